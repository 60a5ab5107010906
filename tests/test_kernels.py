"""tokred::gather_tokens / tokred::scatter_tokens: Triton kernels (interpreter), custom ops, compile, ONNX.

The oracle for both ops is advanced indexing (``x[batch_ids, index]``), independent of the
torch.gather/scatter reference and of the kernels.

Interpreter: TRITON_INTERPRET=1 is set per test (monkeypatch), not for the whole process, so
other test modules keep real Triton (on a GPU machine inductor's kernels stay compiled). That is
enough because tokred kernels are ``triton.jit``-ed at launch, once per interpreter mode
(``common.triton_kernel``), not when tokred is imported: whichever module imported tokred
first, the launch below sees the variable.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import tokred.triton_ops as triton_ops
from tokred.triton_ops import common
from tokred.triton_ops import gather_tokens as gather_tokens_module
from tokred.triton_ops import scatter_tokens as scatter_tokens_module
from tokred.triton_ops.gather_tokens import gather_tokens_reference, gather_tokens_triton
from tokred.triton_ops.scatter_tokens import scatter_tokens_reference, scatter_tokens_triton

gather_op = torch.ops.tokred.gather_tokens
scatter_op = torch.ops.tokred.scatter_tokens


# ----------------------------------------------------------------------------------------------
# Inputs and the independent oracle
# ----------------------------------------------------------------------------------------------


def random_token_index(batch: int, num_tokens: int, num_kept: int, generator: torch.Generator) -> torch.Tensor:
    """index[B, M]: per row, M distinct tokens of N in random order (a random partial permutation)."""
    return torch.stack([torch.randperm(num_tokens, generator=generator)[:num_kept] for _ in range(batch)])


def oracle_gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """out[b, m] = x[b, index[b, m]] by advanced indexing."""
    return x[torch.arange(x.shape[0])[:, None], index]


def oracle_scatter(base: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """Copy of base with out[b, index[b, m]] = src[b, m] by advanced-index assignment."""
    out = base.clone()
    out[torch.arange(base.shape[0])[:, None], index] = src
    return out


# (B, N, M, row shape): odd M and C, M not a multiple of any block, rank 2 (no row dims) and rank 4.
SHAPES = [
    (1, 5, 5, (3,)),
    (2, 9, 5, (7,)),
    (3, 17, 13, (33,)),
    (2, 6, 3, (2, 5)),
    (2, 7, 4, ()),
]
SHAPE_IDS = [f"B{b}-N{n}-M{m}-row{'x'.join(map(str, row)) or 'none'}" for b, n, m, row in SHAPES]


def make_inputs(shape, dtype, seed=0):
    """(x[B, N, *row], index[B, M], src[B, M, *row]) for one SHAPES entry."""
    batch, num_tokens, num_kept, row = shape
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, num_tokens, *row, generator=generator).to(dtype)
    index = random_token_index(batch, num_tokens, num_kept, generator)
    src = torch.randn(batch, num_kept, *row, generator=generator).to(dtype)
    return x, index, src


# ----------------------------------------------------------------------------------------------
# Reference implementations == oracle (CPU path of the custom ops)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_reference_matches_oracle(shape):
    x, index, src = make_inputs(shape, torch.float32)
    assert torch.equal(gather_tokens_reference(x, index), oracle_gather(x, index))
    assert torch.equal(scatter_tokens_reference(x, index, src), oracle_scatter(x, index, src))
    assert torch.equal(gather_op(x, index), oracle_gather(x, index))
    assert torch.equal(scatter_op(x, index, src), oracle_scatter(x, index, src))


def test_gather_allows_repeated_indices():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 3, generator=generator)
    index = torch.randint(0, 4, (2, 9), generator=generator)
    assert torch.equal(gather_op(x, index), oracle_gather(x, index))


def test_outputs_are_fresh_contiguous_tensors():
    x, index, src = make_inputs(SHAPES[1], torch.float32)
    x_strided = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, batch-inner layout
    for out in (gather_op(x_strided, index), scatter_op(x_strided, index, src)):
        assert out.is_contiguous()
        assert out.data_ptr() != x_strided.data_ptr()


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda x, i, s: gather_op(x, i.int()), "int64"),
        (lambda x, i, s: gather_op(x, i[:1]), "batch mismatch"),
        (lambda x, i, s: gather_op(x[0, 0], i), "rank >= 2"),
        (lambda x, i, s: scatter_op(x, i, s[:, :-1]), "src"),
        (lambda x, i, s: scatter_op(x, i, s.half()), "src"),
    ],
    ids=["int32-index", "batch", "rank", "src-shape", "src-dtype"],
)
def test_bad_arguments_raise(call, message):
    x, index, src = make_inputs(SHAPES[1], torch.float32)
    with pytest.raises(RuntimeError, match=message):
        call(x, index, src)


# ----------------------------------------------------------------------------------------------
# Triton kernels under the interpreter == oracle
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_tokens, width", [(1, 1), (7, 3), (197, 768), (4096, 64), (3, 5000)])
def test_block_sizes_cover_shapes_within_tile_cap(num_tokens, width):
    block_m, block_c = common.token_block_sizes(num_tokens, width)
    for block in (block_m, block_c):
        assert block >= 1 and block & (block - 1) == 0  # tl.arange needs powers of two
    assert block_m * block_c <= common.MAX_TILE_ELEMENTS
    assert block_c >= min(width, common.MAX_BLOCK_C)  # a row needs at most cdiv(C, 256) programs
    assert block_m <= common.next_power_of_2(num_tokens)  # no tile is mostly masked-off tokens
    assert 1 <= common.num_warps_for_tile(block_m, block_c) <= 8


@pytest.fixture
def triton_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert common.interpreter_enabled()


# None: block sizes chosen from the shapes; (4, 8): small blocks, so several tiles per row and
# partial tiles along both M and C even on these tiny shapes.
BLOCKS = [None, (4, 8)]


@pytest.mark.parametrize("blocks", BLOCKS, ids=["auto-blocks", "blocks4x8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_triton_gather_matches_oracle(triton_interpreter, shape, dtype, blocks):
    x, index, _ = make_inputs(shape, dtype)
    block_m, block_c = blocks or (None, None)
    out = gather_tokens_triton(x, index, block_m=block_m, block_c=block_c)
    assert out.dtype == dtype and out.shape == (index.shape[0], index.shape[1], *x.shape[2:])
    assert torch.equal(out, oracle_gather(x, index))


@pytest.mark.parametrize("blocks", BLOCKS, ids=["auto-blocks", "blocks4x8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_triton_scatter_matches_oracle(triton_interpreter, shape, dtype, blocks):
    x, index, src = make_inputs(shape, dtype)
    block_m, block_c = blocks or (None, None)
    out = scatter_tokens_triton(x, index, src, block_m=block_m, block_c=block_c)
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal(out, oracle_scatter(x, index, src))


def test_triton_kernels_read_strided_inputs(triton_interpreter):
    """Non-contiguous x, index and src are read through their strides, not assumed contiguous."""
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(2, 11, 10, generator=generator).transpose(1, 2)  # [B, N=10, C=11], C-stride 10
    index = random_token_index(2, 10, 6, generator).t().contiguous().t()  # column-major [B, M]
    src = torch.randn(2, 11, 6, generator=generator).transpose(1, 2)  # [B, M=6, C=11]
    assert not (x.is_contiguous() or index.is_contiguous() or src.is_contiguous())
    assert torch.equal(gather_tokens_triton(x, index, block_m=4, block_c=4), oracle_gather(x, index))
    assert torch.equal(scatter_tokens_triton(x, index, src, block_m=4, block_c=4), oracle_scatter(x, index, src))


def test_triton_repeated_gather_indices(triton_interpreter):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 5, generator=generator)
    index = torch.randint(0, 4, (3, 7), generator=generator)
    assert torch.equal(gather_tokens_triton(x, index, block_m=2, block_c=2), oracle_gather(x, index))


def test_triton_empty_token_index(triton_interpreter):
    x = torch.randn(2, 5, 3)
    index = torch.empty(2, 0, dtype=torch.int64)
    src = torch.empty(2, 0, 3)
    assert gather_tokens_triton(x, index).shape == (2, 0, 3)
    assert torch.equal(scatter_tokens_triton(x, index, src), x)


def test_triton_kernels_compile_for_cuda(monkeypatch):
    """The Triton compiler, not only the interpreter, accepts both kernels: lowered to an sm_90
    cubin ahead of time, which needs no GPU. Catches what the permissive interpreter lets through."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for kernel in (gather_tokens_module._gather_tokens_kernel, scatter_tokens_module._scatter_tokens_kernel):
        jitted = kernel.jitted()
        assert isinstance(jitted, triton.runtime.jit.JITFunction)
        signature = {}
        for name in jitted.arg_names:
            if name.startswith("BLOCK_"):
                signature[name] = "constexpr"
            elif name == "index_ptr":
                signature[name] = "*i64"
            elif name.endswith("_ptr"):
                signature[name] = "*fp16"
            else:
                signature[name] = "i32"
        source = ASTSource(fn=jitted, signature=signature, constexprs={"BLOCK_M": 16, "BLOCK_C": 128})
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
        assert len(compiled.asm["cubin"]) > 0


@pytest.mark.skipif(not (torch.cuda.is_available() and common.HAS_TRITON), reason="needs CUDA and triton")
def test_custom_ops_on_cuda_match_oracle():
    x, index, src = make_inputs((3, 17, 13, (33,)), torch.float16)
    x, index, src = x.cuda(), index.cuda(), src.cuda()
    assert torch.equal(gather_op(x, index).cpu(), oracle_gather(x.cpu(), index.cpu()))
    assert torch.equal(scatter_op(x, index, src).cpu(), oracle_scatter(x.cpu(), index.cpu(), src.cpu()))


# ----------------------------------------------------------------------------------------------
# Custom-op contract: opcheck, autograd, torch.compile
# ----------------------------------------------------------------------------------------------


def opcheck_samples():
    """(op, args) pairs: ranks 2, 3 and 4, fp32 and fp16, with and without requires_grad."""
    samples = []
    for shape, dtype, requires_grad in [
        (SHAPES[1], torch.float32, False),
        (SHAPES[3], torch.float32, True),
        (SHAPES[4], torch.float32, True),
        (SHAPES[2], torch.float16, False),
    ]:
        x, index, src = make_inputs(shape, dtype)
        x.requires_grad_(requires_grad)
        src.requires_grad_(requires_grad)
        samples.append((gather_op, (x, index)))
        samples.append((scatter_op, (x, index, src)))
    return samples


@pytest.mark.parametrize("op, args", opcheck_samples(), ids=lambda v: getattr(v, "__name__", ""))
def test_opcheck(op, args):
    torch.library.opcheck(op, args)


def test_backward_matches_finite_differences():
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(2, 5, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    src = torch.randn(2, 3, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    repeated = torch.tensor([[0, 0, 4], [2, 1, 2]])  # gather may repeat tokens: grads add up
    unique = random_token_index(2, 5, 3, generator)
    assert torch.autograd.gradcheck(gather_op, (x, repeated))
    assert torch.autograd.gradcheck(scatter_op, (x, unique, src))


def move_tokens(x: torch.Tensor, index: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Tokens ``index`` of x[B, N, C] (gathered as rank 4, [B, M, 2, C/2]) written into base[B, N, C].

    No arithmetic on purpose: inductor then emits no C++ kernel, so the compile test stays fast.
    """
    batch, num_tokens, width = x.shape
    kept = gather_op(x.view(batch, num_tokens, 2, width // 2), index)
    return scatter_op(base, index, kept.reshape(batch, index.shape[1], width))


def oracle_move_tokens(x, index, base):
    return oracle_scatter(base, index, oracle_gather(x, index))


def test_custom_ops_under_inductor_compile_match_eager():
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(move_tokens, backend=counter, fullgraph=True, dynamic=True)
    for batch in (2, 3):  # one compile with a symbolic batch serves both
        x, index, _ = make_inputs((batch, 9, 5, (6,)), torch.float32, seed=batch)
        base = torch.randn_like(x)
        assert torch.equal(compiled(x, index, base), oracle_move_tokens(x, index, base))
    assert counter.frame_count == 1
    graph_targets = {node.target for node in counter.graphs[0].graph.nodes}
    assert {gather_op, scatter_op} <= graph_targets  # the ops stayed in the graph (no graph break)


# ----------------------------------------------------------------------------------------------
# ONNX
# ----------------------------------------------------------------------------------------------


def test_translation_table_covers_every_tokred_op():
    table = triton_ops.onnx_translation_table()
    registered = {name for name in torch._C._dispatch_get_all_op_names() if name.startswith("tokred::")}
    assert registered, "importing tokred.triton_ops registered no ops"
    for name in registered:
        op_name = name.split("::", 1)[1].split(".", 1)[0]
        assert getattr(torch.ops.tokred, op_name).default in table, name


class MoveTokens(torch.nn.Module):
    def forward(self, x, index, base):
        return move_tokens(x, index, base)


# x, index and base share one batch Dim; the exporter says it names the axis only once.
@pytest.mark.filterwarnings("ignore:# The axis name. batch will not be used")
def test_onnx_export_runs_in_onnxruntime_with_dynamic_batch():
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    x, index, _ = make_inputs((2, 9, 4, (6,)), torch.float32)
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.onnx.export(
        MoveTokens().eval(),
        (x, index, torch.randn_like(x)),
        dynamo=True,
        custom_translation_table=triton_ops.onnx_translation_table(),
        dynamic_shapes={"x": {0: batch}, "index": {0: batch}, "base": {0: batch}},
        verbose=False,
    )
    op_types = {node.op_type for node in program.model_proto.graph.node}
    assert {"GatherElements", "ScatterElements"} <= op_types
    assert all(node.domain in ("", "ai.onnx") for node in program.model_proto.graph.node)

    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    input_names = [i.name for i in session.get_inputs()]
    for run_batch in (2, 3):  # 3 != the export batch: the batch axis really is dynamic
        x, index, _ = make_inputs((run_batch, 9, 4, (6,)), torch.float32, seed=run_batch)
        base = torch.randn_like(x)
        feeds = dict(zip(input_names, (x.numpy(), index.numpy(), base.numpy())))
        (got,) = session.run(None, feeds)
        assert torch.equal(torch.from_numpy(got), oracle_move_tokens(x, index, base))
