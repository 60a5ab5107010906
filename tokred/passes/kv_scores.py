"""The functions a KV-compressed prefill graph calls: per-head token scores, the selection of the
kept cache entries, and their gather or merge; and the one a decode step calls on a cache whose
heads keep different counts (AdaKV), to attend past its padding. Plain torch over the cache layout;
tokred/passes/kv_cache.py inserts them beside each layer's attention, which stays as it was (SDPA
included).

Shapes: q [B, H, R, D] (the queries as the attention reads them, rotary applied: the last R of the
N positions; R = N in a prefill, the re-fed chunk during decode), k [B, Hkv, N, D] and
v [B, Hkv, N, Dv] (what the layer stores in its cache), H = g * Hkv (GQA groups of g query heads
share one KV head). Every score is [B, Hkv, N]: higher is kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokred.rewriter.tokens import kept_count

# queries per block of the accumulated attention (h2o): the [B, H, block, N] probabilities of one
# block are the most it holds at once, never the N x N map
ACCUMULATE_BLOCK = 256


def _grouped(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """q [B, H, R, D] -> [B, Hkv, g, R, D]: each KV head's query heads."""
    b, h, r, d = q.shape
    return q.reshape(b, kv_heads, h // kv_heads, r, d)


def _row_probabilities(q_rows: torch.Tensor, k: torch.Tensor, first_row: int, scale: float) -> torch.Tensor:
    """Causal attention probabilities (fp32) of the query rows first_row.. over all N keys.

    q_rows [B, H, R, D] (the rows first_row..first_row+R-1), k [B, Hkv, N, D] -> [B, Hkv, g, R, N]."""
    n = k.shape[2]
    qg = _grouped(q_rows, k.shape[1]).float()
    logits = torch.einsum("bhgrd,bhnd->bhgrn", qg, k.float()) * scale
    rows = torch.arange(first_row, first_row + q_rows.shape[2], device=k.device)
    future = torch.arange(n, device=k.device)[None, :] > rows[:, None]  # [R, N]
    return logits.masked_fill(future, float("-inf")).softmax(dim=-1)


def window_attention(q: torch.Tensor, k: torch.Tensor, window: int, scale: float) -> torch.Tensor:
    """SnapKV's observation: the attention the last ``window`` queries pay each key, summed over
    those queries and averaged over each KV head's query heads. -> [B, Hkv, N]."""
    n = k.shape[2]
    w = min(window, q.shape[2])
    probs = _row_probabilities(q[:, :, q.shape[2] - w:], k, n - w, scale)
    return probs.sum(dim=3).mean(dim=2)


def accumulated_attention(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """H2O's heavy hitters: the attention every query pays each key, summed over all R queries
    (causal), computed ``ACCUMULATE_BLOCK`` queries at a time; averaged over each KV head's query
    heads. -> [B, Hkv, N]."""
    n, rows = k.shape[2], q.shape[2]
    total = None
    for start in range(0, rows, ACCUMULATE_BLOCK):
        part = _row_probabilities(q[:, :, start:start + ACCUMULATE_BLOCK], k, n - rows + start, scale).sum(dim=3)
        total = part if total is None else total + part
    return total.mean(dim=2)


def key_norm_scores(k: torch.Tensor) -> torch.Tensor:
    """Key norm (attention-free): keys of small norm draw the most attention, so score = -||k||.
    k [B, Hkv, N, D] -> [B, Hkv, N]."""
    return -k.float().norm(dim=-1)


def recency_scores(k: torch.Tensor) -> torch.Tensor:
    """StreamingLLM: the most recent tokens first (with the sinks the selection always keeps).
    -> [B, Hkv, N], the position itself."""
    b, h, n, _ = k.shape
    return torch.arange(n, device=k.device, dtype=torch.float32).expand(b, h, n)


def constant_scores(k: torch.Tensor, table: tuple) -> torch.Tensor:
    """A fixed ranking (the seeded random baseline): ``table`` holds Hkv * N values, row-major.
    -> [B, Hkv, N]."""
    b, h, n, _ = k.shape
    return torch.tensor(table, device=k.device, dtype=torch.float32).reshape(h, n).expand(b, h, n)


def head_mean(scores: torch.Tensor) -> torch.Tensor:
    """One ranking per layer (TOVA): the scores averaged over the KV heads. [B, Hkv, N] -> same."""
    return scores.mean(dim=1, keepdim=True).expand_as(scores)


def pooled(scores: torch.Tensor, pool: int) -> torch.Tensor:
    """SnapKV's clustering: each score averaged over a window of ``pool`` neighbouring positions
    (odd, zero-padded at the ends), so kept tokens come with their context. [B, Hkv, N] -> same."""
    b, h, n = scores.shape
    out = F.avg_pool1d(scores.reshape(b * h, 1, n), kernel_size=pool, stride=1, padding=pool // 2)
    return out.reshape(b, h, n)


def select_kept(scores: torch.Tensor, kept: int, sinks: int, protect_last: int) -> torch.Tensor:
    """The cache entries each head keeps: the first ``sinks`` and last ``protect_last`` positions
    always, the rest by score; in position order. scores [B, Hkv, N] -> index [B, Hkv, kept]."""
    n = scores.shape[-1]
    pos = torch.arange(n, device=scores.device)
    always = (pos < sinks) | (pos >= n - protect_last)
    ranked = scores.float().masked_fill(always, float("inf"))
    return ranked.topk(kept, dim=-1).indices.sort(dim=-1).values


def select_adaptive(scores: torch.Tensor, kept: int, sinks: int, protect_last: int, floor: int,
                    length: int) -> tuple:
    """AdaKV's head-adaptive budget: a layer keeps ``kept`` entries per KV head on average
    (Hkv * kept in all), shared across its heads by score. Each head keeps its first ``sinks`` and
    last ``protect_last`` positions and its ``floor`` best (AdaKV's safeguard); the rest of the
    layer's budget goes to the best remaining scores of any head, at most ``length`` per head.

    scores [B, Hkv, N] -> (index [B, Hkv, length], valid [B, Hkv, length]): each head's kept
    positions in position order, then padding slots (valid False, index 0)."""
    b, h, n = scores.shape
    pos = torch.arange(n, device=scores.device)
    always = (pos < sinks) | (pos >= n - protect_last)
    ranked = scores.float().masked_fill(always, float("inf"))
    best = ranked.topk(length, dim=-1)  # each head's candidates, best first
    ranks = torch.arange(length, device=scores.device)
    forced = best.values.masked_fill(ranks < floor, float("inf"))
    chosen = forced.reshape(b, h * length).topk(h * kept, dim=-1).indices
    valid = torch.zeros(b, h * length, dtype=torch.bool, device=scores.device).scatter(1, chosen, True)
    valid = valid.reshape(b, h, length)
    order = best.indices.masked_fill(~valid, n).sort(dim=-1).values  # padding (n) sorts last
    valid = order < n
    return order.masked_fill(~valid, 0), valid


def gather_valid(x: torch.Tensor, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """x [B, Hkv, N, D], index / valid [B, Hkv, M] -> [B, Hkv, M, D], zeros in the padding slots
    (a zero key is how a decode step tells padding: :func:`mask_padding`)."""
    return gather_kept(x, index).masked_fill(~valid.unsqueeze(-1), 0)


def mask_padding(mask, k: torch.Tensor, heads: int) -> torch.Tensor:
    """A decode step's attention mask extended to block the cache's padding slots (all-zero keys,
    :func:`gather_valid`). mask: the step's SDPA attn_mask (None, bool "may attend", or additive),
    k [B, Hk, Nk, D] the keys as SDPA reads them (Hk = heads, or Hkv with enable_gqa), heads: the
    query heads. -> bool [B, H, 1, Nk] (mask None or bool) or the additive mask with -inf there."""
    padding = (k == 0).all(dim=-1)  # [B, Hk, Nk]
    if padding.shape[1] != heads:
        padding = padding.repeat_interleave(heads // padding.shape[1], dim=1)
    padding = padding.unsqueeze(2)
    if mask is None:
        return ~padding
    if mask.dtype == torch.bool:
        return mask & ~padding
    return mask.masked_fill(padding, float("-inf"))


def select_fraction(scores: torch.Tensor, keep, sinks: int, protect_last: int) -> torch.Tensor:
    """:func:`select_kept` with the count computed from this call's N (a graph compiled for every
    token count): ``tokens.kept_count(keep, N)``, and never fewer than the always-kept
    positions. scores [B, Hkv, N] -> index [B, Hkv, kept(N)]."""
    n = scores.shape[-1]
    kept = torch.sym_max(kept_count(keep, n), torch.sym_min(sinks + protect_last, n))
    return select_kept(scores, kept, sinks, protect_last)


def gather_kept(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, Hkv, N, D], index [B, Hkv, M] -> [B, Hkv, M, D]."""
    return x.gather(2, index.unsqueeze(-1).expand(*index.shape, x.shape[-1]))


def merge_evicted(k: torch.Tensor, v: torch.Tensor, index: torch.Tensor) -> tuple:
    """KV merging (D2O, KVMerger): every evicted entry joins its most similar kept entry of the same
    head (cosine of the keys), and each kept entry becomes the equal-weight mean of the keys and of
    the values that joined it (itself included), so the evicted mass is not lost.

    k [B, Hkv, N, D], v [B, Hkv, N, Dv], index [B, Hkv, M] -> (k [B, Hkv, M, D], v [B, Hkv, M, Dv])."""
    b, h, n, _ = k.shape
    m = index.shape[-1]
    kept_k = gather_kept(k, index)
    similarity = F.normalize(k.float(), dim=-1) @ F.normalize(kept_k.float(), dim=-1).transpose(-1, -2)
    slot = similarity.argmax(dim=-1)  # [B, Hkv, N]: the kept entry each entry joins
    own = torch.arange(m, device=k.device).expand(b, h, m)
    slot = slot.scatter(2, index, own)  # a kept entry stays in its own slot
    counts = torch.zeros(b, h, m, device=k.device).scatter_add(2, slot, torch.ones(b, h, n, device=k.device))

    def mean(x: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(b, h, m, x.shape[-1], device=x.device, dtype=torch.float32)
        total = total.scatter_add(2, slot.unsqueeze(-1).expand(b, h, n, x.shape[-1]), x.float())
        return (total / counts.unsqueeze(-1)).to(x.dtype)

    return mean(k), mean(v)
