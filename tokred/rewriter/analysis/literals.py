"""Literals in shape arguments that equal a token count.

Dynamo bakes static sizes into the graph (``x.reshape(2, 197, 3, 6, 64)``). Where a pass changes
the token count, each such literal on a token dim must change with it. A literal counts only where
the token-axis dataflow says its output dim runs over tokens, so a hidden size that happens to
equal N is left alone.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import fx

from tokred.rewriter.analysis.graph import is_call, shape_of
from tokred.rewriter.analysis.token_axis import TokenAxes

SIZE_METHODS = ("view", "reshape", "expand", "new_zeros", "new_ones", "new_empty", "new_full")
SIZE_FUNCS = (torch.reshape, torch.zeros, torch.ones, torch.empty, torch.full, torch.randn, torch.rand)


@dataclass(frozen=True)
class ShapeLiteral:
    """``node``'s argument at ``path`` (``(i,)`` or ``(i, j)`` into args) is ``value``, the size of
    token dim ``dim`` of its output; ``tokens`` is the token count it holds (value = k * tokens)."""

    node: fx.Node
    path: tuple
    value: int
    dim: int
    tokens: int


def size_arg_paths(node: fx.Node) -> Optional[list]:
    """Paths of the size arguments of a shape-taking call, one per output dim (aligned right)."""
    if is_call(node, *SIZE_METHODS) or node.target in (torch.reshape,):
        first = 1
    elif node.op == "call_function" and node.target in SIZE_FUNCS:
        first = 0
    else:
        return None
    rest = node.args[first:]
    if node.target is torch.full or node.target == "new_full":
        rest = rest[:1]
    if len(rest) == 1 and isinstance(rest[0], (list, tuple, torch.Size)):
        return [(first, j) for j in range(len(rest[0]))]
    return [(i,) for i in range(first, first + len(rest))]


def get_path(node: fx.Node, path: tuple) -> Any:
    value = node.args[path[0]]
    return value[path[1]] if len(path) == 2 else value


def set_path(node: fx.Node, path: tuple, value: Any) -> None:
    args = list(node.args)
    if len(path) == 2:
        inner = list(args[path[0]])
        inner[path[1]] = value
        args[path[0]] = type(args[path[0]])(inner) if not isinstance(args[path[0]], torch.Size) else tuple(inner)
    else:
        args[path[0]] = value
    node.args = tuple(args)


def literals_of(node: fx.Node, axes: TokenAxes, token_counts: set) -> list:
    """The token-count literals in ``node``'s arguments."""
    shape = shape_of(node)
    dims = axes.of(node)
    if shape is None or not dims:
        return []
    found = []
    if is_call(node, torch.arange) and 0 in dims:
        for i, a in enumerate(node.args[:2]):
            if isinstance(a, int) and a == shape[0] and a in token_counts:
                found.append(ShapeLiteral(node, (i,), a, 0, a))
        return found
    if node.target is operator.getitem and isinstance(node.args[1], (tuple, slice)):
        return found  # slices are handled by the surgery (they cut a buffer to N)
    paths = size_arg_paths(node)
    if not paths:
        return found
    offset = len(shape) - len(paths)
    for k, path in enumerate(paths):
        d = k + offset
        value = get_path(node, path)
        if d < 0 or d not in dims or not isinstance(value, int) or isinstance(value, bool):
            continue
        if value != shape[d]:
            continue
        tokens = next((n for n in sorted(token_counts) if value % n == 0), None)
        if tokens is not None:
            found.append(ShapeLiteral(node, path, value, d, tokens))
    return found


def find_shape_literals(graph: fx.Graph, axes: TokenAxes, token_counts: set) -> list:
    """All token-count literals in the graph's shape arguments."""
    out = []
    for node in graph.nodes:
        if node.op in ("call_function", "call_method"):
            out.extend(literals_of(node, axes, token_counts))
    return out
