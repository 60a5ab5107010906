"""Small facts about single FX nodes of a Dynamo (torch-level) graph: targets, shapes, module names."""

from __future__ import annotations

import operator
import re
from typing import Any, Optional

import networkx as nx
import torch
import torch.nn.functional as F
from torch import fx

SDPA_TARGETS = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}
LINEAR_TARGETS = {F.linear, torch._C._nn.linear}
MATMUL_TARGETS = {torch.matmul, operator.matmul, torch.bmm}
SOFTMAX_FUNCS = {F.softmax, torch.softmax, torch.nn.functional.softmax, torch._C._nn.softmax
                 if hasattr(torch._C._nn, "softmax") else F.softmax}
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


def is_state(node: fx.Node) -> bool:
    """A placeholder (or get_attr) holding a module parameter or buffer, not a user input."""
    if node.op == "get_attr":
        return True
    if node.op != "placeholder":
        return False
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    name = source.name if source is not None and hasattr(source, "name") else node.name
    name = name() if callable(name) else name
    return "self" in str(name).split(".")[0] or "_parameters" in str(name) or "_buffers" in str(name) \
        or node.name.startswith("l_self_")


def is_parameter_like(node: fx.Node) -> bool:
    """A parameter/buffer placeholder, or a node computed only from such (e.g. cls_token.expand)."""
    if node.op in ("placeholder", "get_attr"):
        return is_state(node)
    if node.op == "output":
        return False
    # sizes (SymInt nodes under a dynamic batch, e.g. cls_token.expand(s0, -1, -1)) are not data
    inputs = [a for a in node.all_input_nodes if isinstance(example_value(a), torch.Tensor)]
    return bool(inputs) and all(is_parameter_like(a) for a in inputs)


_INDEX = re.compile(r"\[(\d+)\]")
_QUOTED = re.compile(r"\[['\"]([^'\"]+)['\"]\]")


def normalize_module_path(path: str) -> str:
    """``L['self'].blocks[3].attn`` -> ``blocks.3.attn``; ``L['self']`` -> ``''``."""
    path = re.sub(r"^L\[['\"]self['\"]\]\.?", "", path)
    path = re.sub(r"^self\.?", "", path)
    path = path.replace("._modules", "")
    path = _QUOTED.sub(r".\1", path)
    path = _INDEX.sub(r".\1", path)
    return path.strip(".").replace("..", ".")


def module_path(node: fx.Node) -> str:
    """Qualified name of the innermost module that produced ``node`` (``''`` for top level)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path, _ = list(stack.values())[-1]
    return normalize_module_path(str(path))


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
