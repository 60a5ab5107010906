"""ONNX export (tokred.export_onnx): round trips in onnxruntime, the pre-write check, clear errors.

Every export here writes into pytest's tmp_path; the round-trip tests then load the file
themselves (onnx.checker) and run it in onnxruntime at two batch sizes, independently of the
checks export_onnx made before writing it.
"""

from __future__ import annotations

import operator

import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import tokred
import tokred.export as tokred_export
from tokred.export import ExportError, ExportMismatchError, export_onnx, second_batch_inputs

TOL = 1e-4


# ------------------------------------------------------------------------------------------ helpers

def run_onnx(path, feeds: dict) -> list:
    """Outputs of the ONNX file at ``path`` in onnxruntime (CPU), as torch tensors."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [torch.from_numpy(o) for o in session.run(None, {k: v.numpy() for k, v in feeds.items()})]


def dims(value_info) -> list:
    """['batch', 3, 32, 32]: dim_param where symbolic, dim_value where static."""
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def assert_close(got: list, want: list) -> None:
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape, (i, g.shape, w.shape)
        torch.testing.assert_close(g, w, atol=TOL, rtol=TOL, msg=lambda m: f"output {i}: {m}")


def vit():
    """timm ViT-Tiny, depth 2, 32x32 images with 8x8 patches: 16 patches + class token."""
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=32,
                             patch_size=8).eval()


def images(batch: int, seed: int) -> torch.Tensor:
    """[batch, 3, 32, 32] standard-normal pixels."""
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def bert(impl: str):
    """transformers BertModel: hidden 32 = 2 heads x 16, depth 2, vocab 100, random weights."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, attn_implementation=impl)
    model = BertModel(config).eval()
    assert model.config._attn_implementation == impl
    return model


def text_inputs(batch: int, seq: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids [batch, seq] in [3, 100) and an int64 attention mask; row i has i padded tokens."""
    ids = torch.randint(3, 100, (batch, seq), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(batch, seq, dtype=torch.long)
    for row in range(1, batch):
        mask[row, seq - row:] = 0
    return ids, mask


# ------------------------------------------------------------------------------------ round trips

def test_vit_round_trip(tmp_path):
    model = vit()
    x = images(2, seed=1)
    result = export_onnx(model, (x,), tmp_path / "vit.onnx")

    assert result.path == tmp_path / "vit.onnx" and result.path.exists()
    onnx.checker.check_model(str(result.path), full_check=True)
    proto = onnx.load(str(result.path))
    assert [i.name for i in proto.graph.input] == ["x"] == result.inputs
    assert [o.name for o in proto.graph.output] == ["output"] == result.outputs
    assert dims(proto.graph.input[0]) == ["batch", 3, 32, 32]
    assert dims(proto.graph.output[0]) == ["batch", 1000]
    assert result.dynamic_batch and result.batch_sizes == (2, 3)
    assert 0 <= result.max_abs_diff <= TOL
    assert [s.module for s in result.report.attention_sites] == ["blocks.0.attn", "blocks.1.attn"]
    # The capture marked shallow copies dynamic, never the caller's tensor.
    assert not getattr(x, "_dynamo_dynamic_indices", None)

    for batch, seed in ((2, 1), (5, 2)):
        pixels = images(batch, seed)
        with torch.no_grad():
            want = [model(pixels)]
        assert_close(run_onnx(result.path, {"x": pixels}), want)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_bert_round_trip_with_padding(tmp_path, impl):
    model = bert(impl)
    ids, mask = text_inputs(batch=2, seq=10, seed=1)
    assert mask[1, -1] == 0  # row 1 is padded
    result = export_onnx(model, (ids,), tmp_path / f"bert_{impl}.onnx",
                         example_kwargs={"attention_mask": mask})

    onnx.checker.check_model(str(result.path), full_check=True)
    proto = onnx.load(str(result.path))
    assert [i.name for i in proto.graph.input] == ["input_ids", "attention_mask"] == result.inputs
    assert [o.name for o in proto.graph.output] == ["last_hidden_state", "pooler_output"] == result.outputs
    assert [dims(v) for v in proto.graph.input] == [["batch", 10], ["batch", 10]]
    assert [dims(v) for v in proto.graph.output] == [["batch", 10, 32], ["batch", 32]]
    assert result.dynamic_batch and result.batch_sizes == (2, 3)
    assert len(result.report.attention_sites) == 2

    for batch, seed in ((2, 1), (4, 2)):  # batch 4: rows with 0..3 padded tokens
        ids, mask = text_inputs(batch, 10, seed)
        with torch.no_grad():
            out = model(ids, attention_mask=mask)
        want = [out.last_hidden_state, out.pooler_output]
        assert_close(run_onnx(result.path, {"input_ids": ids, "attention_mask": mask}), want)


@pytest.mark.parametrize("which", ["vit", "bert_sdpa", "bert_eager"])
def test_merged_model_round_trip(tmp_path, which):
    """Token merging (scatter_add + counts, pairwise-rank selection) exports with standard ops and
    the file equals the merged model in PyTorch, also at a batch size it was not exported with."""
    if which == "vit":
        model, args, kwargs = vit(), (images(2, seed=1),), {}
        feeds_at = lambda batch: ({"x": images(batch, seed=3)}, (images(batch, seed=3),), {})
    else:
        model = bert(which.split("_")[1])
        ids, mask = text_inputs(batch=2, seq=10, seed=1)
        args, kwargs = (ids,), {"attention_mask": mask}

        def feeds_at(batch):
            ids, mask = text_inputs(batch, 10, seed=5)
            return {"input_ids": ids, "attention_mask": mask}, (ids,), {"attention_mask": mask}

    result = export_onnx(model, args, tmp_path / f"{which}_merged.onnx", example_kwargs=kwargs, merge={"r": 3})
    assert [s.status for s in result.report.attention_sites] == ["rewritten", "rewritten"]
    proto = onnx.load(str(result.path))
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}  # standard ops only
    feeds, a, kw = feeds_at(4)
    torch._dynamo.reset()
    merged = torch.compile(model, backend=tokred.backend(inner="aot_eager", merge={"r": 3}))
    with torch.no_grad():
        out = merged(*a, **kw)
    torch._dynamo.reset()
    want = [out] if isinstance(out, torch.Tensor) else [out.last_hidden_state, out.pooler_output]
    assert_close(run_onnx(result.path, feeds), want)


# --------------------------------------------------------------------------- the pre-write check

def _shift_first_output(gm: torch.fx.GraphModule, by: float) -> None:
    """Add ``by`` to the graph's first output (a wrong rewrite that the report does not admit)."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    first, *rest = output.args[0]
    with gm.graph.inserting_before(output):
        shifted = gm.graph.call_function(operator.add, (first, by))
    output.args = ((shifted, *rest),)
    gm.recompile()


def test_mismatch_raises_and_writes_no_file(tmp_path, monkeypatch):
    real_rewrite = tokred_export.rewrite

    def perturbing_rewrite(gm, example_inputs, options):
        gm, report = real_rewrite(gm, example_inputs, options)
        _shift_first_output(gm, 1e-2)
        return gm, report

    monkeypatch.setattr(tokred_export, "rewrite", perturbing_rewrite)
    path = tmp_path / "vit.onnx"
    with pytest.raises(ExportMismatchError, match=r"output 0 \('output'\).*atol=0.0001, rtol=0.0001") as info:
        export_onnx(vit(), (images(2, seed=1),), path)

    assert isinstance(info.value, ValueError)
    assert info.value.output_index == 0
    assert info.value.max_abs_diff == pytest.approx(1e-2, rel=1e-3)
    assert f"{info.value.max_abs_diff:.3g}" in str(info.value)
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []  # nor a temporary file left behind


def test_a_rewritten_graph_is_checked_against_itself(tmp_path, monkeypatch):
    """When the report says sites were rewritten, the reference is the rewritten graph in PyTorch."""
    real_rewrite = tokred_export.rewrite

    def rewrite_that_admits_it(gm, example_inputs, options):
        gm, report = real_rewrite(gm, example_inputs, options)
        _shift_first_output(gm, 0.5)
        report.attention_sites[0].mark("rewritten", "test: output shifted by 0.5")
        return gm, report

    monkeypatch.setattr(tokred_export, "rewrite", rewrite_that_admits_it)
    model = vit()
    result = export_onnx(model, (images(2, seed=1),), tmp_path / "vit.onnx")
    assert result.report.changed and result.batch_sizes == (2, 3)
    assert any("rewritten graph in PyTorch" in n for n in result.report.notes), result.report.notes

    pixels = images(4, seed=3)
    with torch.no_grad():
        want = [model(pixels) + 0.5]
    assert_close(run_onnx(result.path, {"x": pixels}), want)


def test_bad_option_is_rejected_before_anything_runs(tmp_path):
    class MustNotRun(torch.nn.Module):
        def forward(self, x):
            raise AssertionError("the model ran before the options were validated")

    with pytest.raises(ValueError, match="no_such_option"):
        export_onnx(MustNotRun(), (torch.ones(2, 3),), tmp_path / "m.onnx", no_such_option=1)
    with pytest.raises(ValueError, match="'strict'"):
        export_onnx(MustNotRun(), (torch.ones(2, 3),), tmp_path / "m.onnx", strict="yes")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------ batch and errors

class FixedBatch(torch.nn.Module):
    """Hard-codes batch 2 in a reshape, so the batch cannot be dynamic."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [2, 3, 6] -> [2, 12]
        return self.proj(x).reshape(2, -1)


def test_static_batch_fallback_is_reported(tmp_path):
    torch.manual_seed(0)
    model = FixedBatch().eval()
    x = torch.randn(2, 3, 6)
    result = export_onnx(model, (x,), tmp_path / "fixed.onnx")

    assert not result.dynamic_batch and result.batch_sizes == (2,)
    assert any("static batch 2" in n and "specialized" in n for n in result.report.notes), result.report.notes
    proto = onnx.load(str(result.path))
    assert dims(proto.graph.input[0]) == [2, 3, 6]
    with torch.no_grad():
        assert_close(run_onnx(result.path, {"x": x}), [model(x)])


def test_batch_one_exports_static_with_a_note(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.GELU()).eval()
    result = export_onnx(model, (torch.randn(1, 6),), tmp_path / "b1.onnx")
    assert not result.dynamic_batch
    assert any("static batch 1" in n for n in result.report.notes), result.report.notes
    assert dims(onnx.load(str(result.path)).graph.input[0]) == [1, 6]


def test_dynamic_batch_off_exports_the_example_batch(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.GELU()).eval()
    result = export_onnx(model, (torch.randn(3, 6),), tmp_path / "b3.onnx", dynamic_batch=False)
    assert not result.dynamic_batch and result.batch_sizes == (3,)
    # A static batch was asked for: no fallback note.
    assert not any(n.startswith("onnx: static batch") for n in result.report.notes)
    assert dims(onnx.load(str(result.path)).graph.input[0]) == [3, 6]


def test_capture_failure_names_the_step(tmp_path):
    class GraphBreak(torch.nn.Module):
        def forward(self, x):
            y = x * 2
            torch._dynamo.graph_break()
            return y + 1

    with pytest.raises(ExportError, match="step 'capture'.*graph_break") as info:
        export_onnx(GraphBreak(), (torch.ones(2, 3),), tmp_path / "m.onnx")
    assert info.value.step == "capture"
    assert not isinstance(info.value, ValueError)
    assert list(tmp_path.iterdir()) == []


def test_onnx_conversion_failure_names_the_step_and_op(tmp_path):
    class SingularValues(torch.nn.Module):
        def forward(self, x):  # [B, 3, 3] -> [B, 3]; torch.onnx has no lowering for SVD
            return torch.linalg.svdvals(x)

    with pytest.raises(ExportError, match="step 'onnx export'.*svd") as info:
        export_onnx(SingularValues(), (torch.randn(2, 3, 3),), tmp_path / "m.onnx")
    assert info.value.step == "onnx export"
    assert "Traceback" not in str(info.value) and len(str(info.value)) < 600
    assert list(tmp_path.iterdir()) == []


def test_second_batch_inputs_are_of_the_same_kind():
    ids, mask = text_inputs(batch=3, seq=7, seed=0)
    pixels = torch.rand(3, 4) * 10 + 5
    table = torch.arange(4.0)  # no batch axis
    new_ids, new_mask, new_pixels, new_table = second_batch_inputs([ids, mask, pixels, table], [0, 1, 2])

    assert new_ids.shape == (4, 7) and new_ids.dtype == ids.dtype
    assert int(new_ids.min()) >= int(ids.min()) and int(new_ids.max()) <= int(ids.max())
    assert not torch.equal(new_ids[:3], ids) and torch.unique(new_ids).numel() > 2
    # Masks are copied row by row: every new row is one of the original padding patterns.
    assert new_mask.shape == (4, 7)
    assert all(any(torch.equal(row, old) for old in mask) for row in new_mask)
    assert new_pixels.shape == (4, 4) and new_pixels.dtype == pixels.dtype
    assert abs(new_pixels.mean().item() - pixels.mean().item()) < 3 * pixels.std().item()
    assert new_table is table


def test_export_onnx_is_exposed_on_the_package():
    assert tokred.export_onnx is export_onnx


def test_compare_judges_with_torch_tolerances():
    """The onnxruntime check: torch.testing.assert_close decides (NaN equals NaN), the error names
    the output and counts what is outside the tolerance, and the reported figure is the largest
    absolute difference."""
    from tokred.export_io import compare

    ref = torch.tensor([1.0, float("nan"), float("inf"), 0.0])
    assert compare([ref.numpy().copy()], [ref], ["y"], 1e-4, 1e-4, "test") == 0.0
    close = ref + torch.tensor([5e-5, 0.0, 0.0, 0.0])
    assert compare([close.numpy()], [ref], ["y"], 1e-4, 1e-4, "test") == pytest.approx(5e-5, rel=1e-2)  # float32 rounding
    far = torch.tensor([1.0, 0.0, 1.0, 0.5])  # NaN against a number, inf against a number, 0.5 off
    with pytest.raises(ExportMismatchError, match=r"output 0 \('y'\) differs from PyTorch by up to inf.*"
                                                  r"Mismatched elements: 3 / 4") as info:
        compare([far.numpy()], [ref], ["y"], 1e-4, 1e-4, "test")
    assert info.value.args and "No file was written" in str(info.value)
    ints = torch.tensor([1, 2, 3])
    assert compare([ints.numpy()], [ints], ["ids"], 0.0, 0.0, "test") == 0.0
