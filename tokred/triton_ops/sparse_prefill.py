"""Two CPU prefill paths of sparse attention without masks or gathers, for the shapes they fit.

Causal prefills (q_offset 0, Nq == Nk, no bias) of two patterns, where the gathered-block paths
(sparse_torch.py) would build masks and copy key blocks:

* ``sink_window_band_attention``: causal sink_window: overlapping contiguous key windows under one
  band mask, as strided views (no gather), plus the sinks, merged by log-sum-exp. The entry point
  decides it (``sparse_attention.band_path_applies``) and tells the op.
* ``past_blocks_attention``: a layout of the shape causal block_topk gives a prefill
  (``past_blocks_layout``): whole past blocks without a mask, the own block's causal triangle
  under one shared mask, gathered as contiguous block rows.

Both call CPU flash attention (``aten._scaled_dot_product_flash_attention_for_cpu``) for its
log-sum-exp output. Shapes: q [B, H, N, D], k/v [B, Hkv, N, D/Dv] -> [B, H, N, Dv].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from tokred.triton_ops.sparse_args import additive_mask
from tokred.triton_ops.sparse_torch import padded_rows


# Query rows per chunk of ``sink_window_band_attention``: a chunk of c rows attends to the same
# window + c - 1 keys, so each row pays c - 1 keys beyond its window; flash's query tile is 32
# rows below c = 192. 64 measured fastest on this CPU at window 1024 (32..256 within noise).
SINK_WINDOW_CHUNK = 64


def band_chunks(t: Tensor, start: int, rows: int, chunks: int, step: int) -> Tensor:
    """Overlapping views of one batch row ``t [H', N, X]``: [chunks, H', rows, X], chunk i being
    rows ``[start + i * step, start + i * step + rows)`` (no copy; flash reads the strides)."""
    heads, _, width = t.shape
    return t.as_strided((chunks, heads, rows, width), (step * t.stride(1), t.stride(0), t.stride(1), t.stride(2)),
                        t.storage_offset() + start * t.stride(1))


def band_mask(chunk: int, window: int, device) -> Tensor:
    """Additive fp32 mask [chunk, window + chunk - 1] of a chunk's window part: row r (query at
    position s + r) against column t (key at s - window + 1 + t) is 0 where r <= t <= r + window - 1
    (the key is in the query's window), -inf elsewhere. The same for every chunk."""
    rows = torch.arange(chunk, device=device)[:, None]
    cols = torch.arange(window + chunk - 1, device=device)[None, :]
    return additive_mask((cols >= rows) & (cols <= rows + window - 1))


def sink_window_band_attention(q: Tensor, k: Tensor, v: Tensor, sinks: int, window: int, scale: float,
                               chunk: int = SINK_WINDOW_CHUNK) -> Tensor:
    """Causal sink_window prefill without gathers: q [B, H, N, D], k/v [B, Hkv, N, *] -> [B, H, N, Dv].

    Queries at positions p < P0 = window + sinks - 1 see every key <= p (their window reaches the
    sinks): one causal SDPA over the first P0 tokens. A later query's window (p - window, p] lies
    after the sinks, so it is two disjoint key sets: the window part of a chunk of queries
    [s, s + c) reads the contiguous keys [s - window + 1, s + c) with a band mask that is the same
    for every chunk (``band_mask``), so all chunks run as one flash call over overlapping strided
    views of K and V (GQA inside flash); the sinks are keys [0, sinks) for every such query, one
    flash call without a mask. The two are merged by their log-sum-exps. Work: c - 1 keys per row
    beyond the pattern's own (plus the rows of a partial last chunk, run as a smaller call).
    """
    batch, heads, num_tokens, _ = q.shape
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = q.new_empty(batch, heads, num_tokens, v.shape[-1])
    prefix = min(num_tokens, window + sinks - 1)
    if prefix:
        out[:, :, :prefix] = flash(q[:, :, :prefix], k[:, :, :prefix], v[:, :, :prefix], is_causal=True,
                                   scale=scale)[0]
    rows = num_tokens - prefix
    if rows == 0:
        return out
    sink_out = sink_lse = None
    if sinks:
        sink_out, sink_lse = flash(q[:, :, prefix:], k[:, :, :sinks], v[:, :, :sinks], scale=scale)[:2]
    mask = band_mask(chunk, window, q.device)
    full, tail = divmod(rows, chunk)
    # (first row after the prefix, rows per chunk, number of chunks) of the full chunks and the tail
    parts = [(0, chunk, full), (full * chunk, tail, 1)]
    for b in range(batch):
        for first, size, count in parts:
            if size == 0 or count == 0:
                continue
            start = prefix + first
            keys = window + size - 1
            window_out, window_lse = flash(band_chunks(q[b], start, size, count, chunk),
                                           band_chunks(k[b], start - window + 1, keys, count, chunk),
                                           band_chunks(v[b], start - window + 1, keys, count, chunk),
                                           attn_mask=mask[:size, :keys], scale=scale)[:2]
            # [count, H, size, *] -> [H, count * size, *]: this part's rows in order
            window_out = window_out.transpose(0, 1).reshape(heads, count * size, -1)
            window_lse = window_lse.transpose(0, 1).reshape(heads, count * size)
            span = slice(start, start + count * size)
            if sink_out is None:
                out[b, :, span] = window_out
            else:
                sink_span = slice(first, first + count * size)
                out[b, :, span] = merge_by_lse(window_out, window_lse, sink_out[b, :, sink_span],
                                               sink_lse[b, :, sink_span]).to(out.dtype)
    return out


# Bytes of gathered K plus V per step of ``past_blocks_attention``: measured fastest around here
# (a step's copies stay in cache-friendly sizes, and few enough ops).
PAST_STEP_BYTES = 64 * 2**20


def past_blocks_layout(count: Tensor, index: Tensor) -> int | None:
    """P, the first query block of the uniform part, if the layout has the shape causal block_topk
    gives a prefill (count [B, H, NQB], index [B, H, NQB, MAXK]), else None.

    The shape: query block m keeps min(m + 1, MAXK) blocks, its own block m last. Blocks m < P =
    MAXK - 1 then keep every visible block (a dense causal prefix), and each block m >= P keeps
    MAXK - 1 distinct blocks strictly before m (ascending, so all < m) plus its own.
    """
    num_q_blocks, max_blocks = index.shape[2], index.shape[3]
    blocks = torch.arange(num_q_blocks, device=count.device)
    if not bool((count == torch.clamp(blocks + 1, max=max_blocks)).all()):
        return None
    prefix = min(num_q_blocks, max_blocks - 1)
    if not bool((index[:, :, prefix:, max_blocks - 1] == blocks[prefix:]).all()):
        return None
    return prefix


def merge_by_lse(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> Tensor:
    """Softmax attention over the union of two disjoint key sets from each set's output [.., L, Dv]
    and log-sum-exp [.., L]: the outputs weighted by each set's share of the total mass, in fp32.

    Set b's share is exp(lse_b) / (exp(lse_a) + exp(lse_b)) = sigmoid(lse_b - lse_a), so the merge
    is one lerp (one pass over the outputs; the max/exp/divide form took ~20x longer, measured).
    """
    share_b = torch.sigmoid(lse_b.float() - lse_a.float()).unsqueeze(-1)
    return torch.lerp(out_a.float(), out_b.float(), share_b)


def own_block_causal_mask(block: int, max_blocks: int, device) -> Tensor:
    """Additive fp32 mask [block, max_blocks * block] of a query block against its gathered key
    blocks, the own block last: 0 on the past blocks, the causal triangle (key row <= query row)
    on the own block. The same for every query block and head."""
    rows = torch.arange(block, device=device)[:, None]
    cols = torch.arange(max_blocks * block, device=device)[None, :] - (max_blocks - 1) * block
    return additive_mask(cols <= rows)


def past_blocks_attention(q: Tensor, k: Tensor, v: Tensor, count: Tensor, index: Tensor, scale: float,
                          block: int) -> Tensor | None:
    """Causal prefill over a block_topk-shaped layout: [B, H, N, Dv], or None where the layout is
    not of that shape (see ``past_blocks_layout``).

    q [B, H, N, D], k/v [B, Hkv, N, *], count [B, H, NQB], index [B, H, NQB, MAXK]. The dense
    prefix (query blocks < P) is one causal SDPA. Each later query block's MAXK blocks (MAXK - 1
    whole past blocks, then its own) are gathered as contiguous block rows and attended with CPU
    flash attention under one mask shared by every block and head (``own_block_causal_mask``: only
    the own block's triangle is masked). Steps of as many query blocks as fit ``PAST_STEP_BYTES``
    of gathered K and V gather into buffers reused from step to step (the gather is the cost beyond
    the kept blocks themselves; smaller steps looked faster on 1 thread but were ~4x slower on 2
    loaded threads, measured).
    """
    prefix = past_blocks_layout(count, index)
    if prefix is None:
        return None
    batch, heads, num_tokens, dim = q.shape
    kv_heads, dim_v = k.shape[1], v.shape[-1]
    num_blocks, max_blocks = index.shape[2], index.shape[3]
    out = q.new_empty(batch, heads, num_blocks * block, dim_v)
    rows = min(num_tokens, prefix * block)
    if rows:
        out[:, :, :rows] = F.scaled_dot_product_attention(q[:, :, :rows], k[:, :, :rows], v[:, :, :rows],
                                                          is_causal=True, scale=scale, enable_gqa=heads != kv_heads)
    if prefix == num_blocks:
        return out[:, :, :num_tokens]
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    # Padding rows (a last partial block) are zeros: they only ever meet padded keys in their own
    # block's causal part and are cut off at the end.
    q_blocks = padded_rows(q, num_blocks * block).reshape(batch * heads, num_blocks, block, dim)
    k_flat = padded_rows(k, num_blocks * block).reshape(batch * kv_heads * num_blocks, block * dim)  # a row per block
    v_flat = padded_rows(v, num_blocks * block).reshape(batch * kv_heads * num_blocks, block * dim_v)
    kv_row = ((torch.arange(batch, device=q.device).view(batch, 1, 1) * kv_heads
               + torch.arange(heads, device=q.device).view(1, heads, 1) // (heads // kv_heads)) * num_blocks)
    mask = own_block_causal_mask(block, max_blocks, q.device)
    bytes_per_block = batch * heads * max_blocks * block * (dim + dim_v) * q.element_size()
    per_step = max(1, PAST_STEP_BYTES // max(1, bytes_per_block))
    k_buffer = k_flat.new_empty(batch * heads * per_step * max_blocks, block * dim)
    v_buffer = v_flat.new_empty(batch * heads * per_step * max_blocks, block * dim_v)
    out_blocks = out.view(batch * heads, num_blocks, block, dim_v)
    for first in range(prefix, num_blocks, per_step):
        last = min(num_blocks, first + per_step)
        steps = last - first
        rows_kv = (index[:, :, first:last].long() + kv_row[..., None]).flatten()  # [B * H * G * MAXK]
        keys = torch.index_select(k_flat, 0, rows_kv, out=k_buffer[:rows_kv.shape[0]])
        values = torch.index_select(v_flat, 0, rows_kv, out=v_buffer[:rows_kv.shape[0]])
        # batch = (b, h), heads = the step's query blocks: q and out are views, no copy
        out_blocks[:, first:last] = flash(q_blocks[:, first:last],
                                          keys.view(batch * heads, steps, max_blocks * block, dim),
                                          values.view(batch * heads, steps, max_blocks * block, dim_v),
                                          attn_mask=mask, scale=scale)[0]
    return out[:, :, :num_tokens]
