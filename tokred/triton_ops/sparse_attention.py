"""Block-sparse attention: ``sparse_attention(q, k, v, pattern)`` and the op ``tokred::sparse_attention``.

Shapes: q [B, H, Nq, D], k [B, Hkv, Nk, D], v [B, Hkv, Nk, Dv], H % Hkv == 0 (GQA: query head h
reads kv head h // (H // Hkv)); output [B, H, Nq, Dv] in q's dtype (softmax accumulated in fp32).
Query row i sits at absolute position ``q_offset + i`` (default ``Nk - Nq``: decode and prefill
with a KV cache); key j at position j. Rows with no visible key (possible with a padding
``attn_bias``) return zeros in every path.

This module holds the custom op (``torch.library``: its CPU implementation, the CUDA kernel
registration, the fake, the FLOP formula) and the one dispatcher that picks a lowering; the parts
live in modules below it, which never import it:

    sparse_pattern   SparsePattern, validation, element rule (rule-language string), mask_mod
    sparse_args      argument checks, scale/q_offset defaults, additive bias
    sparse_blocks    block geometry: kept blocks <-> the op's (kv_count, kv_index) layout
    sparse_topk      block_topk's data-dependent selection (Quest's bound)
    sparse_layout    a pattern's layout; static layouts built once per shape, LRU cache, BlockMask split
    sparse_threads   single_thread / all_threads
    sparse_torch     CPU torch paths: dense masked reference, gathered-block paths
    sparse_prefill   CPU prefill paths without masks: sink_window band, block_topk past blocks
    sparse_cpu       tokred's C++ CPU kernel (interval rules)
    sparse_kernel    the generated Triton kernel (CUDA)
    sparse_flex      the flex_attention lowering (CPU inside a compiled graph)
    sparse_cost      the op's FLOPs
    sparse_onnx      the ONNX lowering (rule language only; named here as ``onnx_lowering``
                     because tokred.triton_ops reads it from the op's module)

How it runs: ``sparse_attention`` turns the pattern into a block layout (``pattern_layout``:
block_topk's computed from q and k on every call, sink_window's and mask's built once per shape by
``static_layout``) and an element rule string, then calls ``torch.ops.tokred.sparse_attention``.
On CUDA that is the generated block-sparse flash-attention kernel. On CPU
(``sparse_attention_blocks``), for rules made of key intervals (block_topk, sink_window:
``interval_rule``), tokred's C++ kernel; where it is not built, and for mask rules, the torch paths
(work proportional to the blocks kept; block_topk's causal prefill takes ``past_blocks_attention``,
causal sink_window's prefill ``sink_window_band_attention``, which the entry point decides once in
``band_path_applies`` and tells the op). On CPU inside a graph being compiled, mask patterns (and
sink_window where the C++ kernel is not built, but its causal prefill) lower to flex_attention
with the same blocks (``use_flex_path``: inductor's CPU flex kernel measured faster than the
gathered blocks). With gradients to carry, ``sparse_attention_reference`` (dense SDPA with the
pattern's mask) runs instead: autograd differentiates it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tokred.compat.torch_api import detect_fake_mode
from tokred.triton_ops import sparse_cost, sparse_cpu, sparse_kernel
from tokred.triton_ops.common import HAS_TRITON
from tokred.triton_ops.sparse_args import additive_bias, additive_mask, check_band, check_layout, check_qkv, resolve
from tokred.triton_ops.sparse_blocks import (
    block_layout,
    blocks_of_mask,
    blocks_of_rows,
    dense_rule_mask,
    kept_from_layout,
    query_block_bounds,
    without_broadcast,
)
from tokred.triton_ops.sparse_flex import FLEX_CPU_BLOCK_MULTIPLE, flex_cpu_attention
from tokred.triton_ops.sparse_layout import (
    build_static_layout,
    flex_block_tensors,
    full_blocks,
    kept_blocks,
    max_kept_blocks,
    pattern_layout,
    pattern_mask,
    sink_window_blocks,
    static_kept_blocks,
    static_layout,
    static_layout_spec,
    static_max_kept_blocks,
)
from tokred.triton_ops.sparse_onnx import onnx_lowering
from tokred.triton_ops.sparse_pattern import (
    CAUSAL_RULE,
    DEFAULT_BLOCK,
    KINDS,
    SparsePattern,
    cpu_kernel_rule,
    element_rule,
    interval_rule,
    layout_blocks,
    pattern_mask_mod,
    pattern_rule,
)
from tokred.triton_ops.sparse_prefill import (
    band_chunks,
    band_mask,
    merge_by_lse,
    own_block_causal_mask,
    past_blocks_attention,
    past_blocks_layout,
    sink_window_band_attention,
)
from tokred.triton_ops.sparse_threads import all_threads, single_thread
from tokred.triton_ops.sparse_topk import block_bounds_mean_query, block_topk_blocks
from tokred.triton_ops.sparse_torch import (
    attention_with_mask,
    padded_bias_rows,
    padded_rows,
    per_head_layout_attention,
    shared_layout_attention,
    sparse_attention_reference,
)

# The names callers import from here (the entry point, the op, and the parts re-exported above).
__all__ = [
    "CAUSAL_RULE", "DEFAULT_BLOCK", "FLEX_CPU_BLOCK_MULTIPLE", "KINDS", "SparsePattern", "additive_bias",
    "additive_mask", "all_threads", "attention_with_mask", "band_chunks", "band_mask", "band_path_applies",
    "block_bounds_mean_query", "block_layout", "block_topk_blocks", "blocks_of_mask", "blocks_of_rows",
    "build_static_layout", "check_band", "check_layout", "check_qkv", "cpu_kernel_rule", "cpu_runtime",
    "dense_rule_mask", "element_rule", "flex_block_tensors", "flex_cpu_attention", "full_blocks", "interval_rule",
    "kept_blocks", "kept_from_layout", "layout_blocks", "max_kept_blocks", "merge_by_lse", "onnx_lowering",
    "own_block_causal_mask", "padded_bias_rows", "padded_rows", "past_blocks_attention", "past_blocks_layout",
    "pattern_layout", "pattern_mask", "pattern_mask_mod", "pattern_rule", "per_head_layout_attention",
    "query_block_bounds", "resolve", "shared_layout_attention", "single_thread", "sink_window_band_attention",
    "sink_window_blocks", "sparse_attention", "sparse_attention_blocks", "sparse_attention_op",
    "sparse_attention_reference", "static_kept_blocks", "static_layout", "static_layout_spec",
    "static_max_kept_blocks", "use_flex_path", "without_broadcast",
]


# ----------------------------------------------------------------------------------------------
# The op's CPU implementation: which CPU lowering runs a layout
# ----------------------------------------------------------------------------------------------


def sparse_attention_blocks(q: Tensor, k: Tensor, v: Tensor, kv_count: Tensor, kv_index: Tensor,
                            bias: Tensor | None, scale: float, q_offset: int, block_m: int, block_n: int,
                            rule: str, band_sinks: int = 0, band_window: int = 0) -> Tensor:
    """CPU path of the op (runs eagerly inside the opaque custom op): [B, H, Nq, Dv].

    Query block m of head h attends to key blocks ``kv_index[b, h, m, :kv_count[b, h, m]]``
    (``block_n`` keys each, ``block_m`` query rows per block), masked by ``rule`` and ``bias``
    [B, H, Nq, Nk]. Two strategies, both doing work proportional to the blocks kept:

    * layout shared by every batch row and head (sink_window, mask rules without b/h): steps of
      CHUNK_ROWS query rows, each one SDPA over the union of its blocks' key blocks (one copy of
      those keys, GQA inside SDPA), masked to each block's own blocks and the rule;
    * per-head layouts (block_topk): steps of as many query blocks as fit STEP_BYTES, each block
      with its own gathered key blocks, one batched SDPA per step.

    Two prefill shapes (no bias, q_offset 0, CPU) take paths without masks or gathers instead:
    block_topk's causal layout (``past_blocks_attention``) and, where the caller says so
    (``band_window`` > 0), causal sink_window (``sink_window_band_attention``, which reads neither
    the layout nor the rule).
    """
    intervals = interval_rule(rule)
    if intervals is not None and sparse_cpu.applies(q):
        return sparse_cpu.block_sparse_attention(q, k, v, kv_count, kv_index, bias, scale, q_offset, block_m, block_n,
                                                 intervals)
    if band_window > 0 and q.device.type == "cpu":
        return sink_window_band_attention(q, k, v, band_sinks, band_window, scale)
    count = without_broadcast(kv_count, (0, 1))
    index = without_broadcast(kv_index, (0, 1))
    if bias is not None:
        bias = without_broadcast(bias, (0, 1, 2))
    prefill = bias is None and q_offset == 0 and q.shape[2] == k.shape[2] and q.device.type == "cpu"
    if prefill and rule == CAUSAL_RULE and block_m == block_n:
        out = past_blocks_attention(q, k, v, count.expand(q.shape[0], q.shape[1], -1),
                                    index.expand(q.shape[0], q.shape[1], -1, -1), scale, block_m)
        if out is not None:
            return out
    with single_thread():  # the mask and gather ops; SDPA itself runs on all threads
        if count.shape[0] == 1 and count.shape[1] == 1:
            return shared_layout_attention(q, k, v, count[0, 0], index[0, 0], bias, scale, q_offset, block_m,
                                           block_n, rule)
        return per_head_layout_attention(q, k, v, count.expand(q.shape[0], q.shape[1], -1),
                                         index.expand(q.shape[0], q.shape[1], -1, -1), bias, scale, q_offset,
                                         block_m, block_n, rule)


# ----------------------------------------------------------------------------------------------
# The custom op
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("tokred::sparse_attention", mutates_args=())
def sparse_attention_op(q: Tensor, k: Tensor, v: Tensor, kv_count: Tensor, kv_index: Tensor,
                        bias: Tensor | None, scale: float, q_offset: int, block_m: int, block_n: int,
                        rule: str, band_sinks: int = 0, band_window: int = 0) -> Tensor:
    """Block-sparse attention over a block layout: q [B, H, Nq, D] -> [B, H, Nq, Dv] (see module doc).

    ``band_window`` > 0 says that layout & rule is causal sink_window(band_sinks, band_window) in a
    prefill (the caller's decision, ``band_path_applies``): the CPU path then runs
    ``sink_window_band_attention``, which reads neither the layout nor the rule. The CUDA kernel
    and the ONNX lowering read the layout and the rule either way (the same result).
    """
    check_qkv(q, k, v)
    check_layout(q, kv_count, kv_index, block_m)
    check_band(q, k, bias, q_offset, band_window)
    return sparse_attention_blocks(q, k, v, kv_count, kv_index, bias, scale, q_offset, block_m, block_n,
                                   rule, band_sinks, band_window).contiguous()


def _sparse_attention_cuda(q, k, v, kv_count, kv_index, bias, scale, q_offset, block_m, block_n, rule,
                           band_sinks=0, band_window=0):
    """CUDA implementation of the op: the generated Triton kernel, [B, H, Nq, Dv] (band_sinks and
    band_window only pick a CPU strategy)."""
    return sparse_kernel.sparse_attention_triton(q, k, v, kv_count, kv_index, bias, scale, q_offset, block_m, block_n,
                                                 rule)


if HAS_TRITON:
    sparse_attention_op.register_kernel("cuda")(_sparse_attention_cuda)


@sparse_attention_op.register_fake
def _sparse_attention_fake(q, k, v, kv_count, kv_index, bias, scale, q_offset, block_m, block_n, rule,
                           band_sinks=0, band_window=0):
    """The op's output [B, H, Nq, Dv] from shapes alone, after the real implementations' checks."""
    check_qkv(q, k, v)
    check_layout(q, kv_count, kv_index, block_m)
    check_band(q, k, bias, q_offset, band_window)
    return q.new_empty((q.shape[0], q.shape[1], q.shape[2], v.shape[3]))


# FlopCounterMode counts the op by the pairs its layout evaluates; tokred's report uses the same formula.
sparse_cost.register(torch.ops.tokred.sparse_attention)


# ----------------------------------------------------------------------------------------------
# The dispatcher: which lowering runs a call
# ----------------------------------------------------------------------------------------------


def use_flex_path(pattern: SparsePattern, q: Tensor, k: Tensor, v: Tensor, attn_bias: Tensor | None,
                  band: bool) -> bool:
    """True where the CPU path should be flex_attention: a graph being compiled (inductor lowers
    flex to its CPU template, measured faster than the gathered-block op on this machine, see
    bench/results/sparse_attention_speed.md), no extra bias (the op handles padding masks), and a
    pattern whose allowed set is its element rule (sink_window, mask), and no gradient to carry.

    Not where tokred's CPU kernel (sparse_cpu.cpp) runs the pattern: sink_window, where the
    kernel measured 0.4-0.65x flex's time. Not for blocks that are not a multiple of
    ``FLEX_CPU_BLOCK_MULTIPLE``. Not where the op takes
    the band path (``band``, from ``band_path_applies``): it measured faster than flex there
    (1.1-1.3x the density bound, flex ~2x). Not block_topk: flex's mask_mod defines its result
    (flex's non-inductor implementation, run by backends like aot_eager, evaluates mask_mod
    everywhere and ignores the block list), so the selection would have to be looked up in
    mask_mod, and inductor's CPU flex lowering found no kernel for a mask_mod reading a tensor
    computed in the graph (NoValidChoicesError, torch 2.14).
    """
    tracing = torch.compiler.is_compiling() or detect_fake_mode((q,)) is not None
    # flex has no backward on CPU: a graph traced with gradients (a model called without no_grad)
    # takes the gathered-block op
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    # nor for ONNX: the BlockMask construction sorts stably, which the exporter cannot lower
    exporting = torch.onnx.is_in_onnx_export()
    # nor for blocks that are not a multiple of 16: torch 2.14's CPU flex kernel returned wrong
    # values (NaN, or errors of O(1)) for blocks of 8 and 24 (16, 32, 48, 64, 128 measured right)
    flex_block = pattern.block % FLEX_CPU_BLOCK_MULTIPLE == 0
    # nor where tokred's CPU kernel runs the op (sink_window): it measured faster than flex
    own_kernel = sparse_cpu.applies(q) and cpu_kernel_rule(pattern)
    return (tracing and not needs_grad and not exporting and flex_block and not q.is_cuda
            and attn_bias is None and pattern.kind != "block_topk" and not band and not own_kernel)


def cpu_runtime(pattern: SparsePattern) -> str:
    """Which code runs ``pattern`` on CPU, for the rewrite report."""
    if not cpu_kernel_rule(pattern):
        return "on CPU: torch ops (flex_attention inside inductor graphs)"
    usable, reason = sparse_cpu.kernel_status()
    return "on CPU: tokred's C++ kernel" if usable else f"on CPU: torch ops (the C++ kernel is {reason})"


def band_path_applies(pattern: SparsePattern, q: Tensor, k: Tensor, q_offset: int,
                      attn_bias: Tensor | None) -> bool:
    """Whether the op runs sink_window as ``sink_window_band_attention`` on CPU: a causal prefill
    (q_offset 0, as many queries as keys, no bias) with a window of at least one key. Decided here
    once, from the pattern and shapes; the op is told (its band_sinks/band_window arguments)."""
    return (pattern.kind == "sink_window" and pattern.causal and pattern.window > 0 and q_offset == 0
            and q.shape[2] == k.shape[2] and attn_bias is None and not q.is_cuda)


def sparse_attention(q: Tensor, k: Tensor, v: Tensor, pattern: SparsePattern, scale: float | None = None,
                     q_offset: int | None = None, attn_bias: Tensor | None = None) -> Tensor:
    """Sparse attention with ``pattern``: q [B, H, Nq, D], k/v [B, Hkv, Nk, D/Dv] -> [B, H, Nq, Dv].

    Takes the block layout (sink_window, mask: ``static_layout``, once per shape; block_topk: its
    selection from q and k) and rule, then runs, by where it is:
    * CUDA: ``torch.ops.tokred.sparse_attention`` -> the generated Triton kernel;
    * CPU inside a graph being compiled (Dynamo or the aot_autograd trace of a rewritten graph),
      no ``attn_bias``, a mask pattern (or sink_window but its causal prefill where the C++ kernel
      is not built): flex_attention with the same blocks (``flex_cpu_attention``);
    * CPU otherwise: the op's CPU paths (``sparse_attention_blocks``: the C++ kernel for
      block_topk and sink_window, else torch), told here whether sink_window takes the band path;
    * with gradients to carry (a model called without ``torch.no_grad``): the dense masked
      reference, which autograd differentiates (the op has no backward).
    Traceable by torch.compile (static and dynamic shapes) and by the ONNX exporter. One known
    failure, in torch 2.14's inductor rather than here: this function compiled with dynamic=True
    by inductor on CPU, for a mask pattern whose block is a multiple of 16 (the flex path), fails
    in inductor's CPU flex lowering; Dynamo shows the symbolic lengths as ints, so this function
    cannot route that case to the op. tokred's pass skips mask rules at symbolic lengths.
    """
    if not isinstance(pattern, SparsePattern):
        raise ValueError(f"sparse_attention: pattern must be a SparsePattern, got {type(pattern).__name__}")
    if not torch.compiler.is_compiling():
        check_qkv(q, k, v)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return sparse_attention_reference(q, k, v, pattern, scale, q_offset, attn_bias)
    scale, q_offset = resolve(q, k, scale, q_offset)
    band = band_path_applies(pattern, q, k, q_offset, attn_bias)
    if use_flex_path(pattern, q, k, v, attn_bias, band):
        return flex_cpu_attention(q, k, v, pattern, element_rule(pattern), scale, q_offset)
    kv_count, kv_index, rule = pattern_layout(pattern, q, k, q_offset)
    block_m, block_n = layout_blocks(pattern)
    band_sinks, band_window = (pattern.sinks, pattern.window) if band else (0, 0)
    return sparse_attention_op(q, k, v, kv_count, kv_index, additive_bias(attn_bias, q, k), scale, q_offset,
                               block_m, block_n, rule, band_sinks, band_window)
