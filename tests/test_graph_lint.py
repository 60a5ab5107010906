"""Rewritten graphs are free of host syncs: what every pass inserts traces to device-side ATen ops.

A graph that reads a tensor's value on the host (``.item()``, ``.tolist()``, ``bool(t)`` in a
Python branch), or whose output size depends on data (``nonzero``, ``masked_select``, ``unique``),
stalls the GPU at every call and cannot be captured in a CUDA graph (``mode="reduce-overhead"``).
The functions a pass inserts are plain Python (tome_step, the prune scorers) that inductor traces
through, so a sync hides inside them, not in the rewritten graph's own nodes: each rewritten graph
is traced here to ATen ops (``make_fx``, real tensors, as AOT autograd sees it) and those are
checked.
"""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import tokred
from tokred.rewriter.options import parse_options
from zoo import ZOO

aten = torch.ops.aten
# ATen ops that read a value on the host or give a data-dependent shape
SYNC_OPS = {aten._local_scalar_dense.default, aten.item.default, aten.nonzero.default, aten.masked_select.default,
            aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default,
            aten.nonzero_static.default, aten.is_nonzero.default}

CASES = [
    ("timm_vit_tiny_sdpa", {"merge": {"r": 2}}),
    ("timm_vit_tiny_eager", {"merge": {"r": 2, "prop_attn": True}}),
    ("timm_vit_tiny_sdpa", {"merge": {"r": 2, "mode": "local"}}),
    ("timm_deit_tiny_distilled_sdpa", {"merge": {"r": 2, "protect": "set_aside"}}),
    ("timm_vit_tiny_sdpa", {"prune": {"keep": 0.5, "at": [0], "score": "cls"}}),
    ("timm_vit_tiny_sdpa", {"prune": {"keep": 0.5, "at": [0], "score": "diversity"}}),
    ("hf_bert_sdpa", {"merge": {"r": 2}}),
    ("hf_bert_sdpa", {"prune": {"keep": 0.5, "at": [0], "fuse": True}}),
    ("hf_llama_sdpa", {"prune": {"keep": 0.5, "at": [0], "score": "query", "pool": 3}}),
    ("hf_llama_sdpa", {"prune": {"keep": 0.5, "at": [0], "score": "transition"}}),
    ("hf_llama_sdpa", {"prune": {"keep": 0.5, "at": [0], "score": "random"}}),
    ("hf_llama_sdpa", {"sparse_attention": {"pattern": "sink_window", "sinks": 2, "window": 4}}),
    ("hf_llama_sdpa", {"sparse_attention": {"pattern": "block_topk", "block": 4, "topk": 1}}),
]


def host_syncs(gm: torch.fx.GraphModule, example_inputs) -> list:
    """The host-sync ATen ops ``gm`` runs (empty: none), traced with its example inputs."""
    try:
        traced = make_fx(gm, tracing_mode="real")(*example_inputs)
    except RuntimeError as exc:  # make_fx refuses a host read of a traced value (.item(), bool(t))
        return [f"a traced value read on the host: {str(exc).splitlines()[0][:200]}"]
    found = []
    for node in traced.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in SYNC_OPS:
            found.append(str(node.target))
        elif node.target is aten._to_copy.default and "device" in node.kwargs:
            source = node.args[0].meta.get("val") if isinstance(node.args[0], torch.fx.Node) else None
            if source is None or torch.device(node.kwargs["device"]) != source.device:
                found.append(f"{node.target} to {node.kwargs['device']} (a host/device copy)")
    return found


def rewritten(zm, options: dict) -> list:
    """(rewritten graph, its example inputs, report) for each graph the zoo model's capture gives."""
    parsed = parse_options(options)
    graphs = []

    def keep(gm, example_inputs):
        gm, report = tokred.rewrite(gm, example_inputs, parsed)
        graphs.append((gm, list(example_inputs), report))
        return gm.forward

    with torch.no_grad():
        torch.compile(zm.model, backend=keep, dynamic=False)(*zm.args, **zm.kwargs)
    return graphs


@pytest.mark.parametrize("name, options", CASES, ids=[f"{n}-{next(iter(o))}-{i}" for i, (n, o) in enumerate(CASES)])
def test_rewritten_graphs_have_no_host_sync(name, options, fresh_dynamo):
    graphs = rewritten(ZOO[name](), options)
    assert any(report.changed for _, _, report in graphs), f"{name}: {options} rewrote nothing"
    for gm, example_inputs, _ in graphs:
        with torch.no_grad():
            syncs = host_syncs(gm, example_inputs)
        assert not syncs, f"{name} with {options}: the rewritten graph syncs with the host: {syncs}"


def test_the_lint_finds_a_host_sync():
    """The check itself: a value read on the host, a data-dependent shape, a device copy."""

    def reads_value(x):
        return x * x.sum().item()

    def data_dependent(x):
        return x.nonzero()

    def branches(x):
        return x + 1 if bool(x.sum() > 0) else x - 1

    x = torch.randn(4)
    for fn, op in ((reads_value, "read on the host"), (data_dependent, "nonzero"), (branches, "read on the host")):
        gm = torch.fx.symbolic_trace(fn) if fn is not branches else torch.fx.GraphModule({}, _opaque_graph(fn))
        assert any(op in s for s in host_syncs(gm, [x])), fn.__name__
    clean = torch.fx.symbolic_trace(lambda x: (x * 2).softmax(-1))
    assert host_syncs(clean, [x]) == []


def _opaque_graph(fn) -> torch.fx.Graph:
    """A graph that calls ``fn`` as one node, as a pass inserts its functions (traced through later)."""
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_function(fn, (x,)))
    return graph
