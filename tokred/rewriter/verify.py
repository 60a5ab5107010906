"""Checks run after a rewrite: graph lint, fake-tensor shape propagation, the output contract."""

from __future__ import annotations

import torch
from torch import fx

from tokred.compat.torch_api import FakeTensor, FakeTensorMode, detect_fake_mode, tree_leaves


def _fake_mode(example_inputs) -> FakeTensorMode:
    mode = detect_fake_mode(example_inputs)
    return mode if mode is not None else FakeTensorMode(allow_non_fake_inputs=True)


class ShapeCheckError(ValueError):
    """The rewritten graph's shapes do not fit together at ``node`` (found by fake propagation)."""

    def __init__(self, node: fx.Node, cause: BaseException):
        from tokred.rewriter.analysis.graph import module_path

        module = module_path(node)
        where = f" in {module}" if module else ""
        lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
        detail = lines[0][:200] if lines else type(cause).__name__
        super().__init__(f"the rewritten graph's shapes do not fit at node {node.name}{where} (a side input "
                         f"that keeps the old token count?): {detail}")
        self.node = node


def propagate_shapes(gm: fx.GraphModule, example_inputs) -> None:
    """Recompute ``node.meta['example_value']`` of every node with fake tensors.

    Raises whatever shape error the first inconsistent node gives, with the node named.
    """
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    class NamingProp(FakeTensorProp):
        def run_node(self, n):
            try:
                return super().run_node(n)
            except ShapeCheckError:
                raise
            except Exception as exc:  # name the node that failed, in words
                raise ShapeCheckError(n, exc) from exc

    mode = _fake_mode(example_inputs)
    NamingProp(gm, mode).propagate(*example_inputs)
    for node in gm.graph.nodes:
        if "val" in node.meta:
            node.meta["example_value"] = node.meta["val"]


def _meta_value(node: fx.Node):
    return node.meta.get("example_value", node.meta.get("val"))


def infer_node(node: fx.Node):
    """The fake value of one (new) node from its inputs' metadata, stored in its meta; the rest of
    the graph is not propagated (the driver checks the whole graph once per pass)."""
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), _meta_value)
    # the inputs' own fake mode (Dynamo's, with its shape environment), not the tracing context's
    modes = [v.fake_mode for v in tree_leaves((args, kwargs)) if isinstance(v, FakeTensor)]
    mode = modes[0] if modes else FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        if node.op == "call_method":
            result = getattr(args[0], node.target)(*args[1:], **kwargs)
        elif node.op == "call_module":
            result = node.graph.owning_module.get_submodule(node.target)(*args, **kwargs)
        else:
            result = node.target(*args, **kwargs)
    node.meta["example_value"] = node.meta["val"] = result
    return result


def cut_size(a: int, n: int, keep: int, leading: int = 0) -> int:
    """A token size after a cut from ``n`` to ``keep`` tokens: k*n (heads or groups merged into the
    dim) becomes k*keep; with ``leading`` prefix tokens kept in place, k*(n - leading) (the tokens
    after them) becomes k*(keep - leading); any other size stays."""
    if a % n == 0:
        return a // n * keep
    if leading and a % (n - leading) == 0:
        return a // (n - leading) * (keep - leading)
    return a


def cut_shape(shape: tuple, token_dims, n: int, keep: int, leading: int = 0) -> tuple:
    """``shape`` after a cut: :func:`cut_size` of each token dim, the other dims as they are."""
    return tuple(cut_size(a, n, keep, leading) if d in token_dims else a for d, a in enumerate(shape))


class PredictedShapes:
    """Node shapes that a pass's token cuts set without running the graph, checked once per pass.

    A cut from N to M tokens changes only the token dims of the nodes in its region (N -> M), so
    their new shapes are known without fake-tensor propagation (which, over the whole graph after
    every cut, made a 12-block merge propagate the graph 12 times). The pass's later plans and cuts
    read the predicted shapes; the nodes a cut adds get their values from their inputs'
    (:func:`infer_node`). The driver then propagates the graph once and :meth:`check` compares
    every prediction with the propagated shape.
    """

    def __init__(self):
        self.expected: dict = {}  # node -> the shape the cuts so far give it

    def predict(self, region: list, token_dims: dict, n, keep: int, added: list, leading: int = 0) -> bool:
        """Set the shapes after a cut of ``region`` (nodes in graph order, their token dims as
        before the cut) from ``n`` to ``keep`` tokens, and infer the ``added`` nodes (graph order).

        Returns False, changing nothing, where a size is symbolic (a dynamic graph): there, the
        caller propagates the graph instead (a prediction must not guard on a symbolic size).
        """
        values = {node: _meta_value(node) for node in region}
        tensors = {node: v for node, v in values.items() if isinstance(v, torch.Tensor)}
        sizes = [n, keep, *(s for v in tensors.values() for s in v.shape)]
        if not all(isinstance(s, int) for s in sizes):
            return False
        staged = {}
        for node, value in tensors.items():
            shape = cut_shape(tuple(value.shape), token_dims.get(node, ()), n, keep, leading)
            staged[node] = shape
            if shape != tuple(value.shape):
                node.meta["example_value"] = node.meta["val"] = _empty_like(value, shape)
        for node in added:
            try:
                _infer_with_inputs(node)
            except Exception as exc:  # an op the cut inserted does not fit its inputs: say where
                raise ShapeCheckError(node, exc) from exc
        self.expected.update(staged)
        return True

    def snapshot(self) -> dict:
        return dict(self.expected)

    def restore(self, saved: dict) -> None:
        self.expected = saved

    def check(self, graph: fx.Graph) -> None:
        """After the graph was propagated: every predicted shape is the propagated one."""
        alive = set(graph.nodes)
        for node, shape in self.expected.items():
            value = _meta_value(node) if node in alive else None
            if value is None:
                continue  # erased since (dead code) or without a value
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else None
            if got != shape:
                raise ValueError(f"node {node.name}: shape {got} after the rewrite, expected {shape}")


def _infer_with_inputs(node: fx.Node) -> None:
    """:func:`infer_node`, first for the inputs without a value (nodes a pass added itself, around
    its cuts: the candidates of prunable_ids)."""
    if node.op not in ("call_function", "call_method", "call_module"):
        return
    for inp in node.all_input_nodes:
        if _meta_value(inp) is None:
            _infer_with_inputs(inp)
    infer_node(node)


def _empty_like(value: torch.Tensor, shape: tuple) -> torch.Tensor:
    """A tensor of ``shape`` standing for ``value`` in the metadata: fake in its fake mode (meta
    for a real one), so that predicting a shape allocates nothing."""
    if isinstance(value, FakeTensor):
        with value.fake_mode:
            return value.new_empty(shape)
    return torch.empty(shape, dtype=value.dtype, device="meta")


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
