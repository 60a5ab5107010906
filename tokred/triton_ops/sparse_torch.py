"""The op's torch paths on CPU: dense masked SDPA (the reference) and the gathered-block paths.

What ``tokred::sparse_attention`` runs on CPU where tokred's C++ kernel (sparse_cpu.py) does not
apply (mask rules, or the kernel not built), chosen by the op's CPU dispatch
(``sparse_attention.sparse_attention_blocks``). Each does work proportional to the blocks kept:

* ``shared_layout_attention``: a layout shared by every batch row and head (sink_window, mask
  rules without b/h): steps of ``CHUNK_ROWS`` query rows, each one SDPA over the union of its
  blocks' key blocks, masked to each block's own blocks and the rule;
* ``per_head_layout_attention``: per-head layouts (block_topk): steps of as many query blocks as
  fit ``STEP_BYTES``, each with its own gathered key blocks, one batched SDPA per step.

The two prefill paths without masks or gathers are in sparse_prefill.py. ``attention_with_mask``
is the dense masked SDPA every path here ends in; ``sparse_attention_reference`` is that SDPA
over the pattern's whole allowed set (``sparse_layout.pattern_mask``), and what the entry point
runs where gradients are needed (autograd differentiates it).

Shapes: q [B, H, Nq, D], k/v [B, Hkv, Nk, D/Dv], layouts as in sparse_blocks.py; rows with no
allowed key give zeros.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from tokred.triton_ops import common, sparse_rule
from tokred.triton_ops.sparse_args import additive_bias, additive_mask, check_qkv, resolve
from tokred.triton_ops.sparse_blocks import block_layout, kept_from_layout
from tokred.triton_ops.sparse_layout import pattern_mask
from tokred.triton_ops.sparse_pattern import SparsePattern
from tokred.triton_ops.sparse_threads import all_threads, single_thread


def attention_with_mask(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, bias: Tensor | None,
                        scale: float) -> Tensor:
    """Dense SDPA of q [.., H, L, D] over k, v [.., Hkv, S, *] with bool ``mask`` and additive
    ``bias`` (both broadcastable to [.., H, L, S]); rows with no allowed key give zeros."""
    with single_thread():
        group = q.shape[-3] // k.shape[-3]
        if group > 1 and q.dim() != 4:  # SDPA's enable_gqa wants [B, H, L, D]
            k = k.repeat_interleave(group, dim=-3)
            v = v.repeat_interleave(group, dim=-3)
        additive = additive_mask(mask, q.dtype)
        if bias is not None:
            additive = additive + bias
        row_open = (additive > float("-inf")).any(-1, keepdim=True)
    with all_threads():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=additive, scale=scale,
                                             enable_gqa=q.shape[-3] != k.shape[-3])
    with single_thread():
        return torch.where(row_open, out, 0.0).to(q.dtype)


def sparse_attention_reference(q: Tensor, k: Tensor, v: Tensor, pattern: SparsePattern,
                               scale: float | None = None, q_offset: int | None = None,
                               attn_bias: Tensor | None = None) -> Tensor:
    """Dense masked SDPA with ``pattern_mask``: [B, H, Nq, Dv] (zeros where a row sees no key)."""
    check_qkv(q, k, v)
    scale, q_offset = resolve(q, k, scale, q_offset)
    mask = pattern_mask(pattern, q, k, q_offset)
    return attention_with_mask(q, k, v, mask, additive_bias(attn_bias, q, k), scale)


# Query rows per step of the shared-layout CPU path: large enough that SDPA runs at its dense
# throughput, small enough that the union of the step's key blocks stays close to each row's own
# (a window of w keys costs w + CHUNK_ROWS keys per row instead of w + block).
CHUNK_ROWS = 256


def padded_rows(t: Tensor, rows: int) -> Tensor:
    """``t [.., N, X]`` zero-padded along dim -2 to ``rows`` rows; ``t`` itself (no copy, possibly
    not contiguous: callers reshape, not view) when it has them already."""
    return t if t.shape[-2] == rows else F.pad(t, (0, 0, 0, rows - t.shape[-2]))


def padded_bias_rows(bias: Tensor, rows: int) -> Tensor:
    """A bias [B', H', Nq or 1, Nk] padded to ``rows`` query rows (a broadcast row dim stays 1)."""
    return bias if bias.shape[2] == 1 else padded_rows(bias, rows)


def shared_layout_attention(q, k, v, count, index, bias, scale, q_offset, block_m, block_n, rule):
    """Strategy 1 of ``sparse_attention_blocks``: q [B, H, Nq, D], k/v [B, Hkv, Nk, D/Dv], one
    layout count [NQB], index [NQB, MAXK] for all (b, h), bias [B', H', Nq or 1, Nk] or None ->
    [B, H, Nq, Dv].

    Query blocks are grouped into NC chunks of CHUNK_ROWS rows; chunk c attends to the union of
    its blocks' key blocks (S keys, padded to the largest union). Chunks ride in SDPA's batch dim
    ([B * NC, H, C, D] against [B * NC, Hkv, S, D], mask [B * NC, H or 1, C, S]), so the whole
    layer is a fixed, small number of ops whatever N is: on a loaded machine every op costs a
    scheduling delay, so op count matters as much as FLOPs.
    """
    batch, heads, num_queries, dim = q.shape
    kv_heads, num_keys = k.shape[1], k.shape[2]
    device = q.device
    kept = kept_from_layout(count, index, common.cdiv(num_keys, block_n))  # [NQB, NKB]
    per_chunk = max(1, CHUNK_ROWS // block_m)
    chunks = common.cdiv(kept.shape[0], per_chunk)
    chunk_rows = per_chunk * block_m
    kept = F.pad(kept, (0, 0, 0, chunks * per_chunk - kept.shape[0]))
    union = kept.view(chunks, per_chunk, -1).any(1)  # [NC, NKB]
    union_count, union_index = block_layout(union, max(1, int(union.sum(-1).max())))
    keys = (union_index.long()[..., None] * block_n + torch.arange(block_n, device=device)).flatten(1)  # [NC, S]
    entry = (torch.arange(union_index.shape[1], device=device) < union_count[:, None]).repeat_interleave(block_n, 1)
    keys_ok = entry & (keys < num_keys)
    keys = keys.clamp(max=num_keys - 1)
    rows = torch.arange(chunks * chunk_rows, device=device).view(chunks, chunk_rows, 1)  # query rows
    allowed = kept[rows // block_m, (keys // block_n)[:, None, :]] & keys_ok[:, None, :]  # [NC, C, S]
    by_rule = sparse_rule.eval_rule_torch(
        rule, torch.arange(batch, device=device).view(batch, 1, 1, 1, 1),
        torch.arange(heads, device=device).view(1, 1, heads, 1, 1), (q_offset + rows)[None, :, None],
        keys[None, :, None, None, :])
    allowed = allowed[None, :, None] if by_rule is None else allowed[None, :, None] & by_rule  # [B', NC, H', C, S]

    def chunks_first(t: Tensor) -> Tensor:  # [B, NC, H', C, S] (any B' of 1 expanded) -> [B * NC, H', C, S]
        return t.expand(batch, *t.shape[1:]).flatten(0, 1)

    step_bias = None
    if bias is not None:
        bias_rows = padded_bias_rows(bias, chunks * chunk_rows)
        row_index = rows if bias_rows.shape[2] > 1 else torch.zeros_like(rows[:, :1])
        step_bias = chunks_first(bias_rows[:, :, row_index, keys[:, None, :]].transpose(1, 2))
    q_chunks = padded_rows(q, chunks * chunk_rows).reshape(batch, heads, chunks, chunk_rows, dim)
    q_chunks = q_chunks.transpose(1, 2).flatten(0, 1)  # [B * NC, H, C, D]

    def gathered(t: Tensor) -> Tensor:  # [B, Hkv, Nk, X] -> [B * NC, Hkv, S, X]
        return t.index_select(2, keys.flatten()).view(batch, kv_heads, chunks, -1, t.shape[-1]).transpose(1, 2) \
            .flatten(0, 1)

    out = attention_with_mask(q_chunks, gathered(k), gathered(v), chunks_first(allowed), step_bias, scale)
    out = out.view(batch, chunks, heads, chunk_rows, -1).transpose(1, 2).flatten(2, 3)
    return out[:, :, :num_queries]


# Bytes of gathered K plus V per step of the per-head path: large steps (few ops) within memory.
STEP_BYTES = 256 * 2**20


def per_head_layout_attention(q, k, v, count, index, bias, scale, q_offset, block_m, block_n, rule):
    """Strategy 2 of ``sparse_attention_blocks``: q [B, H, Nq, D], k/v [B, Hkv, Nk, D/Dv], count
    [B, H, NQB], index [B, H, NQB, MAXK], bias [B', H', Nq or 1, Nk] or None -> [B, H, Nq, Dv].

    Each (b, h, query block) gets its own gathered key blocks (whole rows of the padded K/V
    viewed as blocks); steps of as many query blocks as fit STEP_BYTES run as one 4-d SDPA with
    (h, query block) flattened into the head dim.
    """
    batch, heads, num_queries, dim = q.shape
    kv_heads, num_keys = k.shape[1], k.shape[2]
    num_q_blocks, max_blocks = index.shape[2], index.shape[3]
    num_k_blocks = common.cdiv(num_keys, block_n)
    device = q.device
    pad_keys = num_k_blocks * block_n - num_keys
    k_blocks = F.pad(k, (0, 0, 0, pad_keys)).view(batch, kv_heads, num_k_blocks, block_n, dim)
    v_blocks = F.pad(v, (0, 0, 0, pad_keys)).view(batch, kv_heads, num_k_blocks, block_n, v.shape[-1])
    q_blocks = padded_rows(q, num_q_blocks * block_m).reshape(batch, heads, num_q_blocks, block_m, dim)
    bias_rows = None if bias is None else padded_bias_rows(bias, num_q_blocks * block_m)
    batch_index = torch.arange(batch, device=device).view(batch, 1, 1, 1)
    head_index = (torch.arange(heads, device=device) // (heads // kv_heads)).view(1, heads, 1, 1)
    step_bytes = batch * heads * max_blocks * block_n * (dim + v.shape[-1]) * q.element_size()
    per_step = max(1, STEP_BYTES // step_bytes)
    out = q.new_empty(batch, heads, num_q_blocks * block_m, v.shape[-1])
    for first in range(0, num_q_blocks, per_step):
        last = min(num_q_blocks, first + per_step)
        step_index = index[:, :, first:last].long()  # [B, H, G, MAXK]
        k_step = k_blocks[batch_index, head_index, step_index].flatten(-3, -2)  # [B, H, G, MAXK * bn, D]
        v_step = v_blocks[batch_index, head_index, step_index].flatten(-3, -2)
        keys = (step_index[..., None] * block_n + torch.arange(block_n, device=device)).flatten(-2)  # [B, H, G, L]
        entry = (torch.arange(max_blocks, device=device) < count[:, :, first:last, None]).repeat_interleave(block_n, -1)
        allowed = (entry & (keys < num_keys))[..., None, :]  # [B, H, G, 1, L]
        rows = torch.arange(first * block_m, last * block_m, device=device).view(1, 1, last - first, block_m, 1)
        by_rule = sparse_rule.eval_rule_torch(
            rule, torch.arange(batch, device=device).view(batch, 1, 1, 1, 1),
            torch.arange(heads, device=device).view(1, heads, 1, 1, 1), q_offset + rows, keys[..., None, :])
        if by_rule is not None:
            allowed = allowed & by_rule
        step_bias = None
        if bias_rows is not None:
            keys_in = keys.clamp(max=num_keys - 1)
            if bias_rows.shape[2] > 1:
                row_index = rows.expand(batch, heads, -1, -1, -1)
            else:
                row_index = torch.zeros(1, 1, 1, 1, 1, dtype=torch.long, device=device)
            step_bias = bias_rows.expand(batch, heads, -1, -1)[
                batch_index[..., None], torch.arange(heads, device=device).view(1, heads, 1, 1, 1), row_index,
                keys_in[..., None, :]]  # [B, H, G, bm or 1, L]
            step_bias = step_bias.flatten(1, 2)
        allowed = allowed.expand(batch, heads, last - first, block_m, -1).flatten(1, 2)
        step_out = attention_with_mask(q_blocks[:, :, first:last].flatten(1, 2), k_step.flatten(1, 2),
                                       v_step.flatten(1, 2), allowed, step_bias, scale)
        out[:, :, first * block_m:last * block_m] = step_out.view(batch, heads, -1, v.shape[-1])
    return out[:, :, :num_queries]
