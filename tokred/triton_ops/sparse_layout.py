"""The block layout of a sparse attention pattern, and the cache of the static ones.

A layout is the set of key blocks each query block visits (sparse_blocks.py has its two forms).
Which pattern gives which:

* block_topk: computed from q and k on every call (sparse_topk.py);
* sink_window, mask (static: fixed by the pattern, the lengths and q_offset): built once per shape
  by ``static_layout`` and kept in a bounded LRU cache (or as constants of a traced graph).
  sink_window's kept blocks are computed in closed form per block (``sink_window_blocks``, no
  [Nq, Nk] mask); a mask's from its rule evaluated on every pair (``dense_rule_mask``).

For flex_attention (sparse_flex.py) a static layout is also given as a ``BlockMask``'s tensors
with kept blocks split into full blocks (the rule holds for every pair: flex skips mask_mod
there) and partial ones, as ``create_block_mask`` splits them (``flex_block_tensors``).

``pattern_layout`` is what the entry point calls: (kv_count, kv_index, rule) for the op.
``pattern_mask`` is the exact allowed set [B', H', Nq, Nk] (the reference).
"""

from __future__ import annotations

import collections
import contextlib

import torch
from torch import Tensor

from tokred.compat.torch_api import allow_in_graph, assume_constant_result, detect_fake_mode, disable_current_modes
from tokred.triton_ops import common, sparse_rule
from tokred.triton_ops.sparse_args import resolve
from tokred.triton_ops.sparse_blocks import block_layout, blocks_of_mask, dense_rule_mask, query_block_bounds
from tokred.triton_ops.sparse_pattern import SparsePattern, element_rule, layout_blocks
from tokred.triton_ops.sparse_threads import single_thread
from tokred.triton_ops.sparse_topk import block_topk_blocks, block_topk_max_blocks


def sink_window_blocks(pattern: SparsePattern, num_queries: int, num_keys: int, block_m: int, block_n: int,
                       q_offset: int, device) -> Tensor:
    """Kept key blocks of sink_window, [1, 1, NQB, NKB] bool: blocks holding any visible key."""
    first, last = query_block_bounds(num_queries, block_m, q_offset, device)
    key_first = torch.arange(0, num_keys, block_n, device=device)
    key_last = torch.clamp(key_first + block_n, max=num_keys) - 1
    first, last = first[:, None], last[:, None]
    # [NQB, NKB] even where no term below depends on the row (not causal, window 0)
    sink = (key_first < pattern.sinks).expand(first.shape[0], -1)
    if pattern.causal:
        sink = sink & (key_first <= last)
    window = (key_last > first - pattern.window) & (key_first <= last) if pattern.window > 0 else \
        torch.zeros_like(sink)
    return (sink | window)[None, None]


# ----------------------------------------------------------------------------------------------
# Static layouts (sink_window, mask): built once per shape
# ----------------------------------------------------------------------------------------------


@assume_constant_result
def static_layout_spec(pattern: SparsePattern, rule: str) -> tuple:
    """What a sink_window or mask layout depends on besides lengths, q_offset and device:
    ``(kind, sinks, window, block, causal, rule)``, all plain values so that the tuple can be an
    argument of ``static_layout`` in an FX graph (a pattern holding a mask function cannot). A
    constant for Dynamo: with dynamic=True it would otherwise make the pattern's ints symbolic."""
    return (pattern.kind, pattern.sinks, pattern.window, pattern.block, pattern.causal, rule)


def static_kept_blocks(spec: tuple, batch: int, heads: int, num_queries: int, num_keys: int, q_offset: int,
                       device) -> Tensor:
    """Kept key blocks of a sink_window or mask pattern (``spec`` from ``static_layout_spec``):
    bool [B or 1, H or 1, NQB, NKB], B and H only where a mask rule reads b or h."""
    kind, sinks, window, block, causal, rule = spec
    if kind == "sink_window":
        pattern = SparsePattern(kind, sinks=sinks, window=window, block=block, causal=causal)
        return sink_window_blocks(pattern, num_queries, num_keys, block, block, q_offset, device)
    return blocks_of_mask(dense_rule_mask(rule, batch, heads, num_queries, num_keys, q_offset, device), block, block)


def static_max_kept_blocks(spec: tuple, num_queries: int, num_keys: int) -> int:
    """A bound on kept key blocks per query block of a sink_window or mask layout, from the
    lengths alone (the layout's MAXK where the layout is traced with symbolic lengths)."""
    kind, sinks, window, block, _, _ = spec
    num_k_blocks = common.cdiv(num_keys, block)
    if kind != "sink_window":
        return max(1, num_k_blocks)
    # Blocks meeting the span [first - window + 1, last] of window + block - 1 positions, plus sinks.
    window_blocks = (window + min(block, num_queries) - 2) // block + 2 if window > 0 else 0
    return max(1, min(common.cdiv(sinks, block) + window_blocks, num_k_blocks))


def full_blocks(spec: tuple, num_queries: int, num_keys: int, q_offset: int, device) -> Tensor | None:
    """Blocks where the element rule of a sink_window or mask pattern (``spec`` from
    ``static_layout_spec``) holds for every (query, key): [1, 1, NQB, NKB] bool, or None where
    unknown (kind "mask": every kept block is treated as partial)."""
    kind, sinks, window, block, causal, _ = spec
    if kind == "mask":
        return None
    first, last = query_block_bounds(num_queries, block, q_offset, device)
    key_first = torch.arange(0, num_keys, block, device=device)
    key_last = key_first + block - 1  # a partial last key block is never full (keys >= Nk)
    full = (key_last[None, :] < num_keys) & torch.ones(first.shape[0], 1, dtype=torch.bool, device=device)
    if causal:
        full = full & (key_last[None, :] <= first[:, None])
    in_window = last[:, None] - key_first[None, :] < window
    if not causal:
        in_window = in_window & (key_last[None, :] <= first[:, None])
    full = full & (in_window | (key_last[None, :] < sinks))
    return full[None, None]


def flex_block_tensors(spec: tuple, kept: Tensor, num_queries: int, num_keys: int,
                       q_offset: int) -> tuple[Tensor, ...]:
    """flex_attention's BlockMask tensors for ``kept`` [B', H', NQB, NKB] blocks of a sink_window or
    mask pattern, full and partial blocks split as create_block_mask splits them: (kv_num_blocks,
    kv_indices, full_kv_num_blocks, full_kv_indices, q_num_blocks, q_indices, full_q_num_blocks,
    full_q_indices), the order of ``BlockMask``'s constructor arguments."""
    from torch.nn.attention.flex_attention import BlockMask

    block = spec[3]
    num_k_blocks = kept.shape[-1]
    full = full_blocks(spec, num_queries, num_keys, q_offset, kept.device)
    full = kept & full if full is not None else torch.zeros_like(kept)
    partial_count, partial_index = block_layout(kept & ~full, num_k_blocks)
    full_count, full_index = block_layout(full, num_k_blocks)
    # compute_q_blocks stays on: without the q-block index inductor's CPU flex lowering found no
    # kernel choice (NoValidChoicesError, torch 2.14).
    mask = BlockMask.from_kv_blocks(partial_count, partial_index, full_count, full_index, BLOCK_SIZE=(block, block),
                                    seq_lengths=(num_queries, num_keys))
    return (mask.kv_num_blocks, mask.kv_indices, mask.full_kv_num_blocks, mask.full_kv_indices, mask.q_num_blocks,
            mask.q_indices, mask.full_q_num_blocks, mask.full_q_indices)


def build_static_layout(spec: tuple, batch: int, heads: int, num_queries: int, num_keys: int, q_offset: int,
                        device, for_flex: bool, concrete: bool) -> tuple[Tensor, ...]:
    """A sink_window or mask layout built from scratch (what ``static_layout`` returns).

    ``concrete``: the lengths are ints and the tensors real, so a mask rule's MAXK can be its
    layout's own largest count rather than ``static_max_kept_blocks``, every key block (the
    per-head CPU path gathers MAXK blocks per query block).
    """
    kept = static_kept_blocks(spec, batch, heads, num_queries, num_keys, q_offset, device)
    if for_flex:
        return flex_block_tensors(spec, kept, num_queries, num_keys, q_offset)
    max_blocks = max(1, int(kept.sum(-1).max())) if concrete and spec[0] == "mask" else \
        static_max_kept_blocks(spec, num_queries, num_keys)
    return block_layout(kept, max_blocks)


# Layouts kept by ``static_layout``, least recently used dropped first. An entry is small (NQB x
# MAXK int32, or flex's block tensors), the bound only stops a run over ever new lengths (decode
# steps with a growing cache) from growing memory without limit.
STATIC_LAYOUT_CACHE_SIZE = 64
_STATIC_LAYOUTS: collections.OrderedDict[tuple, tuple[Tensor, ...]] = collections.OrderedDict()


@allow_in_graph
def static_layout(q: Tensor, k: Tensor, q_offset: int, spec: tuple, for_flex: bool) -> tuple[Tensor, ...]:
    """The block layout of a sink_window or mask pattern (``spec`` from ``static_layout_spec``),
    built once per (spec, lengths, q_offset, device; B and H where a mask rule reads b or h).

    Returns (kv_count [B', H', NQB] int32, kv_index [B', H', NQB, MAXK] int32), B' = B or 1 and
    H' = H or 1; with ``for_flex`` BlockMask's eight block tensors (``flex_block_tensors``). q and
    k only give lengths and device.

    Where it runs:
    * eagerly: a lookup in a bounded cache (``STATIC_LAYOUT_CACHE_SIZE`` entries);
    * traced with fake tensors and int lengths (aot_autograd under torch.compile, ONNX export):
      the cached tensors become constants of the traced graph (``lift_fresh_copy`` of a real
      tensor), so the compiled graph never rebuilds them (it copies the few KB per call);
    * traced with symbolic lengths (dynamic shapes): built in the traced graph, as it must be.
    Dynamo does not trace into it (``allow_in_graph``): it stays one call in Dynamo's graph, run
    by the backend's own trace as above (or eagerly by the "eager" backend).
    """
    kind, rule = spec[0], spec[5]
    names = sparse_rule.rule_names(rule) if kind == "mask" else frozenset()
    batch = q.shape[0] if "b" in names else 1
    heads = q.shape[1] if "h" in names else 1
    sizes = (batch, heads, q.shape[2], k.shape[2], q_offset)
    if any(isinstance(size, torch.SymInt) for size in sizes):
        return build_static_layout(spec, *sizes, q.device, for_flex, concrete=False)
    key = (spec, *sizes, q.device, for_flex)
    layout = _STATIC_LAYOUTS.pop(key, None)
    if layout is None:
        with disable_current_modes():  # real tensors, not recorded, even inside a fake-tensor trace
            layout = build_static_layout(spec, *sizes, q.device, for_flex, concrete=True)
    _STATIC_LAYOUTS[key] = layout  # (re)inserted last: most recently used
    while len(_STATIC_LAYOUTS) > STATIC_LAYOUT_CACHE_SIZE:
        _STATIC_LAYOUTS.popitem(last=False)
    if detect_fake_mode((q, k)) is not None:
        return tuple(torch.ops.aten.lift_fresh_copy(t) for t in layout)
    return layout


# ----------------------------------------------------------------------------------------------
# Any pattern
# ----------------------------------------------------------------------------------------------


def kept_blocks(pattern: SparsePattern, q: Tensor, k: Tensor, q_offset: int, rule: str) -> Tensor:
    """Kept key blocks per query block for q [B, H, Nq, D], k [B, Hkv, Nk, D]: bool
    [B or 1, H or 1, NQB, NKB] at ``layout_blocks``."""
    if pattern.kind == "block_topk":
        return block_topk_blocks(pattern, q, k, q_offset)
    return static_kept_blocks(static_layout_spec(pattern, rule), q.shape[0], q.shape[1], q.shape[2], k.shape[2],
                              q_offset, q.device)


def max_kept_blocks(pattern: SparsePattern, num_queries: int, num_keys: int) -> int:
    """A static bound on kept key blocks per query block (the layout's MAXK)."""
    if pattern.kind != "block_topk":
        return static_max_kept_blocks(static_layout_spec(pattern, ""), num_queries, num_keys)
    return block_topk_max_blocks(pattern, num_keys)


def pattern_layout(pattern: SparsePattern, q: Tensor, k: Tensor, q_offset: int) -> tuple[Tensor, Tensor, str]:
    """(kv_count [B, H, NQB], kv_index [B, H, NQB, MAXK] (expanded views), rule) for the op, from
    q [B, H, Nq, D] and k [B, Hkv, Nk, D].

    block_topk's layout is computed from q and k on every call; the static patterns' layouts come
    from ``static_layout`` (built once per shape).
    """
    rule = element_rule(pattern)
    if pattern.kind == "block_topk":
        tracing = torch.compiler.is_compiling() or detect_fake_mode((q, k)) is not None
        # eagerly on one thread: small ops, each slowed by OpenMP scheduling on a loaded machine
        # (N=4096, 2 threads, load ~3: 197 ms vs 11-17 ms on one, measured)
        with contextlib.nullcontext() if tracing else single_thread():
            kept = block_topk_blocks(pattern, q, k, q_offset)
            count, index = block_layout(kept, max_kept_blocks(pattern, q.shape[2], k.shape[2]))
    else:
        count, index = static_layout(q, k, q_offset, static_layout_spec(pattern, rule), False)
    batch, heads = q.shape[0], q.shape[1]
    return count.expand(batch, heads, -1), index.expand(batch, heads, -1, -1), rule


def pattern_mask(pattern: SparsePattern, q: Tensor, k: Tensor, q_offset: int | None = None) -> Tensor:
    """The exact allowed set for q [B, H, Nq, D], k [B, Hkv, Nk, D]: bool [B or 1, H or 1, Nq, Nk]
    (block_topk's depends on q and k): kept blocks spread to their pairs, and the element rule."""
    _, q_offset = resolve(q, k, None, q_offset)
    rule = element_rule(pattern)
    num_queries, num_keys = q.shape[2], k.shape[2]
    block_m, block_n = layout_blocks(pattern)
    kept = kept_blocks(pattern, q, k, q_offset, rule)
    rows = torch.arange(num_queries, device=q.device) // block_m
    cols = torch.arange(num_keys, device=q.device) // block_n
    mask = kept[:, :, rows][:, :, :, cols]
    rule_mask = dense_rule_mask(rule, q.shape[0], q.shape[1], num_queries, num_keys, q_offset, q.device)
    return mask if rule_mask is None else mask & rule_mask
