"""``tokred::gather_tokens(x[B, N, *row], index[B, M]) -> [B, M, *row]``: out[b, m] = x[b, index[b, m]].

Keeps the tokens a pass chose (pruning, the kept set of a merge) in the order ``index`` gives.
Indices may repeat within a row. Index values must lie in ``[0, N)``: the reference path raises
otherwise, the Triton path does not check (a check would need a device sync).
"""

from __future__ import annotations

import torch
from torch import Tensor

from tokred.triton_ops import common
from tokred.triton_ops.common import HAS_TRITON, tl


def gather_tokens_reference(x: Tensor, index: Tensor) -> Tensor:
    """Plain-torch gather along the token axis; the CPU path and the reference for the kernel."""
    common.check_token_index("gather_tokens", x, index)
    return torch.gather(x, 1, common.expand_token_index(index, x)).contiguous()


if HAS_TRITON:

    @common.triton_kernel
    def _gather_tokens_kernel(
        x_ptr, index_ptr, out_ptr,
        M, C,
        stride_xb, stride_xn, stride_xc,
        stride_ib, stride_im,
        stride_ob, stride_om,
        BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        """One program copies a [BLOCK_M tokens, BLOCK_C channels] tile of out[b] from x[b].

        Grid: (cdiv(M, BLOCK_M), cdiv(C, BLOCK_C), B). out is contiguous-in-C ([B, M, C]).
        """
        pid_m = tl.program_id(0)
        pid_c = tl.program_id(1)
        # int64 batch offset: B * N * C may exceed 2**31 elements.
        b = tl.program_id(2).to(tl.int64)
        tokens = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        channels = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        token_mask = tokens < M
        tile_mask = token_mask[:, None] & (channels[None, :] < C)

        source_tokens = tl.load(index_ptr + b * stride_ib + tokens * stride_im, mask=token_mask, other=0)
        src = x_ptr + b * stride_xb + source_tokens[:, None] * stride_xn + channels[None, :] * stride_xc
        values = tl.load(src, mask=tile_mask)
        dst = out_ptr + b * stride_ob + tokens[:, None].to(tl.int64) * stride_om + channels[None, :]
        tl.store(dst, values, mask=tile_mask)


def gather_tokens_triton(x: Tensor, index: Tensor, block_m: int | None = None, block_c: int | None = None) -> Tensor:
    """Launch the Triton gather kernel (CUDA, or any device under TRITON_INTERPRET=1).

    ``block_m``/``block_c`` override the block sizes chosen from the shapes (powers of two;
    tests use small ones to exercise partial tiles on tiny tensors).
    """
    common.require_triton("gather_tokens")
    common.check_token_index("gather_tokens", x, index)
    batch, tokens_out = index.shape
    rows = common.as_token_rows(x)
    width = rows.shape[2]
    out = torch.empty((batch, tokens_out, width), dtype=x.dtype, device=x.device)
    if out.numel() > 0:
        default_m, default_c = common.token_block_sizes(tokens_out, width)
        block_m, block_c = block_m or default_m, block_c or default_c
        grid = (common.cdiv(tokens_out, block_m), common.cdiv(width, block_c), batch)
        _gather_tokens_kernel[grid](
            rows, index, out,
            tokens_out, width,
            rows.stride(0), rows.stride(1), rows.stride(2),
            index.stride(0), index.stride(1),
            out.stride(0), out.stride(1),
            BLOCK_M=block_m, BLOCK_C=block_c,
            num_warps=common.num_warps_for_tile(block_m, block_c),
        )
    return out.view(batch, tokens_out, *x.shape[2:])


@torch.library.custom_op("tokred::gather_tokens", mutates_args=())
def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """``out[b, m] = x[b, index[b, m]]`` for ``x[B, N, *row]``, ``index[B, M]`` int64 -> ``[B, M, *row]``."""
    return gather_tokens_reference(x, index)


if HAS_TRITON:
    gather_tokens.register_kernel("cuda")(gather_tokens_triton)


@gather_tokens.register_fake
def _gather_tokens_fake(x: Tensor, index: Tensor) -> Tensor:
    common.check_token_index("gather_tokens", x, index)
    return x.new_empty((index.shape[0], index.shape[1], *x.shape[2:]))


def _gather_tokens_setup_context(ctx, inputs, output) -> None:
    x, index = inputs
    ctx.save_for_backward(index)
    ctx.x_shape = x.shape


def _gather_tokens_backward(ctx, grad_out: Tensor):
    """d x = scatter_add of grad_out back to the source tokens (indices may repeat, so add)."""
    (index,) = ctx.saved_tensors
    grad_x = grad_out.new_zeros(ctx.x_shape)
    grad_x.scatter_add_(1, common.expand_token_index(index, grad_x), grad_out)
    return grad_x, None


gather_tokens.register_autograd(_gather_tokens_backward, setup_context=_gather_tokens_setup_context)


def onnx_lowering():
    """ONNX translation for ``torch.onnx.export(..., dynamo=True, custom_translation_table=...)``.

    GatherElements along axis 1 with the index broadcast over the row dims.
    """
    from onnxscript import opset18 as op

    def tokred_gather_tokens(x, index):
        return op.GatherElements(x, common.onnx_expand_token_index(op, index, x), axis=1)

    return tokred_gather_tokens
