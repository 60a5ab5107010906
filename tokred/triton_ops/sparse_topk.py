"""block_topk's selection: the one data-dependent layout producer of sparse attention.

Keys and queries in blocks of ``block`` (query blocks counted from the first query: rows
``[m*block, (m+1)*block)``; decode's single query is a block of one). A query block keeps whole
key blocks: the first ``sinks`` blocks, the ``local`` blocks ending at the key block holding the
block's last query position, and the ``topk`` best other blocks, all among the causally visible
ones (key block start <= last query position; every block when not causal).

"Best" is Quest's bound (Tang et al. 2024) taken for the block's mean query ``qbar`` (per query
head, against the keys of its kv head): key block ``n`` summarised by per-channel ``kmin``,
``kmax`` scores ``u[n] = sum_c max(qbar_c * kmin_c, qbar_c * kmax_c) = relu(qbar) . kmax -
relu(-qbar) . kmin``, an upper bound on ``qbar . k`` for every key k of the block, i.e. on the
block-mean of the block's scores for that key. Highest ``u`` wins, ties go to the lower block
index; a row with fewer than ``topk`` candidates keeps them all.

Computed from q and k on every call, with torch ops that compile and ONNX-trace (the result is
kept blocks [B, H, NQB, NKB], turned into the op's layout by ``sparse_blocks.block_layout``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from tokred.triton_ops import common
from tokred.triton_ops.sparse_blocks import blocks_of_rows, query_block_bounds
from tokred.triton_ops.sparse_pattern import SparsePattern


def block_bounds_mean_query(q: Tensor, k: Tensor, block: int) -> Tensor:
    """Quest bound per (query block, key block): q [B, H, Nq, D], k [B, Hkv, Nk, D] ->
    [B, H, NQB, NKB] fp32 (see the module docstring)."""
    batch, heads, num_queries, dim = q.shape
    kv_heads, num_keys = k.shape[1], k.shape[2]
    num_q_blocks, num_k_blocks = common.cdiv(num_queries, block), common.cdiv(num_keys, block)
    rows = torch.clamp(num_queries - torch.arange(num_q_blocks, device=q.device) * block, max=block)
    q_mean = blocks_of_rows(q.float(), block).sum(3) / rows[:, None].to(torch.float32)

    k_blocks = blocks_of_rows(k.float(), block)
    valid = (torch.arange(num_k_blocks * block, device=k.device) < num_keys).view(num_k_blocks, block, 1)
    k_min = torch.where(valid, k_blocks, float("inf")).amin(3)
    k_max = torch.where(valid, k_blocks, float("-inf")).amax(3)
    group = heads // kv_heads
    k_min = k_min.repeat_interleave(group, dim=1)  # [B, H, NKB, D]
    k_max = k_max.repeat_interleave(group, dim=1)
    return q_mean.clamp_min(0) @ k_max.transpose(-1, -2) - (-q_mean).clamp_min(0) @ k_min.transpose(-1, -2)


def block_topk_blocks(pattern: SparsePattern, q: Tensor, k: Tensor, q_offset: int) -> Tensor:
    """Kept key blocks of block_topk: q [B, H, Nq, D], k [B, Hkv, Nk, D] -> [B, H, NQB, NKB] bool
    (see the module docstring)."""
    block = pattern.block
    num_queries, num_keys = q.shape[2], k.shape[2]
    num_k_blocks = common.cdiv(num_keys, block)
    _, last = query_block_bounds(num_queries, block, q_offset, q.device)
    key_block = torch.arange(num_k_blocks, device=q.device)
    visible = key_block[None, :] * block <= last[:, None] if pattern.causal else \
        torch.ones(last.shape[0], num_k_blocks, dtype=torch.bool, device=q.device)
    own = torch.div(last, block, rounding_mode="floor")[:, None]
    forced = (key_block[None, :] < pattern.sinks) | ((key_block[None, :] <= own) & (key_block[None, :] > own - pattern.local))
    forced = forced & visible  # [NQB, NKB]
    candidate = visible & ~forced
    kept = forced[None, None].expand(q.shape[0], q.shape[1], -1, -1)
    topk = min(pattern.topk, num_k_blocks)
    if topk == 0:
        return kept
    scores = block_bounds_mean_query(q, k, block).masked_fill(~candidate, float("-inf"))
    if torch.onnx.is_in_onnx_export():
        # ONNX TopK orders equal values by lower index, as the stable sort does (torch.topk does
        # not promise an order on ties; the exporter has no stable sort).
        order = torch.topk(scores, topk, dim=-1).indices
    else:
        # Stable descending sort: equal bounds keep ascending block order, so the lower index wins.
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :topk]
    chosen = torch.zeros_like(kept).scatter(-1, order, candidate.expand_as(kept).gather(-1, order))
    return kept | chosen


def block_topk_max_blocks(pattern: SparsePattern, num_keys: int) -> int:
    """A static bound on block_topk's kept key blocks per query block (its layout's MAXK):
    sinks + local + topk, at most every key block."""
    num_k_blocks = common.cdiv(num_keys, pattern.block)
    return max(1, min(pattern.sinks + pattern.local + pattern.topk, num_k_blocks))
