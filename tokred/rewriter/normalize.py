"""One spelling per op before matching: in-place arithmetic becomes out-of-place where that
cannot change what the graph computes.

    respelled = normalize(gm)   # number of nodes rewritten

Dynamo records ``scores /= math.sqrt(d)`` as ``operator.itruediv(scores, c)`` (and ``x.mul_(s)`` as
the method ``mul_``); the attention matcher knows ``truediv``/``div``/``mul``. The in-place form is
replaced by the out-of-place one when nothing can see the difference:

- the mutated tensor is not a graph input (the caller would see its tensor change) and not a
  view of another tensor (the mutation would reach the base);
- nothing reads the mutated tensor after the in-place op, other than through its result.

Anything else is left in place (the matcher then does not find that site, and says nothing wrong).
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from tokred.rewriter.analysis.graph import example_value

# in-place op -> its out-of-place twin, as functions and as methods
IN_PLACE_FUNCTIONS = {operator.itruediv: operator.truediv, operator.imul: operator.mul,
                      operator.iadd: operator.add, operator.isub: operator.sub}
IN_PLACE_METHODS = {"div_": "div", "mul_": "mul", "add_": "add", "sub_": "sub"}


def normalize(gm: fx.GraphModule) -> int:
    """Respell the in-place arithmetic of ``gm`` out of place where it is safe; returns how many
    nodes were respelled (the graph is recompiled if any)."""
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    values = {id(example_value(node)) for node in gm.graph.nodes if isinstance(example_value(node), torch.Tensor)}
    respelled = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in IN_PLACE_FUNCTIONS:
            twin = IN_PLACE_FUNCTIONS[node.target]
        elif node.op == "call_method" and node.target in IN_PLACE_METHODS:
            twin = IN_PLACE_METHODS[node.target]
        else:
            continue
        if _safe_to_respell(node, order, values):
            node.target = twin
            respelled += 1
    if respelled:
        gm.graph.lint()
        gm.recompile()
    return respelled


def _safe_to_respell(node: fx.Node, order: dict, values: set) -> bool:
    """Whether ``node`` (an in-place op on its first argument) may compute out of place;
    ``values``: the ids of the graph's node values (a view of one of them is not respelled)."""
    mutated = node.args[0] if node.args else None
    if not isinstance(mutated, fx.Node) or mutated.op in ("placeholder", "get_attr"):
        return False
    value = example_value(mutated)
    if not isinstance(value, torch.Tensor):
        return False
    if value._base is not None and id(value._base) in values:
        return False  # a view of another node's tensor: the mutation would reach it (a view of an
        # op's own temporary, as a batched matmul's result is, reaches nothing the graph reads)
    later = [user for user in mutated.users if user is not node and order[user] > order[node]]
    return not later
