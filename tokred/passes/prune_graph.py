"""The functions a pruned graph calls (scores, candidates, selection, fusion, exit tracking), as
plain torch over [B, N, C] streams; tokred/passes/prune.py inserts them. Each dispatches to a
fused tokred:: kernel where ``graph_calls_kernel`` says so, else runs its reference inline.
"""

from __future__ import annotations

from typing import Optional

import torch

import tokred.triton_ops  # noqa: F401  (registers the tokred:: prune ops)
from tokred.compat import torch_api
from tokred.triton_ops.common import graph_calls_kernel
from tokred.triton_ops.prune import (
    ascending_index_reference, attention_row_scores_reference, k_center_selected_reference,
    selected_mask_reference,
)
from tokred.rewriter import tokens


def query_range(rows: tuple, n) -> tuple:
    """The query rows ``(lo, hi)`` (negative: from the end, hi None: to the end) of ``n`` tokens as
    positions ``lo <= i < hi``; ``n`` may be symbolic (one graph for every length)."""
    lo, hi = rows
    return (lo + n if lo < 0 else lo), (n if hi is None else hi + n if hi < 0 else hi)


def row_bias(mask: Optional[torch.Tensor], rows: tuple, n: int, causal: bool, dtype=torch.float32):
    """The attention mask of the query ``rows`` (``(lo, hi)``, :func:`query_range`) as an additive
    float bias [B|1, H|1, R, N] (None: none).

    ``mask`` is the site's attn_mask as SDPA reads it (boolean "may attend" or additive, broadcastable
    to [B, H, N, N]); ``causal`` adds the causal mask of those rows (SDPA's is_causal).
    """
    lo, hi = query_range(rows, n)
    bias = None
    if mask is not None:
        m = mask if mask.shape[-2] == 1 else mask[..., lo:hi, :]
        if m.dtype == torch.bool:
            m = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(~m, float("-inf"))
        bias = m.to(dtype)
    if causal:
        device = mask.device if mask is not None else None
        pos = torch.arange(n, device=device)
        r = torch.arange(lo, hi, device=device)
        future = torch.zeros(r.shape[0], n, dtype=dtype, device=device).masked_fill(
            pos.unsqueeze(0) > r.unsqueeze(1), float("-inf"))[None, None]
        bias = future if bias is None else bias + future
    return bias


def score_rows(q: torch.Tensor, k: torch.Tensor, mask: Optional[torch.Tensor], rows: tuple, causal: bool):
    """What the attention scores read: the query ``rows`` (``(lo, hi)``) of q [B, H, N, D] ->
    [B, H, R, D], and their additive mask bias [B|1, H|1, R, N] on q's device (None: no mask)."""
    lo, hi = query_range(rows, q.shape[2])
    bias = row_bias(mask, rows, k.shape[2], causal)
    return q[:, :, lo:hi], None if bias is None else bias.to(q.device)


def prune_by_attention(x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, mask: Optional[torch.Tensor],
                       rows: tuple, scale: float, causal: bool, candidates: torch.Tensor,
                       num_candidates: int, keep: int):
    """Score by the attention the query ``rows`` give each token, keep the best ``keep`` of the
    ``candidates`` ([N] or [B, N] bool): x [B, N, C], q [B, H, N, D], k [B, Hkv, N, D]
    -> (kept [B, M, C], index [B, M], scores [B, N] float32).

    Only the R query rows are computed (never the [N, N] map): the model keeps its SDPA. The fused
    Triton op (score, select and gather in one) is called where ``graph_calls_kernel`` says so.
    """
    q_rows, bias = score_rows(q, k, mask, rows, causal)
    if candidates.dim() == 1 and graph_calls_kernel(x, "prune_tokens"):
        return torch.ops.tokred.prune_tokens(x, q_rows, k, scale, bias, candidates, keep, num_candidates)
    scores = attention_row_scores_reference(q_rows, k, scale, bias)
    index = select_kept(scores, candidates, num_candidates, keep)
    return tokens.gather_stream(x, index), index, scores


def accumulated_attention_scores(qs: tuple, ks: tuple, masks: tuple, rows: tuple, scales: tuple,
                                 causal: tuple) -> torch.Tensor:
    """The attention the query ``rows`` pay each token, averaged over several blocks (H2O and
    TransPrune accumulate importance over layers): qs[i] [B, H, N, D], ks[i] [B, Hkv, N, D], the
    attention mask, scale and causal flag of block i -> scores [B, N] float32."""
    total = None
    for q, k, mask, scale, is_causal in zip(qs, ks, masks, scales, causal):
        q_rows, bias = score_rows(q, k, mask, rows, is_causal)
        scores = attention_row_scores_reference(q_rows, k, scale, bias)
        total = scores if total is None else total + scores
    return total / len(qs)


def accumulated_transition_scores(x_ins: tuple, x_outs: tuple) -> torch.Tensor:
    """:func:`transition_scores` summed over several blocks (TransPrune accumulates TTV over
    layers): x_ins[i], x_outs[i] [B, N, C], the stream entering and leaving block i -> [B, N]."""
    total = None
    for x_in, x_out in zip(x_ins, x_outs):
        scores = transition_scores(x_in, x_out)
        total = scores if total is None else total + scores
    return total


def pooled_scores(scores: torch.Tensor, size: int) -> torch.Tensor:
    """SnapKV's clustering: each of scores [B, N] averaged over the ``size`` positions centred on
    it (fewer at the ends: the mean of those that exist) -> [B, N] float32. A token beside highly
    scored ones rises, so the kept tokens come in runs that keep their local context instead of
    isolated words."""
    return torch.nn.functional.avg_pool1d(scores.float().unsqueeze(1), size, stride=1, padding=size // 2,
                                          count_include_pad=False).squeeze(1)


def transition_scores(x_in: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
    """Token transition across a block: (1 - cos) + relative norm change; x_in, x_out [B, N, C] -> [B, N]."""
    a, b = x_in.float(), x_out.float()
    norm_in, norm_out = a.norm(dim=-1), b.norm(dim=-1)
    cos = (a * b).sum(dim=-1) / (norm_in * norm_out).clamp_min(1e-12)
    return (1 - cos) + (norm_out - norm_in).abs() / (norm_in + 1e-6)


def demote_padding(scores: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Scores [B, N] with padding keys (no query may attend them, per the attention ``mask``) at
    -inf: padding is pruned first, whatever the scorer thinks of it (a padding token's hidden state
    moves a lot across a block, and a random ranking would keep some)."""
    padding = tokens.padding_keys(mask, scores.shape[0], scores.shape[1]).to(scores.device)
    return scores.float().masked_fill(padding, float("-inf"))


def constant_scores(x: torch.Tensor, table: tuple) -> torch.Tensor:
    """The same scores for every sample: ``table`` (N floats, a graph constant) -> [B, N]."""
    scores = torch.tensor(table, dtype=torch.float32, device=x.device)
    return scores.unsqueeze(0).expand(x.shape[0], len(table))


def candidate_mask(n: int, start: int, end: int, device) -> torch.Tensor:
    """[N] bool: True on the prunable positions [start, end)."""
    pos = torch.arange(n, device=device)
    return (pos >= start) & (pos < end)


def interval_candidates(x: torch.Tensor, start: int, tail: int) -> torch.Tensor:
    """The prunable positions [start, N - tail) of the N tokens of x [B, N, ...] as [N] bool."""
    return candidate_mask(x.shape[1], start, x.shape[1] - tail, x.device)


def prunable_counts(x: torch.Tensor, start: int, tail: int, keep) -> tuple:
    """(prunable, kept): the tokens [start, N - tail) of x [B, N, ...] and how many of them ``keep``
    (a fraction or a count, :func:`tokens.kept_count`) leaves. In the graph of a symbolic token
    count, so that each call computes them from its own N, without a guard on it."""
    prunable = torch.sym_max(0, x.shape[1] - start - tail)
    return prunable, tokens.kept_count(keep, prunable)


def candidate_positions(source: torch.Tensor, ids: Optional[tuple], start: int, end: int) -> torch.Tensor:
    """Prunable positions [B, N] bool inside [start, end): tokens whose id is in ``ids`` (``source``:
    the token ids [B, N]) or, with ``ids`` None, the positions ``source`` [B, N, ...] marks (a VLM's
    image-token mask)."""
    n = source.shape[1]
    found = torch.isin(source, torch.tensor(ids, device=source.device)) if ids is not None else \
        source.reshape(source.shape[0], n, -1).bool().any(dim=-1)
    return found & candidate_mask(n, start, end, source.device)


def token_candidates(source: torch.Tensor, ids: Optional[tuple], start: int, end: int, count: int) -> torch.Tensor:
    """:func:`candidate_positions`, of which every row must hold ``count`` (the kept count is
    static); a batch that does not stops with an error at run time instead of pruning the wrong
    number of tokens."""
    candidates = candidate_positions(source, ids, start, end)
    torch_api.assert_async((candidates.sum(dim=1) == count).all(),
                        "tokred prune: a row of the batch holds another number of prunable_ids tokens than "
                        "the example input the model was compiled for")
    return candidates


def next_candidates(candidates: torch.Tensor, index: torch.Tensor, fused: bool) -> torch.Tensor:
    """The prunable positions after a cut: candidates [B, N] taken at the kept ``index`` [B, M];
    a fused token (appended last) is not prunable."""
    kept = candidates.gather(1, index[:, : index.shape[1] - int(fused)])
    return torch.cat([kept, torch.zeros_like(kept[:, :1])], dim=1) if fused else kept


def select_kept(scores: torch.Tensor, candidates: torch.Tensor, num_candidates: int, k: int) -> torch.Tensor:
    """Kept positions [B, M], ascending: the non-candidates plus the k best-scored candidates.

    scores [B, N]; candidates [N] bool (the same for every row) or [B, N] (``num_candidates`` each).
    """
    n = scores.shape[1]
    if candidates.dim() == 1 and graph_calls_kernel(scores, "select_kept"):
        return torch.ops.tokred.select_kept(scores.float(), candidates, k, num_candidates)
    keep_mask = ~candidates | selected_mask_reference(scores.float(), candidates, k)
    return ascending_index_reference(keep_mask, n - num_candidates + k)


def k_center(x: torch.Tensor, candidates: torch.Tensor, num_candidates: int, k: int) -> torch.Tensor:
    """Diversity: kept positions [B, M] by greedy k-center over the candidates [N] of x [B, N, C]."""
    if candidates.dim() != 1:
        raise ValueError("tokred option 'prune.score' 'diversity' takes the same prunable positions in every "
                         "row ('range'), not 'prunable_ids'")
    # a greedy loop: an opaque op on every device (inlined, it would unroll k steps into the graph),
    # and always at a symbolic k (a graph for every token count: no fixed number of steps)
    if graph_calls_kernel(x, "k_center") or not isinstance(k, int):
        return torch.ops.tokred.k_center(x, candidates, k, num_candidates)
    keep_mask = ~candidates | k_center_selected_reference(x, candidates, k)
    return ascending_index_reference(keep_mask, x.shape[1] - num_candidates + k)


def fuse_pruned(x: torch.Tensor, kept: torch.Tensor, index: torch.Tensor, weights: torch.Tensor):
    """EViT's fused token: the weighted average of the pruned tokens, appended to the kept ones.

    x [B, N, C], kept [B, M, C], index [B, M] (kept positions), weights [B, N] (>= 0).
    Returns (x [B, M + 1, C], index [B, M + 1]): the fused token stands at the position of the
    pruned token with the largest weight (its mask row and position are the fused token's).
    """
    pruned = torch.ones_like(weights, dtype=torch.bool).scatter(1, index, False)
    w = torch.where(pruned, weights.float(), torch.zeros_like(weights, dtype=torch.float32))
    # uniform weights when all pruned weights are zero (e.g. masked padding)
    w = torch.where(w.sum(dim=1, keepdim=True) > 0, w, pruned.float())
    fused = (w.unsqueeze(-1) * x.float()).sum(dim=1, keepdim=True) / w.sum(dim=1).clamp_min(1e-12)[:, None, None]
    at = torch.where(pruned, w, torch.full_like(w, -1.0)).argmax(dim=1, keepdim=True)
    return torch.cat([kept, fused.to(kept.dtype)], dim=1), torch.cat([index, at], dim=1)


def init_exits(x: torch.Tensor) -> torch.Tensor:
    """trace_source before the first cut: every token of x [B, N, C] is in (-1) -> [B, N] int64."""
    return torch.full(x.shape[:2], -1, dtype=torch.int64, device=x.device)


def track_exits(exits: torch.Tensor, origin: Optional[torch.Tensor], kept: torch.Tensor,
                carried: torch.Tensor, block: int) -> tuple:
    """trace_source after a cut at ``block``: (exits [B, N0], origin [B, M]).

    exits:   for each original position, the block after which it left (-1: still in);
    origin:  the original position of each current token (None: identity, before the first cut);
    kept:    [B, K] the positions (in the current tokens) the cut kept;
    carried: [B, M] the positions the next region's tokens stand for (kept, plus a fused token's
             representative), so that later cuts map back to original positions.
    """
    to_original = (lambda i: i) if origin is None else (lambda i: origin.gather(1, i))
    still_in = torch.zeros_like(exits, dtype=torch.bool).scatter(1, to_original(kept), True)
    exits = torch.where((exits < 0) & ~still_in, torch.full_like(exits, block), exits)
    return exits, to_original(carried)


def uniform_weights(x: torch.Tensor) -> torch.Tensor:
    """Equal weights [B, N] for the tokens of x [B, N, C]."""
    return torch.ones(x.shape[:2], dtype=torch.float32, device=x.device)


def getitem(t, i):
    return t[i]


