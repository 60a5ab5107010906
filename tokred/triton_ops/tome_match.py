"""``tokred::tome_match(metric[B, N, D], group[B, N]) -> (node_max[B, Na] fp32, node_idx[B, Na] int64)``.

Bipartite soft matching scores of token merging (ToMe, Bolya et al. 2023). The tokens are split
alternately into set A (even positions, ``Na = ceil(N/2)`` rows) and set B (odd positions,
``Nb = N // 2`` rows). Each A token is matched to its most similar B token by cosine similarity
of the metric rows (computed in fp32; a zero row has similarity 0 with everything):

    scores[b, i, j] = <a_i / max(|a_i|, 1e-12), b_j / max(|b_j|, 1e-12)>
    node_max[b, i], node_idx[b, i] = max_j scores[b, i, j], argmax_j (lowest j on ties)

``group`` restricts matching: a pair (i, j) is allowed only where ``group_a[i] == group_b[j] >= 0``
(-1 marks a protected token such as a class token; different groups, e.g. padding and real
tokens, never merge). A row with no allowed pair (or ``Nb == 0``) gets ``node_max = -inf`` and
``node_idx = 0``, so sorting by ``node_max`` puts it last. The op is not differentiable (as in
ToMe, the matching only selects indices): its outputs never require grad. Metrics must be finite:
with NaN rows the kernel's max may skip NaN scores where torch.max propagates them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tokred.compat.triton_api import max_combine, min_combine, sum_combine
from tokred.triton_ops import common
from tokred.triton_ops.common import HAS_TRITON, tl

# Norms below this count as zero rows: they normalise to zero instead of dividing by ~0.
NORM_EPS = 1e-12


def check_match_args(metric: Tensor, group: Tensor) -> None:
    """Raise unless ``metric`` is a float ``[B, N, D]`` and ``group`` an int64 ``[B, N]`` on its device."""
    torch._check(metric.dim() == 3, lambda: f"tome_match: expected metric [B, N, D], got {tuple(metric.shape)}")
    torch._check(metric.dtype.is_floating_point, lambda: f"tome_match: expected a float metric, got {metric.dtype}")
    torch._check(group.dim() == 2, lambda: f"tome_match: expected group [B, N], got {tuple(group.shape)}")
    torch._check(group.dtype == torch.int64, lambda: f"tome_match: expected int64 group, got {group.dtype}")
    for dim in (0, 1):  # one check per size, so symbolic sizes become separate guards
        torch._check(
            group.shape[dim] == metric.shape[dim],
            lambda: f"tome_match: group {tuple(group.shape)} must be [B, N] for metric {tuple(metric.shape)}",
        )
    torch._check(metric.device == group.device,
                 lambda: f"tome_match: metric on {metric.device}, group on {group.device}")


def match_output_shape(metric: Tensor) -> tuple:
    """(B, Na): one score per A token, Na = ceil(N / 2) (symbolic sizes pass through)."""
    return metric.shape[0], (metric.shape[1] + 1) // 2


def tome_match_reference(metric: Tensor, group: Tensor) -> tuple[Tensor, Tensor]:
    """Plain-torch matching (materialises the [B, Na, Nb] scores); the CPU path and the reference.

    Traceable by torch.compile (benchmarks compile it): the argument checks run eagerly only, as
    Dynamo cannot trace their message closures.
    """
    if not torch.compiler.is_compiling():
        check_match_args(metric, group)
    batch, num_a = match_output_shape(metric)
    if metric.shape[1] < 2:  # no B tokens: nothing to match, torch.max would reject the empty dim
        return (torch.full((batch, num_a), float("-inf"), device=metric.device),
                torch.zeros((batch, num_a), dtype=torch.int64, device=metric.device))
    unit = metric.float()
    unit = unit / unit.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
    # contiguous: the strided halves' matmul would guard on N's parity (a graph for odd, one for even)
    a, b = unit[:, 0::2].contiguous(), unit[:, 1::2].contiguous()
    group_a, group_b = group[:, 0::2, None], group[:, 1::2][:, None, :]
    allowed = (group_a >= 0) & (group_a == group_b)  # [B, Na, Nb]; group_b >= 0 follows from ==
    scores = (a @ b.transpose(1, 2)).masked_fill(~allowed, float("-inf"))
    node_max, node_idx = scores.max(dim=-1)
    return node_max.contiguous(), node_idx.contiguous()


if HAS_TRITON:

    @common.triton_kernel
    def _tome_match_kernel(
        metric_ptr, group_ptr, max_ptr, idx_ptr,
        NA, NB, D,
        stride_mb, stride_mn, stride_md,
        stride_gb, stride_gn,
        stride_ob, stride_on,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """One program scores BLOCK_M A tokens of batch b against every B token of b.

        Grid: (cdiv(Na, BLOCK_M), B). A token i is metric row 2i, B token j row 2j + 1. The
        program walks B in blocks of BLOCK_N (and D in blocks of BLOCK_D), so the Na x Nb scores
        exist only one [BLOCK_M, BLOCK_N] tile at a time, in registers. Normalisation happens on
        the fly: cos(a, b) = (a . b) / (|a| |b|), with the norms of B rows summed in the same D
        loop as the dot products. A running (max, argmax) per A row is kept across B blocks; a
        later block replaces it only when strictly greater, so ties keep the lowest j.
        fp32 throughout, with IEEE fp32 dots (no TF32) and correctly rounded sqrt/div: near-equal
        scores must order as in the reference.

        Only Triton builtins are called (tl.full, tl.reduce with tokred.compat.triton_api's
        combine functions, not tl.zeros/tl.sum/tl.max): those helpers are @triton.jit functions themselves, which the
        interpreter cannot call when TRITON_INTERPRET was switched on after triton was imported
        (as tests do); tl.reduce is patched by the interpreter at launch and compiles as tl.sum does.
        """
        pid_m = tl.program_id(0)
        # int64 batch offset: B * N * D may exceed 2**31 elements.
        b = tl.program_id(1).to(tl.int64)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < NA
        a_tokens = 2 * rows.to(tl.int64)
        dims = tl.arange(0, BLOCK_D)
        metric_b = metric_ptr + b * stride_mb
        group_a = tl.load(group_ptr + b * stride_gb + a_tokens * stride_gn, mask=row_mask, other=-1)

        sumsq_a = tl.full((BLOCK_M,), 0, tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + dims
            a_tile = tl.load(metric_b + a_tokens[:, None] * stride_mn + d[None, :] * stride_md,
                             mask=row_mask[:, None] & (d[None, :] < D), other=0.0).to(tl.float32)
            sumsq_a += tl.reduce(a_tile * a_tile, 1, sum_combine)
        inv_norm_a = tl.div_rn(1.0, tl.maximum(tl.sqrt_rn(sumsq_a), 1e-12))

        best = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        best_idx = tl.full((BLOCK_M,), 0, tl.int32)
        for n0 in range(0, NB, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_mask = cols < NB
            b_tokens = 2 * cols.to(tl.int64) + 1
            group_b = tl.load(group_ptr + b * stride_gb + b_tokens * stride_gn, mask=col_mask, other=-1)
            dots = tl.full((BLOCK_M, BLOCK_N), 0, tl.float32)
            sumsq_b = tl.full((BLOCK_N,), 0, tl.float32)
            for d0 in range(0, D, BLOCK_D):
                d = d0 + dims
                d_mask = d < D
                # a rows are re-read per B block: BLOCK_M x D elements from L1/L2, cheaper than
                # holding a whole D-wide tile in registers for large D.
                a_tile = tl.load(metric_b + a_tokens[:, None] * stride_mn + d[None, :] * stride_md,
                                 mask=row_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
                # B loaded transposed, [BLOCK_D, BLOCK_N], straight into the dot's layout.
                b_tile_t = tl.load(metric_b + b_tokens[None, :] * stride_mn + d[:, None] * stride_md,
                                   mask=d_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
                dots = tl.dot(a_tile, b_tile_t, dots, input_precision="ieee")
                sumsq_b += tl.reduce(b_tile_t * b_tile_t, 0, sum_combine)
            inv_norm_b = tl.div_rn(1.0, tl.maximum(tl.sqrt_rn(sumsq_b), 1e-12))
            scores = dots * inv_norm_a[:, None] * inv_norm_b[None, :]
            allowed = (group_a[:, None] >= 0) & (group_a[:, None] == group_b[None, :]) & col_mask[None, :]
            scores = tl.where(allowed, scores, float("-inf"))

            block_best = tl.reduce(scores, 1, max_combine)
            # Lowest column reaching the block's max (an all -inf row gives n0; it never wins below).
            block_idx = tl.reduce(tl.where(scores == block_best[:, None], cols[None, :], NB), 1,
                                  min_combine)
            better = block_best > best
            best = tl.where(better, block_best, best)
            best_idx = tl.where(better, block_idx, best_idx)

        out_offsets = b * stride_ob + rows.to(tl.int64) * stride_on
        tl.store(max_ptr + out_offsets, best, mask=row_mask)
        tl.store(idx_ptr + out_offsets, best_idx.to(tl.int64), mask=row_mask)


# tl.dot needs every tile dim >= 16.
MIN_DOT_BLOCK = 16


def match_block_sizes(num_a: int, num_b: int, dim: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D) for ``num_a`` A rows, ``num_b`` B rows of ``dim`` channels.

    32 x 32 score tiles with D in chunks of up to 64: ViT-B's metric (D = 64) takes one chunk,
    and the [32, 64] x [64, 32] fp32 operands plus the [32, 32] accumulator stay in registers
    (see ``match_num_warps``). Smaller where the problem is smaller (never below tl.dot's 16).
    """
    def fit(n: int, cap: int) -> int:
        return max(MIN_DOT_BLOCK, min(common.next_power_of_2(n), cap))

    return fit(num_a, 32), fit(num_b, 32), fit(dim, 64)


def match_num_warps(block_m: int, block_n: int, block_d: int) -> int:
    """8 warps once the two dot operands reach 4096 elements (the 32 x 32 x 64 tile), else 4.

    ptxas for sm_90 (fp32 metric, 32 x 32 x 64): 4 warps need 255 registers and spill, 8 warps
    176 registers and no spills; fp16/bf16 fit either way.
    """
    return 8 if block_d * (block_m + block_n) >= 4096 else 4


def tome_match_triton(
    metric: Tensor,
    group: Tensor,
    block_m: int | None = None,
    block_n: int | None = None,
    block_d: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Launch the fused matching kernel (CUDA, or any device under TRITON_INTERPRET=1).

    ``block_m``/``block_n``/``block_d`` override the block sizes chosen from the shapes (powers
    of two >= 16; tests use 16 to get several blocks along every loop on small tensors).
    """
    common.require_triton("tome_match")
    check_match_args(metric, group)
    batch, num_a = match_output_shape(metric)
    num_b, dim = metric.shape[1] // 2, metric.shape[2]
    node_max = torch.empty((batch, num_a), dtype=torch.float32, device=metric.device)
    node_idx = torch.empty((batch, num_a), dtype=torch.int64, device=metric.device)
    if node_max.numel() > 0:
        default_m, default_n, default_d = match_block_sizes(num_a, num_b, dim)
        block_m, block_n, block_d = block_m or default_m, block_n or default_n, block_d or default_d
        grid = (common.cdiv(num_a, block_m), batch)
        _tome_match_kernel[grid](
            metric, group, node_max, node_idx,
            num_a, num_b, dim,
            metric.stride(0), metric.stride(1), metric.stride(2),
            group.stride(0), group.stride(1),
            node_max.stride(0), node_max.stride(1),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
            num_warps=match_num_warps(block_m, block_n, block_d),
        )
    return node_max, node_idx


@torch.library.custom_op("tokred::tome_match", mutates_args=())
def tome_match(metric: Tensor, group: Tensor) -> tuple[Tensor, Tensor]:
    """ToMe matching: metric [B, N, D], group [B, N] int64 -> (node_max [B, Na] fp32, node_idx [B, Na] int64)."""
    return tome_match_reference(metric, group)


if HAS_TRITON:
    tome_match.register_kernel("cuda")(tome_match_triton)


@tome_match.register_fake
def _tome_match_fake(metric: Tensor, group: Tensor) -> tuple[Tensor, Tensor]:
    check_match_args(metric, group)
    shape = match_output_shape(metric)
    return metric.new_empty(shape, dtype=torch.float32), metric.new_empty(shape, dtype=torch.int64)


def _tome_match_setup_context(ctx, inputs, output) -> None:
    # The matching selects indices (ToMe runs it under no_grad): no gradient flows through it.
    ctx.mark_non_differentiable(*output)


def _tome_match_backward(ctx, grad_max, grad_idx):
    return None, None


tome_match.register_autograd(_tome_match_backward, setup_context=_tome_match_setup_context)


def onnx_lowering():
    """ONNX translation for ``torch.onnx.export(..., dynamo=True, custom_translation_table=...)``.

    The reference's computation in standard ops: Cast to float, ReduceL2 + Max(eps) + Div,
    strided Slice for the A/B split, MatMul, Where(-inf) for the group rule, ReduceMax and
    ArgMax (first index on ties, as torch.max). Needs N >= 2 at run time (ReduceMax/ArgMax over
    an empty B set are errors in ONNX; the torch paths return -inf / 0 there).
    """
    import onnx
    from onnxscript import opset18 as op

    def ints(*values):
        return op.Constant(value_ints=list(values))

    def tokred_tome_match(metric, group):
        unit = op.Cast(metric, to=onnx.TensorProto.FLOAT)
        norm = op.ReduceL2(unit, ints(-1), keepdims=1)
        unit = op.Div(unit, op.Max(norm, op.Constant(value_float=NORM_EPS)))

        def split(t, start):  # t[:, start::2]
            return op.Slice(t, ints(start), ints(2**62), ints(1), ints(2))

        a, b = split(unit, 0), split(unit, 1)
        scores = op.MatMul(a, op.Transpose(b, perm=[0, 2, 1]))  # [B, Na, Nb]
        group_a = op.Unsqueeze(split(group, 0), ints(2))  # [B, Na, 1]
        group_b = op.Unsqueeze(split(group, 1), ints(1))  # [B, 1, Nb]
        zero = op.Constant(value_int=0)
        allowed = op.And(op.GreaterOrEqual(group_a, zero), op.Equal(group_a, group_b))
        scores = op.Where(allowed, scores, op.Constant(value_float=float("-inf")))
        node_max = op.ReduceMax(scores, ints(-1), keepdims=0)
        node_idx = op.ArgMax(scores, axis=-1, keepdims=0, select_last_index=0)
        return node_max, node_idx

    return tokred_tome_match
