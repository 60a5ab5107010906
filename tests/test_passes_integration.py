"""The pruning and sparse attention passes with the rest of tokred: ONNX export (each export is run
in onnxruntime and compared with PyTorch by tokred.export_onnx before the file is written), and
models called with gradients enabled (no torch.no_grad), which aot_autograd traces for backward."""

from __future__ import annotations

import pytest

pytest.importorskip("onnxruntime")

import torch  # noqa: E402

import tokred  # noqa: E402
from tokred.tools.models import load_spec  # noqa: E402


@pytest.mark.parametrize("options", [
    {"sparse_attention": {"pattern": "sink_window", "sinks": 2, "window": 8}},
    {"sparse_attention": {"pattern": "block_topk", "block": 8, "topk": 1}},
    {"prune": {"keep": 0.5, "at": [0], "score": "query"}},
], ids=["sink_window", "block_topk", "prune_query"])
def test_rewritten_decoder_exports_and_matches(options, tmp_path, fresh_dynamo):
    lm = load_spec("hf:llama?task=causal-lm&seq=24")
    lm.model.config.use_cache = False
    result = tokred.export_onnx(lm.model, lm.args, tmp_path / "lm.onnx", example_kwargs=lm.kwargs, **options)
    assert (tmp_path / "lm.onnx").exists()
    assert result.max_abs_diff <= 1e-4
    assert any(site.status == "rewritten" for site in result.report.attention_sites)


@pytest.mark.parametrize("pattern", [
    {"pattern": "sink_window", "sinks": 2, "window": 8},
    {"pattern": "block_topk", "block": 8, "topk": 1},
], ids=["sink_window", "block_topk"])
def test_sparse_model_called_with_gradients(pattern, fresh_dynamo):
    """Without no_grad the rewritten graph is traced for backward: the sites still rewrite, the
    output equals the no-grad one, and gradients flow (through the dense masked reference)."""
    lm = load_spec("hf:llama?task=causal-lm&seq=24")
    backend = tokred.backend(inner="aot_eager", sparse_attention=pattern)
    compiled = torch.compile(lm.model, backend=backend)
    out = compiled(*lm.args, **lm.kwargs).logits
    assert [s.status for s in backend.report.attention_sites] == ["rewritten", "rewritten"]
    with torch.no_grad():
        want = compiled(*lm.args, **lm.kwargs).logits
    assert torch.allclose(out, want, atol=1e-5)
    out.sum().backward()
    assert lm.model.lm_head.weight.grad is not None
