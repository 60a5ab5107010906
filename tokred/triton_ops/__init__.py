"""tokred's custom ops: the operators passes insert into graphs. ``import tokred.triton_ops`` registers them.

Ops (all under ``torch.ops.tokred``; token axis = dim 1, batch = dim 0, trailing dims = one row):
    gather_tokens(x[B, N, *row], index[B, M])                 -> [B, M, *row]
    scatter_tokens(base[B, N, *row], index[B, M], src[B, M, *row]) -> [B, N, *row]
    tome_match(metric[B, N, D], group[B, N])                 -> (node_max[B, Na] fp32, node_idx[B, Na] int64)
    tome_merge(x[B, N, C], size[B, N, 1], unm_idx[B, Nu], src_idx[B, R], dst_idx[B, R])
                                                             -> (x[B, Nu + Nb, C], size[B, Nu + Nb, 1] fp32)
    prune_tokens / select_kept / k_center                    (token pruning; see prune.py)

The pattern every kernel follows (one module per op, ``<op>.py``; shared helpers in ``common.py``):

1. ``<op>_reference(...)``: plain torch. It is the CPU path and the reference the kernel is tested
   against. ONNX-safe building blocks only (gather/scatter with an expanded index, scatter_add
   plus counts for means; never ``scatter_reduce(mean)`` or ``index_add`` with repeats).
2. The Triton kernel, inside ``if HAS_TRITON:`` (importing tokred must work without Triton),
   decorated with ``@common.triton_kernel``: ``triton.jit`` applied at first launch, once per
   TRITON_INTERPRET mode, so tests can switch the interpreter on after tokred was imported.
   Block sizes are ``tl.constexpr`` chosen from the shapes (``common.token_block_sizes``);
   offsets that can pass 2**31 elements are computed in int64.
3. ``<op>_triton(..., block_m=None, block_c=None)``: validates, allocates the output, launches.
   Callable directly, so tests run it on CPU tensors under TRITON_INTERPRET=1.
4. ``torch.library.custom_op("tokred::<op>", mutates_args=())`` whose default implementation is
   the reference; ``register_kernel("cuda")`` installs the Triton launch when Triton is there.
   Outputs are fresh contiguous tensors (never an alias of an input).
5. ``register_fake``: output shape/dtype from input shapes only (symbolic sizes welcome), with the
   same argument checks as the real implementations. ``register_autograd`` where cheap.
6. ``onnx_lowering()``: returns a function of standard ONNX ops (onnxscript opset 18, traced by
   the exporter; imported lazily because onnxscript is an optional extra), built from runtime
   shapes so dynamic axes export. Add it to ``_OP_MODULES`` below so ``onnx_translation_table``
   covers it.
7. Tests in tests/test_kernels.py: kernel under the interpreter == reference (fp32/fp16, partial
   tiles, batch > 1), custom op under torch.compile == reference, ``torch.library.opcheck``,
   ONNX export run in onnxruntime == torch.
"""

from __future__ import annotations

from typing import Callable

from tokred.triton_ops import gather_tokens, scatter_tokens, sparse_attention, tome_match, tome_merge
from tokred.triton_ops import prune  # tokred::prune_tokens, select_kept, k_center
from tokred.triton_ops.common import HAS_TRITON

# Every op module: its custom op has the module's name, and it defines ``onnx_lowering()``.
_OP_MODULES = (gather_tokens, scatter_tokens, tome_match, tome_merge, sparse_attention)

__all__ = ["HAS_TRITON", "onnx_translation_table", "gather_tokens", "scatter_tokens", "tome_match", "tome_merge", "prune",
           "sparse_attention"]


def onnx_translation_table() -> dict[Callable, Callable]:
    """``{torch.ops.tokred.<op>.default: lowering}`` for every tokred op.

    Pass it as ``torch.onnx.export(..., dynamo=True, custom_translation_table=...)``.
    """
    import torch

    table = {getattr(torch.ops.tokred, module.__name__.rsplit(".", 1)[1]).default: module.onnx_lowering()
             for module in _OP_MODULES}
    table.update(prune.onnx_lowerings())  # three ops in one module: it names them itself
    return table
