"""``tokred::scatter_tokens(base[B, N, *row], index[B, M], src[B, M, *row]) -> [B, N, *row]``.

out = a copy of ``base`` with ``out[b, index[b, m]] = src[b, m]``: puts processed tokens back at
their positions (restoring pruned or merged sequences at the outputs). Indices must be unique
within a row (with repeats, which write wins is undefined, as for ``Tensor.scatter``) and lie in
``[0, N)``: the reference path raises otherwise, the Triton path does not check.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tokred.triton_ops import common
from tokred.triton_ops.common import HAS_TRITON, tl
from tokred.triton_ops.gather_tokens import gather_tokens


def check_scatter_args(base: Tensor, index: Tensor, src: Tensor) -> None:
    """Raise unless ``src`` is ``[B, M, *row]`` for ``base[B, N, *row]``, ``index[B, M]``, same dtype."""
    common.check_token_index("scatter_tokens", base, index)

    def shape_message():
        return (f"scatter_tokens: src {tuple(src.shape)} must be [B, M, *row] for base "
                f"{tuple(base.shape)} and index {tuple(index.shape)}")

    torch._check(src.dim() == base.dim(), shape_message)
    # One check per size, so symbolic sizes become separate guards rather than one forced bool.
    for src_size, expected in zip(src.shape, (*index.shape, *base.shape[2:])):
        torch._check(src_size == expected, shape_message)
    torch._check(src.dtype == base.dtype, lambda: f"scatter_tokens: src {src.dtype} vs base {base.dtype}")
    torch._check(src.device == base.device, lambda: f"scatter_tokens: src on {src.device}, base on {base.device}")


def scatter_tokens_reference(base: Tensor, index: Tensor, src: Tensor) -> Tensor:
    """Plain-torch scatter along the token axis; the CPU path and the reference for the kernel."""
    check_scatter_args(base, index, src)
    out = base.clone(memory_format=torch.contiguous_format)
    return out.scatter_(1, common.expand_token_index(index, out), src)


if HAS_TRITON:

    @common.triton_kernel
    def _scatter_tokens_kernel(
        src_ptr, index_ptr, out_ptr,
        M, C,
        stride_sb, stride_sm, stride_sc,
        stride_ib, stride_im,
        stride_ob, stride_on,
        BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        """One program writes a [BLOCK_M tokens, BLOCK_C channels] tile of src[b] into out[b].

        Grid: (cdiv(M, BLOCK_M), cdiv(C, BLOCK_C), B). out ([B, N, C], contiguous in C) already
        holds a copy of base; rows not named by the index keep it.
        """
        pid_m = tl.program_id(0)
        pid_c = tl.program_id(1)
        # int64 batch offset: B * N * C may exceed 2**31 elements.
        b = tl.program_id(2).to(tl.int64)
        tokens = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        channels = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        token_mask = tokens < M
        tile_mask = token_mask[:, None] & (channels[None, :] < C)

        target_tokens = tl.load(index_ptr + b * stride_ib + tokens * stride_im, mask=token_mask, other=0)
        src = src_ptr + b * stride_sb + tokens[:, None].to(tl.int64) * stride_sm + channels[None, :] * stride_sc
        values = tl.load(src, mask=tile_mask)
        dst = out_ptr + b * stride_ob + target_tokens[:, None] * stride_on + channels[None, :]
        tl.store(dst, values, mask=tile_mask)


def scatter_tokens_triton(
    base: Tensor, index: Tensor, src: Tensor, block_m: int | None = None, block_c: int | None = None
) -> Tensor:
    """Launch the Triton scatter kernel (CUDA, or any device under TRITON_INTERPRET=1).

    ``block_m``/``block_c`` override the block sizes chosen from the shapes (powers of two).
    """
    common.require_triton("scatter_tokens")
    check_scatter_args(base, index, src)
    batch, tokens_in = index.shape
    out = base.clone(memory_format=torch.contiguous_format)
    out_rows = common.as_token_rows(out)  # a view: out is contiguous
    src_rows = common.as_token_rows(src)
    width = out_rows.shape[2]
    if src_rows.numel() > 0:
        default_m, default_c = common.token_block_sizes(tokens_in, width)
        block_m, block_c = block_m or default_m, block_c or default_c
        grid = (common.cdiv(tokens_in, block_m), common.cdiv(width, block_c), batch)
        _scatter_tokens_kernel[grid](
            src_rows, index, out_rows,
            tokens_in, width,
            src_rows.stride(0), src_rows.stride(1), src_rows.stride(2),
            index.stride(0), index.stride(1),
            out_rows.stride(0), out_rows.stride(1),
            BLOCK_M=block_m, BLOCK_C=block_c,
            num_warps=common.num_warps_for_tile(block_m, block_c),
        )
    return out


@torch.library.custom_op("tokred::scatter_tokens", mutates_args=())
def scatter_tokens(base: Tensor, index: Tensor, src: Tensor) -> Tensor:
    """Copy of ``base[B, N, *row]`` with ``out[b, index[b, m]] = src[b, m]`` (unique indices per row)."""
    return scatter_tokens_reference(base, index, src)


if HAS_TRITON:
    scatter_tokens.register_kernel("cuda")(scatter_tokens_triton)


@scatter_tokens.register_fake
def _scatter_tokens_fake(base: Tensor, index: Tensor, src: Tensor) -> Tensor:
    check_scatter_args(base, index, src)
    return torch.empty_like(base, memory_format=torch.contiguous_format)


def _scatter_tokens_setup_context(ctx, inputs, output) -> None:
    _, index, _ = inputs
    ctx.save_for_backward(index)


def _scatter_tokens_backward(ctx, grad_out: Tensor):
    """d base = grad_out with the overwritten tokens zeroed; d src = grad_out at those tokens."""
    (index,) = ctx.saved_tensors
    grad_base = grad_out.scatter(1, common.expand_token_index(index, grad_out), 0.0)
    grad_src = gather_tokens(grad_out, index)
    return grad_base, None, grad_src


scatter_tokens.register_autograd(_scatter_tokens_backward, setup_context=_scatter_tokens_setup_context)


def onnx_lowering():
    """ONNX translation for ``torch.onnx.export(..., dynamo=True, custom_translation_table=...)``.

    ScatterElements (no reduction: indices are unique) along axis 1 with the index broadcast
    over the row dims.
    """
    from onnxscript import opset18 as op

    def tokred_scatter_tokens(base, index, src):
        expanded = common.onnx_expand_token_index(op, index, base)
        return op.ScatterElements(base, expanded, src, axis=1, reduction="none")

    return tokred_scatter_tokens
