"""Helpers shared by every tokred kernel: Triton availability, lazy jit, block sizes, token index shapes.

Token ops work on tensors whose dim 0 is the batch and dim 1 the token axis: ``x[B, N, *row]``.
Every dim after the token axis is one "row" of ``C = prod(row)`` elements, so a kernel sees
``x`` as ``[B, N, C]`` and a token index as ``[B, M]`` (int64, values in ``[0, N)``).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import os
from typing import Any, Callable

import torch

try:
    import triton
    import triton.language as tl  # noqa: F401  (re-exported for kernel modules)

    HAS_TRITON = True
except ImportError:  # the reference (plain torch) path needs no Triton
    triton = None
    tl = None
    HAS_TRITON = False

# Cap on one program's tile: BLOCK_M * BLOCK_C elements. 4096 elements of 4 bytes fill 16 KiB of
# registers across 8 warps (16 per thread): large enough to saturate bandwidth on a copy kernel,
# small enough to stay clear of register spills.
MAX_TILE_ELEMENTS = 4096
MAX_BLOCK_C = 256


def interpreter_enabled() -> bool:
    """True when TRITON_INTERPRET=1 is set now (Triton reads the variable on every access)."""
    return HAS_TRITON and bool(triton.knobs.runtime.interpret)


class LazyTritonKernel:
    """A Triton kernel that is ``triton.jit``-ed at launch time, once per interpreter mode.

    ``triton.jit`` decides between the compiler and the interpreter when it decorates a function,
    from TRITON_INTERPRET at that moment. Deferring it to the launch lets a process that imported
    tokred with the variable unset switch the interpreter on later (tests do this), and keeps the
    compiled kernel cached for ordinary launches. Launch exactly like a jitted kernel:
    ``kernel[grid](*args, BLOCK=..., num_warps=...)``.
    """

    def __init__(self, fn: Callable):
        self.fn = fn
        self._jitted: dict[bool, Any] = {}
        functools.update_wrapper(self, fn)

    def jitted(self):
        """The ``triton.jit`` object for the current TRITON_INTERPRET setting."""
        require_triton(self.fn.__name__)
        mode = interpreter_enabled()
        if mode not in self._jitted:
            self._jitted[mode] = triton.jit(self.fn)
        return self._jitted[mode]

    def __getitem__(self, grid):
        return self.jitted()[grid]


def triton_kernel(fn: Callable) -> LazyTritonKernel:
    """Decorator for tokred kernels: ``triton.jit``, applied lazily (see ``LazyTritonKernel``)."""
    return LazyTritonKernel(fn)


def require_triton(op_name: str) -> None:
    """Raise a clear error where a Triton launch is asked for without Triton installed."""
    if not HAS_TRITON:
        raise RuntimeError(f"{op_name}: the Triton kernel needs the triton package; use the reference path")


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the Triton kernel should run: Triton is installed and every tensor is on CUDA."""
    return HAS_TRITON and all(t.is_cuda for t in tensors)


KERNEL_MODES = ("auto", "triton", "reference")
KERNELS_ENV = "TOKRED_KERNELS"
# The backend options ``kernels`` and ``cpu_kernel`` of the compile in progress (or of the graph
# running): context variables, so one model's choice never leaks into another's, or another thread's.
_KERNELS: contextvars.ContextVar[str] = contextvars.ContextVar("tokred_kernels", default="auto")
CPU_KERNEL: contextvars.ContextVar[bool] = contextvars.ContextVar("tokred_cpu_kernel", default=True)


@contextlib.contextmanager
def kernel_settings(kernels: str | None = None, cpu_kernel: bool | None = None):
    """Within the block: ``kernels`` ("auto", "triton", "reference") chooses which ops a graph
    calls as Triton kernels on CUDA, ``cpu_kernel=False`` keeps sparse attention off tokred's C++
    CPU kernel. None leaves a setting as it is. The backend wraps its compile and its graphs in it."""
    if kernels is not None and kernels not in KERNEL_MODES:
        raise ValueError(f"kernels must be one of {KERNEL_MODES}, got {kernels!r}")
    tokens = []
    if kernels is not None:
        tokens.append((_KERNELS, _KERNELS.set(kernels)))
    if cpu_kernel is not None:
        tokens.append((CPU_KERNEL, CPU_KERNEL.set(bool(cpu_kernel))))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def kernel_mode() -> str:
    """The ``kernels`` setting in force: TOKRED_KERNELS where set (a documented override), else
    the backend option's (default "auto")."""
    mode = os.environ.get(KERNELS_ENV) or _KERNELS.get()
    if mode not in KERNEL_MODES:
        raise ValueError(f"{KERNELS_ENV} must be one of {KERNEL_MODES}, got {mode!r}")
    return mode

# Ops a rewritten graph calls as Triton kernels on CUDA in "auto" mode. Measured end to end on an
# H100 (bench/results/passes_gpu*.md): graphs that inline the plain-torch references of the
# token ops were faster than graphs calling their kernels (merged ViT-B 0.34x against 0.27x of
# dense, pruned ViT-B 1.20x against 1.03x): inductor fuses the references with their neighbours,
# a custom op is a fusion barrier. The fused prune_tokens kernel also lost alone (0.02-0.06x of its
# reference under inductor, bench/results/prune_kernels_gpu.md). k_center's greedy loop is the
# exception: unrolled by inductor it takes minutes to compile, and its kernel runs 13x faster
# than the eager loop.
KERNELS_IN_GRAPH = frozenset({"k_center"})


def graph_calls_kernel(x: torch.Tensor, op: str) -> bool:
    """Whether a rewritten graph calls the custom op ``op`` (Triton) for ``x``, or inlines its
    plain-torch reference (which inductor then fuses with its neighbours).

    Read when the graph is traced. :func:`kernel_mode`: "auto" (default: the ops in
    KERNELS_IN_GRAPH as Triton kernels on CUDA, the others inlined), "triton" (every custom op on
    CUDA), "reference" (never a custom op). Off CUDA the references are always inlined.
    """
    mode = kernel_mode()
    if mode == "reference" or not (x.is_cuda and HAS_TRITON):
        return False
    return mode == "triton" or op in KERNELS_IN_GRAPH


def cdiv(a: int, b: int) -> int:
    """Ceiling division: programs needed to cover ``a`` elements in blocks of ``b``."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(n - 1, 0).bit_length()


def token_block_sizes(num_tokens: int, row_width: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_C) for a kernel that copies ``num_tokens`` rows of ``row_width`` elements.

    BLOCK_C covers the row up to MAX_BLOCK_C (wider rows take several programs along C);
    BLOCK_M fills the rest of a MAX_TILE_ELEMENTS tile but no more than the tokens there are.
    """
    block_c = min(next_power_of_2(row_width), MAX_BLOCK_C)
    block_m = max(1, min(next_power_of_2(num_tokens), MAX_TILE_ELEMENTS // block_c))
    return block_m, block_c


def num_warps_for_tile(block_m: int, block_c: int) -> int:
    """Warps for a copy tile: about 16 elements per thread, between 1 and 8 warps."""
    return max(1, min(8, (block_m * block_c) // 512))


def row_width(x: torch.Tensor) -> int:
    """C: elements per token of ``x[B, N, *row]`` (1 for a rank-2 tensor)."""
    return math.prod(x.shape[2:])


def as_token_rows(x: torch.Tensor) -> torch.Tensor:
    """View (or copy, where a view is impossible) ``x[B, N, *row]`` as ``[B, N, C]``."""
    return x.reshape(x.shape[0], x.shape[1], row_width(x))


def expand_token_index(index: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Broadcast ``index[B, M]`` over the row dims of ``x[B, N, *row]``: ``[B, M, *row]`` (a view).

    The result is the index argument ``torch.gather``/``Tensor.scatter`` take along dim 1.
    """
    row_shape = x.shape[2:]
    return index.reshape(*index.shape, *([1] * len(row_shape))).expand(*index.shape, *row_shape)


def check_token_index(name: str, x: torch.Tensor, index: torch.Tensor) -> None:
    """Raise if ``index`` is not an int64 ``[B, M]`` token index for ``x[B, N, ...]``.

    Works on fake tensors with symbolic sizes (torch._check records the batch equality as a
    guard instead of evaluating it). Index values are not checked: that would need a device sync.
    """
    torch._check(x.dim() >= 2, lambda: f"{name}: expected x of rank >= 2 [B, N, ...], got {tuple(x.shape)}")
    torch._check(index.dim() == 2, lambda: f"{name}: expected index [B, M], got {tuple(index.shape)}")
    torch._check(index.dtype == torch.int64, lambda: f"{name}: expected int64 index, got {index.dtype}")
    torch._check(
        index.shape[0] == x.shape[0],
        lambda: f"{name}: batch mismatch, x {tuple(x.shape)} vs index {tuple(index.shape)}",
    )
    torch._check(x.device == index.device, lambda: f"{name}: x on {x.device}, index on {index.device}")


def onnx_expand_token_index(op, index, x):
    """ONNX graph for ``expand_token_index``: ``index[B, M]`` -> ``[B, M, *x.shape[2:]]``.

    ``op`` is an onnxscript opset. Built from runtime shapes only (no rank or size baked in), so
    it serves any rank of ``x`` and any dynamic batch or token count.
    """
    import onnx

    index_shape = op.Shape(index)
    row_shape = op.Shape(x, start=2)
    one = onnx.helper.make_tensor("one", onnx.TensorProto.INT64, [1], [1])
    ones_per_row_dim = op.ConstantOfShape(op.Shape(row_shape), value=one)
    index_column = op.Reshape(index, op.Concat(index_shape, ones_per_row_dim, axis=0))
    return op.Expand(index_column, op.Concat(index_shape, row_shape, axis=0))
