"""The compatibility boundary (tokred/compat/) and what it guarantees a user's process:

- module and parameter names resolved however Dynamo spells a source (``L['self']``,
  ``L['args'][0]`` as transformers >= 5.24 calls a model, older ``self.`` forms);
- the cache keyword of the installed transformers, decided per model;
- no global side effects: explain, export and the early-exit draft leave other compiled models
  compiled; no thread count or environment variable left changed;
- analysis or a pass that fails leaves the graph as it was, with a reason (strict raises);
- the kernel choices as backend options, with the environment variables as overrides.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import pytest
import torch
from torch import fx, nn

import tokred
from tokred.compat import torch_api, transformers_api
from tokred.rewriter.analysis.graph import is_state, module_path, resolve_module
from tokred.triton_ops import common

# ----------------------------------------------------------------------------- source names


@pytest.mark.parametrize("path, name", [
    ("L['self'].blocks[3].attn", "blocks.3.attn"),
    ("L['self']", ""),
    ("L['args'][0].model.layers[0].self_attn", "model.layers.0.self_attn"),
    ("L['args'][0]._modules['model']._modules['layers']._modules['1']", "model.layers.1"),
    ("self.blocks.3.attn", "blocks.3.attn"),
    ("G['model'].encoder.layer[2]", "encoder.layer.2"),
])
def test_module_name_without_known_roots(path, name):
    assert torch_api.module_name(path) == name


def test_module_name_strips_the_graphs_module_root():
    """The root comes from the parameter sources: a wrapper object holding the model as
    ``.model`` names modules relative to the model, as its named_modules() does."""
    roots = frozenset({torch_api._root_of(torch_api.source_tokens(
        "L['self'].model._modules['layers']._modules['0']._parameters['weight']"))})
    assert torch_api.module_name("L['self'].model.layers[0].mlp", roots) == "layers.0.mlp"


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(x)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.register_buffer("offset", torch.ones(8))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x + self.offset


def _decorated(forward):
    """A forward wrapped as transformers >= 5.24 wraps its models' (``deprecate_kwarg``): Dynamo
    then reads the model as ``L['args'][0]``."""
    @functools.wraps(forward)
    def wrapper(*args, **kwargs):
        return forward(*args, **kwargs)
    return wrapper


class WrappedNet(Net):
    forward = _decorated(Net.forward)


def _captured(model, x) -> fx.GraphModule:
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    torch_api.capture(model, (x,), backend=backend, fullgraph=True)
    return graphs[0]


@pytest.mark.parametrize("cls", [Net, WrappedNet])
def test_names_and_state_by_what_they_are(cls):
    model = cls().eval()
    gm = _captured(model, torch.randn(2, 8))
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    state = [n for n in placeholders if is_state(n)]
    assert len(state) == 5 and len(placeholders) == 6  # 2 x (weight, bias) + the buffer; x is input
    linears = [n for n in gm.graph.nodes if n.op == "call_function" and "linear" in str(n.target)]
    assert [module_path(n) for n in linears] == ["blocks.0.lin", "blocks.1.lin"]
    assert all(resolve_module(model, module_path(n)) is model.blocks[i].lin for i, n in enumerate(linears))


def test_resolve_module_falls_back_to_a_unique_suffix():
    model = Net()
    outer = nn.Module()
    outer.net = model
    assert resolve_module(model, "net.blocks.1", Block) is model.blocks[1]  # captured from a wrapper
    assert resolve_module(outer, "blocks.1.lin") is model.blocks[1].lin     # captured from inside
    with pytest.raises(ValueError, match="no submodule"):
        resolve_module(model, "decoder.layers.0")


def test_version_checks_name_the_version():
    with pytest.raises(RuntimeError, match=r"torch >= 2\.4, found torch 2\.3\.1"):
        torch_api.check_torch_version("2.3.1")
    torch_api.check_torch_version(torch.__version__)
    pytest.importorskip("transformers")
    transformers_api.check_transformers_version()


# ----------------------------------------------------------------------------- transformers


def test_cache_keyword_follows_the_forward_signature():
    class Old(nn.Module):
        def forward(self, input_ids, past_key_values=None, use_cache=None):
            return input_ids

    class New(nn.Module):
        def forward(self, input_ids, cache=None, use_cache=None):
            return input_ids

    assert transformers_api.cache_keyword(Old()) == "past_key_values"
    assert transformers_api.cache_keyword(New()) == "cache"
    assert transformers_api.cache_keyword(torch.compile(New())) == "cache"
    assert tokred.cache_argument(Old(), 3) == {"past_key_values": 3}


def test_cache_keyword_of_the_installed_transformers():
    tf = pytest.importorskip("transformers")
    model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1,
                                               num_attention_heads=2, intermediate_size=32)).eval()
    keyword = transformers_api.cache_keyword(model)
    assert keyword in ("cache", "past_key_values")
    ids = torch.randint(0, 32, (1, 5))
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        cache = transformers_api.returned_cache(out)
        layers = transformers_api.cache_layers(cache)
        assert len(layers) == 1 and transformers_api.layer_states(layers[0])[0].shape[2] == 5
        step = model(input_ids=ids[:, :1], **tokred.cache_argument(model, cache), use_cache=True)
    assert transformers_api.returned_cache(step).get_seq_length() == 6


# ----------------------------------------------------------------------------- no global side effects


class CountingBackend:
    """Counts compiles and calls of the graphs it compiles."""

    def __init__(self):
        self.compiles = 0
        self.calls = 0

    def __call__(self, gm, example_inputs):
        self.compiles += 1

        def run(*args):
            self.calls += 1
            return gm(*args)

        return run


def test_library_calls_leave_other_compiled_models_compiled(tmp_path):
    """Compile one model, call explain, export_onnx and the early-exit draft on others (one of
    the same class), and the first still runs its compiled code, not recompiled."""
    first = Net().eval()
    counting = CountingBackend()
    compiled = torch.compile(first, backend=counting)
    x = torch.randn(2, 8)
    with torch.no_grad():
        compiled(x)
    assert (counting.compiles, counting.calls) == (1, 1)

    tokred.explain(Net().eval(), x)
    tokred.explain(Net().eval(), x)
    pytest.importorskip("onnxruntime")
    tokred.export_onnx(Net().eval(), (x,), tmp_path / "net.onnx")
    tf = pytest.importorskip("transformers")
    from tokred.runtime.drafters import slice_early_exit

    lm = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=2,
                                            num_attention_heads=2, intermediate_size=32)).eval()
    assert slice_early_exit(lm).blocks == 2

    with torch.no_grad():
        compiled(x)
    assert (counting.compiles, counting.calls) == (1, 2)


def test_explain_again_and_again_on_one_model():
    """Dynamo's recompile limit is per code object: repeated explains must keep capturing."""
    model = Net().eval()
    x = torch.randn(2, 8)
    for _ in range(10):
        assert tokred.explain(model, x).graphs == 1


def test_importing_tokred_writes_no_environment_variable():
    code = ("import os, sys; before = dict(os.environ); import tokred, tokred.tools.offline, tokred.tools.models, "
            "tokred.tools.demo, tokred.runtime.streaming, tokred.runtime.generate; "
            "changed = {k for k in set(before) | set(os.environ) "
            "if before.get(k) != os.environ.get(k)}; sys.exit(f'changed: {changed}' if changed else 0)")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_sparse_attention_leaves_the_thread_count():
    from tokred.triton_ops import sparse_attention

    threads = torch.get_num_threads()
    with sparse_attention.single_thread():
        assert torch.get_num_threads() == 1
        with sparse_attention.all_threads():
            assert torch.get_num_threads() == threads
    assert torch.get_num_threads() == threads
    with pytest.raises(RuntimeError):
        with sparse_attention.single_thread():
            raise RuntimeError("op failed")
    assert torch.get_num_threads() == threads


# ----------------------------------------------------------------------------- kernel options


def test_kernel_options_are_validated_and_scoped(monkeypatch):
    monkeypatch.delenv(common.KERNELS_ENV, raising=False)
    with pytest.raises(ValueError, match="'kernels'"):
        tokred.backend(kernels="fastest")
    with pytest.raises(ValueError, match="'cpu_kernel'"):
        tokred.backend(cpu_kernel="no")
    assert tokred.backend(kernels="reference", cpu_kernel=False).options.kernel_settings == \
        {"kernels": "reference", "cpu_kernel": False}
    assert common.kernel_mode() == "auto"
    with common.kernel_settings(kernels="reference", cpu_kernel=False):
        assert common.kernel_mode() == "reference" and common.CPU_KERNEL.get() is False
        monkeypatch.setenv(common.KERNELS_ENV, "triton")  # the documented override wins
        assert common.kernel_mode() == "triton"
        monkeypatch.delenv(common.KERNELS_ENV)
    assert common.kernel_mode() == "auto" and common.CPU_KERNEL.get() is True


def test_cpu_kernel_option_reaches_the_running_graph():
    """The backend runs its graphs under the options' kernel settings, and only them."""
    class Probe(nn.Module):
        def forward(self, x):
            return x * 2

    seen = []
    gm = fx.symbolic_trace(Probe())
    node = next(n for n in gm.graph.nodes if n.op == "call_function")
    with gm.graph.inserting_after(node):
        gm.graph.call_function(lambda: seen.append(common.CPU_KERNEL.get()))
    gm.recompile()
    run = tokred.backend(cpu_kernel=False, inner="eager")(gm, [torch.ones(2)])
    run(torch.ones(2))
    assert seen == [False] and common.CPU_KERNEL.get() is True


def test_mode_is_validated():
    with pytest.raises(ValueError, match="'mode'"):
        tokred.backend(mode="fast")
    with pytest.raises(ValueError, match="needs inner='inductor'"):
        tokred.backend(mode="max-autotune", inner="eager")
    assert tokred.backend(mode="max-autotune").options.mode == "max-autotune"


# ----------------------------------------------------------------------------- failures pass through


def test_failing_analysis_passes_the_model_through(monkeypatch):
    from tokred.rewriter import analysis

    def broken(gm):
        raise IndexError("list index out of range")

    monkeypatch.setattr(analysis, "analyze", broken)
    model = Net().eval()
    x = torch.randn(2, 8)
    be = tokred.backend(inner="eager", merge={"r": 2})
    torch.testing.assert_close(torch.compile(model, backend=be)(x), model(x))
    assert any("analysis failed" in note and "IndexError" in note for note in be.report.notes)
    strict = tokred.backend(inner="eager", strict=True)
    with pytest.raises(Exception, match="list index out of range"):
        torch.compile(Net().eval(), backend=strict)(x)


@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
def test_failing_pass_leaves_the_graph_as_it_was(monkeypatch, inner):
    """A pass that changes the graph, then raises: the graph comes back node for node, with what
    Dynamo put on the nodes (aot_autograd reads the placeholders' sources)."""
    import importlib

    backend_module = importlib.import_module("tokred.backend")  # tokred.backend is also a function

    def half_done(self):
        gm = self.gm
        node = next(n for n in gm.graph.nodes if n.op == "call_function")
        with gm.graph.inserting_after(node):
            gm.graph.call_function(torch.neg, (node,))
        for site in self.report.attention_sites:
            site.mark("rewritten", "half done", "merge")
        raise RuntimeError("the pass broke\nwith a long trace")

    monkeypatch.setattr(backend_module.PASSES["merge"], "match", half_done)
    model = Net().eval()
    x = torch.randn(2, 8)
    be = tokred.backend(inner=inner, merge={"r": 2})
    out = torch.compile(model, backend=be)(x)
    torch.testing.assert_close(out, model(x))
    assert "merge: not applied, the graph is left as it was: RuntimeError: the pass broke" in be.report.notes
    assert not be.report.changed
