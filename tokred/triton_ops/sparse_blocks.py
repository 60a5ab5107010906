"""Block geometry of sparse attention: kept blocks, their layout as count/index, and back.

A layout cuts the Nq query rows into NQB = cdiv(Nq, block_m) query blocks and the Nk keys into
NKB = cdiv(Nk, block_n) key blocks. Two forms of the same set, per batch row and query head:

* kept blocks: bool [B', H', NQB, NKB] (B' = B or 1, H' = H or 1 where every row or head shares
  it), FlexAttention's dense block mask (``BlockMask.to_dense()``);
* the op's layout: ``kv_count [.., NQB]`` int32 kept blocks per query block and ``kv_index
  [.., NQB, MAXK]`` int32, the kept key blocks in ascending order (entries past the count repeat
  the last kept block), FlexAttention's ``kv_num_blocks`` / ``kv_indices`` without the
  full/partial split (the op's kernels mask every visited tile; ``sparse_layout.flex_block_tensors``
  makes the split for flex).

Everything here is plain torch that compiles, ONNX-traces and runs at symbolic lengths. Imports
only the rule language and ``common``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from tokred.triton_ops import common, sparse_rule


def query_block_bounds(num_queries: int, block_m: int, q_offset: int, device) -> tuple[Tensor, Tensor]:
    """(first, last) absolute query position per query block, each [NQB] int64."""
    starts = torch.arange(0, num_queries, block_m, device=device)
    first = q_offset + starts
    last = q_offset + torch.clamp(starts + block_m, max=num_queries) - 1
    return first, last


def blocks_of_rows(t: Tensor, block: int) -> Tensor:
    """``t [B, H, N, X]`` as blocks [B, H, cdiv(N, block), block, X], the last one zero-padded.

    Padded by a concatenation of ``pad + block`` zero rows, the extra block then dropped: never a
    zero-size padding, whose presence a graph with a symbolic N would otherwise guard on (and
    recompile for N a multiple of the block), and no F.pad, whose eager form takes no symbolic pad
    (shape propagation of a dynamic graph runs it).
    """
    batch, heads, num_rows, width = t.shape
    num_blocks = common.cdiv(num_rows, block)
    padded = torch.cat([t, t.new_zeros(batch, heads, num_blocks * block - num_rows + block, width)], dim=2)
    return padded.view(batch, heads, num_blocks + 1, block, width)[:, :, :num_blocks]


def dense_rule_mask(rule: str, batch: int, heads: int, num_queries: int, num_keys: int, q_offset: int,
                    device) -> Tensor | None:
    """The rule evaluated on every (query, key): bool [B or 1, H or 1, Nq, Nk]; None for no rule.

    FlexAttention's ``create_mask`` for the rule's mask_mod, by broadcasting instead of vmap: a
    dim the rule does not read stays 1, and it traces at symbolic lengths.
    """
    b = torch.arange(batch, device=device).view(-1, 1, 1, 1)
    h = torch.arange(heads, device=device).view(1, -1, 1, 1)
    q_idx = (q_offset + torch.arange(num_queries, device=device)).view(1, 1, -1, 1)
    kv_idx = torch.arange(num_keys, device=device).view(1, 1, 1, -1)
    mask = sparse_rule.eval_rule_torch(rule, b, h, q_idx, kv_idx)
    if mask is None:
        return None
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    return mask


def blocks_of_mask(mask: Tensor, block_m: int, block_n: int) -> Tensor:
    """[B', H', Nq, Nk] bool -> [B', H', NQB, NKB]: blocks with any True (flex's partial | full)."""
    num_queries, num_keys = mask.shape[-2:]
    nqb, nkb = common.cdiv(num_queries, block_m), common.cdiv(num_keys, block_n)
    mask = F.pad(mask, (0, nkb * block_n - num_keys, 0, nqb * block_m - num_queries))
    return mask.view(*mask.shape[:2], nqb, block_m, nkb, block_n).any(5).any(3)


def block_layout(kept: Tensor, max_blocks: int) -> tuple[Tensor, Tensor]:
    """(kv_count [.., NQB] int32, kv_index [.., NQB, max_blocks] int32) from kept [.., NQB, NKB].

    kv_index lists the kept blocks in ascending order; entries past kv_count repeat the last kept
    block (0 where none), so every entry is a valid block index.
    """
    count = kept.sum(-1, dtype=torch.int32)
    # Kept block n gets the key NKB - n (all distinct), others 0: the top max_blocks keys are the
    # kept blocks in ascending order. TopK rather than a stable sort: it exports to ONNX.
    num_blocks = kept.shape[-1]
    keys = kept.to(torch.float32) * (num_blocks - torch.arange(num_blocks, device=kept.device)).to(torch.float32)
    order = torch.topk(keys, max_blocks, dim=-1).indices
    entry = torch.arange(max_blocks, device=kept.device)
    last = order.gather(-1, (count.long() - 1).clamp_min(0)[..., None])
    index = torch.where(entry < count[..., None], order, last)
    return count, index.to(torch.int32)


def kept_from_layout(kv_count: Tensor, kv_index: Tensor, num_k_blocks: int) -> Tensor:
    """[.., NQB] counts and [.., NQB, MAXK] indices -> kept blocks [.., NQB, NKB] bool."""
    entry = torch.arange(kv_index.shape[-1], device=kv_index.device) < kv_count[..., None]
    kept = torch.zeros(*kv_index.shape[:-1], num_k_blocks, dtype=torch.int32, device=kv_index.device)
    # Repeated indices (the padding entries) all write the same 0 or 1 value per slot via amax.
    kept.scatter_reduce_(-1, kv_index.long(), entry.to(torch.int32), reduce="amax")
    return kept.bool()


def without_broadcast(t: Tensor, dims: tuple[int, ...]) -> Tensor:
    """``t`` with each of ``dims`` that is an expanded (stride 0) dim narrowed to size 1 (a layout
    [B, H, NQB, *] expanded from [1, 1, NQB, *] back to the shared one)."""
    for dim in dims:
        if t.shape[dim] > 1 and t.stride(dim) == 0:
            t = t.narrow(dim, 0, 1)
    return t
