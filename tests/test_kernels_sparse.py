"""tokred::sparse_attention: patterns, the generated Triton kernel (interpreter), CPU path, compile, ONNX.

The oracle below builds each pattern's allowed set with Python loops straight from the definitions
in tokred/triton_ops/sparse_pattern.py and sparse_topk.py (per query position and key; block_topk
per query block with its own float64 Quest bound and sort), and computes attention per row in
float64. It shares no code with the modules' vectorised layouts, the gathered-block CPU path or
the kernel.

Interpreter: TRITON_INTERPRET=1 is set per test (monkeypatch); tokred jits kernels at launch.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tokred import triton_ops
from tokred.triton_ops import common, sparse_kernel, sparse_rule
from tokred.triton_ops import sparse_attention as sparse_module
from tokred.triton_ops.sparse_attention import (
    SparsePattern,
    past_blocks_attention,
    past_blocks_layout,
    sink_window_band_attention,
    pattern_layout,
    pattern_mask,
    resolve,
    sparse_attention,
    sparse_attention_reference,
)

needs_triton = pytest.mark.skipif(not common.HAS_TRITON, reason="triton not installed")


# ----------------------------------------------------------------------------------------------
# Oracle: loops, float64
# ----------------------------------------------------------------------------------------------


def oracle_mask(pattern: SparsePattern, q: torch.Tensor, k: torch.Tensor, q_offset: int) -> torch.Tensor:
    """Allowed set [B, H, Nq, Nk] bool, one (query, key) or (query block, key block) at a time."""
    batch, heads, num_queries, _ = q.shape
    kv_heads, num_keys = k.shape[1], k.shape[2]
    allowed = torch.zeros(batch, heads, num_queries, num_keys, dtype=torch.bool)
    for b in range(batch):
        for h in range(heads):
            if pattern.kind == "block_topk":
                kept = oracle_topk_blocks(pattern, q[b, h].double(), k[b, h // (heads // kv_heads)].double(),
                                          q_offset)
            for i in range(num_queries):
                pos = q_offset + i
                for j in range(num_keys):
                    if pattern.causal and j > pos:
                        continue
                    if pattern.kind == "sink_window":
                        ok = j < pattern.sinks or pos - pattern.window < j <= pos
                    elif pattern.kind == "block_topk":
                        ok = (j // pattern.block) in kept[i // pattern.block]
                    else:
                        ok = bool(pattern.mask_fn(torch.tensor(b), torch.tensor(h), torch.tensor(pos),
                                                  torch.tensor(j)))
                    allowed[b, h, i, j] = ok
    return allowed


def oracle_topk_blocks(pattern: SparsePattern, q: torch.Tensor, k: torch.Tensor, q_offset: int) -> list[set]:
    """Kept key blocks per query block of one head: q [Nq, D], k [Nk, D] (float64)."""
    block = pattern.block
    num_queries, num_keys = q.shape[0], k.shape[0]
    num_k_blocks = math.ceil(num_keys / block)
    kept = []
    for start in range(0, num_queries, block):
        rows = q[start:start + block]
        last = q_offset + start + rows.shape[0] - 1
        mean = rows.mean(0)
        visible = [n for n in range(num_k_blocks) if not pattern.causal or n * block <= last]
        own = last // block
        forced = {n for n in visible if n < pattern.sinks or own - pattern.local < n <= own}
        bounds = []
        for n in visible:
            if n in forced:
                continue
            keys = k[n * block:(n + 1) * block]
            lo, hi = keys.min(0).values, keys.max(0).values
            bounds.append((-sum(max(mean[c] * lo[c], mean[c] * hi[c]).item() for c in range(len(mean))), n))
        chosen = {n for _, n in sorted(bounds)[:pattern.topk]}  # highest bound first, then lower index
        kept.append(forced | chosen)
    return kept


def oracle_attention(q, k, v, allowed, scale, bias=None) -> torch.Tensor:
    """[B, H, Nq, Dv] float64, row by row; a row with nothing allowed is zero."""
    batch, heads, num_queries, _ = q.shape
    group = heads // k.shape[1]
    out = torch.zeros(batch, heads, num_queries, v.shape[-1], dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            for i in range(num_queries):
                scores = (k[b, h // group].double() @ q[b, h, i].double()) * scale
                if bias is not None:
                    scores = scores + bias[b, h, i].double()
                scores = scores.masked_fill(~allowed[b, h, i], -math.inf)
                if torch.isinf(scores).all():
                    continue
                out[b, h, i] = torch.softmax(scores, 0) @ v[b, h // group].double()
    return out


def qkv(batch, heads, kv_heads, num_queries, num_keys, dim=16, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    make = lambda h, n: torch.randn(batch, h, n, dim, generator=generator).to(dtype)
    return make(heads, num_queries), make(kv_heads, num_keys), make(kv_heads, num_keys)


def diagonal_bands(b, h, q_idx, kv_idx):
    """A FlexAttention-style rule: every third diagonal, plus the first two keys, minus head 1's odd rows."""
    return (((q_idx - kv_idx) % 3 == 0) | (kv_idx < 2)) & ((h != 1) | (q_idx % 2 == 0))


PATTERNS = {
    "sink_window": SparsePattern("sink_window", sinks=3, window=9, block=16),
    "sink_window_noncausal": SparsePattern("sink_window", sinks=5, window=12, block=16, causal=False),
    "window_only": SparsePattern("sink_window", window=20, block=16),
    "sinks_only_noncausal": SparsePattern("sink_window", sinks=5, window=0, block=16, causal=False),
    "block_topk": SparsePattern("block_topk", block=16, topk=1, sinks=1, local=1),
    "block_topk_noncausal": SparsePattern("block_topk", block=16, topk=2, sinks=0, local=1, causal=False),
    "mask": SparsePattern("mask", block=16, mask_fn=diagonal_bands),
    "mask_noncausal": SparsePattern("mask", block=16, causal=False,
                                    mask_fn=lambda b, h, q_idx, kv_idx: torch.abs(q_idx - kv_idx) < 7),
}

# (batch, heads, kv_heads, Nq, Nk): GQA, batch > 1, odd lengths, prefill with a cache, decode.
SHAPES = {
    "gqa_odd": (2, 4, 2, 37, 37),
    "mha_multi_block": (1, 2, 2, 67, 67),
    "prefill_with_cache": (1, 2, 1, 21, 53),
    "decode": (2, 4, 2, 1, 45),
    "whole_blocks_with_cache": (1, 4, 2, 32, 64),
}


# ----------------------------------------------------------------------------------------------
# Pattern definitions
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PATTERNS))
@pytest.mark.parametrize("shape", ["gqa_odd", "prefill_with_cache", "decode"])
def test_pattern_mask_matches_oracle(name, shape):
    pattern = PATTERNS[name]
    batch, heads, kv_heads, num_queries, num_keys = SHAPES[shape]
    q, k, _ = qkv(batch, heads, kv_heads, num_queries, num_keys)
    _, q_offset = resolve(q, k, None, None)
    mask = pattern_mask(pattern, q, k).expand(batch, heads, -1, -1)
    assert torch.equal(mask, oracle_mask(pattern, q, k, q_offset))


def test_block_topk_keeps_all_blocks_of_short_rows_and_prefers_lower_index_on_ties():
    # All keys equal: every bound ties, so the lowest candidate blocks win.
    q = torch.randn(1, 1, 64, 16)
    k = torch.ones(1, 1, 64, 16)
    pattern = SparsePattern("block_topk", block=16, topk=1, sinks=0, local=1)
    kept = pattern_mask(pattern, q, k)[0, 0, ::16, ::16]  # one entry per (query block, key block)
    expected = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(kept, expected)


def test_reference_matches_oracle_attention_with_bias():
    pattern = PATTERNS["sink_window"]
    q, k, v = qkv(2, 4, 2, 37, 37)
    padding = torch.ones(2, 1, 1, 37, dtype=torch.bool)
    padding[1, ..., 30:] = False
    scale, q_offset = resolve(q, k, None, None)
    bias = torch.where(padding, 0.0, -math.inf).expand(2, 4, 37, 37)
    expected = oracle_attention(q, k, v, oracle_mask(pattern, q, k, q_offset), scale, bias)
    got = sparse_attention_reference(q, k, v, pattern, attn_bias=padding)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.fixture(params=["own_kernel", "torch_paths"])
def cpu_paths(request):
    """Each CPU test twice: with tokred's C++ kernel where it applies, and with the torch paths."""
    if request.param == "torch_paths":
        request.getfixturevalue("torch_sparse_paths")
    return request.param


@pytest.mark.parametrize("name", sorted(PATTERNS))
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_cpu_path_matches_reference(cpu_paths, name, shape):
    q, k, v = qkv(*SHAPES[shape])
    pattern = PATTERNS[name]
    torch.testing.assert_close(sparse_attention(q, k, v, pattern), sparse_attention_reference(q, k, v, pattern),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["sink_window", "block_topk", "mask"])
@pytest.mark.parametrize("bias_kind", ["padding", "float"])
def test_cpu_path_with_bias_matches_oracle(cpu_paths, name, bias_kind):
    q, k, v = qkv(2, 4, 2, 37, 37)
    pattern = PATTERNS[name]
    scale, q_offset = resolve(q, k, None, None)
    if bias_kind == "padding":  # bool [B, 1, 1, Nk], True = may attend
        bias = torch.ones(2, 1, 1, 37, dtype=torch.bool)
        bias[1, ..., 29:] = False
        additive = torch.where(bias, 0.0, -math.inf).expand(2, 4, 37, 37)
    else:  # float [B, H, Nq, Nk]
        bias = additive = torch.randn(2, 4, 37, 37, generator=torch.Generator().manual_seed(1))
    expected = oracle_attention(q, k, v, oracle_mask(pattern, q, k, q_offset), scale, additive)
    torch.testing.assert_close(sparse_attention(q, k, v, pattern, attn_bias=bias).double(), expected,
                               atol=1e-5, rtol=1e-5)


def test_window_covering_everything_is_dense_causal_sdpa(cpu_paths):
    q, k, v = qkv(2, 4, 2, 45, 45)
    dense = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    pattern = SparsePattern("sink_window", sinks=0, window=45, block=16)
    torch.testing.assert_close(sparse_attention(q, k, v, pattern), dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sparse_attention_reference(q, k, v, pattern), dense, atol=1e-5, rtol=1e-5)


def test_topk_covering_all_blocks_is_dense(cpu_paths):
    q, k, v = qkv(2, 4, 2, 45, 45)
    kr, vr = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    causal = SparsePattern("block_topk", block=16, topk=3, sinks=0, local=1)
    full = SparsePattern("block_topk", block=16, topk=3, sinks=0, local=1, causal=False)
    torch.testing.assert_close(sparse_attention(q, k, v, causal),
                               F.scaled_dot_product_attention(q, kr, vr, is_causal=True), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sparse_attention(q, k, v, full),
                               F.scaled_dot_product_attention(q, kr, vr), atol=1e-5, rtol=1e-5)


def test_fully_masked_rows_are_zero(cpu_paths):
    q, k, v = qkv(1, 2, 2, 20, 20)
    pattern = PATTERNS["window_only"]
    bias = torch.ones(20, 20, dtype=torch.bool)
    bias[3] = False
    out = sparse_attention(q, k, v, pattern, attn_bias=bias)
    assert torch.equal(out[:, :, 3], torch.zeros_like(out[:, :, 3]))
    torch.testing.assert_close(out, sparse_attention_reference(q, k, v, pattern, attn_bias=bias))


def test_block_topk_layout_is_proportional_to_kept_blocks():
    q, k, _ = qkv(1, 2, 1, 128, 128)
    pattern = SparsePattern("block_topk", block=16, topk=2, sinks=1, local=1)
    count, index, _ = pattern_layout(pattern, q, k, 0)
    assert index.shape[-1] == 4  # sinks + local + topk
    assert count.max().item() == 4 and count[0, 0, 0].item() == 1  # first block only sees itself


# ----------------------------------------------------------------------------------------------
# Rules and validation
# ----------------------------------------------------------------------------------------------


def test_mask_fn_traces_to_rule_evaluated_like_the_function():
    rule = sparse_rule.rule_from_mask_fn(diagonal_bands)
    b, h = torch.arange(2).view(2, 1, 1, 1), torch.arange(3).view(1, 3, 1, 1)
    q_idx, kv_idx = torch.arange(9).view(1, 1, 9, 1), torch.arange(11).view(1, 1, 1, 11)
    got = sparse_rule.eval_rule_torch(rule, b, h, q_idx, kv_idx).expand(2, 3, 9, 11)
    assert torch.equal(got, diagonal_bands(b, h, q_idx, kv_idx).expand(2, 3, 9, 11))
    assert "tl.where" in sparse_kernel.triton_rule("where(q_idx > 3, kv_idx < 2, kv_idx > 5)")


def test_untraceable_mask_fn_and_bad_arguments_raise():
    """The op's own errors name its arguments (the pass words them as tokred options)."""
    table = torch.tensor([1, 0, 1])
    with pytest.raises(ValueError, match="sparse attention mask_fn") as error:
        sparse_rule.rule_from_mask_fn(lambda b, h, q_idx, kv_idx: q_idx.float() > 0.5 * kv_idx.float())
    assert "tokred option" not in str(error.value)
    with pytest.raises(ValueError, match="sparse attention mask_fn"):
        sparse_rule.rule_from_mask_fn(lambda b, h, q_idx, kv_idx: table[kv_idx] > 0)
    with pytest.raises(ValueError, match="sparse attention pattern: kind") as error:
        SparsePattern("strided")
    assert "tokred option" not in str(error.value)
    with pytest.raises(ValueError, match="sparse attention pattern: window"):
        SparsePattern("sink_window", window=-1)
    with pytest.raises(ValueError, match="sparse attention pattern: mask_fn"):
        SparsePattern("mask")
    with pytest.raises(ValueError, match="sparse attention rule"):
        sparse_rule.check_rule("__import__('os')")
    with pytest.raises(ValueError, match="sparse_attention: pattern must be a SparsePattern"):
        sparse_attention(*qkv(1, 2, 2, 4, 4), {"pattern": "sink_window"})


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_pattern_mask_mod_decides_like_the_element_rule(name):
    """The pattern's flex mask_mod (and_masks/or_masks of its parts) and its rule string (what the
    kernels read) allow the same pairs, at absolute positions shifted by q_offset."""
    pattern = PATTERNS[name]
    b, h = torch.arange(2).view(2, 1, 1, 1), torch.arange(3).view(1, 3, 1, 1)
    rows, kv_idx = torch.arange(13).view(1, 1, 13, 1), torch.arange(40).view(1, 1, 1, 40)
    rule = sparse_module.element_rule(pattern)
    for q_offset in (0, 27):
        by_rule = sparse_rule.eval_rule_torch(rule, b, h, rows + q_offset, kv_idx)
        by_rule = torch.ones((), dtype=torch.bool) if by_rule is None else by_rule
        by_mask_mod = sparse_module.pattern_mask_mod(pattern, q_offset)(b, h, rows, kv_idx)
        assert torch.equal(by_mask_mod.expand(2, 3, 13, 40), by_rule.expand(2, 3, 13, 40))


def test_sparse_modules_import_one_way():
    """No cycle among the sparse attention modules, and none but the dispatcher imports it
    (lazy imports inside functions count)."""
    import ast
    import graphlib
    import pathlib

    folder = pathlib.Path(sparse_module.__file__).parent
    imports = {}
    for path in folder.glob("sparse_*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "tokred.triton_ops":
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tokred.triton_ops."):
                names.add(node.module.rsplit(".", 1)[1])
            elif isinstance(node, ast.Import):
                names |= {alias.name.rsplit(".", 1)[1] for alias in node.names
                          if alias.name.startswith("tokred.triton_ops.")}
        imports[path.stem] = {name for name in names if name.startswith("sparse_")}
    list(graphlib.TopologicalSorter(imports).static_order())  # raises CycleError on a cycle
    assert [name for name, used in imports.items() if "sparse_attention" in used] == []


# ----------------------------------------------------------------------------------------------
# Triton kernel under the interpreter
# ----------------------------------------------------------------------------------------------


def run_kernel(q, k, v, pattern, attn_bias=None):
    from tokred.triton_ops.sparse_attention import additive_bias

    scale, q_offset = resolve(q, k, None, None)
    count, index, rule = pattern_layout(pattern, q, k, q_offset)
    return sparse_kernel.sparse_attention_triton(q, k, v, count, index, additive_bias(attn_bias, q, k), scale,
                                                 q_offset, pattern.block, pattern.block, rule)


@needs_triton
@pytest.mark.parametrize("name", sorted(PATTERNS))
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_kernel_matches_reference(monkeypatch, name, shape):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, v = qkv(*SHAPES[shape])
    pattern = PATTERNS[name]
    torch.testing.assert_close(run_kernel(q, k, v, pattern), sparse_attention_reference(q, k, v, pattern),
                               atol=1e-5, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_half_precision_and_padding_bias(monkeypatch, dtype):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, v = qkv(2, 4, 2, 37, 37, dtype=dtype)
    padding = torch.ones(2, 1, 1, 37, dtype=torch.bool)
    padding[0, ..., 33:] = False
    pattern = PATTERNS["block_topk"]
    got = run_kernel(q, k, v, pattern, attn_bias=padding)
    assert got.dtype == dtype
    expected = sparse_attention_reference(q.float(), k.float(), v.float(), pattern, attn_bias=padding)
    torch.testing.assert_close(got.float(), expected, atol=2e-2, rtol=2e-2)


@needs_triton
def test_kernel_non_power_of_two_block_and_head_dim(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, v = qkv(1, 2, 1, 50, 50, dim=24)
    pattern = SparsePattern("sink_window", sinks=2, window=11, block=20)
    torch.testing.assert_close(run_kernel(q, k, v, pattern), sparse_attention_reference(q, k, v, pattern),
                               atol=1e-5, rtol=1e-5)


@needs_triton
def test_generated_kernel_is_cached_per_rule():
    assert sparse_kernel.generated_kernel("(kv_idx <= q_idx)") is sparse_kernel.generated_kernel("(kv_idx <= q_idx)")
    assert sparse_kernel.generated_kernel("(kv_idx < 3)") is not sparse_kernel.generated_kernel("(kv_idx <= q_idx)")


# ----------------------------------------------------------------------------------------------
# Custom op: opcheck, compile, ONNX
# ----------------------------------------------------------------------------------------------


def op_args(pattern, q, k, v):
    scale, q_offset = resolve(q, k, None, None)
    count, index, rule = pattern_layout(pattern, q, k, q_offset)
    return (q, k, v, count.contiguous(), index.contiguous(), None, scale, q_offset, pattern.block, pattern.block,
            rule)


def test_opcheck():
    q, k, v = qkv(1, 4, 2, 23, 23)
    torch.library.opcheck(torch.ops.tokred.sparse_attention.default, op_args(PATTERNS["mask"], q, k, v),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("name", ["sink_window", "block_topk", "mask", "sink_window_noncausal"])
@pytest.mark.parametrize("shape", ["gqa_odd", "prefill_with_cache", "whole_blocks_with_cache", "decode"])
def test_compiles_with_static_shapes(fresh_dynamo, name, shape):
    # Compiled on CPU without a bias, sparse_attention takes the flex_attention path
    # (flex_cpu_attention): its BlockMask and mask_mod (partial/full split, q_offset, block_topk's
    # selection) must give the reference's result.
    q, k, v = qkv(*SHAPES[shape])
    pattern = PATTERNS[name]
    compiled = torch.compile(lambda q, k, v: sparse_attention(q, k, v, pattern), backend="aot_eager",
                             fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), sparse_attention_reference(q, k, v, pattern),
                               atol=1e-5, rtol=1e-5)


class SparseLayer(torch.nn.Module):
    def __init__(self, pattern):
        super().__init__()
        self.pattern = pattern

    def forward(self, q, k, v, padding):
        return sparse_attention(q, k, v, self.pattern, attn_bias=padding)


@pytest.mark.parametrize("name", ["sink_window", "block_topk", "mask"])
def test_onnx_export_runs_in_onnxruntime(tmp_path, name):
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    q, k, v = qkv(1, 4, 2, 37, 37)
    padding = torch.ones(1, 1, 1, 37, dtype=torch.bool)
    padding[..., 35:] = False
    layer = SparseLayer(PATTERNS[name]).eval()
    path = tmp_path / "sparse.onnx"
    torch.onnx.export(layer, (q, k, v, padding), str(path), dynamo=True,
                      custom_translation_table=triton_ops.onnx_translation_table())
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), (q, k, v, padding))}
    got = torch.from_numpy(session.run(None, feeds)[0])
    torch.testing.assert_close(got, sparse_attention_reference(q, k, v, PATTERNS[name], attn_bias=padding),
                               atol=1e-4, rtol=1e-4)


def test_onnx_block_topk_breaks_ties_like_torch(tmp_path):
    # Equal keys make every Quest bound tie: ONNX TopK and torch's stable sort must both keep the
    # lowest-index candidate blocks.
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    q, _, v = qkv(1, 2, 1, 64, 64)
    k = torch.ones(1, 1, 64, 16)
    padding = torch.ones(1, 1, 1, 64, dtype=torch.bool)
    pattern = SparsePattern("block_topk", block=16, topk=1, sinks=0, local=1)
    path = tmp_path / "ties.onnx"
    torch.onnx.export(SparseLayer(pattern).eval(), (q, k, v, padding), str(path), dynamo=True,
                      custom_translation_table=triton_ops.onnx_translation_table())
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), (q, k, v, padding))}
    got = torch.from_numpy(session.run(None, feeds)[0])
    torch.testing.assert_close(got, sparse_attention_reference(q, k, v, pattern), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("topk,sinks,local", [(2, 1, 1), (3, 0, 2), (0, 0, 1), (1, 2, 1)])
def test_block_topk_prefill_takes_the_unmasked_past_blocks_path(torch_sparse_paths, topk, sinks, local, dtype):
    """The CPU prefill of causal block_topk (no bias) runs past_blocks_attention: it must take
    it (the layout has its shape) and equal the element-wise oracle, with odd N, GQA, batch 2."""
    q, k, v = qkv(2, 4, 2, 150, 150, dtype=dtype)
    pattern = SparsePattern("block_topk", block=16, topk=topk, sinks=sinks, local=local)
    count, index, _ = pattern_layout(pattern, q, k, 0)
    scale, q_offset = resolve(q, k, None, None)
    out = past_blocks_attention(q, k, v, count, index, scale, 16)
    assert out is not None, "the block_topk prefill layout was not recognised"
    expected = oracle_attention(q.float(), k.float(), v.float(), oracle_mask(pattern, q, k, q_offset), scale)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)
    torch.testing.assert_close(sparse_attention(q, k, v, pattern), out)


def test_past_blocks_path_refuses_other_layouts():
    """A layout whose query blocks do not end on their own block (a window) is left to the
    generic path."""
    q, k, v = qkv(1, 2, 2, 80, 80)
    count, index, _ = pattern_layout(SparsePattern("sink_window", sinks=0, window=20, block=16), q, k, 0)
    assert past_blocks_layout(count, index) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sinks,window,chunk,n", [(3, 9, 4, 37), (0, 20, 8, 150), (4, 30, 16, 150), (2, 200, 8, 150),
                                                  (1, 1, 4, 23)])
def test_sink_window_band_path_matches_oracle(sinks, window, chunk, n, dtype):
    """The band path (overlapping key windows under one band mask, the sinks merged by
    log-sum-exp): full chunks, a partial last chunk, no sinks, a window covering everything, a
    window of one key; odd N, GQA, batch 2, against the element-wise oracle."""
    q, k, v = qkv(2, 4, 2, n, n, dtype=dtype)
    pattern = SparsePattern("sink_window", sinks=sinks, window=window, block=16)
    scale, q_offset = resolve(q, k, None, None)
    out = sink_window_band_attention(q, k, v, sinks, window, scale, chunk=chunk)
    expected = oracle_attention(q.float(), k.float(), v.float(), oracle_mask(pattern, q, k, q_offset), scale)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)


def test_sink_window_prefill_takes_the_band_path_eager_and_compiled(monkeypatch, fresh_dynamo, torch_sparse_paths):
    """Without the C++ kernel, causal sink_window's CPU prefill runs the band path, eagerly and inside a compiled graph
    (not flex_attention); a decode step over a cache does not (it has q_offset > 0)."""
    calls = []
    band = sparse_module.sink_window_band_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape[2])
        return band(*args, **kwargs)

    monkeypatch.setattr(sparse_module, "sink_window_band_attention", counting)
    pattern = PATTERNS["sink_window"]
    q, k, v = qkv(*SHAPES["gqa_odd"])
    expected = sparse_attention_reference(q, k, v, pattern)
    torch.testing.assert_close(sparse_attention(q, k, v, pattern), expected, atol=1e-5, rtol=1e-5)
    assert calls == [37]
    assert not sparse_module.use_flex_path(pattern, q, k, v, None, 0)
    compiled = torch.compile(lambda q, k, v: sparse_attention(q, k, v, pattern), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), expected, atol=1e-5, rtol=1e-5)
    assert calls == [37, 37]
    q, k, v = qkv(*SHAPES["decode"])
    torch.testing.assert_close(sparse_attention(q, k, v, pattern), sparse_attention_reference(q, k, v, pattern),
                               atol=1e-5, rtol=1e-5)
    assert calls == [37, 37]


def test_padded_rows_returns_the_input_when_nothing_is_padded():
    t = torch.randn(2, 48, 3, 16).transpose(1, 2)  # [B, H, N, D], not contiguous
    assert sparse_module.padded_rows(t, 48) is t
    padded = sparse_module.padded_rows(t, 64)
    assert padded.shape == (2, 3, 64, 16) and torch.equal(padded[:, :, :48], t) and not padded[:, :, 48:].any()


@pytest.mark.parametrize("name", ["block_topk", "mask", "sink_window"])
def test_non_contiguous_whole_block_inputs_match_reference(cpu_paths, name):
    """q/k/v as views of [B, N, H, D] (transposed, as attention modules make them) with N a multiple
    of the block: padded_rows hands them on uncopied, and every CPU path (with and without a
    padding bias) must still read them right."""
    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 64, h, 16, generator=generator).transpose(1, 2) for h in (4, 2, 2))
    pattern = PATTERNS[name]
    padding = torch.ones(2, 1, 1, 64, dtype=torch.bool)
    padding[1, ..., 50:] = False
    for bias in (None, padding):
        torch.testing.assert_close(sparse_attention(q, k, v, pattern, attn_bias=bias),
                                   sparse_attention_reference(q, k, v, pattern, attn_bias=bias), atol=1e-5, rtol=1e-5)
