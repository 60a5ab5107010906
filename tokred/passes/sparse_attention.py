"""Sparse attention: every attention core becomes a sparse-pattern attention kernel call.

    torch.compile(model, backend="tokred",
                  options={"sparse_attention": {"pattern": "sink_window", "sinks": 4, "window": 1024}})
    {"pattern": "block_topk", "block": 64, "topk": 16, "sinks": 1, "local": 1}
    {"pattern": "mask", "mask": fn}            # fn(b, h, q_idx, kv_idx) -> bool, FlexAttention-style
    "layers": [0, 3]                            # only these attention layers (default: all)

The token count does not change: each site's SDPA call (or, for eager attention, the output of its
``softmax(q k^T * scale + mask) @ v`` chain, whose dead remainder is erased) is replaced by
``tokred.triton_ops.sparse_attention.sparse_attention(q, k, v, pattern, scale, attn_bias)``.

The rule for the site's own mask: **the pattern is intersected with it**, so a query never sees a key
the model itself masks (padding, causality, the model's own sliding window). Masks that are
constants of the graph (built from index comparisons only, as transformers builds causal masks)
are evaluated once at compile time:

- exactly causal: folded into the pattern (``causal=True``, no bias tensor for the kernel to read);
- causal sliding window w' (Gemma 2/3 sliding layers): with ``sink_window`` and w' <= window the
  site keeps its own window (``sink_window sinks=0 window=w'``; sinks outside it stay masked, as
  the model masks them); with a wider w' the narrower pattern window applies and the model's mask
  is passed on as ``attn_bias`` (the sinks only count where the model's window reaches them);
- anything else constant: passed on as ``attn_bias``.

Masks that depend on the inputs (padding) are passed on as ``attn_bias``. ``sink_window`` needs
causal attention (a bidirectional encoder has no "last ``window`` tokens"); such sites are skipped
with that reason, as are sites whose mask cannot be expressed as an additive or boolean bias
broadcastable to [B, H, Nq, Nk].

Decoding with a KV cache: a site whose keys are ``cat(cache, k_proj(x))`` of the queries' own
hidden states, with fewer queries than keys, is causal self-attention with the queries last (the
kernel's default ``q_offset = Nk - Nq``). Symbolic lengths (Dynamo's dynamic graph for the decode
steps of ``generate``, or ``dynamic=True``) are decided without evaluating a length: a site is
cached self-attention by that structure alone, or self-attention where Nq == Nk holds for every
length; its mask is passed on, not folded; the layout is built in the graph. Mask rules with
symbolic lengths are skipped (their CPU path, flex_attention, does not compile with them). The pass runs after the
token-reducing passes and reads the lengths the graph has then: after pruning, windows and blocks
count the tokens that remain.

GQA: where the site repeats kv heads (repeat_kv's expand + reshape, repeat_interleave) the kernel is
given the un-repeated [B, Hkv, N, D] keys and values and does the grouping itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import networkx as nx
import torch
from torch import fx

from tokred.passes.sparse_site import (
    allowed_from_bias, attends_over_cache, broadcasts, known_true, manual_mask_ops, own_window, size_hint,
    training_dropout, unrepeated_kv, unscaled_query,
)
from tokred.rewriter.analysis.graph import arg, evaluate_constant, shape_of, to_networkx
from tokred.rewriter.analysis.sites import logit_ops_text
from tokred.rewriter.driver import GraphPass, Skip
from tokred.rewriter.report import note_unchanged, unchanged_reason
from tokred.rewriter.surgery import RewriteError
from tokred.rewriter.verify import infer_node

NAME = "sparse_attention"
PATTERNS = ("sink_window", "block_topk", "mask")
_KEYS = {
    "sink_window": {"pattern", "layers", "sinks", "window"},
    "block_topk": {"pattern", "layers", "block", "topk", "sinks", "local"},
    "mask": {"pattern", "layers", "mask"},
}
# the density of a pattern is reported at this many tokens as well as at the graph's own
REPORT_TOKENS = 4096


# ----------------------------------------------------------------------------- options

def _int_option(value: dict, key: str, default: Optional[int], minimum: int) -> int:
    if key not in value:
        if default is None:
            raise ValueError(f"tokred option 'sparse_attention.{key}' is required for pattern "
                             f"{value['pattern']!r}")
        return default
    x = value[key]
    if isinstance(x, bool) or not isinstance(x, int) or x < minimum:
        raise ValueError(f"tokred option 'sparse_attention.{key}' must be an int >= {minimum}, got {x!r}")
    return x


@dataclass(frozen=True)
class SparseOptions:
    """pattern: "sink_window" (sinks, window), "block_topk" (block, topk, sinks, local) or "mask"
    (mask: fn(b, h, q_idx, kv_idx) -> bool); layers: the attention layers to rewrite (None: all).
    Keys of another pattern are None."""

    pattern: str
    layers: Optional[tuple] = None
    sinks: Optional[int] = None
    window: Optional[int] = None
    block: Optional[int] = None
    topk: Optional[int] = None
    local: Optional[int] = None
    mask: Any = None

    @classmethod
    def parse(cls, value: Any) -> "SparseOptions":
        """``{"pattern": ..., <pattern's keys>, "layers": [...]}``; a bad value raises naming the option."""
        if not isinstance(value, dict):
            raise ValueError("tokred option 'sparse_attention' must be a dict like "
                             f"{{'pattern': 'sink_window', 'sinks': 4, 'window': 1024}}, got {value!r}")
        pattern = value.get("pattern")
        if pattern not in PATTERNS:
            raise ValueError(f"tokred option 'sparse_attention.pattern' must be one of {PATTERNS}, got {pattern!r}")
        for key in value:
            if key not in _KEYS[pattern]:
                raise ValueError(f"unknown tokred option 'sparse_attention.{key}' for pattern {pattern!r}; "
                                 f"known: {', '.join(sorted(_KEYS[pattern]))}")
        layers = value.get("layers")
        if layers is not None:
            if not isinstance(layers, (list, tuple)) or not all(
                    isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
                raise ValueError(f"tokred option 'sparse_attention.layers' must be a list of layer indices "
                                 f"(ints >= 0), got {layers!r}")
            layers = tuple(sorted(set(layers)))
        if pattern == "sink_window":
            return cls(pattern, layers, sinks=_int_option(value, "sinks", 4, 0),
                       window=_int_option(value, "window", None, 1))
        if pattern == "block_topk":
            return cls(pattern, layers, block=_int_option(value, "block", 64, 1),
                       topk=_int_option(value, "topk", 16, 1), sinks=_int_option(value, "sinks", 0, 0),
                       local=_int_option(value, "local", 1, 0))
        fn = value.get("mask")
        if not callable(fn):
            raise ValueError(f"tokred option 'sparse_attention.mask' must be a function "
                             f"mask(b, h, q_idx, kv_idx) -> bool tensor, got {fn!r}")
        from tokred.triton_ops.sparse_rule import rule_from_mask_fn

        try:  # the kernels trace it into their rule language: fail now, not at compile time
            rule_from_mask_fn(fn)
        except ValueError as exc:
            raise ValueError(f"tokred option 'sparse_attention.mask': {exc}") from exc
        return cls(pattern, layers, mask=fn)


def make_pattern(opts: SparseOptions, causal: bool, window: Optional[int] = None, sinks: Optional[int] = None):
    """The kernel's SparsePattern for the options (``window``/``sinks`` override sink_window's)."""
    from tokred.triton_ops.sparse_attention import SparsePattern

    kind = opts.pattern
    if kind == "sink_window":
        return SparsePattern(kind=kind, sinks=opts.sinks if sinks is None else sinks,
                             window=opts.window if window is None else window, causal=True)
    if kind == "block_topk":
        return SparsePattern(kind=kind, block=opts.block, topk=opts.topk, sinks=opts.sinks,
                             local=opts.local, causal=causal)
    return SparsePattern(kind=kind, mask_fn=opts.mask, causal=causal)


# ----------------------------------------------------------------------------- pattern arithmetic

def sink_window_density(n_q: int, n_k: int, sinks: int, window: int) -> float:
    """Fraction of the causal (query, key) pairs a sink_window pattern keeps, queries at the end.

    Query i (absolute position p = n_k - n_q + i) keeps keys p - window < j <= p and j < sinks.
    """
    offset = n_k - n_q
    kept = causal = 0
    for i in range(n_q):
        p = offset + i
        in_window = min(window, p + 1)
        kept += in_window + max(0, min(sinks, p + 1 - in_window))
        causal += p + 1
    return kept / causal


def block_topk_density(n_q: int, n_k: int, pattern, causal: bool) -> float:
    """Upper bound on the fraction of attended (query, key) pairs under block_topk: per query
    block, at most ``topk`` key blocks (sink and local blocks counted among them when the kernel
    does; otherwise added), out of the blocks the query block may see."""
    block = pattern.block
    nqb, nkb = math.ceil(n_q / block), math.ceil(n_k / block)
    offset_blocks = (n_k - n_q) // block
    kept = total = 0
    for qb in range(nqb):
        visible = min(nkb, qb + offset_blocks + 1) if causal else nkb
        kept += min(visible, pattern.topk + pattern.sinks + pattern.local)
        total += visible
    return kept / total


def pattern_density(opts: SparseOptions, n_q: int, n_k: int, causal: bool) -> Optional[float]:
    """The pattern's density at these sizes (None where it depends on the data or the function)."""
    if opts.pattern == "sink_window":
        return sink_window_density(n_q, n_k, opts.sinks, opts.window)
    if opts.pattern == "block_topk":
        return block_topk_density(n_q, n_k, make_pattern(opts, causal), causal)
    return None


def describe(opts: SparseOptions, n: int, causal: bool, window: Optional[int] = None, sinks: Optional[int] = None) -> str:
    """A report reason like ``sink_window sinks=4 window=1024 (density 0.27 at N=4096)``."""
    kind = opts.pattern
    if kind == "sink_window":
        sinks = opts.sinks if sinks is None else sinks
        window = opts.window if window is None else window
        head = f"sink_window sinks={sinks} window={window}"
        sizes = sorted({n, REPORT_TOKENS})
        dens = ", ".join(f"density {sink_window_density(m, m, sinks, window):.3g} at N={m}" for m in sizes)
        return f"{head} ({dens})"
    if kind == "block_topk":
        head = (f"block_topk block={opts.block} topk={opts.topk} sinks={opts.sinks} "
                f"local={opts.local}")
        pattern = make_pattern(opts, causal)
        dens = ", ".join(f"density <= {block_topk_density(m, m, pattern, causal):.3g} at N={m}"
                         for m in sorted({n, REPORT_TOKENS}))
        return f"{head} ({dens})"
    name = getattr(opts.mask, "__name__", type(opts.mask).__name__)
    return f"mask {name}" + (" (causal)" if causal else "")


# ----------------------------------------------------------------------------- planning one site

@dataclass(frozen=True)
class Plan:
    """What replaces one site: the kernel call's arguments (q [B, H, Nq, D], k/v [B, Hkv, Nk, D]
    nodes, the pattern, the scale, the mask passed on as ``(node, "bias" | "fill")`` or None) and
    the report line; ``gqa``: the kernel groups the kv heads itself."""

    q: fx.Node
    k: fx.Node
    v: fx.Node
    pattern: Any
    scale: Optional[float]
    bias: Optional[tuple]
    reason: str
    gqa: bool


def plan_site(gm: fx.GraphModule, site, opts: SparseOptions, nxg: Optional[nx.DiGraph] = None):
    """A :class:`Plan` for ``site``, or the reason (str) it cannot be rewritten."""
    nxg = to_networkx(gm.graph) if nxg is None else nxg
    if site.key_layout:
        return site.key_layout
    if site.logit_ops:
        return (f"its logits pass through {logit_ops_text(site)} before the softmax; the sparse "
                f"kernel computes softmax(q k^T * scale) only")
    # lengths as the graph has them now: a token-reducing pass that ran before may have cut them
    q_shape, k_shape = shape_of(site.q), shape_of(site.k)
    if q_shape is None or k_shape is None or len(q_shape) != 4 or len(k_shape) != 4:
        return f"q/k are not [B, H, N, D] (q {q_shape}, k {k_shape})"
    n, n_k = q_shape[2], k_shape[2]
    # symbolic lengths (a dynamic graph, e.g. decode steps over a growing KV cache): decided from
    # the graph's structure and facts true for every length, never by evaluating a size (that
    # would guard the compiled graph on it)
    symbolic = not (isinstance(n, int) and isinstance(n_k, int))
    if symbolic:
        if opts.pattern == "mask":
            return ("symbolic sequence length (dynamic shapes) with a mask rule: its CPU path "
                    "(flex_attention) does not compile with symbolic lengths; compile with dynamic=False")
        cached = attends_over_cache(site)
        if not cached and not known_true(n == n_k):
            return f"symbolic query and key lengths that may differ ({n} queries, {n_k} keys)"
    else:
        cached = n < n_k and attends_over_cache(site)
        if n != n_k and not cached:
            return f"{site.role} ({'1 query' if n == 1 else f'{n} queries'}, {n_k} keys)"
    if training_dropout(site):
        return "attention dropout is active (training)"
    # the site's mask: a node (or None) and how it is applied
    if site.kind == "sdpa":
        if arg(site.node, 5, "is_causal", False) not in (True, False):
            return "is_causal is not a constant"
        mask = arg(site.node, 3, "attn_mask")
        applied = [] if mask is None else [("bias", mask)]
    else:
        applied = manual_mask_ops(site, nxg)
        if applied is None:
            return "the softmax chain holds an op other than scale and mask"
    if len(applied) > 1:
        return f"{len(applied)} masks applied in the softmax chain (only one can be passed on)"
    mask_node, how = (applied[0][1], applied[0][0]) if applied else (None, None)
    if mask_node is not None and not isinstance(mask_node, fx.Node):
        return f"the mask is a constant {type(mask_node).__name__}, not a tensor"
    mask_shape = shape_of(mask_node)
    if mask_node is not None and (mask_shape is None or len(mask_shape) > 4 or not broadcasts(
            mask_shape, (q_shape[0], q_shape[1], n, n_k))):
        return f"the mask of shape {mask_shape} does not broadcast to [B, H, Nq, Nk]"
    # self-attention over a KV cache is causal with the queries last, whatever its mask shows (one
    # decoding query sees every key)
    causal = bool(site.causal) or cached
    kind = opts.pattern
    # a constant mask: fold what the pattern expresses (causal, a narrower sliding window)
    window = sinks = None
    keep_bias = mask_node is not None
    note = ""
    if mask_node is not None:
        # a symbolic graph's mask is not folded: its value at one length says nothing of the others
        value = None if symbolic else evaluate_constant(gm, mask_node, nxg)
        allowed = None
        if value is not None:
            allowed = (~value if value.dtype == torch.bool else None) if how == "fill" else allowed_from_bias(value)
        w = own_window(allowed, n, n_k) if allowed is not None and allowed.shape[-2:] == (n, n_k) else None
        if w is not None:
            causal = True
            if w >= n_k:
                keep_bias, note = False, "; causal mask folded"
            elif kind == "sink_window" and w <= opts.window:
                keep_bias, window, sinks = False, w, 0
                note = f"; keeps its own sliding window {w} (narrower than {opts.window})"
            else:
                note = f"; the model's own sliding window {w} is kept as attn_bias"
        elif allowed is not None and bool(allowed.all()):
            keep_bias, note = False, "; all-true mask dropped"
    if kind == "sink_window" and not causal:
        return "sink_window needs causal attention (this site is bidirectional)"
    if kind == "mask" and opts.mask is None:
        return "no mask function"
    pattern = make_pattern(opts, causal, window=window, sinks=sinks)
    if site.kind == "sdpa":
        scale = arg(site.node, 6, "scale")
        if scale is not None and not isinstance(scale, (int, float)):
            return "the SDPA scale is not a constant"
        q = site.q
    else:
        scale = site.scale if site.scale is not None else 1.0
        q = unscaled_query(site.q)
    gqa_sdpa = site.kind == "sdpa" and bool(site.node.kwargs.get("enable_gqa", False))
    k = site.k if gqa_sdpa else unrepeated_kv(site.k)
    v = site.v if gqa_sdpa else unrepeated_kv(site.v)
    if (k is site.k) != (v is site.v):  # only one of them un-repeated: keep both as they are
        k, v = site.k, site.v
    if shape_of(q) is None or len(shape_of(q)) != 4 or len(shape_of(k)) != 4:
        return f"q/k are not [B, H, N, D] (q {shape_of(q)}, k {shape_of(k)})"
    bias = None
    if keep_bias:
        bias = (mask_node, how)
    if symbolic:
        note += f"; symbolic length {n_k} (density at the example's N)"
    reason = describe(opts, size_hint(n_k, REPORT_TOKENS), causal, window=window, sinks=sinks) + note
    return Plan(q, k, v, pattern, scale, bias, reason, gqa=k is not site.k or gqa_sdpa)


def invert_mask(mask: torch.Tensor) -> torch.Tensor:
    """masked_fill's mask (True = masked) -> an SDPA-style boolean mask (True = may attend)."""
    return ~mask


# ----------------------------------------------------------------------------- identity

def identity_reason(plan: Plan) -> Optional[str]:
    """Why ``plan``'s pattern keeps every pair of the site's own causal (or full) attention, e.g.
    ``window 2000 >= the 1024 tokens: identity``; None where it drops some, or at symbolic lengths."""
    from tokred.triton_ops.sparse_cost import identity_reason as reason

    shapes = [shape_of(n) for n in (plan.q, plan.k, plan.v)]
    if any(s is None or not all(isinstance(d, int) for d in s) for s in shapes):
        return None
    return reason(plan.pattern, *shapes)


def _unchanged(report, opts: SparseOptions) -> str:
    """Why no site was rewritten, in words."""
    sites, layers = report.attention_sites, opts.layers
    if sites and layers is not None and not any(s.layer in layers for s in sites):
        present = sorted({s.layer for s in sites if s.layer is not None})
        return f"layers {list(layers)} select none of the graph's attention layers {present}"
    return unchanged_reason(report, NAME) or "no site was rewritten"


# ----------------------------------------------------------------------------- the pass

class SparseAttentionCall:
    """The graph's call target: ``sparse_attention`` with a fixed pattern.

    The pattern is held here rather than written into the graph as a constant argument: FX prints
    constants into the graph's Python code, and a pattern holding a mask function has no source
    form. q [B, H, Nq, D], k/v [B, Hkv, Nk, D] -> [B, H, Nq, Dv].
    """

    def __init__(self, pattern):
        self.pattern = pattern
        self.__name__ = f"sparse_attention_{pattern.kind}"

    def __call__(self, q, k, v, scale=None, attn_bias=None):
        from tokred.triton_ops.sparse_attention import sparse_attention

        return sparse_attention(q, k, v, self.pattern, scale=scale, attn_bias=attn_bias)

    def flops(self, q, k, v, scale=None, attn_bias=None) -> int:
        """Its cost for the report (tokred/rewriter/flops.py): the formula FlopCounterMode counts
        ``tokred::sparse_attention`` by (``sparse_cost``), at the example sizes."""
        from tokred.triton_ops.sparse_cost import pattern_flops

        sizes = [tuple(size_hint(s, REPORT_TOKENS) for s in t.shape) for t in (q, k, v)]
        return pattern_flops(self.pattern, *sizes)

    def __repr__(self) -> str:
        return f"SparseAttentionCall({self.pattern})"


def _insert_call(gm: fx.GraphModule, site, plan: Plan) -> fx.Node:
    graph = gm.graph
    with graph.inserting_before(site.node):
        bias = None
        if plan.bias is not None:
            node, how = plan.bias
            bias = graph.call_function(invert_mask, (node,)) if how == "fill" else node
        call = graph.call_function(SparseAttentionCall(plan.pattern), (plan.q, plan.k, plan.v),
                                   {"scale": plan.scale, "attn_bias": bias})
    call.meta["nn_module_stack"] = dict(site.node.meta.get("nn_module_stack", {}))
    site.node.replace_all_uses_with(call)
    return call


def erase_dead(graph: fx.Graph, node: fx.Node) -> None:
    """Erase ``node`` and, transitively, what only it used (the dead softmax chain, a folded mask).

    Not ``graph.eliminate_dead_code()``: that erases every dead node of the graph, and Dynamo's
    graphs hold dead in-place calls on inputs (a cache update) that fx cannot tell are impure."""
    frontier, erased = [node], set()
    while frontier:
        cur = frontier.pop()
        if cur in erased or cur.users or cur.op in ("placeholder", "output", "get_attr") \
                or cur.is_impure() or str(cur.target).endswith("_"):
            continue
        inputs = cur.all_input_nodes
        graph.erase_node(cur)
        erased.add(cur)
        frontier.extend(inputs)


class SparseAttention(GraphPass):
    """Every (selected) attention core becomes the sparse kernel; every site is reported."""

    name, Options = NAME, SparseOptions

    def match(self) -> list:
        layers = self.opts.layers
        self.patterns, self.identities, self.replaced = [], [], []
        return [s for s in self.facts.attention_sites if layers is None or s.layer in layers]

    def plan(self, site):
        plan = plan_site(self.gm, site, self.opts)
        return Skip(plan) if isinstance(plan, str) else plan

    def apply(self, site, plan: Plan) -> str:
        call = _insert_call(self.gm, site, plan)
        if self.options.verify:
            _check_site(call, site)
        self.replaced.append(site.node)
        self.patterns.append(plan.pattern)
        self.identities.append(identity_reason(plan))
        return plan.reason + ("; GQA in the kernel" if plan.gqa else "")

    def finish(self) -> None:
        for node in self.replaced:
            erase_dead(self.gm.graph, node)
        if not self.replaced:
            note_unchanged(self.report, NAME, _unchanged(self.report, self.opts))
            return
        if all(self.identities):  # rewritten, but every site computes what the model did
            note_unchanged(self.report, NAME, "; ".join(dict.fromkeys(self.identities)))
        layers = self.opts.layers
        layers_note = "all layers" if layers is None else f"layers {list(layers)}"
        inputs = self.example_inputs
        on_cpu = inputs is not None and all(t.device.type == "cpu" for t in inputs if isinstance(t, torch.Tensor))
        from tokred.triton_ops.sparse_attention import cpu_runtime

        runtime = f"; {cpu_runtime(self.patterns[0])}" if on_cpu else ""
        self.report.note(f"{NAME}: {len(self.replaced)} sites use the {self.opts.pattern} kernel "
                         f"({layers_note}){runtime}")


def _check_site(call: fx.Node, site) -> None:
    """The kernel call gives the shape of the attention it replaces (fake tensors, this node only)."""
    after = infer_node(call)
    before = shape_of(site.node)
    after = tuple(after.shape) if isinstance(after, torch.Tensor) else None
    if before is None or after is None or len(before) != len(after) or not all(
            known_true(a == b) for a, b in zip(before, after)):
        raise RewriteError(f"the rewritten graph does not check: {call.name} has shape {after}, "
                           f"the attention it replaces {before}")
