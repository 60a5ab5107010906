"""The zoo of real architectures through tokred: found sites, and compiled outputs equal eager ones.

Every test builds its model inside (``ZOO[name]()``), so collection builds nothing; dynamo is reset
around every test. Compiles use ``inner="aot_eager"`` (fast on CPU); one test uses inductor.

A Dynamo trace of one tiny HF model costs 1-4 s on this CPU, so by default each entry is traced
twice: one ``tokred.explain`` (cached, shared by all explain tests) and one aot_eager compile. The
by-name backend test and the tokred-independent graph check run on QUICK by default and on the
whole zoo with ``--long``.
"""

from __future__ import annotations

import functools

import pytest
import torch

import tokred
from zoo import ZOO, ZOO_INFO, ZooModel, flatten_outputs, max_abs_diff, zoo_names, zoo_params

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

ATOL = 1e-5  # fp32; every tokred path here changes no arithmetic, so outputs agree to rounding

# One entry per family/implementation that matters to the plumbing: timm eager attention, an HF
# masked SDPA encoder, an HF GQA decoder returning a KV cache, a model without attention.
QUICK = ["timm_vit_tiny_eager", "hf_bert_sdpa", "hf_llama_cache_sdpa", "timm_resnet"]


def _captured_graphs(z: ZooModel) -> list[torch.fx.GraphModule]:
    """The torch-level graphs Dynamo hands a backend for ``z``, captured by a recording backend."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(z.model, backend=record)(*z.args, **z.kwargs)
    torch._dynamo.reset()
    return graphs


def _innermost_module(node: torch.fx.Node, model: torch.nn.Module) -> str:
    """Qualified name in ``model.named_modules()`` of the innermost module a node was traced in
    ('' at top level), found by object identity: Dynamo keys its module stack by ``id(module)``.
    Independent of how Dynamo spells the module's source (``L['self'].blocks.0.attn``,
    ``L['args'][0].blocks.0.attn``, which tokred's analysis parses)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    key = list(stack.keys())[-1]
    names = {str(id(module)): name for name, module in model.named_modules()}
    assert key in names, f"module stack key {key!r} of {node.name} is no module of the model"
    return names[key]


def _attention_cores(graphs: list[torch.fx.GraphModule], impl: str) -> list[torch.fx.Node]:
    """SDPA calls (impl 'sdpa') or softmax calls (impl 'eager') in graph order."""
    found = []
    for gm in graphs:
        for node in gm.graph.nodes:
            if node.op != "call_function" and node.op != "call_method":
                continue
            name = getattr(node.target, "__name__", str(node.target))
            if impl == "sdpa" and name == "scaled_dot_product_attention":
                found.append(node)
            if impl == "eager" and name == "softmax":
                found.append(node)
    return found


# ------------------------------------------------------------------------- the zoo itself


@pytest.mark.parametrize("name", zoo_params())
def test_eager_output_finite_and_deterministic(name):
    """Two builds of an entry have identical weights and outputs; every output tensor is finite."""
    first, second = ZOO[name](), ZOO[name]()
    assert first.name == name
    info = ZOO_INFO[name]
    assert (first.family, first.impl, first.kind) == (info.family, info.impl, info.kind)
    assert not first.model.training, "zoo models are built in eval mode"

    out_first, out_again, out_second = first(), first(), second()
    tensors = flatten_outputs(out_first)
    assert tensors, "the model returned no tensor"
    for t in tensors:
        assert torch.isfinite(t).all(), f"non-finite output of shape {tuple(t.shape)}"
    assert max_abs_diff(out_first, out_again) == 0.0, "two runs of one model differ"
    assert max_abs_diff(out_first, out_second) == 0.0, "two builds differ: a builder is not seeded"


@pytest.mark.parametrize("name", zoo_params())
def test_metadata_names_real_modules(name):
    """attention_modules and block_prefix name modules that exist; sizes are distinct numbers."""
    z = ZOO[name]()
    modules = dict(z.model.named_modules())
    assert len(z.attention_modules) == z.n_attention
    assert all(t.shape[0] == z.batch for t in flatten_outputs(z()) if t.dim()), "batch is the leading dim"
    for qualified in z.attention_modules:
        assert qualified in modules, f"{qualified} is not a module of {name}"
    if z.n_attention == 0:
        assert z.block_prefix is None and z.token_count is None
        return
    blocks = modules[z.block_prefix]
    assert isinstance(blocks, (torch.nn.ModuleList, torch.nn.Sequential)) and len(blocks) == z.n_attention
    for i, qualified in enumerate(z.attention_modules):
        assert qualified.startswith(f"{z.block_prefix}.{i}.")
    # A literal equal to N must be unambiguous in the captured graph's shape arguments.
    batch = z.batch
    sizes = [batch, z.token_count, z.heads, z.head_dim, z.hidden]
    assert len(set(sizes)) == len(sizes), f"batch, N, heads, head_dim, hidden not distinct: {sizes}"
    assert z.heads * z.head_dim == z.hidden and z.heads % z.kv_heads == 0


@pytest.mark.parametrize("name", zoo_params(attention=True, quick=QUICK))
def test_metadata_matches_captured_graph(name):
    """Independently of tokred: the Dynamo graph has n_attention cores, in the named modules, of
    the stated geometry (SDPA query [B, heads, N, head_dim]; softmax scores [B, heads, N, N])."""
    z = ZOO[name]()
    graphs = _captured_graphs(z)
    assert len(graphs) == 1, f"{name} graph-breaks into {len(graphs)} graphs"
    cores = _attention_cores(graphs, z.impl)
    assert [_innermost_module(n, z.model) for n in cores] == z.attention_modules
    batch = z.batch
    for node in cores:
        if z.impl == "sdpa":
            query = node.args[0].meta["example_value"]
            assert tuple(query.shape) == (batch, z.heads, z.token_count, z.head_dim)
        else:
            scores = node.meta["example_value"]
            assert tuple(scores.shape) == (batch, z.heads, z.token_count, z.token_count)


# ---------------------------------------------------------------------------- tokred.explain


@functools.lru_cache(maxsize=None)
def _explained(name: str) -> tuple[ZooModel, tokred.Report]:
    """``ZOO[name]()`` and its ``tokred.explain`` report, computed once per entry for all tests here."""
    z = ZOO[name]()
    return z, tokred.explain(z.model, *z.args, example_kwargs=z.kwargs)


@pytest.mark.parametrize("name", zoo_params(attention=True))
def test_explain_finds_every_attention_module(name):
    """One attention site per attention layer, named by the module that computes it."""
    z, report = _explained(name)
    modules = [site.module for site in report.attention_sites]
    assert len(modules) == z.n_attention, f"found {modules}, expected {z.attention_modules}\n{report}"
    assert sorted(modules) == sorted(z.attention_modules), str(report)
    for site in report.attention_sites:
        assert site.status == "found", f"{site.module}: {site.status} {site.reason}"


@pytest.mark.parametrize("name", zoo_params(attention=True))
def test_explain_site_geometry(name):
    """Each site's heads, kv heads (GQA), head_dim, shapes, causal flag and mask are right."""
    z, report = _explained(name)
    assert report.attention_sites, str(report)
    batch = z.batch
    for site in report.attention_sites:
        where = f"{name} {site.module}"
        assert (site.heads, site.kv_heads, site.head_dim) == (z.heads, z.kv_heads, z.head_dim), where
        assert tuple(site.q_shape) == (batch, z.heads, z.token_count, z.head_dim), where
        assert tuple(site.kv_shape)[-2:] == (z.token_count, z.head_dim), where
        assert site.causal == z.causal, where
        if z.has_mask:
            assert site.has_mask, f"{where}: the padding mask was not found"
        if z.kind == "vision":
            assert not site.has_mask, f"{where}: a vision model has no mask"


@pytest.mark.parametrize("name", zoo_params(attention=True))
def test_explain_token_count_and_prefix(name):
    """The report's token count N and number of protected prefix (class/distill/register) tokens."""
    z, report = _explained(name)
    assert report.token_count == z.token_count, str(report)
    assert report.prefix_tokens == z.prefix_tokens, str(report)


@pytest.mark.parametrize("name", zoo_params(attention=False))
def test_explain_model_without_attention(name):
    """A model with no attention: no site, and the printed report says so."""
    z, report = _explained(name)
    assert report.attention_sites == []
    assert "no attention" in str(report)


# --------------------------------------------------------------------------- torch.compile


def _compiled_output(z: ZooModel, backend, options=None):
    torch._dynamo.reset()
    compiled = torch.compile(z.model, backend=backend, options=options)
    with torch.no_grad():
        return compiled(*z.args, **z.kwargs)


@pytest.mark.parametrize("name", zoo_params())
def test_compile_with_backend_instance_matches_eager(name):
    """torch.compile(model, backend=tokred.backend(inner='aot_eager')) reproduces eager outputs."""
    z = ZOO[name]()
    expected = z()
    be = tokred.backend(inner="aot_eager")
    got = _compiled_output(z, be)
    assert be.reports, "the tokred backend was never called"
    assert max_abs_diff(expected, got) <= ATOL


@pytest.mark.parametrize("name", zoo_params(quick=QUICK))
def test_compile_with_backend_by_name_matches_eager(name):
    """torch.compile(model, backend='tokred', options={'inner': 'aot_eager'}) reproduces eager."""
    z = ZOO[name]()
    expected = z()
    got = _compiled_output(z, "tokred", {"inner": "aot_eager"})
    assert max_abs_diff(expected, got) <= ATOL


def test_compile_vit_tiny_with_inductor_matches_eager():
    """The one inductor end-to-end run (inductor is the default inner compiler; slow on CPU)."""
    z = ZOO["timm_vit_tiny_sdpa"]()
    expected = z()
    be = tokred.backend()
    assert be.options.inner == "inductor"
    got = _compiled_output(z, be)
    assert be.reports, "the tokred backend was never called"
    assert max_abs_diff(expected, got) <= ATOL


def test_zoo_covers_both_attention_implementations():
    """Every family with attention comes as SDPA and as written-out eager attention."""
    for family in ("timm", "hf"):
        sdpa = {n.removesuffix("_sdpa") for n in zoo_names(family=family, impl="sdpa")}
        eager = {n.removesuffix("_eager") for n in zoo_names(family=family, impl="eager")}
        assert eager <= sdpa and sdpa - eager <= {"hf_llama_cache"}, (family, sdpa ^ eager)
    assert zoo_names(attention=False), "the zoo needs models without attention"
