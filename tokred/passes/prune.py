"""Token pruning: after chosen blocks, keep the highest-scored tokens; the others exit early.

    torch.compile(model, backend="tokred", options={"prune": {"keep": 0.5, "at": [2], "score": "cls"}})

At the output of each block listed in ``at`` the prunable tokens are scored and the ``keep``
fraction (or count) with the highest scores is kept, in their original order; the later blocks run
on the kept tokens only, with their masks, rotary positions and position ids gathered so that every
kept token keeps its original position. After the last block the pruned tokens are put back with
the value they had when pruned (exit early), so the outputs keep their shapes.

Scores (computed at the block of the cut; the README gives the exact formulas):
  cls         attention of the class token (row 0) to every token (FasterVLM, EViT)
  query       attention from the last token, the last M tokens (``query=M``) or a query range
              ``query=(start, end)`` (FastV, PromptDistill)
  transition  how much a token changed across the block, in direction and magnitude (TransPrune)
  diversity   greedy k-center on cosine distance: keep a spread-out set (DivPrune, ToDRE)
  random      a seeded random ranking: the baseline every scorer must beat
The attention scores read only the needed rows (q_row . K^T with the model's scale and mask), so
the model keeps SDPA. ``accumulate=A`` combines the scores of the A blocks ending at the cut
(attention averaged, transitions summed: H2O, TransPrune). ``pool=P`` averages each token's score
with its neighbours' (a window of P positions, SnapKV's clustering), so kept tokens come in runs
that keep their local context. ``fuse`` adds one token holding the weighted average of the pruned
ones (EViT).

Decoders with a KV cache: the prefill is pruned; the cache of the layers after the cut holds the
kept tokens (their keys rotated at their original positions) and decode steps attend to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import fx

from tokred.passes.prune_candidates import find_candidates
from tokred.passes.prune_options import (  # noqa: F401  (kept_count, SCORES: the pass's public names)
    ATTENTION_SCORES, SCORES, PruneOptions, kept_count, resolve_cuts,
)
from tokred.passes.prune_graph import (
    accumulated_attention_scores, accumulated_transition_scores, constant_scores, demote_padding,
    fuse_pruned, getitem, init_exits, interval_candidates, k_center, next_candidates, pooled_scores,
    prunable_counts, prune_by_attention, query_range, select_kept, token_candidates, track_exits,
    transition_scores, uniform_weights,
)
from tokred.rewriter import tokens
from tokred.rewriter.analysis.graph import is_symbolic, shape_keys
from tokred.rewriter.analysis.masks import reads_padding, site_masks
from tokred.rewriter.driver import GraphPass, Skip
from tokred.rewriter.report import note_unchanged
from tokred.rewriter.surgery import KVOutputs, Reduction, RewriteError, cut_tokens, mask_node, record_each_run

NAME = "prune"
def prunable_interval(n: int, protected: int, token_range: Optional[tuple], protect_last: int) -> tuple:
    """The prunable positions [start, end) of N tokens (always an interval: see the module doc)."""
    start, end = protected, n - protect_last
    if token_range is not None:
        lo, hi = (v + n if v < 0 else v for v in token_range)
        start, end = max(start, lo), min(end, hi)
    return start, max(start, end)


def symbolic_span(protected: int, token_range: Optional[tuple], protect_last: int):
    """The prunable positions of a symbolic token count N as (start, tail): [start, N - tail), both
    ints, so that one graph serves every N; None where ``range`` counts its start from the end or
    its end from the start (then the span's ends move with N in a way two ints cannot hold)."""
    start, tail = protected, protect_last
    if token_range is not None:
        lo, hi = token_range
        if lo < 0 or hi >= 0:
            return None
        start, tail = max(start, lo), max(tail, -hi)
    return start, tail


# ----------------------------------------------------------------------------- the pass

@dataclass(frozen=True)
class PrunePlan:
    """One cut after block ``at``: ``n`` tokens, of which the ``count`` prunable ones (positions
    ``start..end-1``, or the prunable_ids tokens) keep ``k``; ``m`` tokens leave the cut; ``tail``
    tokens follow the prunable ones (protect_last, range, fused tokens).

    At a symbolic token count (``symbolic``; ``n`` is its size key, e.g. ``s27``) end, count, k and
    m are None: the graph computes them at each call from its N (``prune_graph.prunable_counts``)."""

    at: int
    keep: Any
    n: Any
    start: int
    end: Optional[int]
    count: Optional[int]
    k: Optional[int]
    m: Optional[int]
    by_ids: bool = False
    tail: int = 0
    symbolic: bool = False


@dataclass
class PruneReduction(Reduction):
    """A pruning cut, with what the next cut reads: the candidates node it read [B, N] and the
    exit tracking (trace_source) it extended."""

    candidates: Optional[fx.Node] = None
    exits: Optional[fx.Node] = None
    origin: Optional[fx.Node] = None


class Prune(GraphPass):
    """Prune after each block of ``at``; every site is reported."""

    name, Options = NAME, PruneOptions

    def match(self) -> list:
        blocks = self.facts.blocks
        self.cuts = resolve_cuts(self.opts, blocks)
        beyond = [at for at, _ in self.cuts if blocks and (at >= len(blocks) or not self.facts.blocks_after(blocks[at]))]
        if beyond:  # another graph of the model (a VLM's other tower) may hold it: no error here
            note_unchanged(self.report, NAME, f"option 'prune.at': block {beyond[0]} is not followed by another "
                                              f"block of its stack in this graph (blocks found: "
                                              f"{_stacks_text(blocks)})")
            self.cuts = [(at, keep) for at, keep in self.cuts if at not in beyond]
        if blocks and len({blocks[at].stack for at, _ in self.cuts}) > 1:  # one stream's tokens per pass
            first = blocks[self.cuts[0][0]].stack
            other = next(at for at, _ in self.cuts if blocks[at].stack != first)
            note_unchanged(self.report, NAME, f"option 'prune.at': block {other} lies on another stack of blocks "
                                              f"than block {self.cuts[0][0]} ({_stacks_text(blocks)}); one stack "
                                              f"is cut per graph")
            self.cuts = [(at, keep) for at, keep in self.cuts if blocks[at].stack == first]
        cut_stack = self.facts.stack_of(blocks[self.cuts[0][0]]) if self.cuts and blocks else blocks
        self.causal = any(b.attention.causal for b in cut_stack)  # of the stream cut (an encoder's, not its decoder's)
        self.score = self.opts.score or ("query" if self.causal else "cls")
        self.protected = self.facts.protected_tokens
        self.fused_tokens = 0  # fused tokens appended by earlier cuts stay at the end, never pruned
        self.span = None  # (start, tail): the prunable tokens are [start, N - tail), fixed at the first cut
        self.candidates = None  # the candidates node [B, N] after the last cut (prunable_ids)
        self.ids_input = None  # prunable_ids: the input ids node and each row's count
        self.last: Optional[PruneReduction] = None
        self.reduced = {}  # stream node at a cut -> the reduced stream that replaced it for later blocks
        self.cache_outputs = frozenset()
        self.keeps = dict(self.cuts)
        if blocks and not self.cuts:
            note_unchanged(self.report, NAME, f"at {list(self.opts.at)} names none of this graph's blocks "
                                              f"({blocks[0].module}..{blocks[-1].module})")
        return [blocks[at] for at, _ in self.cuts] if blocks else []

    def plan(self, block):
        opts, blocks, at = self.opts, self.facts.blocks, block.index
        shape = shape_keys(block.output)
        n = shape[1] if shape is not None else None
        reason = _cannot_prune(block, self.score, opts.fuse, self.causal, self.protected,
                               self.facts.blocks_after(block))
        symbolic = n is not None and is_symbolic(n)
        if symbolic:
            reason = reason or _cannot_prune_symbolic(opts, self.score, self.protected)
        scored = blocks[max(0, at - opts.accumulate + 1):at + 1]
        if at - opts.accumulate + 1 < 0 or any(b.stack != block.stack for b in scored):
            reason = reason or (f"option 'prune.accumulate': the {opts.accumulate} blocks ending at block {at} "
                                f"reach before the first block of its stack")
        if n is None:
            reason = reason or "the residual stream at the block output has no known shape"
        if reason:
            return Skip(reason)
        if self.span is None and symbolic:
            self.span = symbolic_span(self.protected, opts.range, opts.protect_last)
        elif self.span is None:
            start, end = prunable_interval(n, self.protected, opts.range, opts.protect_last)
            if opts.prunable_ids is not None:
                try:
                    found = find_candidates(self.gm, opts.prunable_ids, start, end, n, self.example_inputs,
                                            blocks[0].input)
                except RewriteError as exc:
                    return Skip(str(exc))
                self.ids_input = (found, end)  # the candidates in [start, end)
                end = start + found.count  # only their count is read from here on
            self.span = (start, n - end)
        start, tail = self.span[0], self.span[1] + self.fused_tokens  # fused tokens stay last
        fused = 1 if opts.fuse else 0
        if symbolic:
            return PrunePlan(at=at, keep=self.keeps[at], n=n, start=start, end=None, count=None, k=None, m=None,
                             tail=tail, symbolic=True)
        p = n - start - tail  # prunable tokens per row
        if p <= 0:
            return Skip("no prunable tokens (protected, range, prunable_ids and protect_last cover all)")
        k = kept_count(self.keeps[at], p)
        return PrunePlan(at=at, keep=self.keeps[at], n=n, start=start, end=start + p, count=p, k=k,
                         m=n - p + k + fused, by_ids=opts.prunable_ids is not None, tail=tail)

    def apply(self, block, plan: PrunePlan) -> str:
        opts, blocks, graph = self.opts, self.facts.blocks, self.gm.graph
        if plan.by_ids and self.candidates is None:  # the first cut marks the prunable_ids tokens
            found, end = self.ids_input
            with graph.inserting_before(next(iter(found.node.users))):
                self.candidates = graph.call_function(token_candidates, (
                    found.node, opts.prunable_ids if found.kind == "ids" else None, plan.start, end, found.count))
        start, tail = plan.start, plan.tail
        candidates = self.candidates if plan.by_ids else \
            (lambda g, stream: g.call_function(interval_candidates, (stream, start, tail)))
        sources = [(self.reduced.get(b.input, b.input), b) for b in blocks[plan.at - opts.accumulate + 1:plan.at + 1]]
        # the prefix tokens (class, registers) lead every kept index when none of them may be pruned
        prefix = self.facts.prefix_tokens
        leading = prefix if not plan.by_ids and prefix <= plan.start else 0
        make = _reduction(block, self.score, opts, plan, candidates, sources, self.last, leading)
        later = self.facts.blocks_after(block)
        cut = cut_tokens(self.gm, self.facts, block.output, later[-1].output, make, plan.m, self.example_inputs,
                         self.options.verify, kv_outputs=_kv_outputs(later), shapes=self.shapes)
        self.last = cut.reduction
        self.cache_outputs |= cut.cache_outputs
        self.reduced[cut.stream] = cut.gathered
        self.fused_tokens += 1 if opts.fuse else 0
        if plan.by_ids:  # the kept candidates, wherever the cut put them
            with graph.inserting_after(cut.index):
                self.candidates = graph.call_function(next_candidates, (cut.reduction.candidates, cut.index, opts.fuse))
        # the kept candidates are contiguous again: [start, start + k), the tail tokens after them
        how = "".join(f" {key}={getattr(opts, key)}" for key in ("accumulate", "pool") if getattr(opts, key) > 1)
        if plan.symbolic:
            return (f"prune score={self.score}{how} keep={plan.keep}: N -> {_kept_text(plan, opts.fuse)} tokens "
                    f"after block {plan.at} (prunable {plan.start}..N-{plan.tail + 1}, P of them; N = each "
                    f"call's token count: a symbolic token count)")
        where = f"prunable {plan.start}..{plan.end - 1}" if not plan.by_ids else \
            f"{plan.count} {self.ids_input[0].what}"
        return (f"prune score={self.score}{how} keep={plan.keep}: {plan.n} -> {plan.m} tokens after block "
                f"{plan.at} ({where})")

    def finish(self) -> None:
        if not self.facts.blocks:
            self.report.note("prune: no transformer blocks found; nothing pruned")
            return
        if not self.rewritten:
            return
        if self.opts.trace_source:
            self.report.sources = record_each_run(self.gm, self.last.exits, "tokred_prune_exits")
            if self.options.inner != "eager":
                self.report.note("prune: trace_source records only when the graph runs eagerly (tokred.explain)")
        self.gm.graph.eliminate_dead_code()  # e.g. the candidates after the last cut
        self.report.note(f"prune: {len(self.rewritten)} cut(s), score={self.score}, {self.protected} protected "
                         f"leading tokens, pruned tokens exit early")


def _stacks_text(blocks: list) -> str:
    """The graph's blocks by stack, e.g. "0..1 (encoder.block.0..1), 2..3 (decoder.block.0..1)"."""
    parts = []
    for stack in dict.fromkeys(b.stack for b in blocks):
        members = [b for b in blocks if b.stack == stack]
        span = f"{members[0].index}..{members[-1].index}" if len(members) > 1 else str(members[0].index)
        parts.append(f"{span} ({members[0].module}{'..' if len(members) > 1 else ''}"
                     f"{members[-1].module.rsplit('.', 1)[-1] if len(members) > 1 else ''})")
    return ", ".join(parts)


def _cannot_prune(block, score: str, fuse: bool, causal: bool, protected: int, later=()) -> str:
    """Why the cut after ``block`` cannot be made ("" if it can); ``later``: the blocks after it,
    which run on the kept tokens."""
    site = block.attention
    if site.logit_ops and score in ATTENTION_SCORES:
        return (f"score '{score}' recomputes plain scaled attention, and this site's logits pass through a "
                f"soft-cap or a temperature before the softmax; use score 'transition', 'diversity' or 'random'")
    if block.output is None or block.mlp_add is None:
        return "the block's MLP residual add was not found"
    if later and later[-1].output is None:
        return (f"the output of the last block ({later[-1].module or later[-1].index}) was not found: the "
                f"pruned tokens could not be put back after it")
    if score == "cls" and protected == 0:
        return "score 'cls' needs a class token at position 0 (none found); use score 'query' or another"
    if score == "cls" and site.causal:
        return "score 'cls' on causal attention: token 0 attends to itself only; use score 'query'"
    if fuse and causal:
        return "fuse on a causal model: the fused token has no position that keeps causality"
    return ""


def _kv_outputs(later_blocks) -> KVOutputs:
    """A pruned prefill may return a KV cache of the kept tokens when a decode step's attention in
    the later layers fits their shorter cache: SDPA sites with no mask, or with one built from
    positions alone (causal, prefix-LM: transformers passes an unpadded decode step no mask). A
    padding mask, or a mask an eager attention adds (one decode mask serves every layer, over the
    unpruned layers' N + 1 keys), would not fit it."""
    for b in later_blocks:
        masks = site_masks(b.attention)
        name = b.attention.module or str(b.index)
        if any(reads_padding(m) for _, m in masks):
            return KVOutputs(False, f"{name} reads an attention mask (a padded batch?): decode steps could "
                                    f"not attend to a pruned cache through it; prune unpadded prompts or without "
                                    f"use_cache")
        if masks and b.attention.kind != "sdpa":
            return KVOutputs(False, f"{name} adds the model's causal mask to its logits (eager attention): "
                                    f"a decode step's mask spans the unpruned layers' N + 1 keys and would not "
                                    f"fit a pruned layer's cache; use attn_implementation='sdpa' or use_cache=False")
    return KVOutputs(True)


def _cannot_prune_symbolic(opts: PruneOptions, score: str, protected: int) -> str:
    """Why a cut cannot be made at a symbolic token count ("" if it can): what would need N fixed."""
    why = "with a symbolic token count (dynamic shapes)"
    if opts.prunable_ids is not None:
        return (f"option 'prune.prunable_ids' {why}: the kept count of each row's image tokens is fixed at "
                f"compile time; compile with dynamic=False")
    if score == "random":
        return f"score 'random' {why}: its table of N seeded scores is drawn at compile time; compile with dynamic=False"
    if symbolic_span(protected, opts.range, opts.protect_last) is None:
        return (f"option 'prune.range' {opts.range} {why}: give the start from the beginning (>= 0) and the "
                f"end from the end (< 0), or compile with dynamic=False")
    return ""


def _kept_text(plan: PrunePlan, fuse: bool) -> str:
    """The tokens leaving a symbolic cut, in words: ``N - P + kept_count(keep, P)``."""
    kept = f"min({plan.keep}, P)" if isinstance(plan.keep, int) else f"round({plan.keep} P)"
    return f"N - P + {kept}{' + 1' if fuse else ''}"


def _query_rows(score: str, opts: PruneOptions, n) -> tuple:
    """The query rows of the attention scores as a (lo, hi) range (``prune_graph.query_range``);
    checked against the ``n`` tokens where n is an int."""
    if score == "cls":
        return (0, 1)
    rows = opts.query or (-1, None)
    if not isinstance(n, int):
        return rows  # resolved at each call, against its own N
    lo, hi = query_range(rows, n)
    if not 0 <= lo < hi <= n:
        raise RewriteError(f"option 'prune.query' {opts['query']} is outside the {n} tokens")
    return (lo, hi)


def _scale(site) -> float:
    """The softmax scale of an attention site (SDPA's default 1/sqrt(head_dim) when not given)."""
    return site.scale if site.scale is not None else site.head_dim ** -0.5


def _select(graph: fx.Graph, block, score: str, opts: PruneOptions, stream: fx.Node, plan: PrunePlan,
            cands: fx.Node, sources: list, counts: tuple) -> tuple:
    """Insert the selection at the cut after ``block``: (kept [B, M, C], index [B, M], scores [B, N]
    or None). ``cands``: the candidates node [B, N]; ``sources``: (input, block) of every block
    whose scores are accumulated, the cut's last; ``counts``: (prunable, kept), ints or (at a
    symbolic token count) nodes."""
    site = block.attention
    masks = site_masks(site)  # as the site reads them now (an earlier cut gathered them)
    (p, k), n = counts, plan.n
    pool = opts.pool
    if score in ATTENTION_SCORES and (len(sources) > 1 or pool > 1):
        # scores, pooling, then selection (the fused score + select + gather op scores one block
        # and selects at once)
        sites = [b.attention for _, b in sources]
        scores = graph.call_function(accumulated_attention_scores, (
            tuple(s.q for s in sites), tuple(s.k for s in sites), tuple(mask_node(graph, site_masks(s)) for s in sites),
            _query_rows(score, opts, n), tuple(_scale(s) for s in sites), tuple(s.causal for s in sites)))
        if pool > 1:
            scores = graph.call_function(pooled_scores, (scores, pool))
            if masks:  # a pooled padding key beside real tokens is no longer 0
                scores = graph.call_function(demote_padding, (scores, mask_node(graph, masks)))
        index = graph.call_function(select_kept, (scores, cands, p, k))
        return graph.call_function(tokens.gather_stream, (stream, index)), index, scores
    if score in ATTENTION_SCORES:
        pruned = graph.call_function(prune_by_attention, (stream, site.q, site.k, mask_node(graph, masks),
                                                          _query_rows(score, opts, n), _scale(site), site.causal,
                                                          cands, p, k))
        return tuple(graph.call_function(getitem, (pruned, i)) for i in range(3))
    if score == "diversity":
        scores = None
        index = graph.call_function(k_center, (stream, cands, p, k))
    else:
        if score == "transition":  # each block's input as it reads it now (an earlier cut reduced it)
            outputs = tuple(b.output for _, b in sources[:-1]) + (stream,)
            scores = graph.call_function(transition_scores, (sources[0][0], stream)) if len(sources) == 1 else \
                graph.call_function(accumulated_transition_scores, (tuple(i for i, _ in sources), outputs))
            if pool > 1:
                scores = graph.call_function(pooled_scores, (scores, pool))
        else:  # random: a seeded table per cut, a constant of the graph
            table = torch.rand(n, generator=torch.Generator().manual_seed(opts.seed))
            scores = graph.call_function(constant_scores, (stream, tuple(table.tolist())))
        if masks:
            scores = graph.call_function(demote_padding, (scores, mask_node(graph, masks)))
        index = graph.call_function(select_kept, (scores, cands, p, k))
    return graph.call_function(tokens.gather_stream, (stream, index)), index, scores


def _reduction(block, score: str, opts: PruneOptions, plan: PrunePlan, candidates, sources: list,
               last: Optional[PruneReduction], leading: int = 0):
    """make_reduction for one pruning cut after ``block``; ``candidates`` is a node, or a function
    of the graph and the stream that inserts it; ``last``: the previous cut (exit tracking);
    ``leading``: prefix tokens never pruned (the kept index, in position order, starts with them)."""

    def make(graph: fx.Graph, stream: fx.Node) -> PruneReduction:
        cands = candidates(graph, stream) if callable(candidates) else candidates
        counts = (plan.count, plan.k)
        if plan.symbolic:  # computed at each call from its own N
            counted = graph.call_function(prunable_counts, (stream, plan.start, plan.tail, plan.keep))
            counts = tuple(graph.call_function(getitem, (counted, i)) for i in range(2))
        kept, index, scores = _select(graph, block, score, opts, stream, plan, cands, sources, counts)
        kept_index = index
        if opts.fuse:
            weights = scores if score in ATTENTION_SCORES else graph.call_function(uniform_weights, (stream,))
            fused = graph.call_function(fuse_pruned, (stream, kept, index, weights))
            kept, kept_index = (graph.call_function(getitem, (fused, i)) for i in range(2))
        exits = origin = None
        if opts.trace_source:
            exits = last.exits if last is not None else graph.call_function(init_exits, (stream,))
            origin = last.origin if last is not None else None
            tracked = graph.call_function(track_exits, (exits, origin, index, kept_index, block.index))
            exits, origin = (graph.call_function(getitem, (tracked, i)) for i in range(2))
        if not opts.fuse:
            restore = lambda g, cut_stream, end_node: g.call_function(tokens.scatter_stream,
                                                                      (cut_stream, index, end_node))
        else:  # the attention scores weighted the fused token's average (EViT), other scores a mean
            restore = lambda g, cut_stream, end_node: g.call_function(restore_fused, (cut_stream, index, end_node))
        return PruneReduction(stream=kept, index=kept_index, restore=restore, candidates=cands, exits=exits,
                              origin=origin, leading=leading)

    return make


def restore_fused(base: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Exit early with a fused token: drop the last (fused) token, scatter the kept ones.

    base [B, N, C] (the stream at the cut), index [B, M] (kept positions), out [B, M + 1, C]."""
    return tokens.scatter_stream(base, index, out[:, :-1])
