"""Checks run after a rewrite: graph lint, fake-tensor shape propagation, the output contract."""

from __future__ import annotations

import torch
from torch import fx

from tokred.compat.torch_api import FakeTensor, FakeTensorMode, detect_fake_mode, tree_leaves


def _fake_mode(example_inputs) -> FakeTensorMode:
    mode = detect_fake_mode(example_inputs)
    return mode if mode is not None else FakeTensorMode(allow_non_fake_inputs=True)


def propagate_shapes(gm: fx.GraphModule, example_inputs) -> None:
    """Recompute ``node.meta['example_value']`` of every node with fake tensors.

    Raises whatever shape error the first inconsistent node gives, with the node named.
    """
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    mode = _fake_mode(example_inputs)
    prop = FakeTensorProp(gm, mode)
    try:
        prop.propagate(*example_inputs)
    except Exception as exc:  # name the node that failed
        raise ValueError(f"shape propagation failed: {exc}") from exc
    for node in gm.graph.nodes:
        if "val" in node.meta:
            node.meta["example_value"] = node.meta["val"]


def infer_node(node: fx.Node):
    """The fake value of one (new) node from its inputs' metadata, stored in its meta; the rest of
    the graph is not propagated (the driver checks the whole graph once per pass)."""
    def value(n: fx.Node):
        return n.meta.get("example_value", n.meta.get("val"))

    args, kwargs = fx.node.map_arg((node.args, node.kwargs), value)
    # the inputs' own fake mode (Dynamo's, with its shape environment), not the tracing context's
    modes = [v.fake_mode for v in tree_leaves((args, kwargs)) if isinstance(v, FakeTensor)]
    mode = modes[0] if modes else FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        result = node.target(*args, **kwargs)
    node.meta["example_value"] = node.meta["val"] = result
    return result


def output_signature(gm: fx.GraphModule) -> list:
    """(shape, dtype) of every graph output, from the node metadata."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    sig = []
    for arg in tree_leaves(out.args[0]):
        ev = arg.meta.get("example_value", arg.meta.get("val")) if isinstance(arg, fx.Node) else None
        sig.append((tuple(ev.shape), ev.dtype) if isinstance(ev, torch.Tensor) else None)
    return sig


def check_output_contract(before: list, after: list, skip=frozenset()) -> None:
    """Invariant 1: same number of outputs, same shapes and dtypes (``skip``: output positions
    allowed to change shape, e.g. a pruned prefill's KV cache)."""
    if len(before) != len(after):
        raise ValueError(f"output contract broken: {len(before)} outputs before, {len(after)} after")
    for i, (a, b) in enumerate(zip(before, after)):
        if a != b and not (i in skip and a is not None and b is not None and len(a[0]) == len(b[0])):
            raise ValueError(f"output contract broken at output {i}: {a} before, {b} after")
