"""What tokred's Triton kernels take from Triton beyond its documented language.

Kernels reduce with ``tl.reduce(x, axis, combine)``, not ``tl.sum`` / ``tl.max``: those change the
dtype (``tl.max`` computes fp16 in fp32, ``tl.sum`` picks its own accumulator type), and the
kernels were written and checked for the exact dtypes they reduce. Triton's own combine
functions are private (``tl.standard._sum_combine``, ``_elementwise_max``); these are the same
functions, defined here with the public ``triton.jit``. Without Triton installed they are None
(the plain-torch reference paths need no Triton).
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference paths need no Triton
    triton = tl = None

if triton is not None:
    @triton.jit
    def sum_combine(a, b):
        return a + b

    @triton.jit
    def max_combine(a, b):
        return tl.maximum(a, b)

    @triton.jit
    def min_combine(a, b):
        return tl.minimum(a, b)
else:
    sum_combine = max_combine = min_combine = None

__all__ = ["sum_combine", "max_combine", "min_combine"]
