"""tokred's own CPU kernel for block-sparse attention (sparse_cpu.cpp), built on first use.

The op's CPU path (``sparse_attention_blocks``) runs it where it applies: fp32, fp16 or bf16
inputs (computed in fp32) and a rule made of key intervals per row (``interval_rule``: causal or
full block_topk, sink_window), with or without an additive bias. Compiled, it measured 0.9-1.2x the
density bound at 2k-16k tokens on this CPU, against 1.2-2.2x for the op's torch paths (see
bench/results/sparse_attention_speed.md).

Built with torch.utils.cpp_extension (g++ and ninja, as inductor's CPU backend needs a C++
compiler too) for the SIMD level torch detects on this CPU, and cached by torch under
``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``). Where it cannot be built or loaded
the op keeps its torch paths; ``kernel_status()`` says which and why. The backend option
``cpu_kernel=False`` turns it off for a model, ``TOKRED_CPU_KERNEL=0`` for a process.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from pathlib import Path

import torch
from torch import Tensor

from tokred.compat.torch_api import assume_constant_result
from tokred.triton_ops.common import CPU_KERNEL, kernel_settings

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("sparse_cpu.cpp")
LIBRARY = "tokred_cpu"
ENV_SWITCH = "TOKRED_CPU_KERNEL"

# SIMD flags per torch's CPU capability: the ATen vector types then compile to the same
# instructions as torch's own kernels on this CPU.
CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2"],
}


def compile_flags() -> list[str]:
    """g++ flags of the build: -O3, OpenMP and the SIMD level torch detected (``CAPABILITY_FLAGS``)."""
    flags = ["-O3", "-fopenmp"]
    return flags + CAPABILITY_FLAGS.get(torch.backends.cpu.get_cpu_capability(), [])


def build_and_load() -> None:
    """Build the library (or find torch's cached build) and load it; raises on failure.

    Loaded at most once per process: a second build of the library (another version) would
    register the namespace again, which aborts the process rather than raising.
    """
    if hasattr(torch.ops.tokred_cpu, "block_sparse_attention"):
        return
    from torch.utils.cpp_extension import load

    load(name=LIBRARY, sources=[str(SOURCE)], extra_cflags=compile_flags(), extra_ldflags=["-fopenmp"],
         is_python_module=False, verbose=False)
    torch.ops.tokred_cpu.block_sparse_attention  # noqa: B018 - raises if the library did not register


@functools.cache
def kernel_status() -> tuple[bool, str]:
    """(usable, reason): builds and loads the kernel once per process."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return False, f"turned off by {ENV_SWITCH}=0"
    try:
        build_and_load()
    except Exception as error:  # noqa: BLE001 - any build/load failure means: use the torch paths
        reason = f"not built ({type(error).__name__}: {str(error).strip().splitlines()[0][:200]})"
        log.warning("tokred: CPU sparse attention kernel %s; using the torch paths", reason)
        return False, reason
    return True, "built"


@assume_constant_result
def kernel_available() -> bool:
    """Whether the kernel is usable (a constant for Dynamo: building it is not traced)."""
    return kernel_status()[0]


@contextlib.contextmanager
def disabled():
    """Inside the block the op takes its torch paths, as where the kernel cannot be built (the
    benchmark and the tests compare the two; the backend option ``cpu_kernel=False`` does it for a
    model, ``TOKRED_CPU_KERNEL=0`` for a process)."""
    with kernel_settings(cpu_kernel=False):
        yield


def applies(q: Tensor) -> bool:
    """Whether ``block_sparse_attention`` runs for inputs like ``q`` (CPU, fp32/fp16/bf16, built,
    not inside ``disabled()``)."""
    return (q.device.type == "cpu" and q.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and CPU_KERNEL.get() and kernel_available())


def block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, kv_count: Tensor, kv_index: Tensor,
                           bias: Tensor | None, scale: float, q_offset: int, block_m: int, block_n: int,
                           rule: tuple[int, int, bool]) -> Tensor:
    """Block-sparse attention by the kernel: [B, H, Nq, Dv] in q's dtype (computed in fp32).

    q [B, H, Nq, D], k/v [B, Hkv, Nk, *]; kv_count [.., NQB] and kv_index [.., NQB, MAXK] (int32,
    broadcast over B and H allowed); bias additive [B', H', Nq or 1, Nk] or None; ``rule`` the
    (sinks, window, causal) of the allowed keys in kept blocks: the row at position p attends key j
    when (j < sinks, and j <= p if causal) or j in [p - window + 1, p] (window > 0); window < 0
    means no lower bound ([0, p] when causal, every key otherwise), window 0 only the sinks.
    Callers check ``applies`` first.
    """
    usable, reason = kernel_status()  # loads the library in this process if nothing has yet
    if not usable:
        raise RuntimeError(f"tokred's CPU sparse attention kernel is {reason}")
    sinks, window, causal = rule
    batch, heads, num_queries, _ = q.shape
    num_keys = k.shape[2]

    def fp32_rows(t: Tensor) -> Tensor:  # fp32 with unit stride in the last dim, otherwise as given
        t = t.float()
        return t if t.stride(-1) == 1 else t.contiguous()

    count = kv_count.expand(batch, heads, -1).contiguous()
    index = kv_index.expand(batch, heads, -1, -1).contiguous()
    if bias is not None:
        bias = bias.float().expand(batch, heads, num_queries, num_keys)
    out = torch.ops.tokred_cpu.block_sparse_attention(fp32_rows(q), fp32_rows(k), fp32_rows(v), count, index, bias,
                                                      scale, q_offset, block_m, block_n, sinks, window, causal)
    return out.to(q.dtype)
