"""tokred::tome_match / tokred::tome_merge: Triton kernels (interpreter), custom ops, compile, ONNX.

The oracles below are written with Python loops over batch and tokens, in float64, following the
ToMe definitions directly (cosine similarity per pair, running best; per destination a weighted
sum and a size sum). They share no code with the references (batched matmul/max, gather/scatter_add)
or the kernels. They are built from differentiable torch ops on single rows, so the merge
oracle's autograd gradients are the reference for the op's analytic backward.

Interpreter: TRITON_INTERPRET=1 is set per test (monkeypatch), as in test_kernels.py; tokred's
kernels are jitted at launch, once per interpreter mode, so that is enough.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import tokred.triton_ops as triton_ops
from tokred.triton_ops import common
from tokred.triton_ops import tome_match as tome_match_module
from tokred.triton_ops import tome_merge as tome_merge_module
from tokred.triton_ops.tome_match import tome_match_reference, tome_match_triton
from tokred.triton_ops.tome_merge import tome_merge_reference, tome_merge_triton

match_op = torch.ops.tokred.tome_match
merge_op = torch.ops.tokred.tome_merge
NEG_INF = float("-inf")


# ----------------------------------------------------------------------------------------------
# Oracles: loops over tokens, float64
# ----------------------------------------------------------------------------------------------


def oracle_match(metric: torch.Tensor, group: torch.Tensor):
    """(node_max [B, Na] f64, node_idx [B, Na] int64, margin [B, Na] f64) by looping over pairs.

    ``margin`` is best minus second-best allowed score (inf with fewer than two allowed pairs):
    where it is tiny, a float32 kernel may legitimately pick the other index.
    """
    batch, num_tokens, _ = metric.shape
    num_a, num_b = (num_tokens + 1) // 2, num_tokens // 2
    node_max = torch.full((batch, num_a), NEG_INF, dtype=torch.float64)
    node_idx = torch.zeros((batch, num_a), dtype=torch.int64)
    margin = torch.full((batch, num_a), math.inf, dtype=torch.float64)

    def unit(row):
        row = row.double()
        return row / max(row.norm().item(), 1e-12)

    for b in range(batch):
        for i in range(num_a):
            token_a = 2 * i
            scores = []
            for j in range(num_b):
                token_b = 2 * j + 1
                group_a, group_b = group[b, token_a].item(), group[b, token_b].item()
                if group_a < 0 or group_b < 0 or group_a != group_b:
                    continue
                scores.append((torch.dot(unit(metric[b, token_a]), unit(metric[b, token_b])).item(), j))
            for score, j in scores:
                if score > node_max[b, i]:  # strictly greater: the first (lowest) j wins ties
                    node_max[b, i], node_idx[b, i] = score, j
            ranked = sorted((s for s, _ in scores), reverse=True)
            if len(ranked) >= 2:
                margin[b, i] = ranked[0] - ranked[1]
    return node_max, node_idx, margin


def oracle_merge(x, size, unm_idx, src_idx, dst_idx):
    """(x_out [B, Nu + Nb, C] f64, size_out [B, Nu + Nb, 1] f64) by looping over merged pairs."""
    batch, num_tokens, _ = x.shape
    num_b = num_tokens // 2
    x_rows, size_rows = [], []
    for b in range(batch):
        weighted = [x[b, 2 * j + 1].double() * size[b, 2 * j + 1].double() for j in range(num_b)]
        total = [size[b, 2 * j + 1].double() for j in range(num_b)]
        for r in range(src_idx.shape[1]):
            i, j = src_idx[b, r].item(), dst_idx[b, r].item()
            weighted[j] = weighted[j] + x[b, 2 * i].double() * size[b, 2 * i].double()
            total[j] = total[j] + size[b, 2 * i].double()
        kept = [unm_idx[b, u].item() for u in range(unm_idx.shape[1])]
        rows = [x[b, 2 * i].double() for i in kept] + [weighted[j] / total[j] for j in range(num_b)]
        sizes = [size[b, 2 * i].double() for i in kept] + total
        x_rows.append(torch.stack(rows) if rows else x.new_zeros((0, x.shape[2]), dtype=torch.float64))
        size_rows.append(torch.stack(sizes) if sizes else x.new_zeros((0, 1), dtype=torch.float64))
    return torch.stack(x_rows), torch.stack(size_rows)


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------


def make_group(batch: int, num_tokens: int, kind: str, generator: torch.Generator) -> torch.Tensor:
    """group [B, N]: "one" all 0; "protected": token 0 and random others -1; "two": protected,
    plus group 1 for a different suffix per batch row (like padding); "closed": batch row 0 all -1."""
    group = torch.zeros(batch, num_tokens, dtype=torch.int64)
    if kind in ("protected", "two"):
        group[:, 0] = -1
        group[torch.rand(batch, num_tokens, generator=generator) < 0.2] = -1
    if kind == "two":
        for b in range(batch):
            start = int(torch.randint(1, num_tokens, (1,), generator=generator))
            group[b, start:] = torch.where(group[b, start:] < 0, group[b, start:], 1)
    if kind == "closed":
        group[0] = -1
    return group


# (B, N, D, group kind): N odd and even (Na != Nb, Na == Nb), a single B token, several 16-blocks
# along A, B and D (N = 41, D = 20), protected tokens, two groups, a batch row with nothing allowed.
MATCH_CASES = [
    (1, 2, 3, "one"),
    (2, 9, 5, "protected"),
    (3, 41, 20, "two"),
    (2, 10, 16, "closed"),
    (2, 35, 7, "one"),
]
MATCH_IDS = [f"B{b}-N{n}-D{d}-{kind}" for b, n, d, kind in MATCH_CASES]


def make_match_inputs(case, dtype, seed=0):
    batch, num_tokens, dim, kind = case
    generator = torch.Generator().manual_seed(seed)
    metric = torch.randn(batch, num_tokens, dim, generator=generator).to(dtype)
    return metric, make_group(batch, num_tokens, kind, generator)


def assert_match_close(got, metric, group, atol):
    """got == oracle: same -inf rows, scores within atol, indices equal where the oracle's choice
    is clear by more than 2 atol (otherwise the chosen index must score within atol of the max)."""
    node_max, node_idx = got
    want_max, want_idx, margin = oracle_match(metric, group)
    assert node_max.dtype == torch.float32 and node_idx.dtype == torch.int64
    assert node_max.shape == want_max.shape and node_idx.shape == want_idx.shape
    closed = torch.isinf(want_max)
    assert torch.equal(torch.isinf(node_max), closed)
    assert torch.all(node_max[closed] < 0)
    assert torch.equal(node_idx[closed], torch.zeros_like(node_idx[closed]))
    torch.testing.assert_close(node_max[~closed].double(), want_max[~closed], atol=atol, rtol=0)
    clear = margin > 2 * atol
    assert torch.equal(node_idx[clear], want_idx[clear])
    assert clear[~closed].float().mean() > 0.9, "inputs too tie-prone for this check to mean much"


# (B, N, C, R, dst kind): R = 0, Nu = 0 (every A token merged), one token (no B tokens), several
# 16-blocks along B, R and C, random destinations (repeats) and every source into one destination.
MERGE_CASES = [
    (1, 2, 3, 0, "random"),
    (2, 9, 5, 3, "random"),
    (3, 41, 33, 18, "random"),
    (2, 10, 20, 5, "same"),
    (2, 11, 6, 6, "random"),
    (2, 1, 4, 0, "random"),
]
MERGE_IDS = [f"B{b}-N{n}-C{c}-R{r}-{kind}" for b, n, c, r, kind in MERGE_CASES]


def make_merge_inputs(case, dtype, seed=0):
    """(x, size, unm_idx, src_idx, dst_idx) for one MERGE_CASES entry; sizes in [1, 4)."""
    batch, num_tokens, width, num_pairs, kind = case
    generator = torch.Generator().manual_seed(seed)
    num_a, num_b = (num_tokens + 1) // 2, num_tokens // 2
    x = torch.randn(batch, num_tokens, width, generator=generator).to(dtype)
    size = 1 + 3 * torch.rand(batch, num_tokens, 1, generator=generator)
    order = torch.stack([torch.randperm(num_a, generator=generator) for _ in range(batch)])
    # Contiguous copies: views of ``order`` would carry a storage offset that Dynamo guards on.
    src_idx, unm_idx = order[:, :num_pairs].contiguous(), order[:, num_pairs:].contiguous()
    if kind == "same":
        dst_idx = torch.full((batch, num_pairs), num_b - 1, dtype=torch.int64)
    else:
        dst_idx = torch.randint(0, max(num_b, 1), (batch, num_pairs), generator=generator)
    return x, size, unm_idx, src_idx, dst_idx


def assert_merge_close(got, inputs):
    """got == oracle: kept rows copied exactly; merged rows within 1e-5 (fp32) or fp16 rounding."""
    x, size, unm_idx, *_ = inputs
    x_out, size_out = got
    want_x, want_size = oracle_merge(*inputs)
    num_kept = unm_idx.shape[1]
    assert x_out.dtype == x.dtype and size_out.dtype == torch.float32
    assert x_out.shape == want_x.shape and size_out.shape == want_size.shape
    assert torch.equal(x_out[:, :num_kept].double(), want_x[:, :num_kept])
    tolerance = 1e-5 if x.dtype == torch.float32 else 2e-3
    torch.testing.assert_close(x_out[:, num_kept:].double(), want_x[:, num_kept:], atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(size_out.double(), want_size, atol=1e-5, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# References (CPU path of the custom ops) == oracles
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", MATCH_CASES, ids=MATCH_IDS)
def test_match_reference_matches_oracle(case):
    metric, group = make_match_inputs(case, torch.float32)
    assert_match_close(tome_match_reference(metric, group), metric, group, atol=1e-5)
    assert_match_close(match_op(metric, group), metric, group, atol=1e-5)


@pytest.mark.parametrize("case", MERGE_CASES, ids=MERGE_IDS)
def test_merge_reference_matches_oracle(case):
    inputs = make_merge_inputs(case, torch.float32)
    assert_merge_close(tome_merge_reference(*inputs), inputs)
    assert_merge_close(merge_op(*inputs), inputs)


def test_match_without_b_tokens_gives_minus_inf_and_index_zero():
    metric = torch.randn(2, 1, 4)
    node_max, node_idx = match_op(metric, torch.zeros(2, 1, dtype=torch.int64))
    assert node_max.shape == (2, 1) and torch.all(node_max == NEG_INF)
    assert torch.equal(node_idx, torch.zeros(2, 1, dtype=torch.int64))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m, g, mi: match_op(m, g.int()), "int64 group"),
        (lambda m, g, mi: match_op(m[0], g), r"metric \[B, N, D\]"),
        (lambda m, g, mi: match_op(m, g[:, :-1]), "group"),
        (lambda m, g, mi: merge_op(mi[0], mi[1].double(), *mi[2:]), "float32 size"),
        (lambda m, g, mi: merge_op(mi[0], mi[1][:, :-1], *mi[2:]), "size"),
        (lambda m, g, mi: merge_op(*mi[:2], mi[2][:, 1:], *mi[3:]), "cover"),
        (lambda m, g, mi: merge_op(*mi[:3], mi[3], mi[4][:, :-1]), "differ"),
        (lambda m, g, mi: merge_op(*mi[:4], mi[4][:1]), "batch mismatch"),
    ],
    ids=["group-dtype", "metric-rank", "group-shape", "size-dtype", "size-shape", "cover", "src-dst", "batch"],
)
def test_bad_arguments_raise(call, message):
    metric, group = make_match_inputs(MATCH_CASES[1], torch.float32)
    merge_inputs = make_merge_inputs(MERGE_CASES[1], torch.float32)
    with pytest.raises(RuntimeError, match=message):
        call(metric, group, merge_inputs)


# ----------------------------------------------------------------------------------------------
# Triton kernels under the interpreter == oracles
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def triton_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert common.interpreter_enabled()


@pytest.mark.parametrize("blocks", [None, 16], ids=["auto-blocks", "blocks16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", MATCH_CASES, ids=MATCH_IDS)
def test_triton_match_matches_oracle(triton_interpreter, case, dtype, blocks):
    metric, group = make_match_inputs(case, dtype)
    got = tome_match_triton(metric, group, block_m=blocks, block_n=blocks, block_d=blocks)
    # The oracle reads the same (fp16-rounded) values, so fp16 differs only by fp32 arithmetic.
    assert_match_close(got, metric, group, atol=1e-5)


def test_triton_match_ties_pick_lowest_index(triton_interpreter):
    """Exact ties (duplicated B rows, integer values) within one 16-block and across blocks."""
    num_b, dim = 20, 4
    metric = torch.zeros(1, 2 * num_b, dim)
    metric[0, 1::2] = torch.tensor([0.0, 1.0, 0.0, 0.0])  # every B row orthogonal to e0 ...
    for j in (3, 5, 18):  # ... except three exact copies of e0 (18 lies in the second block)
        metric[0, 2 * j + 1] = torch.tensor([2.0, 0.0, 0.0, 0.0])
    metric[0, 0::2] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # every A row is e0
    metric[0, 2 * 4] = 0.0  # A row 4 is zero: cosine 0 with everything, first index wins
    group = torch.zeros(1, 2 * num_b, dtype=torch.int64)
    group[0, 2 * 3 + 1] = -1  # B row 3 protected: the tie goes to 5, not 3
    node_max, node_idx = tome_match_triton(metric, group, block_m=16, block_n=16, block_d=16)
    expected_idx = torch.full((1, num_b), 5)
    expected_idx[0, 4] = 0
    expected_max = torch.ones(1, num_b)
    expected_max[0, 4] = 0.0
    assert torch.equal(node_idx, expected_idx)
    assert torch.equal(node_max, expected_max)


def test_triton_match_single_token(triton_interpreter):
    node_max, node_idx = tome_match_triton(torch.randn(3, 1, 5), torch.zeros(3, 1, dtype=torch.int64))
    assert torch.all(node_max == NEG_INF) and torch.equal(node_idx, torch.zeros(3, 1, dtype=torch.int64))


def test_triton_match_reads_strided_inputs(triton_interpreter):
    """A head-mean of keys is rarely contiguous: strides, not layout, locate rows and groups."""
    metric, group = make_match_inputs(MATCH_CASES[2], torch.float32)
    strided_metric = metric.transpose(1, 2).contiguous().transpose(1, 2)
    strided_group = group.t().contiguous().t()
    assert not (strided_metric.is_contiguous() or strided_group.is_contiguous())
    got = tome_match_triton(strided_metric, strided_group, block_m=16, block_n=16, block_d=16)
    assert_match_close(got, metric, group, atol=1e-5)


@pytest.mark.parametrize("blocks", [None, 16], ids=["auto-blocks", "blocks16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", MERGE_CASES, ids=MERGE_IDS)
def test_triton_merge_matches_oracle(triton_interpreter, case, dtype, blocks):
    inputs = make_merge_inputs(case, dtype)
    got = tome_merge_triton(*inputs, block_j=blocks, block_r=blocks, block_c=blocks)
    assert_merge_close(got, inputs)


def test_triton_merge_reads_strided_inputs(triton_interpreter):
    x, size, unm_idx, src_idx, dst_idx = make_merge_inputs(MERGE_CASES[2], torch.float32)
    strided = (x.transpose(1, 2).contiguous().transpose(1, 2),
               size.transpose(0, 1).contiguous().transpose(0, 1),
               unm_idx.t().contiguous().t(), src_idx.t().contiguous().t(), dst_idx.t().contiguous().t())
    assert not any(t.is_contiguous() for t in strided)
    assert_merge_close(tome_merge_triton(*strided, block_j=16, block_r=16, block_c=16),
                       (x, size, unm_idx, src_idx, dst_idx))


def test_triton_merge_is_deterministic(triton_interpreter):
    inputs = make_merge_inputs((2, 41, 24, 20, "same"), torch.float32)
    first = tome_merge_triton(*inputs, block_j=16, block_r=16, block_c=16)
    second = tome_merge_triton(*inputs, block_j=16, block_r=16, block_c=16)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("protect", ["tome", "set_aside"])
@pytest.mark.parametrize("prefix", [0, 1, 2, 5])
def test_triton_kernels_in_the_merge_step(triton_interpreter, monkeypatch, prefix, protect):
    """The merge pass's step with both kernels in place of the references gives the same merge.

    ``protect="tome"`` (the default) hands the kernels ToMe's partition: the class row as group
    -1 (a row of -inf scores, ranked last) and, without protected tokens, kept A rows in score
    order, not index order; the kernels must give what the references give for these too. N = 37
    and D, C = 20 take several 16-blocks; a padded suffix in batch row 1 adds a second group.
    """
    from tokred.passes import merge_graph as merge_pass

    generator = torch.Generator().manual_seed(11 + prefix)
    batch, num_tokens, r = 2, 37, 9
    x = torch.randn(batch, num_tokens, 20, generator=generator)
    metric = torch.randn(batch, num_tokens, 20, generator=generator)
    size = 1 + 3 * torch.rand(batch, num_tokens, 1, generator=generator)
    group = torch.zeros(batch, num_tokens, dtype=torch.int64)
    group[1, -7:] = 1
    want = merge_pass.tome_step(x, metric, size, group, r, prefix, protect)
    monkeypatch.setattr(merge_pass, "tome_match_reference",
                        lambda m, g: tome_match_triton(m, g, block_m=16, block_n=16, block_d=16))
    monkeypatch.setattr(merge_pass, "tome_merge_reference",
                        lambda *args: tome_merge_triton(*args, block_j=16, block_r=16, block_c=16))
    got = merge_pass.tome_step(x, metric, size, group, r, prefix, protect)
    assert torch.equal(got[3], want[3]) and torch.equal(got[4], want[4])  # rep, dest: the same merge
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-6)
    assert torch.equal(got[0][:, :prefix], x[:, :prefix])  # protected tokens untouched, in place


def kernel_configs(tokens: int, dim: int, width: int, r: int) -> dict:
    """{name: (kernel, pointer types, constexprs, num_warps)} as the launchers pick them for these
    shapes ("{x}" stands for the dtype of metric / x)."""
    num_a, num_b = (tokens + 1) // 2, tokens // 2
    match_blocks = tome_match_module.match_block_sizes(num_a, num_b, dim)
    kept_m, kept_c = common.token_block_sizes(num_a - r, width)
    dst_blocks = tome_merge_module.merge_block_sizes(num_b, r, width)
    return {
        "match": (tome_match_module._tome_match_kernel,
                  {"metric_ptr": "*{x}", "group_ptr": "*i64", "max_ptr": "*fp32", "idx_ptr": "*i64"},
                  dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_D"), match_blocks)),
                  tome_match_module.match_num_warps(*match_blocks)),
        "merge-unmerged": (tome_merge_module._tome_merge_unmerged_kernel,
                           {"x_ptr": "*{x}", "size_ptr": "*fp32", "unm_ptr": "*i64", "out_ptr": "*{x}",
                            "size_out_ptr": "*fp32"},
                           {"BLOCK_M": kept_m, "BLOCK_C": kept_c}, common.num_warps_for_tile(kept_m, kept_c)),
        "merge-dst": (tome_merge_module._tome_merge_dst_kernel,
                      {"x_ptr": "*{x}", "size_ptr": "*fp32", "src_ptr": "*i64", "dst_ptr": "*i64",
                       "out_ptr": "*{x}", "size_out_ptr": "*fp32"},
                      dict(zip(("BLOCK_J", "BLOCK_R", "BLOCK_C"), dst_blocks)),
                      tome_merge_module.merge_num_warps(dst_blocks[0], dst_blocks[2])),
    }


# ViT-B (N = 197, D = 64, C = 768, r = 16): the blocks a real launch uses. Tiny: every block at
# its minimum, as the interpreter tests launch them.
COMPILE_SHAPES = {"vit-b": (197, 64, 768, 16), "tiny": (5, 3, 3, 1)}


def compile_for_sm90(kernel, pointers, constexprs, num_warps, x_type, float_args=frozenset()):
    """Compile a kernel to an sm_90 cubin ahead of time (no GPU needed); the compiled kernel.
    Scalar arguments are i32, those named in ``float_args`` fp32."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    jitted = kernel.jitted()
    assert isinstance(jitted, triton.runtime.jit.JITFunction)
    signature = {}
    for name in jitted.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = pointers[name].format(x=x_type)
        else:
            assert not name.endswith("_ptr"), name
            signature[name] = "fp32" if name in float_args else "i32"
    source = ASTSource(fn=jitted, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


def ptxas_spill_report(ptx: str) -> str:
    """``ptxas -v`` on the PTX for sm_90a: its resource lines (registers, spills)."""
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as source:
        source.write(ptx)
        source.flush()
        done = subprocess.run([get_ptxas(90).path, "-v", "-arch=sm_90a", source.name, "-o", "/dev/null"],
                              capture_output=True, text=True, check=True)
    return "\n".join(line for line in done.stderr.splitlines() if "spill" in line or "registers" in line)


# Every kernel in every dtype at ViT-B blocks; the tiny blocks once each (fp32) to keep this quick.
COMPILE_CASES = [(kernel, x_type, "vit-b") for kernel in ("match", "merge-unmerged", "merge-dst")
                 for x_type in ("fp32", "fp16", "bf16")]
COMPILE_CASES += [(kernel, "fp32", "tiny") for kernel in ("match", "merge-unmerged", "merge-dst")]


@pytest.mark.parametrize("kernel_name, x_type, shape_name", COMPILE_CASES, ids=["-".join(c) for c in COMPILE_CASES])
def test_triton_kernels_compile_for_cuda_without_spills(monkeypatch, kernel_name, x_type, shape_name):
    """The Triton compiler, not only the interpreter, accepts each kernel with the blocks its
    launcher picks (an sm_90 cubin, built ahead of time without a GPU), bf16 included, which the
    interpreter cannot run; and ptxas reports no register spills for the ViT-B configuration."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    kernel, pointers, constexprs, num_warps = kernel_configs(*COMPILE_SHAPES[shape_name])[kernel_name]
    compiled = compile_for_sm90(kernel, pointers, constexprs, num_warps, x_type)
    assert len(compiled.asm["cubin"]) > 0
    if shape_name == "vit-b":
        report = ptxas_spill_report(compiled.asm["ptx"])
        assert "0 bytes spill stores" in report, report


@pytest.mark.skipif(not (torch.cuda.is_available() and common.HAS_TRITON), reason="needs CUDA and triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_custom_ops_on_cuda_match_oracle(dtype):
    metric, group = make_match_inputs(MATCH_CASES[2], dtype)
    got = match_op(metric.cuda(), group.cuda())
    assert_match_close(tuple(t.cpu() for t in got), metric, group, atol=1e-5)
    inputs = make_merge_inputs(MERGE_CASES[2], dtype)
    x_out, size_out = merge_op(*(t.cuda() for t in inputs))
    if dtype == torch.bfloat16:  # assert_merge_close's fp16 tolerance is too tight for bf16 rounding
        want_x, _ = oracle_merge(*inputs)
        torch.testing.assert_close(x_out.cpu().double(), want_x, atol=2e-2, rtol=2e-2)
    else:
        assert_merge_close((x_out.cpu(), size_out.cpu()), inputs)


# ----------------------------------------------------------------------------------------------
# Custom-op contract: opcheck, autograd, torch.compile
# ----------------------------------------------------------------------------------------------


def opcheck_samples():
    samples = []
    for case, dtype in [(MATCH_CASES[1], torch.float32), (MATCH_CASES[2], torch.float16),
                        (MATCH_CASES[3], torch.float32)]:  # odd and even N
        metric, group = make_match_inputs(case, dtype)
        samples.append((match_op, (metric, group)))
    metric, group = make_match_inputs(MATCH_CASES[4], torch.float32)
    samples.append((match_op, (metric.requires_grad_(), group)))
    for case, dtype, requires_grad in [
        (MERGE_CASES[1], torch.float32, True),
        (MERGE_CASES[3], torch.float32, True),
        (MERGE_CASES[2], torch.float16, False),
        (MERGE_CASES[0], torch.float32, False),
    ]:
        x, size, *indices = make_merge_inputs(case, dtype)
        samples.append((merge_op, (x.requires_grad_(requires_grad), size.requires_grad_(requires_grad), *indices)))
    return samples


@pytest.mark.parametrize("op, args", opcheck_samples(), ids=lambda v: getattr(v, "__name__", ""))
def test_opcheck(op, args):
    torch.library.opcheck(op, args)


def test_match_outputs_do_not_require_grad():
    metric, group = make_match_inputs(MATCH_CASES[1], torch.float32)
    node_max, node_idx = match_op(metric.requires_grad_(), group)
    assert not node_max.requires_grad and not node_idx.requires_grad


@pytest.mark.parametrize("case", [MERGE_CASES[i] for i in (1, 3, 4)], ids=[MERGE_IDS[i] for i in (1, 3, 4)])
def test_merge_backward_matches_oracle_autograd(case):
    x, size, *indices = make_merge_inputs(case, torch.float32, seed=5)
    generator = torch.Generator().manual_seed(6)
    x_op, size_op = x.clone().requires_grad_(), size.clone().requires_grad_()
    x_oracle, size_oracle = x.double().requires_grad_(), size.double().requires_grad_()
    x_out, size_out = merge_op(x_op, size_op, *indices)
    grad_x_out = torch.randn(x_out.shape, generator=generator)
    grad_size_out = torch.randn(size_out.shape, generator=generator)
    grads = torch.autograd.grad((x_out, size_out), (x_op, size_op), (grad_x_out, grad_size_out))
    want_x, want_size = oracle_merge(x_oracle, size_oracle, *indices)
    want = torch.autograd.grad((want_x, want_size), (x_oracle, size_oracle),
                               (grad_x_out.double(), grad_size_out.double()))
    for got, expected in zip(grads, want):
        torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


def match_and_merge(metric, group, x, size, unm_idx, src_idx, dst_idx):
    """Both ops side by side. No arithmetic around them on purpose: inductor then emits no C++
    kernel, so the compile test stays fast."""
    node_max, node_idx = match_op(metric, group)
    x_out, size_out = merge_op(x, size, unm_idx, src_idx, dst_idx)
    return node_max, node_idx, x_out, size_out


def make_both_inputs(batch: int, seed: int):
    """Inputs of ``match_and_merge``: N = 13 (Na = 7, Nb = 6), D = 5, C = 6, R = 4, Nu = 3. No size
    equals the first batch (2), else Dynamo's duck sizing would tie it to the batch symbol."""
    metric, group = make_match_inputs((batch, 13, 5, "two"), torch.float32, seed=seed)
    return (metric, group, *make_merge_inputs((batch, 13, 6, 4, "random"), torch.float32, seed=seed))


def test_custom_ops_under_inductor_compile_match_reference(fresh_dynamo):
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(match_and_merge, backend=counter, fullgraph=True, dynamic=True)
    for batch in (2, 3):  # one compile with a symbolic batch serves both
        inputs = make_both_inputs(batch, seed=batch)
        got = compiled(*inputs)
        want = (*tome_match_reference(*inputs[:2]), *tome_merge_reference(*inputs[2:]))
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g.shape == w.shape and g.dtype == w.dtype
            assert torch.equal(g, w)
    assert counter.frame_count == 1
    graph_targets = {node.target for node in counter.graphs[0].graph.nodes}
    assert {match_op, merge_op} <= graph_targets  # the ops stayed in the graph (no graph break)


def test_references_trace_under_torch_compile(fresh_dynamo):
    """bench/tome_kernels.py compiles the references with inductor: they must trace in one graph.
    (aot_eager here: the same tracing as inductor without its C++ compile time.)"""
    inputs = make_both_inputs(2, seed=7)
    match = torch.compile(tome_match_reference, backend="aot_eager", fullgraph=True)
    merge = torch.compile(tome_merge_reference, backend="aot_eager", fullgraph=True)
    for got, want in zip((*match(*inputs[:2]), *merge(*inputs[2:])),
                         (*tome_match_reference(*inputs[:2]), *tome_merge_reference(*inputs[2:]))):
        assert torch.equal(got, want)


# ----------------------------------------------------------------------------------------------
# ONNX
# ----------------------------------------------------------------------------------------------


class MatchAndMerge(torch.nn.Module):
    def forward(self, metric, group, x, size, unm_idx, src_idx, dst_idx):
        return match_and_merge(metric, group, x, size, unm_idx, src_idx, dst_idx)


INPUT_NAMES = ("metric", "group", "x", "size", "unm_idx", "src_idx", "dst_idx")


# Every input shares one batch Dim; the exporter says it names the axis only once.
@pytest.mark.filterwarnings("ignore:# The axis name. batch will not be used")
def test_onnx_export_runs_in_onnxruntime_with_dynamic_batch():
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.onnx.export(
        MatchAndMerge().eval(),
        make_both_inputs(2, seed=0),
        dynamo=True,
        custom_translation_table=triton_ops.onnx_translation_table(),
        dynamic_shapes={name: {0: batch} for name in INPUT_NAMES},
        verbose=False,
    )
    nodes = program.model_proto.graph.node
    assert {"ArgMax", "ReduceMax", "MatMul", "ScatterElements", "GatherElements"} <= {n.op_type for n in nodes}
    assert all(node.domain in ("", "ai.onnx") for node in nodes)
    scatter_reductions = {attr.s.decode() for n in nodes if n.op_type == "ScatterElements" for attr in n.attribute
                          if attr.name == "reduction"}
    assert scatter_reductions == {"add"}

    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    input_names = [i.name for i in session.get_inputs()]
    for run_batch in (2, 3):  # 3 != the export batch: the batch axis really is dynamic
        inputs = make_both_inputs(run_batch, seed=run_batch)
        node_max, node_idx, x_out, size_out = (
            torch.from_numpy(t) for t in session.run(None, dict(zip(input_names, (t.numpy() for t in inputs)))))
        assert_match_close((node_max, node_idx), *inputs[:2], atol=1e-5)
        assert_merge_close((x_out, size_out), inputs[2:])
