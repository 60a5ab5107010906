"""tokred's C++ CPU kernel for block-sparse attention (tokred/triton_ops/sparse_cpu.cpp).

Checked against the float64 loop oracle of test_kernels_sparse.py (which shares no code with the
kernel): rules made of key intervals (causal and full block_topk, sink_window causal and not,
window 0), key runs with gaps, queries after a cache, biases that mask whole rows, fp16/bf16,
strided views, head dims that leave SIMD tails. Also: the entry point runs it exactly where it
applies, compiled graphs run it rather than flex_attention, and where it cannot be built the torch
paths give the same results and the report says so.
"""

from __future__ import annotations

import math

import pytest
import torch

from test_kernels_sparse import oracle_attention, oracle_mask, qkv
from tokred.triton_ops import sparse_cpu
from tokred.triton_ops import sparse_attention as sparse_module
from tokred.triton_ops.sparse_attention import (
    SparsePattern,
    interval_rule,
    pattern_layout,
    pattern_rule,
    resolve,
    sparse_attention,
    sparse_attention_reference,
)

TOL = dict(atol=1e-5, rtol=1e-5)


def test_kernel_is_built_on_this_machine():
    assert sparse_cpu.kernel_status() == (True, "built")


@pytest.mark.parametrize("pattern,expected", [
    (SparsePattern("block_topk", block=16), (0, -1, True)),
    (SparsePattern("block_topk", block=16, causal=False), (0, -1, False)),
    (SparsePattern("sink_window", sinks=4, window=1024), (4, 1024, True)),
    (SparsePattern("sink_window", sinks=0, window=7, causal=False), (0, 7, False)),
    (SparsePattern("sink_window", sinks=5, window=0), (5, 0, True)),
    (SparsePattern("mask", mask_fn=lambda b, h, q_idx, kv_idx: (kv_idx < 3) | (q_idx - kv_idx < 10)), None),
    (SparsePattern("mask", mask_fn=lambda b, h, q_idx, kv_idx: q_idx - kv_idx < 4, causal=False), None),
])
def test_interval_rule_reads_exactly_the_interval_patterns(pattern, expected):
    assert interval_rule(pattern_rule(pattern)) == expected


def kernel_run(pattern, q, k, v, bias=None, q_offset=None):
    """The kernel on the pattern's layout: (output, float64 oracle)."""
    scale, q_offset = resolve(q, k, None, q_offset)
    count, index, rule = pattern_layout(pattern, q, k, q_offset)
    block = pattern.block
    out = sparse_cpu.block_sparse_attention(q, k, v, count, index, bias, scale, q_offset, block, block,
                                            interval_rule(rule))
    additive = None if bias is None else bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    expected = oracle_attention(q.float(), k.float(), v.float(), oracle_mask(pattern, q, k, q_offset), scale, additive)
    return out, expected


PATTERNS = {
    "block_topk_gaps": SparsePattern("block_topk", block=8, topk=2, sinks=1, local=1),
    "block_topk_full": SparsePattern("block_topk", block=8, topk=2, sinks=0, local=2, causal=False),
    "sink_window": SparsePattern("sink_window", sinks=3, window=11, block=8),
    "sink_window_full": SparsePattern("sink_window", sinks=2, window=6, block=8, causal=False),
    "sinks_only": SparsePattern("sink_window", sinks=5, window=0, block=8, causal=False),
    "window_only": SparsePattern("sink_window", sinks=0, window=13, block=16),
}

# (batch, heads, kv_heads, Nq, Nk, q_offset or None): GQA with odd lengths, a prefill after a cache,
# decode, a query block whose rows sit before the keys end (q_offset smaller than Nk - Nq).
SHAPES = {
    "gqa_odd": (2, 6, 2, 45, 45, None),
    "after_cache": (1, 4, 4, 19, 60, None),
    "decode": (3, 4, 1, 1, 50, None),
    "explicit_offset": (1, 2, 1, 20, 40, 7),
}


@pytest.mark.parametrize("name", sorted(PATTERNS))
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_kernel_matches_oracle(name, shape):
    *dims, q_offset = SHAPES[shape]
    q, k, v = qkv(*dims, dim=20)  # 20: SIMD tails in every row loop
    out, expected = kernel_run(PATTERNS[name], q, k, v, q_offset=q_offset)
    torch.testing.assert_close(out.double(), expected, **TOL)


def test_kernel_with_gaps_between_kept_blocks_copies_the_runs():
    """block_topk over 96 keys in blocks of 8 with topk 2 keeps blocks with gaps between them: the
    rows whose layout is not one run must be in the test, or the copying branch goes untested."""
    q, k, v = qkv(2, 4, 2, 96, 96, dim=16)
    pattern = PATTERNS["block_topk_gaps"]
    count, index, _ = pattern_layout(pattern, q, k, 0)
    entries = index[..., 1:].long() - index[..., :-1].long()
    live = torch.arange(index.shape[-1] - 1) < (count[..., None] - 1)
    assert bool(((entries > 1) & live).any()), "no layout row with a gap"
    out, expected = kernel_run(pattern, q, k, v)
    torch.testing.assert_close(out.double(), expected, **TOL)


def test_kernel_bias_masks_keys_and_whole_rows():
    """A padding bias of -inf (whole rows of batch 1 left with nothing: zeros) and a float bias."""
    q, k, v = qkv(2, 4, 2, 37, 37, dim=16)
    padding = torch.zeros(2, 1, 1, 37)
    padding[1, ..., 29:] = -math.inf
    padding[1, ..., :3] = -math.inf
    pattern = SparsePattern("sink_window", sinks=3, window=4, block=8)  # rows >= 33 of batch 1 see nothing
    out, expected = kernel_run(pattern, q, k, v, bias=padding)
    assert not expected[1, :, 34:].any() and torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), expected, **TOL)
    bias = torch.randn(2, 4, 37, 37, generator=torch.Generator().manual_seed(2))
    out, expected = kernel_run(PATTERNS["block_topk_gaps"], q, k, v, bias=bias)
    torch.testing.assert_close(out.double(), expected, **TOL)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_half_precision_inputs(dtype):
    q, k, v = qkv(2, 4, 2, 45, 45, dim=16, dtype=dtype)
    out, expected = kernel_run(PATTERNS["sink_window"], q, k, v)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, atol=1e-2, rtol=1e-2)


def test_kernel_reads_strided_views():
    """q/k/v as transposed views of [B, N, H, D] and a value head dim unlike the key's."""
    generator = torch.Generator().manual_seed(4)
    q = torch.randn(2, 45, 4, 16, generator=generator).transpose(1, 2)
    k = torch.randn(2, 45, 2, 16, generator=generator).transpose(1, 2)
    v = torch.randn(2, 45, 2, 12, generator=generator).transpose(1, 2)
    out, expected = kernel_run(PATTERNS["block_topk_gaps"], q, k, v)
    torch.testing.assert_close(out.double(), expected, **TOL)


def test_kernel_refuses_bad_arguments_with_a_clear_error():
    assert sparse_cpu.kernel_status()[0]  # loads the library: this test calls the op directly
    q, k, v = qkv(1, 2, 1, 16, 16, dim=8)
    count, index, _ = pattern_layout(PATTERNS["sink_window"], q, k, 0)
    count, index = count.expand(1, 2, -1).contiguous(), index.expand(1, 2, -1, -1).contiguous()
    with pytest.raises(RuntimeError, match="fp32"):
        torch.ops.tokred_cpu.block_sparse_attention(q.double(), k, v, count, index, None, 1.0, 0, 8, 8, 3, 11, True)
    with pytest.raises(RuntimeError, match="count"):
        torch.ops.tokred_cpu.block_sparse_attention(q, k, v, count[..., :1], index, None, 1.0, 0, 8, 8, 3, 11, True)


@pytest.mark.parametrize("name,runs", [("sink_window", True), ("block_topk_gaps", True), ("mask", False)])
@pytest.mark.parametrize("shape", ["prefill", "decode"])
def test_entry_point_runs_the_kernel_exactly_for_interval_rules(monkeypatch, name, runs, shape):
    calls = []
    kernel = sparse_cpu.block_sparse_attention
    monkeypatch.setattr(sparse_cpu, "block_sparse_attention", lambda *a: calls.append(a[-1]) or kernel(*a))
    pattern = PATTERNS.get(name) or SparsePattern(
        "mask", block=8, mask_fn=lambda b, h, q_idx, kv_idx: (kv_idx < 3) | (q_idx - kv_idx < 11))
    q, k, v = qkv(2, 4, 2, 37 if shape == "prefill" else 1, 37)
    torch.testing.assert_close(sparse_attention(q, k, v, pattern), sparse_attention_reference(q, k, v, pattern), **TOL)
    assert len(calls) == int(runs)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_sink_window_runs_the_kernel_not_flex(fresh_dynamo, monkeypatch, backend):
    """Inside compiled graphs sink_window takes the op (the kernel), also for decode shapes and
    blocks of 16 that flex would take, and with dynamic lengths (where inductor's CPU flex
    lowering failed)."""
    flex = []
    monkeypatch.setattr(sparse_module, "flex_cpu_attention", lambda *a: flex.append(1))
    pattern = SparsePattern("sink_window", sinks=2, window=9, block=16)
    for dynamic in (False, True):
        torch._dynamo.reset()
        compiled = torch.compile(lambda q, k, v: sparse_attention(q, k, v, pattern), backend=backend,
                                 fullgraph=True, dynamic=dynamic)
        for num_queries, num_keys in [(3, 41), (5, 50), (37, 37)]:
            q, k, v = qkv(2, 4, 2, num_queries, num_keys)
            torch.testing.assert_close(compiled(q, k, v), sparse_attention_reference(q, k, v, pattern), **TOL)
    assert flex == []


def test_without_the_kernel_torch_paths_give_the_same_results(monkeypatch):
    """A machine that cannot build the kernel (here: the build raises) or a user who turns it off
    (TOKRED_CPU_KERNEL=0) gets the torch paths, with the reason in kernel_status."""
    q, k, v = qkv(2, 4, 2, 45, 45)
    pattern = PATTERNS["block_topk_gaps"]
    with_kernel = sparse_attention(q, k, v, pattern)

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    try:
        sparse_cpu.kernel_status.cache_clear()
        monkeypatch.setattr(sparse_cpu, "build_and_load", no_compiler)
        usable, reason = sparse_cpu.kernel_status()
        assert not usable and "Ninja is required" in reason
        assert "C++ kernel is not built" in sparse_module.cpu_runtime(pattern)
        torch.testing.assert_close(sparse_attention(q, k, v, pattern), with_kernel, **TOL)
        sparse_cpu.kernel_status.cache_clear()
        monkeypatch.setenv(sparse_cpu.ENV_SWITCH, "0")
        assert sparse_cpu.kernel_status() == (False, f"turned off by {sparse_cpu.ENV_SWITCH}=0")
        torch.testing.assert_close(sparse_attention(q, k, v, pattern), with_kernel, **TOL)
    finally:
        sparse_cpu.kernel_status.cache_clear()


def test_disabled_block_runs_the_torch_paths(monkeypatch):
    calls = []
    kernel = sparse_cpu.block_sparse_attention
    monkeypatch.setattr(sparse_cpu, "block_sparse_attention", lambda *a: calls.append(1) or kernel(*a))
    q, k, v = qkv(2, 4, 2, 45, 45)
    pattern = PATTERNS["block_topk_gaps"]
    with sparse_cpu.disabled():
        inside = sparse_attention(q, k, v, pattern)
    assert calls == []
    torch.testing.assert_close(sparse_attention(q, k, v, pattern), inside, **TOL)
    assert calls == [1]
