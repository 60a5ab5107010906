"""``tokred::tome_merge(x, size, unm_idx, src_idx, dst_idx) -> (x_out, size_out)``: ToMe's size-weighted merge.

Shapes: ``x[B, N, C]`` (any float dtype), ``size[B, N, 1]`` fp32 (tokens each row stands for, > 0),
``unm_idx[B, Nu]``, ``src_idx[B, R]``, ``dst_idx[B, R]`` int64. As in ``tome_match``, the tokens
are split alternately into A (even positions, ``Na = ceil(N/2)``) and B (odd, ``Nb = N // 2``);
``unm_idx`` and ``src_idx`` index A rows (disjoint, together all of A: ``Nu + R = Na``), ``dst_idx``
indexes B rows and may repeat (several A tokens merged into one B token). In fp32:

    x_out[:, :Nu]  = a[unm_idx]                                  (kept A tokens, unchanged)
    x_out[:, Nu:]  = (b * sb + sum_{r: dst_idx[r] = j} (a * sa)[src_idx[r]]) / size_out[:, Nu:]
    size_out[:, :Nu] = sa[unm_idx]
    size_out[:, Nu:] = sb + sum_{r: dst_idx[r] = j} sa[src_idx[r]]

``x_out`` is ``[B, Nu + Nb, C]`` in ``x.dtype``, ``size_out`` ``[B, Nu + Nb, 1]`` fp32. The sums are
scatter-adds (never ``scatter_reduce(mean)`` or ``index_add``, see ARCHITECTURE.md invariant 6). Index values
must lie in range and satisfy the rules above; no path checks that (it would need a device sync).
Differentiable in ``x`` and ``size`` (an analytic backward).
"""

from __future__ import annotations

import torch
from torch import Tensor

from tokred.compat.triton_api import sum_combine
from tokred.triton_ops import common
from tokred.triton_ops.common import HAS_TRITON, tl


def check_merge_args(x: Tensor, size: Tensor, unm_idx: Tensor, src_idx: Tensor, dst_idx: Tensor) -> None:
    """Raise unless the arguments have the shapes, dtypes and devices the module docstring gives."""
    torch._check(x.dim() == 3, lambda: f"tome_merge: expected x [B, N, C], got {tuple(x.shape)}")
    torch._check(x.dtype.is_floating_point, lambda: f"tome_merge: expected a float x, got {x.dtype}")

    def size_message():
        return f"tome_merge: size {tuple(size.shape)} must be [B, N, 1] for x {tuple(x.shape)}"

    torch._check(size.dim() == 3, size_message)
    for size_dim, expected in zip(size.shape, (x.shape[0], x.shape[1], 1)):
        torch._check(size_dim == expected, size_message)
    torch._check(size.dtype == torch.float32, lambda: f"tome_merge: expected float32 size, got {size.dtype}")
    for name, index in (("unm_idx", unm_idx), ("src_idx", src_idx), ("dst_idx", dst_idx)):
        torch._check(index.dim() == 2, lambda: f"tome_merge: expected {name} [B, M], got {tuple(index.shape)}")
        torch._check(index.dtype == torch.int64, lambda: f"tome_merge: expected int64 {name}, got {index.dtype}")
        torch._check(index.shape[0] == x.shape[0],
                     lambda: f"tome_merge: batch mismatch, x {tuple(x.shape)} vs {name} {tuple(index.shape)}")
        torch._check(index.device == x.device, lambda: f"tome_merge: x on {x.device}, {name} on {index.device}")
    torch._check(size.device == x.device, lambda: f"tome_merge: x on {x.device}, size on {size.device}")
    torch._check(src_idx.shape[1] == dst_idx.shape[1],
                 lambda: f"tome_merge: src_idx {tuple(src_idx.shape)} and dst_idx {tuple(dst_idx.shape)} differ")
    torch._check(unm_idx.shape[1] + src_idx.shape[1] == (x.shape[1] + 1) // 2,
                 lambda: f"tome_merge: unm_idx ({unm_idx.shape[1]}) + src_idx ({src_idx.shape[1]}) rows must "
                         f"cover the {(x.shape[1] + 1) // 2} A tokens of x {tuple(x.shape)}")


def merge_output_tokens(x: Tensor, unm_idx: Tensor):
    """Nu + Nb: the kept A tokens, then every B token (symbolic sizes pass through)."""
    return unm_idx.shape[1] + x.shape[1] // 2


def _gather_rows(t: Tensor, index: Tensor) -> Tensor:
    """t[b, index[b, m]] for t [B, N, K], index [B, M] -> [B, M, K]."""
    return torch.gather(t, 1, common.expand_token_index(index, t))


def _merged_dst_fp32(x: Tensor, size: Tensor, src_idx: Tensor, dst_idx: Tensor) -> tuple[Tensor, Tensor]:
    """(dst_mean [B, Nb, C], dst_size [B, Nb, 1]), fp32: the B tokens after the A tokens merged in."""
    a, b = x[:, 0::2].float(), x[:, 1::2].float()
    sa, sb = size[:, 0::2], size[:, 1::2]
    dst_weighted = (b * sb).scatter_add(1, common.expand_token_index(dst_idx, b), _gather_rows(a * sa, src_idx))
    dst_size = sb.scatter_add(1, common.expand_token_index(dst_idx, sb), _gather_rows(sa, src_idx))
    return dst_weighted / dst_size, dst_size


def tome_merge_reference(
    x: Tensor, size: Tensor, unm_idx: Tensor, src_idx: Tensor, dst_idx: Tensor
) -> tuple[Tensor, Tensor]:
    """Plain-torch merge (gather + scatter_add in fp32); the CPU path and the reference.

    Traceable by torch.compile (benchmarks compile it): the argument checks run eagerly only, as
    Dynamo cannot trace their message closures.
    """
    if not torch.compiler.is_compiling():
        check_merge_args(x, size, unm_idx, src_idx, dst_idx)
    dst_mean, dst_size = _merged_dst_fp32(x, size, src_idx, dst_idx)
    # The kept A rows are copied, not round-tripped through fp32 arithmetic.
    x_out = torch.cat([_gather_rows(x[:, 0::2], unm_idx), dst_mean.to(x.dtype)], dim=1)
    size_out = torch.cat([_gather_rows(size[:, 0::2], unm_idx), dst_size], dim=1)
    return x_out, size_out


if HAS_TRITON:

    @common.triton_kernel
    def _tome_merge_unmerged_kernel(
        x_ptr, size_ptr, unm_ptr, out_ptr, size_out_ptr,
        NU, C,
        stride_xb, stride_xn, stride_xc,
        stride_sb, stride_sn,
        stride_ub, stride_um,
        stride_ob, stride_om,
        stride_zb, stride_zm,
        BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        """Kept A tokens: out[b, m] = x[b, 2 unm[b, m]], size_out[b, m] = size[b, 2 unm[b, m]].

        Grid: (cdiv(Nu, BLOCK_M), cdiv(C, BLOCK_C), B). Rows are copied in x's dtype (no fp32
        round trip); the programs of the first C block also copy the sizes.
        """
        pid_m = tl.program_id(0)
        pid_c = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        tokens = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        channels = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        token_mask = tokens < NU
        tile_mask = token_mask[:, None] & (channels[None, :] < C)

        a_rows = tl.load(unm_ptr + b * stride_ub + tokens * stride_um, mask=token_mask, other=0)
        x_tokens = 2 * a_rows
        values = tl.load(x_ptr + b * stride_xb + x_tokens[:, None] * stride_xn + channels[None, :] * stride_xc,
                         mask=tile_mask)
        out_rows = tokens[:, None].to(tl.int64)
        tl.store(out_ptr + b * stride_ob + out_rows * stride_om + channels[None, :], values, mask=tile_mask)

        sizes = tl.load(size_ptr + b * stride_sb + x_tokens * stride_sn, mask=token_mask)
        tl.store(size_out_ptr + b * stride_zb + tokens.to(tl.int64) * stride_zm, sizes,
                 mask=token_mask & (pid_c == 0))

    @common.triton_kernel
    def _tome_merge_dst_kernel(
        x_ptr, size_ptr, src_ptr, dst_ptr, out_ptr, size_out_ptr,
        NU, NB, R, C,
        stride_xb, stride_xn, stride_xc,
        stride_sb, stride_sn,
        stride_rb, stride_rm,
        stride_db, stride_dm,
        stride_ob, stride_om,
        stride_zb, stride_zm,
        BLOCK_J: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        """B tokens with their merged-in A tokens: out[b, Nu + j] and size_out[b, Nu + j].

        Grid: (cdiv(Nb, BLOCK_J), cdiv(C, BLOCK_C), B). Deterministic inverse mapping, no atomics:
        each program owns BLOCK_J destination rows and pulls its sources itself. It walks all R
        (src, dst) pairs in blocks of BLOCK_R, builds the one-hot [BLOCK_J, BLOCK_R] matrix
        ``dst[r] == j`` and accumulates ``onehot @ (a * sa)[src]`` with an IEEE fp32 tl.dot
        (products are exact: x * 1 or x * 0), on top of ``b * sb``; the sizes likewise. The sum
        order is fixed (r ascending within the dot), so results do not vary run to run; the mean is a
        correctly rounded division (tl.div_rn; ``/`` compiles to an approximate one), as torch's. Work is
        O(Nb * R * C) instead of O((Nb + R) * C), which is nothing for ToMe's r (R <= Na, typically
        8..32) and saves the sort/offset launches a CSR inverse map would need. The first C block
        also writes the sizes. (Caveat of the one-hot product: an inf in one source row becomes
        NaN in the other rows of its block, 0 * inf; finite inputs are unaffected.) Builtins only
        (tl.reduce, not tl.sum), for the interpreter; see ``_tome_match_kernel``.
        """
        pid_j = tl.program_id(0)
        pid_c = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        rows = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
        channels = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        row_mask = rows < NB
        channel_mask = channels < C
        x_b = x_ptr + b * stride_xb
        size_b = size_ptr + b * stride_sb

        b_tokens = 2 * rows.to(tl.int64) + 1
        sb = tl.load(size_b + b_tokens * stride_sn, mask=row_mask, other=1.0)
        xb = tl.load(x_b + b_tokens[:, None] * stride_xn + channels[None, :] * stride_xc,
                     mask=row_mask[:, None] & channel_mask[None, :], other=0.0).to(tl.float32)
        weighted = xb * sb[:, None]
        total_size = sb
        for r0 in range(0, R, BLOCK_R):
            pairs = r0 + tl.arange(0, BLOCK_R)
            pair_mask = pairs < R
            dst = tl.load(dst_ptr + b * stride_db + pairs * stride_dm, mask=pair_mask, other=-1)
            src = tl.load(src_ptr + b * stride_rb + pairs * stride_rm, mask=pair_mask, other=0)
            src_tokens = 2 * src
            sa = tl.load(size_b + src_tokens * stride_sn, mask=pair_mask, other=0.0)
            xa = tl.load(x_b + src_tokens[:, None] * stride_xn + channels[None, :] * stride_xc,
                         mask=pair_mask[:, None] & channel_mask[None, :], other=0.0).to(tl.float32)
            onehot = (rows[:, None].to(tl.int64) == dst[None, :]).to(tl.float32)
            weighted = tl.dot(onehot, xa * sa[:, None], weighted, input_precision="ieee")
            total_size += tl.reduce(onehot * sa[None, :], 1, sum_combine)

        out_rows = (NU + rows).to(tl.int64)
        tl.store(out_ptr + b * stride_ob + out_rows[:, None] * stride_om + channels[None, :],
                 tl.div_rn(weighted, total_size[:, None]), mask=row_mask[:, None] & channel_mask[None, :])
        tl.store(size_out_ptr + b * stride_zb + out_rows * stride_zm, total_size, mask=row_mask & (pid_c == 0))


# tl.dot needs every tile dim >= 16.
MIN_DOT_BLOCK = 16


def merge_block_sizes(num_b: int, num_pairs: int, width: int) -> tuple[int, int, int]:
    """(BLOCK_J, BLOCK_R, BLOCK_C) for the destination kernel.

    A [32, 128] fp32 accumulator plus a [32, 128] source tile per program (see
    ``merge_num_warps``); ViT-B's r = 16 merges take one R block. Never below tl.dot's 16.
    """
    def fit(n: int, cap: int) -> int:
        return max(MIN_DOT_BLOCK, min(common.next_power_of_2(n), cap))

    return fit(num_b, 32), fit(num_pairs, 32), fit(width, 128)


def merge_num_warps(block_j: int, block_c: int) -> int:
    """8 warps once the accumulator reaches 4096 elements ([32, 128]), else 4.

    ptxas for sm_90 at [32, 16, 128]: 4 warps spill with fp16 x (128 registers), 8 warps need
    at most 128 registers and do not spill, in fp32, fp16 and bf16.
    """
    return 8 if block_j * block_c >= 4096 else 4


def tome_merge_triton(
    x: Tensor,
    size: Tensor,
    unm_idx: Tensor,
    src_idx: Tensor,
    dst_idx: Tensor,
    block_j: int | None = None,
    block_r: int | None = None,
    block_c: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Launch the two merge kernels (CUDA, or any device under TRITON_INTERPRET=1).

    ``block_j``/``block_r``/``block_c`` override the destination kernel's block sizes (powers of
    two >= 16); ``block_c`` also sets the unmerged kernel's channel block.
    """
    common.require_triton("tome_merge")
    check_merge_args(x, size, unm_idx, src_idx, dst_idx)
    batch, _, width = x.shape
    num_kept, num_pairs, num_b = unm_idx.shape[1], src_idx.shape[1], x.shape[1] // 2
    num_out = num_kept + num_b
    x_out = torch.empty((batch, num_out, width), dtype=x.dtype, device=x.device)
    size_out = torch.empty((batch, num_out, 1), dtype=torch.float32, device=x.device)
    if x_out.numel() == 0:
        return x_out, size_out
    x_strides = (x.stride(0), x.stride(1), x.stride(2))
    size_strides = (size.stride(0), size.stride(1))
    out_strides = (x_out.stride(0), x_out.stride(1), size_out.stride(0), size_out.stride(1))

    if num_kept > 0:
        block_m, default_c = common.token_block_sizes(num_kept, width)
        unmerged_c = block_c or default_c
        grid = (common.cdiv(num_kept, block_m), common.cdiv(width, unmerged_c), batch)
        _tome_merge_unmerged_kernel[grid](
            x, size, unm_idx, x_out, size_out,
            num_kept, width,
            *x_strides, *size_strides,
            unm_idx.stride(0), unm_idx.stride(1),
            *out_strides,
            BLOCK_M=block_m, BLOCK_C=unmerged_c,
            num_warps=common.num_warps_for_tile(block_m, unmerged_c),
        )
    if num_b > 0:
        default_j, default_r, default_c = merge_block_sizes(num_b, num_pairs, width)
        block_j, block_r, block_c = block_j or default_j, block_r or default_r, block_c or default_c
        grid = (common.cdiv(num_b, block_j), common.cdiv(width, block_c), batch)
        _tome_merge_dst_kernel[grid](
            x, size, src_idx, dst_idx, x_out, size_out,
            num_kept, num_b, num_pairs, width,
            *x_strides, *size_strides,
            src_idx.stride(0), src_idx.stride(1),
            dst_idx.stride(0), dst_idx.stride(1),
            *out_strides,
            BLOCK_J=block_j, BLOCK_R=block_r, BLOCK_C=block_c,
            num_warps=merge_num_warps(block_j, block_c),
        )
    return x_out, size_out


@torch.library.custom_op("tokred::tome_merge", mutates_args=())
def tome_merge(
    x: Tensor, size: Tensor, unm_idx: Tensor, src_idx: Tensor, dst_idx: Tensor
) -> tuple[Tensor, Tensor]:
    """ToMe merge: (x [B, Nu + Nb, C], size [B, Nu + Nb, 1] fp32); see the module docstring."""
    return tome_merge_reference(x, size, unm_idx, src_idx, dst_idx)


if HAS_TRITON:
    tome_merge.register_kernel("cuda")(tome_merge_triton)


@tome_merge.register_fake
def _tome_merge_fake(
    x: Tensor, size: Tensor, unm_idx: Tensor, src_idx: Tensor, dst_idx: Tensor
) -> tuple[Tensor, Tensor]:
    check_merge_args(x, size, unm_idx, src_idx, dst_idx)
    num_out = merge_output_tokens(x, unm_idx)
    return x.new_empty((x.shape[0], num_out, x.shape[2])), size.new_empty((x.shape[0], num_out, 1))


def _tome_merge_setup_context(ctx, inputs, output) -> None:
    x, size, unm_idx, src_idx, dst_idx = inputs
    ctx.save_for_backward(x, size, unm_idx, src_idx, dst_idx)


def _interleave_tokens(a: Tensor, b: Tensor) -> Tensor:
    """a [B, ceil(N/2), K] at even and b [B, N//2, K] at odd token positions -> [B, N, K]."""
    out = a.new_empty((a.shape[0], a.shape[1] + b.shape[1], a.shape[2]))
    out[:, 0::2] = a
    out[:, 1::2] = b
    return out


def _tome_merge_backward(ctx, grad_x_out: Tensor, grad_size_out: Tensor):
    """Analytic gradients. With D_j = size_out[Nu + j] and y_j = x_out[Nu + j] (fp32, recomputed):

    d y_j / d b_j = sb_j / D_j,   d y_j / d a_r = sa_r / D_j,       (r merged into j)
    d y_j / d sb_j = (b_j - y_j) / D_j,   d y_j / d sa_r = (a_r - y_j) / D_j,
    d D_j / d sb_j = d D_j / d sa_r = 1; kept A rows pass their gradients straight through.
    """
    x, size, unm_idx, src_idx, dst_idx = ctx.saved_tensors
    num_kept = unm_idx.shape[1]
    a, b = x[:, 0::2].float(), x[:, 1::2].float()
    sa, sb = size[:, 0::2], size[:, 1::2]
    dst_mean, dst_size = _merged_dst_fp32(x, size, src_idx, dst_idx)
    grad_kept, grad_dst = grad_x_out[:, :num_kept].float(), grad_x_out[:, num_kept:].float()
    grad_kept_size, grad_dst_size = grad_size_out[:, :num_kept], grad_size_out[:, num_kept:]

    grad_over_size = grad_dst / dst_size  # [B, Nb, C]
    # sum_C grad_y_j * y_j / D_j: the part of d/d(size) shared by every token merged into j.
    shared = (grad_over_size * dst_mean).sum(dim=-1, keepdim=True)  # [B, Nb, 1]
    at_dst = _gather_rows(grad_over_size, dst_idx)  # [B, R, C]: each source's destination gradient
    a_src, sa_src = _gather_rows(a, src_idx), _gather_rows(sa, src_idx)

    grad_a = torch.zeros_like(a)
    grad_a = grad_a.scatter(1, common.expand_token_index(unm_idx, a), grad_kept)
    grad_a = grad_a.scatter(1, common.expand_token_index(src_idx, a), at_dst * sa_src)
    grad_b = grad_over_size * sb

    grad_sa = torch.zeros_like(sa)
    grad_sa = grad_sa.scatter(1, common.expand_token_index(unm_idx, sa), grad_kept_size)
    grad_sa_src = ((at_dst * a_src).sum(dim=-1, keepdim=True) - _gather_rows(shared, dst_idx)
                   + _gather_rows(grad_dst_size, dst_idx))
    grad_sa = grad_sa.scatter(1, common.expand_token_index(src_idx, sa), grad_sa_src)
    grad_sb = (grad_over_size * b).sum(dim=-1, keepdim=True) - shared + grad_dst_size

    grad_x = _interleave_tokens(grad_a, grad_b).to(x.dtype)
    grad_size = _interleave_tokens(grad_sa, grad_sb)
    return grad_x, grad_size, None, None, None


tome_merge.register_autograd(_tome_merge_backward, setup_context=_tome_merge_setup_context)


def onnx_lowering():
    """ONNX translation for ``torch.onnx.export(..., dynamo=True, custom_translation_table=...)``.

    The reference in standard ops: strided Slice for the A/B split, Cast to float, GatherElements
    with indices broadcast over the channels, ScatterElements(reduction="add") for the sums into
    destination rows (repeats add up, as scatter_add), Div, Concat, CastLike back to x's dtype.
    """
    import onnx
    from onnxscript import opset18 as op

    def ints(*values):
        return op.Constant(value_ints=list(values))

    def split(t, start):  # t[:, start::2]
        return op.Slice(t, ints(start), ints(2**62), ints(1), ints(2))

    def gather_rows(t, index):
        return op.GatherElements(t, common.onnx_expand_token_index(op, index, t), axis=1)

    def tokred_tome_merge(x, size, unm_idx, src_idx, dst_idx):
        a = op.Cast(split(x, 0), to=onnx.TensorProto.FLOAT)
        b = op.Cast(split(x, 1), to=onnx.TensorProto.FLOAT)
        sa, sb = split(size, 0), split(size, 1)
        dst_weighted = op.ScatterElements(op.Mul(b, sb), common.onnx_expand_token_index(op, dst_idx, b),
                                          gather_rows(op.Mul(a, sa), src_idx), axis=1, reduction="add")
        dst_size = op.ScatterElements(sb, common.onnx_expand_token_index(op, dst_idx, sb),
                                      gather_rows(sa, src_idx), axis=1, reduction="add")
        dst_mean = op.CastLike(op.Div(dst_weighted, dst_size), x)
        x_out = op.Concat(gather_rows(split(x, 0), unm_idx), dst_mean, axis=1)
        size_out = op.Concat(gather_rows(sa, unm_idx), dst_size, axis=1)
        return x_out, size_out

    return tokred_tome_merge
