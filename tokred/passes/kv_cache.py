"""KV-cache compression: the prefill runs on every token, but each layer's cache keeps fewer.

    torch.compile(model, backend="tokred", options={"kv_cache": {"method": "snapkv", "keep": 0.5}})

In a decoder's prefill graph (its forward over the prompt with ``use_cache=True``) every layer's
keys and values leave the graph into the model's cache. This pass cuts those outputs, per layer and
per KV head, to ``keep`` of the prompt's N tokens (a fraction, or a count); the attention of the
prefill itself is left as it was (SDPA stays SDPA), so the prefill's logits do not change. The
scores are small side products of each layer (the queries and keys it already has):

  snapkv     attention of the last ``window`` prompt tokens, pooled over ``pool`` neighbours (SnapKV)
  tova       attention of the last token, averaged over all heads: one ranking per layer (TOVA)
  h2o        attention accumulated over every prompt token, blockwise, never an N x N map (H2O)
  knorm      key norm, attention-free: small keys are kept (key-norm press)
  streaming  the first ``sinks`` tokens and the most recent ones (StreamingLLM)
  random     a seeded random ranking: the baseline every method must beat

Always kept: the first ``sinks`` and the last ``protect_last`` tokens (defaults per method: the
observation window for snapkv and h2o, the last token for tova, 4 sinks for streaming). Budgets:
``layers="pyramid"`` gives early layers more and late layers less, the same total (PyramidKV: a
linear schedule from 1.5x to 0.5x the uniform budget); ``heads="shared"`` keeps the same positions
in every KV head of a layer, chosen by the scores averaged over its heads (TOVA's own rule, and on
SmolLM2 passkey retrieval far better for SnapKV than its per-head choice). ``merge=True`` folds every evicted entry
into its most similar kept one instead of dropping it (D2O, KVMerger).

Kept keys keep the rotary position they were computed at, and the model's generate() passes the
positions N, N+1, ... to the decode steps, which attend to the shorter cache; sites that read an
attention mask (a padded batch, eager attention) are skipped with the reason, because a decode
step's mask covers all N + t keys. Sliding-window layers (Gemma3's local layers) return only their
window's last entries: they are left as they are, with the reason. The report says, per layer, the
KV tokens kept and the bytes saved.

``heads="adaptive"`` (AdaKV) stores each layer at the most one head may keep, zero-padded; in the
decode steps' graphs this pass then gives every SDPA call a mask that blocks the zero keys.
``decode={"every", "max"}``: in a graph of several tokens over a cache (the chunk
``tokred.CompressedContext`` feeds again once the cache holds max + every), the returned cache is
cut to ``max`` entries, scored by that chunk's queries.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import fx

from tokred.passes import kv_scores
from tokred.passes.kv_options import (  # noqa: F401  (KVCacheOptions, layer_budgets: the pass's API)
    ADAPTIVE_FLOOR,
    ATTENTION_METHODS,
    KVCacheOptions,
    layer_budgets,
)
from tokred.passes.prune_graph import getitem
from tokred.rewriter.analysis.graph import arg, example_value, is_call, shape_of
from tokred.rewriter.analysis.masks import reads_padding, site_masks
from tokred.rewriter.driver import GraphPass, Keep, Skip
from tokred.rewriter.surgery import output_positions

NAME = "kv_cache"
# how far a cached key or value may be from the node the attention reads (repeat_kv's
# reshape(expand(x[:, :, None])) is three ops)
LAYOUT_OPS = ("reshape", "view", "expand", "unsqueeze", "contiguous", "repeat_interleave", "clone")
LAYOUT_DEPTH = 6


@dataclass(frozen=True)
class KVPlan:
    """One layer's cache cut: ``n`` entries per KV head become ``kept`` (the first ``sinks`` and
    last ``protect_last`` among them), stored in ``stored`` slots per head (``kept``; with adaptive
    heads, the most one head may keep: the others' free slots are zero padding, ``floor`` the
    fewest a head keeps); ``bytes_before`` / ``bytes_after``: the layer's K and V as stored."""

    layer: int
    method: str
    n: Optional[int]
    kept: Optional[int]
    sinks: int
    protect_last: int
    kv_heads: int
    bytes_before: int
    bytes_after: int
    stored: Optional[int]
    floor: int = 0
    decode: bool = False  # a cut during decode (the runtime's re-fed chunk), not the prefill's
    # a symbolic token count: n, kept and stored are None, and each call keeps kept_count(fraction, N)
    fraction: Any = None


@dataclass(frozen=True)
class PaddingPlan:
    """A decode step over a cache whose heads keep different counts (heads="adaptive"): the SDPA
    call at ``layer`` is given a mask that blocks the padding slots (zero keys)."""

    layer: Optional[int]
    heads: int
    keys: int


@dataclass(frozen=True)
class CacheOutputs:
    """The nodes a site's cache is returned through (graph outputs): keys [B, Hkv, N, D] and values."""

    keys: fx.Node
    values: fx.Node


def _output_leaves(graph: fx.Graph) -> set:
    out = next(n for n in reversed(graph.nodes) if n.op == "output")
    return {leaf for leaf in torch.utils._pytree.tree_leaves(out.args[0]) if isinstance(leaf, fx.Node)}


def _new_axes_only(node: fx.Node) -> bool:
    """``node`` is ``x[:, :, None]``-like: an index of full slices, None and ``...`` (no data chosen)."""
    if not (is_call(node, operator.getitem, "__getitem__") and len(node.args) == 2):
        return False
    index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    full = lambda i: i is None or i is Ellipsis or (isinstance(i, slice) and i == slice(None))
    return all(full(i) for i in index)


def cached_tensor(node: fx.Node, outputs: set) -> Optional[fx.Node]:
    """The graph output that holds ``node``'s cache entries: ``node`` itself, or the tensor it was
    laid out from (GQA's repeat_kv) within LAYOUT_DEPTH layout ops; None if it is not returned."""
    for _ in range(LAYOUT_DEPTH + 1):
        if node in outputs:
            return node
        if not (isinstance(node, fx.Node) and (is_call(node, *LAYOUT_OPS) or _new_axes_only(node))
                and node.args and isinstance(node.args[0], fx.Node)):
            return None
        node = node.args[0]
    return None


def _trailing_slice(node: fx.Node) -> Optional[int]:
    """``w`` where ``node`` is ``x[:, :, -w:]`` (the last w entries along the cache's token axis)."""
    if not (is_call(node, operator.getitem, "__getitem__") and len(node.args) == 2
            and isinstance(node.args[1], tuple) and len(node.args[1]) >= 3):
        return None
    index = node.args[1]
    full = lambda i: i is Ellipsis or (isinstance(i, slice) and i == slice(None))
    cut = index[2]
    if (all(full(i) for i in index[:2] + index[3:]) and isinstance(cut, slice) and cut.stop is None
            and cut.step is None and isinstance(cut.start, int) and cut.start < 0):
        return -cut.start
    return None


def sliding_window_cache(node: fx.Node, outputs: set) -> Optional[int]:
    """The window w of a sliding-window layer's cache: the graph returns only the last w entries of
    the tensor ``node`` was laid out from (transformers' sliding cache layers); None otherwise."""
    for _ in range(LAYOUT_DEPTH + 1):
        for user in node.users:
            w = _trailing_slice(user)
            if w is not None and user in outputs:
                return w
        if not (is_call(node, *LAYOUT_OPS) or _new_axes_only(node)) or not node.args \
                or not isinstance(node.args[0], fx.Node):
            return None
        node = node.args[0]
    return None


def _nbytes(shape: tuple, dtype) -> int:
    count = 1
    for s in shape:
        count *= int(s)
    return count * torch.empty((), dtype=dtype).element_size()


class KVCache(GraphPass):
    """Cut each layer's returned KV cache; every attention site is reported."""

    name, Options = NAME, KVCacheOptions

    def idle(self) -> str:
        outputs = _output_leaves(self.gm.graph)
        self.caches, self.sliding = {}, {}
        for site in self.facts.attention_sites:
            keys, values = cached_tensor(site.k, outputs), cached_tensor(site.v, outputs)
            if keys is not None and values is not None:
                self.caches[id(site)] = CacheOutputs(keys, values)
            elif isinstance(site.k, fx.Node) and sliding_window_cache(site.k, outputs) is not None:
                self.sliding[id(site)] = sliding_window_cache(site.k, outputs)
        sites = [s for s in self.facts.attention_sites if id(s) in self.caches]
        if sites and all(self._decode_step(s) and not self._chunk(s) for s in sites) and self.opts.heads != "adaptive":
            return "a decode step (new tokens over a cache): the cache was compressed in the prefill"
        return ""

    def _decode_step(self, site) -> bool:
        q = shape_of(site.q)
        return q is not None and len(q) == 4 and q[2] != self._length(site)

    def _chunk(self, site) -> bool:
        """A forward of several tokens over a cache, with ``decode`` set: the runtime's re-fed chunk."""
        q = shape_of(site.q)
        return self.opts.decode is not None and self._decode_step(site) and isinstance(q[2], int) and q[2] > 1

    def match(self) -> list:
        prefill = [s for s in self.facts.attention_sites
                   if id(s) in self.caches and (not self._decode_step(s) or self._chunk(s))]
        opts = self.opts
        always = opts.sinks + opts.protect_last
        n = max((self._length(s) for s in prefill), default=0)
        self.prefill = [id(s) for s in prefill]
        self.budgets = {}  # a symbolic token count: each call's count is computed in the graph
        if isinstance(n, int):
            self.budgets = dict(zip(self.prefill, layer_budgets(opts.keep, n, len(prefill), opts.layers, always)))
        self.changed_outputs = set()
        self.bytes = [0, 0]
        self.padding_masks = self.decode_cuts = 0
        return list(self.facts.attention_sites)

    def _length(self, site) -> Optional[int]:
        shape = shape_of(self.caches[id(site)].keys)
        return shape[2] if shape is not None and len(shape) == 4 else None

    def plan(self, site):
        opts = self.opts
        if id(site) in self.sliding:
            return Keep(f"a sliding-window layer: its cache already holds only the last {self.sliding[id(site)]} "
                        f"tokens (the model's own window), left as it is")
        if id(site) not in self.caches:
            return Skip("the layer returns no KV cache (called without use_cache, or not a decoder layer)")
        keys, values = shape_of(self.caches[id(site)].keys), shape_of(self.caches[id(site)].values)
        q = shape_of(site.q)
        n = self._length(site)
        if opts.heads == "adaptive" and q is not None and n is not None and self._decode_step(site):
            return self._padding_plan(site)
        if q is None or values is None or n is None:
            return Skip("the layer's query or cache shapes are unknown (no shape metadata)")
        symbolic = not all(isinstance(s, int) for s in (*q, *keys, *values))
        chunk = self._chunk(site)
        if q[2] != n and not chunk:
            return Keep(f"a decode step ({q[2]} new over {n} cached): the cache was compressed in the prefill")
        if chunk and n <= opts.decode.max:
            return Keep(f"{q[2]} tokens over a cache of {n - q[2]}: within decode.max={opts.decode.max}")
        masks = site_masks(site)
        if masks and (not chunk or any(reads_padding(m) for _, m in masks)):
            return Skip("the layer reads an attention mask (a padded batch, or eager attention): a decode "
                        "step's mask would cover all N + t keys, not the compressed cache; use "
                        "attn_implementation='sdpa' and unpadded prompts")
        if not site.causal and not chunk:  # a chunk's causality is its mask's (built from positions)
            return Skip("bidirectional attention: a KV cache is a decoder's")
        if opts.method in ATTENTION_METHODS and site.logit_ops:
            return Skip(f"{opts.method} recomputes plain scaled attention; this layer's logits also go through "
                        f"other ops")
        if symbolic:
            return self._symbolic_plan(site, keys)
        kept = opts.decode.max if chunk else self.budgets[id(site)]
        always = opts.sinks + opts.protect_last
        if kept < min(always, n):
            return Skip(f"keep={opts.keep} leaves {kept} entries, fewer than the {always} always kept "
                        f"(sinks {opts.sinks} + protect_last {opts.protect_last})")
        value = example_value(self.caches[id(site)].keys)
        dtype = value.dtype if isinstance(value, torch.Tensor) else torch.float32
        before = _nbytes(keys, dtype) + _nbytes(values, dtype)
        stored, floor = kept, 0
        if opts.heads == "adaptive":
            stored = min(n, int(math.ceil(opts.head_max * kept)))
            floor = min(kept, max(min(always, n), int(round(ADAPTIVE_FLOOR * kept))))
        return KVPlan(layer=self.prefill.index(id(site)), method=opts.method, n=n, kept=kept,
                      sinks=min(opts.sinks, n), protect_last=min(opts.protect_last, n), kv_heads=keys[1],
                      bytes_before=before, bytes_after=before * stored // n, stored=stored, floor=floor,
                      decode=chunk)

    def _symbolic_plan(self, site, keys: tuple):
        """A prefill compiled for every token count (``dynamic=True``, or Dynamo's automatic dynamic
        shapes after a second prompt length): the kept count is computed in the graph at each call."""
        opts = self.opts
        refusals = ((opts.layers == "pyramid", "PyramidKV's per-layer budgets"),
                    (opts.heads == "adaptive", "adaptive heads' stored length"),
                    (opts.method == "random", "the random baseline's seeded table"),
                    (self._chunk(site) or not isinstance(keys[1], int), "the decode budget's re-fed chunk"))
        for refused, what in refusals:
            if refused:
                return Skip(f"the token count is dynamic (a symbolic shape), and {what} needs it at "
                            f"compile time: compile with dynamic=False to compress the cache")
        return KVPlan(layer=self.prefill.index(id(site)), method=opts.method, n=None, kept=None, sinks=opts.sinks,
                      protect_last=opts.protect_last, kv_heads=keys[1], bytes_before=0, bytes_after=0, stored=None,
                      fraction=opts.keep)

    def _padding_plan(self, site):
        """The decode-step half of heads="adaptive": SDPA learns which cache slots are padding."""
        if site.kind != "sdpa":
            return Skip("heads='adaptive': a decode step must block the cache's padding slots, and this "
                        "layer's attention is written out (eager), not SDPA")
        if arg(site.node, 5, "is_causal", False):
            return Skip("heads='adaptive': this decode step's SDPA is called with is_causal=True, which "
                        "takes no mask to block the cache's padding slots")
        return PaddingPlan(layer=site.layer, heads=site.heads, keys=self._length(site))

    def apply(self, site, plan) -> str:
        if isinstance(plan, PaddingPlan):
            return self._mask_padding(site, plan)
        graph, opts, cache = self.gm.graph, self.opts, self.caches[id(site)]
        out = next(n for n in reversed(graph.nodes) if n.op == "output")
        with graph.inserting_before(out):
            scores = self._scores(graph, site, plan, cache.keys)
            if opts.heads == "adaptive":
                chosen = graph.call_function(kv_scores.select_adaptive, (scores, plan.kept, plan.sinks,
                                                                         plan.protect_last, plan.floor, plan.stored))
                index, valid = (graph.call_function(getitem, (chosen, i)) for i in range(2))
                keys = graph.call_function(kv_scores.gather_valid, (cache.keys, index, valid))
                values = graph.call_function(kv_scores.gather_valid, (cache.values, index, valid))
            elif opts.merge:
                index = self._select(graph, scores, plan)
                merged = graph.call_function(kv_scores.merge_evicted, (cache.keys, cache.values, index))
                keys, values = (graph.call_function(getitem, (merged, i)) for i in range(2))
            else:
                index = self._select(graph, scores, plan)
                keys = graph.call_function(kv_scores.gather_kept, (cache.keys, index))
                values = graph.call_function(kv_scores.gather_kept, (cache.values, index))
        for node, new in ((cache.keys, keys), (cache.values, values)):
            node.replace_all_uses_with(new, delete_user_cb=lambda user: user.op == "output")
        self.changed_outputs |= {keys, values}
        self.cache_outputs = output_positions(graph, self.changed_outputs)
        if not plan.decode:
            self.bytes[0] += plan.bytes_before
            self.bytes[1] += plan.bytes_after
        merged = ", merged" if opts.merge else ""
        if plan.fraction is not None:
            return (f"kv_cache {plan.method} keep={opts.keep}{merged}: layer {_layer(site, plan)} caches "
                    f"keep={opts.keep} of each call's tokens x {plan.kv_heads} KV heads (a symbolic token count: "
                    f"counted per call)")
        if plan.decode:
            self.decode_cuts += 1
            return (f"kv_cache {plan.method} decode: layer {_layer(site, plan)}'s cache cut from {plan.n} to "
                    f"{plan.kept} entries x {plan.kv_heads} KV heads (decode.max), scored by the last "
                    f"{shape_of(site.q)[2]} tokens")
        if opts.heads == "adaptive":
            return (f"kv_cache {plan.method} keep={opts.keep}, adaptive heads: layer {_layer(site, plan)} caches "
                    f"{plan.kept * plan.kv_heads} of {plan.n * plan.kv_heads} entries over {plan.kv_heads} KV heads "
                    f"({plan.floor} to {plan.stored} a head, stored in {plan.stored} slots), "
                    f"{_mb(plan.bytes_before - plan.bytes_after)} saved")
        return (f"kv_cache {plan.method} keep={opts.keep}{merged}: layer {_layer(site, plan)} caches {plan.kept} of "
                f"{plan.n} tokens x {plan.kv_heads} KV heads, {_mb(plan.bytes_before - plan.bytes_after)} saved")

    def _mask_padding(self, site, plan: PaddingPlan) -> str:
        node = site.node
        mask = arg(node, 3, "attn_mask")
        with self.gm.graph.inserting_before(node):
            new = self.gm.graph.call_function(kv_scores.mask_padding, (mask, site.k, plan.heads))
        if len(node.args) > 3:
            node.update_arg(3, new)
        else:
            node.update_kwarg("attn_mask", new)
        self.padding_masks += 1
        layer = f"layer {plan.layer}" if plan.layer is not None else site.module
        return f"kv_cache adaptive heads: {layer}'s decode step blocks the cache's padding slots"

    def _select(self, graph: fx.Graph, scores: fx.Node, plan: KVPlan) -> fx.Node:
        """The kept positions [B, Hkv, kept]: a count fixed at compile time, or computed per call."""
        if plan.fraction is not None:
            return graph.call_function(kv_scores.select_fraction,
                                       (scores, plan.fraction, plan.sinks, plan.protect_last))
        return graph.call_function(kv_scores.select_kept, (scores, plan.kept, plan.sinks, plan.protect_last))

    def _scores(self, graph: fx.Graph, site, plan: KVPlan, keys: fx.Node) -> fx.Node:
        opts = self.opts
        scale = site.scale if site.scale is not None else site.head_dim ** -0.5
        if opts.method == "snapkv":
            scores = graph.call_function(kv_scores.window_attention, (site.q, keys, opts.window, scale))
        elif opts.method == "tova":
            scores = graph.call_function(kv_scores.window_attention, (site.q, keys, 1, scale))
        elif opts.method == "h2o":
            scores = graph.call_function(kv_scores.accumulated_attention, (site.q, keys, scale))
        elif opts.method == "knorm":
            scores = graph.call_function(kv_scores.key_norm_scores, (keys,))
        elif opts.method == "streaming":
            scores = graph.call_function(kv_scores.recency_scores, (keys,))
        else:  # random: a seeded table per layer, a constant of the graph
            generator = torch.Generator().manual_seed(opts.seed + plan.layer)
            table = torch.rand(plan.kv_heads * plan.n, generator=generator)
            scores = graph.call_function(kv_scores.constant_scores, (keys, tuple(table.tolist())))
        if opts.heads == "shared":
            scores = graph.call_function(kv_scores.head_mean, (scores,))
        if opts.pool > 1:
            scores = graph.call_function(kv_scores.pooled, (scores, opts.pool))
        return scores

    def finish(self) -> None:
        cut = len(self.rewritten) - self.padding_masks - self.decode_cuts
        if self.decode_cuts:
            self.report.note(f"kv_cache decode: {self.decode_cuts} layers' caches cut back to decode.max="
                             f"{self.opts.decode.max}")
        if self.padding_masks:
            self.report.note(f"kv_cache adaptive heads: {self.padding_masks} decode-step attentions block their "
                             f"cache's padding slots")
        if not cut:
            return
        before, after = self.bytes
        if not before:  # symbolic token counts: the bytes depend on each call
            self.report.note(f"kv_cache: {cut} layers' caches cut to keep={self.opts.keep} of each call's tokens "
                             f"(a symbolic token count)")
            return
        self.report.kv_cache_bytes = (self.report.kv_cache_bytes[0] + before, self.report.kv_cache_bytes[1] + after)
        self.report.note(f"kv_cache: {cut} layers' caches cut, {_mb(before)} -> {_mb(after)} "
                         f"after the prefill ({after / before:.2f}x)")
        if self.opts.decode is not None:
            self.report.note(f"kv_cache.decode (max {self.opts.decode.max}, every {self.opts.decode.every}) is kept "
                             f"by tokred.CompressedContext, which feeds the chunks this forward cuts; model.generate "
                             f"decodes on the prefill's cut alone")


def _layer(site, plan: KVPlan) -> int:
    """The model's layer index of ``site`` (its count among the prefill's cut layers if unknown)."""
    return site.layer if site.layer is not None else plan.layer


def _mb(n: int) -> str:
    return f"{n / 2 ** 20:.2f} MiB" if n >= 2 ** 20 else f"{n / 2 ** 10:.1f} KiB"
