"""Small facts about single FX nodes of a Dynamo (torch-level) graph: targets, shapes, module names."""

from __future__ import annotations

import operator
from typing import Any, Callable, Iterator, Optional

import networkx as nx
import torch
import torch.nn.functional as F
from torch import fx

from tokred.compat import torch_api

SDPA_TARGETS = {F.scaled_dot_product_attention, *torch_api.SDPA_FUNCS}
LINEAR_TARGETS = {F.linear, *torch_api.LINEAR_FUNCS}
MATMUL_TARGETS = {torch.matmul, operator.matmul, torch.bmm}
SOFTMAX_FUNCS = {F.softmax, torch.softmax, torch.nn.functional.softmax, *torch_api.SOFTMAX_FUNCS}
DROPOUT_FUNCS = {F.dropout, torch.dropout, torch.nn.functional.dropout}
LAYER_NORM_FUNCS = {F.layer_norm, torch.layer_norm}
RMS_NORM_FUNCS = {getattr(F, "rms_norm", F.layer_norm), getattr(torch, "rms_norm", torch.layer_norm)}
ADD_FUNCS = {operator.add, torch.add, operator.iadd}


def is_call(node: Any, *targets) -> bool:
    """``node`` calls one of ``targets`` (functions, or method names as strings)."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function":
        return node.target in targets
    if node.op == "call_method":
        return node.target in targets
    return False


def is_matmul(node: Any) -> bool:
    """A matrix product: torch.matmul / @ / bmm as a function or a method."""
    return is_call(node, *MATMUL_TARGETS, "matmul", "bmm")


def example_value(node: Any):
    if not isinstance(node, fx.Node):
        return None
    return node.meta.get("example_value", node.meta.get("val"))


def shape_of(node: Any) -> Optional[tuple]:
    """Shape of a tensor-valued node (None if not a tensor or unknown): static sizes as ints,
    symbolic sizes (a dynamic graph) left as SymInts."""
    ev = example_value(node)
    if isinstance(ev, torch.Tensor):
        return tuple(_static_size(s) for s in ev.shape)
    return None


def _static_size(s):
    """``s`` as an int when it is one or a SymInt whose value is a constant, else the SymInt.

    Never ``int()`` a symbolic size: that evaluates it and guards the compiled graph on its value
    (Dynamo then recompiles for every other value, e.g. at each decode step of a growing KV cache).
    """
    if isinstance(s, torch.SymInt):
        value = s.node.maybe_as_int()
        return s if value is None else value
    return int(s)


def size_key(s):
    """A size as the analysis compares it: an int, or for a symbolic size (a dynamic graph) its
    sympy expression (``s27``, ``2*s27``). Keys compare, hash and divide structurally, so a
    comparison of two symbolic sizes never evaluates them (which would guard the compiled graph
    on their values, as ``SymInt == SymInt`` does when they differ). None stays None."""
    if s is None:
        return None
    s = _static_size(s)
    return s.node.expr if isinstance(s, torch.SymInt) else s


def shape_keys(node: Any) -> Optional[tuple]:
    """:func:`shape_of` with every size as its :func:`size_key` (None if not a tensor)."""
    shape = shape_of(node)
    return None if shape is None else tuple(size_key(s) for s in shape)


def is_symbolic(size) -> bool:
    """Whether a size (an int, SymInt or size key) is symbolic: it varies from call to call."""
    return not isinstance(size, int)


def is_state(node: fx.Node) -> bool:
    """A placeholder (or get_attr) holding a module parameter or buffer, not a user input."""
    if node.op == "get_attr":
        return True
    return node.op == "placeholder" and torch_api.is_module_state(node)


def is_parameter_like(node: fx.Node) -> bool:
    """A parameter/buffer placeholder, or a node computed only from such (e.g. cls_token.expand)."""
    if node.op in ("placeholder", "get_attr"):
        return is_state(node)
    if node.op == "output":
        return False
    # sizes (SymInt nodes under a dynamic batch, e.g. cls_token.expand(s0, -1, -1)) are not data
    inputs = [a for a in node.all_input_nodes if isinstance(example_value(a), torch.Tensor)]
    return bool(inputs) and all(is_parameter_like(a) for a in inputs)


def module_path(node: fx.Node) -> str:
    """Qualified name of the innermost module that produced ``node`` (``''`` for top level), as
    the model's ``named_modules()`` names it, however Dynamo spelled the module's source."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path, _ = list(stack.values())[-1]
    return torch_api.module_name(str(path), torch_api.module_roots(node.graph))


def resolve_module(root: torch.nn.Module, path: str, kind: Optional[type] = None) -> torch.nn.Module:
    """The submodule of ``root`` a graph's module ``path`` names: ``root.get_submodule(path)``,
    else the one module of type ``kind`` whose name ends with ``path`` or that ``path`` ends with
    (the graph was captured from a wrapper holding ``root``, or from inside it); ValueError if none
    or several match."""
    try:
        found = root.get_submodule(path)
        if kind is None or isinstance(found, kind):
            return found
    except AttributeError:
        pass
    parts = path.split(".") if path else []
    matches = []
    for name, module in root.named_modules():
        own = name.split(".") if name else []
        n = min(len(own), len(parts))
        if n and own[-n:] == parts[-n:] and (kind is None or isinstance(module, kind)):
            matches.append(module)
    if len(matches) != 1:
        raise ValueError(f"{type(root).__name__} has no submodule {path!r}"
                         + (f" of type {kind.__name__}" if kind else "")
                         + (f" ({len(matches)} candidates)" if matches else ""))
    return matches[0]


def module_type(node: fx.Node) -> Optional[type]:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    _, typ = list(stack.values())[-1]
    return typ if isinstance(typ, type) else None


def common_module_path(paths: list) -> str:
    """The longest dotted prefix shared by every path."""
    parts = [p.split(".") if p else [] for p in paths]
    if not parts:
        return ""
    prefix = []
    for items in zip(*parts):
        if all(i == items[0] for i in items):
            prefix.append(items[0])
        else:
            break
    return ".".join(prefix)


def arg(node: fx.Node, index: int, name: str, default=None):
    """Positional-or-keyword argument of a call node."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def to_networkx(graph: fx.Graph) -> nx.DiGraph:
    """The dataflow graph as a networkx DiGraph over fx nodes (edge: input -> user)."""
    g = nx.DiGraph()
    for node in graph.nodes:
        g.add_node(node)
        for inp in node.all_input_nodes:
            g.add_edge(inp, node)
    return g


def walk(node: fx.Node, step: Callable[[fx.Node], Any] = lambda n: n.all_input_nodes,
         max_nodes: Optional[int] = None) -> Iterator[fx.Node]:
    """The nodes reached from ``node`` (itself first) through ``step`` (default: a node's inputs,
    so its ancestors; ``lambda n: n.users`` for its descendants), each once, at most ``max_nodes``.

    On the graph as it is now: the facts' networkx graph is the one taken before the passes ran."""
    frontier, seen = [node], set()
    while frontier and (max_nodes is None or len(seen) < max_nodes):
        cur = frontier.pop()
        if cur in seen:
            continue
        seen.add(cur)
        yield cur
        frontier.extend(step(cur))


def evaluate_constant(gm: fx.GraphModule, node: fx.Node, nxg: Optional[nx.DiGraph] = None) -> Optional[torch.Tensor]:
    """The value of ``node`` when it depends on no graph input (a mask built from aranges), else None."""
    nxg = to_networkx(gm.graph) if nxg is None else nxg
    ancestors = nx.ancestors(nxg, node) | {node}
    if any(n.op == "placeholder" for n in ancestors):
        return None
    sub = fx.Graph()
    env: dict = {}
    for n in gm.graph.nodes:
        if n in ancestors:
            env[n] = sub.node_copy(n, lambda x: env[x])
    sub.output(env[node])
    try:
        with torch.no_grad():
            value = fx.GraphModule(gm, sub)()
    except Exception:  # a construct that does not run outside the graph: treat as not constant
        return None
    return value if isinstance(value, torch.Tensor) else None
