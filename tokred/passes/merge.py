"""Token merging (ToMe): bipartite soft matching in every block, at graph level.

    torch.compile(model, backend="tokred", options={"merge": {"r": 8}})

Global mode (ToMe): in each block, between the attention residual add and the MLP, ``r`` tokens are
merged by bipartite soft matching: the tokens are split alternately into sets A and B, each A token
is matched to its most similar B token (cosine similarity of the attention keys, averaged over
heads), and the ``r`` best-matched A tokens are merged into their B tokens as size-weighted averages.
Sizes are tracked through the graph; with ``prop_attn`` later attention adds ``log(size)`` to its
logits (through SDPA's additive mask, so SDPA is kept). Protected tokens (class, distillation and
register tokens found by the analysis, read-out positions) and, in padded encoder batches, tokens of
different padding status never match. After the last block every original position takes its
merged token's value (unmerge), so the outputs keep their shapes.

How protected tokens are kept out (``protect``, see :func:`.merge_graph.protected_split`):

- ``"tome"`` (default): ToMe's own partition (facebookresearch/ToMe, ``bipartite_soft_matching``).
  A and B alternate over *all* tokens, protected ones included; a protected A token has its row of
  scores at -inf (ToMe's class token), a protected B token its column (ToMe's distillation token),
  so neither is ever merged; the protected tokens stay first, in their order (ToMe's output order
  ``[class, dist, kept A, B]``). With one protected token (a ViT's class token) token 1 is in B,
  token 2 in A, and so on. With no protected token the kept A tokens come in the order of their
  best score, descending, as ToMe's ``class_token=False`` leaves them; otherwise in A order.
  ToMe's code knows at most a class and a distillation token; for more (registers) the same rule
  is applied to each of them (ToMe itself would merge the registers).
- ``"set_aside"``: the protected tokens are taken out before the split, which then starts at the
  first unprotected token. The same as ``"tome"`` for an even number of protected tokens (a class
  and a distillation token); for an odd number (a class token; a class token and 4 registers) the
  unprotected tokens change sets.

Local mode (tomesd): before the attention and before the MLP of each block the branch input is
merged (metric: the hidden states themselves) and the branch output is unmerged before its residual
add; the residual stream keeps all tokens. ``protect`` applies there too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import fx

from tokred.passes.merge_graph import (
    add_key_bias, compose_dest, getitem, head_mean, merge_groups, merged_count, size_bias, tome_step,
)
from tokred.rewriter import tokens
from tokred.rewriter.analysis.graph import is_symbolic, shape_of, size_key
from tokred.rewriter.analysis.masks import site_masks
from tokred.rewriter.analysis.sites import is_projection_node, projection_input
from tokred.rewriter.driver import GraphPass, Keep, Skip
from tokred.rewriter.report import SKIPPED
from tokred.rewriter.surgery import Reduction, RewriteError, cut_tokens, mask_node, record_each_run

NAME = "merge"
SCHEDULES = ("constant", "decreasing")
MODES = ("global", "local")
PROTECT = ("tome", "set_aside")


# ----------------------------------------------------------------------------- options

@dataclass(frozen=True)
class MergeOptions:
    """r: tokens merged per block (an int, spread by ``schedule``, or one per block); mode:
    "global" (ToMe) or "local" (tomesd); protect: "tome" or "set_aside" (module docstring);
    prop_attn: proportional attention (default: on in global mode); trace_source: record where
    each original token went (tokred.explain)."""

    r: Any = 0
    schedule: str = "constant"
    mode: str = "global"
    protect: str = "tome"
    prop_attn: bool = True
    trace_source: bool = False

    @classmethod
    def parse(cls, value: Any) -> "MergeOptions":
        """``{"r": int | list[int], "schedule", "prop_attn", "mode", "protect", "trace_source"}``; an int is r."""
        if isinstance(value, bool) or not isinstance(value, (int, dict)):
            raise ValueError(f"tokred option 'merge' must be a dict like {{'r': 8}} or an int r, got {value!r}")
        if isinstance(value, int):
            value = {"r": value}
        known = {"r", "schedule", "prop_attn", "mode", "protect", "trace_source"}
        for key in value:
            if key not in known:
                raise ValueError(f"unknown tokred option 'merge.{key}'; known: {', '.join(sorted(known))}")
        r = value.get("r", 0)
        if isinstance(r, bool) or not (isinstance(r, int) or (isinstance(r, (list, tuple)) and all(
                isinstance(x, int) and not isinstance(x, bool) for x in r))):
            raise ValueError(f"tokred option 'merge.r' must be an int or a list of ints (one per block), got {r!r}")
        if any(x < 0 for x in (r if isinstance(r, (list, tuple)) else [r])):
            raise ValueError(f"tokred option 'merge.r' must be >= 0, got {r!r}")
        schedule = value.get("schedule", "constant")
        if schedule not in SCHEDULES:
            raise ValueError(f"tokred option 'merge.schedule' must be one of {SCHEDULES}, got {schedule!r}")
        if isinstance(r, (list, tuple)) and "schedule" in value:
            raise ValueError("tokred option 'merge.schedule' applies to an int r, not to a per-block list")
        mode = value.get("mode", "global")
        if mode not in MODES:
            raise ValueError(f"tokred option 'merge.mode' must be one of {MODES}, got {mode!r}")
        protect = value.get("protect", "tome")
        if protect not in PROTECT:
            raise ValueError(f"tokred option 'merge.protect' must be one of {PROTECT}, got {protect!r}")
        for flag in ("prop_attn", "trace_source"):
            if flag in value and not isinstance(value[flag], bool):
                raise ValueError(f"tokred option 'merge.{flag}' must be True or False, got {value[flag]!r}")
        return cls(r=tuple(r) if isinstance(r, (list, tuple)) else r, schedule=schedule, mode=mode,
                   protect=protect, prop_attn=value.get("prop_attn", mode == "global"),
                   trace_source=value.get("trace_source", False))


def r_per_block(r, schedule: str, blocks: int) -> list:
    """r for each block: a list as given, or an int spread by the schedule.

    "constant": r in every block. "decreasing": linearly from 2r down to 0 (the same total as
    constant, more merging early where tokens are most redundant).
    """
    if isinstance(r, (list, tuple)):
        if len(r) != blocks:
            raise ValueError(f"tokred option 'merge.r' lists {len(r)} values but the model has {blocks} blocks")
        return list(r)
    if schedule == "constant" or blocks == 1:
        return [r] * blocks
    return [int(round(2 * r * (blocks - 1 - i) / (blocks - 1))) for i in range(blocks)]


# ----------------------------------------------------------------------------- the pass

@dataclass(frozen=True)
class LocalBranch:
    """tomesd's merge of one branch: its input ``start`` and output ``end`` [B, n, C] (graph
    nodes), ``r`` of its ``n`` tokens merged between them."""

    name: str
    start: fx.Node
    end: fx.Node
    n: int
    r: int


@dataclass(frozen=True)
class MergePlan:
    """One block's merge: ``r`` of its ``n`` tokens (global mode), or, in local mode, each branch
    as a :class:`LocalBranch`; ``prefix`` leading tokens protected. ``symbolic``: n is a symbolic
    token count's size key, and each call merges min(r, (N - prefix) // 2) of its own N."""

    block: int
    r: int
    n: Any
    prefix: int
    branches: tuple = ()
    symbolic: bool = False


@dataclass
class MergeReduction(Reduction):
    """A ToMe merge at a block's mid point, with what the next block's merge reads: the token
    sizes [B, M, 1], matching groups [B, M] and (trace_source) the map from original positions."""

    size: Optional[fx.Node] = None
    group: Optional[fx.Node] = None
    source: Optional[fx.Node] = None


class Merge(GraphPass):
    """Merge tokens in every block that can take it; every site is reported."""

    name, Options = NAME, MergeOptions

    def match(self) -> list:
        blocks = self.facts.blocks
        self.rs = r_per_block(self.opts.r, self.opts.schedule, len(blocks))
        self.prefix = self.facts.protected_tokens
        self.last: Optional[MergeReduction] = None  # the latest merge (sizes, groups, sources)
        self.last_stack = 0  # the stack of blocks the latest merge is on
        self.sizes_before = {}  # block index -> the size node its attention reads (prop_attn)
        return list(blocks)

    def plan(self, block):
        site = block.attention
        if self.last is not None and self.last_stack != block.stack:  # another residual stream
            self.last = None
        if self.last is not None:
            self.sizes_before[block.index] = self.last.size
        reason = _cannot_merge(block, site)
        point = merge_point(block)
        symbolic = not reason and is_symbolic(size_key(shape_of(point)[1]))
        if self.opts.mode == "local":
            reason = reason or block.unsupported
            reason = reason or ("the query projection was not found" if site.q_proj is None else "")
            reason = reason or ("the token count is dynamic (a symbolic shape): r is taken of a fixed N at "
                                "compile time; compile with dynamic=False, or use mode 'global'" if symbolic else "")
            if reason:
                return Skip(f"(local) {reason}")
            branches = tuple(LocalBranch(name, start, end, shape_of(start)[1],
                                         min(self.rs[block.index], (shape_of(start)[1] - self.prefix) // 2))
                             for name, start, end in _local_branches(block, site))
            branches = tuple(b for b in branches if b.r > 0)
            return MergePlan(block.index, 0, 0, self.prefix, branches) if branches else Keep("r=0 at this block")
        if reason:
            return Skip(reason)
        if block.parallel and not self.facts.blocks_after(block):
            return Keep("a parallel-residual block, the last of its stack: merged after its output, no block "
                        "would run on fewer tokens")
        if symbolic:  # r of each call's N, capped in the graph (tome_step) as below
            n, r = size_key(shape_of(point)[1]), self.rs[block.index]
            return MergePlan(block.index, r, n, self.prefix, symbolic=True) if r > 0 else Keep("r=0 at this block")
        n = shape_of(point)[1]
        r = min(self.rs[block.index], (n - self.prefix) // 2)  # at most half of the unprotected tokens
        return MergePlan(block.index, r, n, self.prefix) if r > 0 else Keep(f"r=0 at this block ({n} tokens)")

    def apply(self, block, plan: MergePlan) -> str:
        if self.opts.mode == "local":
            return self._apply_local(block, plan)
        # the prefix tokens (class, registers) stay at 0 .. p - 1, their own representatives
        make = _global_reduction(block.attention, plan.r, plan.prefix, self.opts.protect, self.last,
                                 self.opts.trace_source, min(self.facts.prefix_tokens, plan.prefix))
        end = self.facts.stack_of(block)[-1].output  # tokens are restored where their stream ends
        cut = cut_tokens(self.gm, self.facts, merge_point(block), end, make,
                         None if plan.symbolic else plan.n - plan.r, self.example_inputs, self.options.verify,
                         shapes=self.shapes)
        self.last, self.last_stack = cut.reduction, block.stack
        where = "after the block (parallel residual)" if block.parallel else "after attention"
        if plan.symbolic:
            return (f"merge r={plan.r}: N -> N - {plan.r} tokens {where} (r at most (N - {plan.prefix}) // 2; "
                    f"N = each call's token count: a symbolic token count)")
        return f"merge r={plan.r}: {plan.n} -> {plan.n - plan.r} tokens {where}"

    def _apply_local(self, block, plan: MergePlan) -> str:
        """tomesd: merge each branch input, unmerge the branch output before its residual add."""
        masks = site_masks(block.attention)  # read before the attention branch's cut gathers them
        for branch in plan.branches:
            try:
                cut_tokens(self.gm, self.facts, branch.start, branch.end,
                           _local_reduction(masks, branch.r, plan.prefix, self.opts.protect), branch.n - branch.r,
                           self.example_inputs, self.options.verify, shapes=self.shapes)
            except RewriteError as exc:
                raise RewriteError(f"(local, {branch.name}): {exc}") from exc
        return "merge (local) " + ", ".join(f"{b.name} {b.n}->{b.n - b.r}" for b in plan.branches)

    def finish(self) -> None:
        opts, gm = self.opts, self.gm
        if not self.facts.blocks:
            self.report.note("merge: no transformer blocks found; nothing merged")
            return
        if opts.mode == "local":
            return
        merged = {block.index for block, _ in self.rewritten}
        if opts.prop_attn and self.sizes_before:
            for block in self.facts.blocks:
                size = self.sizes_before.get(block.index)
                if size is not None and block.attention.record.status_of(NAME) != SKIPPED:
                    _add_size_bias(gm, block.attention, size)
            gm.graph.lint()
            gm.recompile()  # the driver propagates the shapes once, after the pass
        if opts.trace_source and self.last is not None and self.last.source is not None:
            self.report.sources = record_each_run(gm, self.last.source, "tokred_merge_sources")
            if self.options.inner != "eager":
                self.report.note("merge: trace_source records only when the graph runs eagerly (tokred.explain)")
        if merged:
            self.report.note(f"merge: {len(merged)} blocks merged, prop_attn={'on' if opts.prop_attn else 'off'}, "
                             f"{self.prefix} protected leading tokens (protect={opts.protect})")


def merge_point(block) -> fx.Node:
    """Where a block's tokens are merged: between its attention and its MLP (ToMe), or after the
    block where it has no stream between them (a parallel-residual block: by its attention's keys;
    the next blocks run on the merged tokens)."""
    return block.output if block.parallel else block.mid


def _cannot_merge(block, site) -> str:
    if site.causal:
        return "causal attention: merging would mix later tokens into earlier ones"
    if block.mlp_add is None or block.output is None:
        return "the block's MLP residual add was not found"
    point = merge_point(block)
    if shape_of(point) is None or len(shape_of(point)) != 3:
        return "the residual stream is not [B, N, C]"
    return ""


def _global_reduction(site, r: int, prefix: int, protect: str, last: Optional[MergeReduction], trace: bool,
                      leading: int = 0):
    """make_reduction for one ToMe merge at a block's :func:`merge_point`; ``last``: the previous
    merge; ``leading``: protected prefix tokens that lead every representative index (see Reduction)."""

    def make(graph: fx.Graph, stream: fx.Node) -> MergeReduction:
        metric = graph.call_function(head_mean, (site.k,))
        group = last.group if last is not None else graph.call_function(merge_groups, (stream, mask_node(graph, site_masks(site))))
        size = last.size if last is not None else None
        step = graph.call_function(tome_step, (stream, metric, size, group, r, prefix, protect))
        merged, size, new_group, rep, dest = (graph.call_function(getitem, (step, i)) for i in range(5))
        source = graph.call_function(compose_dest, (last.source if last is not None else None, dest)) if trace else None
        restore = lambda g, cut_stream, end: g.call_function(tokens.gather_stream, (end, dest))
        return MergeReduction(stream=merged, index=rep, restore=restore, size=size, group=new_group, source=source,
                              leading=leading)

    return make


def _add_size_bias(gm: fx.GraphModule, site, size: fx.Node) -> None:
    """Add log(size) to the logits of ``site``: SDPA through its attn_mask, manual before softmax."""
    graph = gm.graph
    dtype = site.q.meta["example_value"].dtype if "example_value" in site.q.meta else torch.float32
    with graph.inserting_before(site.node if site.kind == "sdpa" else site.softmax):
        bias = graph.call_function(size_bias, (size, dtype))
        if site.kind == "sdpa":
            mask = mask_node(graph, site_masks(site))  # SDPA's own attn_mask
            combined = graph.call_function(add_key_bias, (mask, bias))
            if len(site.node.args) > 3:
                args = list(site.node.args)
                args[3] = combined
                site.node.args = tuple(args)
            else:
                site.node.kwargs = {**site.node.kwargs, "attn_mask": combined}
        else:
            logits = site.softmax.args[0]
            biased = graph.call_function(torch.add, (logits, bias))
            site.softmax.replace_input_with(logits, biased)


def _local_branches(block, site) -> list:
    """(name, branch input, branch output) for the attention and MLP branches of a block."""
    out = []
    attn_in = projection_input(site.q_proj)
    attn_out = next((a for a in block.attn_add.args[:2] if isinstance(a, fx.Node) and a is not block.input), None)
    if attn_out is not None and shape_of(attn_in) == shape_of(attn_out):
        out.append(("attention", attn_in, attn_out))
    mlp_out = next((a for a in block.mlp_add.args[:2] if isinstance(a, fx.Node) and a is not block.mid), None)
    mlp_in = next((u for u in block.mid.users if u is not block.mlp_add), None)
    if mlp_in is not None and is_projection_node(mlp_in):  # post-norm: the MLP reads the stream
        mlp_in = block.mid
    if mlp_out is not None and mlp_in is not None and shape_of(mlp_in) == shape_of(mlp_out):
        out.append(("mlp", mlp_in, mlp_out))
    return out


def _local_reduction(masks: tuple, r: int, prefix: int, protect: str):
    """make_reduction for a tomesd merge of a branch input (metric: the hidden states); ``masks``:
    the attention's masks before any cut (:func:`site_masks`)."""

    def make(graph: fx.Graph, stream: fx.Node) -> Reduction:
        group = graph.call_function(merge_groups, (stream, mask_node(graph, masks)))
        step = graph.call_function(tome_step, (stream, stream, None, group, r, prefix, protect))
        merged, _, _, rep, dest = (graph.call_function(getitem, (step, i)) for i in range(5))
        restore = lambda g, cut_stream, end: g.call_function(tokens.gather_stream, (end, dest))
        return Reduction(stream=merged, index=rep, restore=restore)

    return make
