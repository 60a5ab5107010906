"""Literals in shape arguments that equal a token count.

Dynamo bakes static sizes into the graph (``x.reshape(2, 197, 3, 6, 64)``). Where a pass changes
the token count, each such literal on a token dim must change with it. A literal counts only where
the token-axis dataflow says its output dim runs over tokens, so a hidden size that happens to
equal N is left alone.

In a dynamic graph the token count is a symbol, and a shape argument that holds it is a node
(Dynamo's ``s27`` placeholder, or ``s52*s27`` computed from it) rather than an int: such an
argument is a literal too, with its size key (a sympy expression) as its value.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import fx

from tokred.rewriter.analysis.graph import example_value, is_call, shape_keys, size_key
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


def literal_value(arg: Any):
    """A shape argument as a literal's value: an int (not a bool), a size node's size key, else None."""
    if isinstance(arg, bool):
        return None
    if isinstance(arg, int):
        return arg
    value = example_value(arg)
    return size_key(value) if isinstance(value, torch.SymInt) else None


def literals_of(node: fx.Node, axes: TokenAxes, token_counts: set) -> list:
    """The token-count literals in ``node``'s arguments (``token_counts``: size keys)."""
    shape = shape_keys(node)
    dims = axes.of(node)
    if shape is None or not dims:
        return []
    found = []
    if is_call(node, torch.arange) and 0 in dims:
        for i, a in enumerate(node.args[:2]):
            value = literal_value(a)
            tokens = _token_count_of(value, token_counts) if value is not None and value == shape[0] else None
            if tokens is not None:  # N, or k*N (MoE's arange over the k choices of every token)
                found.append(ShapeLiteral(node, (i,), value, 0, tokens))
        return found
    if node.target is operator.getitem and isinstance(node.args[1], (tuple, slice)):
        return found  # slices are handled by the surgery (they cut a buffer to N)
    paths = size_arg_paths(node)
    if not paths:
        return found
    offset = len(shape) - len(paths)
    for k, path in enumerate(paths):
        d = k + offset
        value = literal_value(get_path(node, path))
        if d < 0 or d not in dims or value is None or value != shape[d]:
            continue
        tokens = _token_count_of(value, token_counts)
        if tokens is not None:
            found.append(ShapeLiteral(node, path, value, d, tokens))
    return found


def _token_count_of(value, token_counts: set):
    """The token count a literal on a token dim holds: the smallest that divides it (value = k*N)."""
    return next((n for n in sorted(token_counts, key=_smallest_first) if value % n == 0), None)


def _smallest_first(count) -> tuple:
    """Sort key of token counts: ints ascending, then symbolic ones."""
    return (0, count, "") if isinstance(count, int) else (1, 0, str(count))


def find_shape_literals(graph: fx.Graph, axes: TokenAxes, token_counts: set) -> list:
    """All token-count literals in the graph's shape arguments."""
    out = []
    for node in graph.nodes:
        if node.op in ("call_function", "call_method"):
            out.extend(literals_of(node, axes, token_counts))
    return out
