"""One spelling per op before matching: in-place arithmetic becomes out-of-place where that
cannot change what the graph computes, and batched matmuls take one form.

    respelled = normalize(gm)   # number of nodes rewritten

Dynamo records ``scores /= math.sqrt(d)`` as ``operator.itruediv(scores, c)`` (and ``x.mul_(s)`` as
the method ``mul_``); the attention matcher knows ``truediv``/``div``/``mul``. The in-place form is
replaced by the out-of-place one when nothing can see the difference:

- the mutated tensor is not a graph input (the caller would see its tensor change) and not a
  view of another tensor (the mutation would reach the base);
- nothing reads the mutated tensor after the in-place op, other than through its result.

Anything else is left in place (the matcher then does not find that site, and says nothing wrong).

Batched matmuls (:mod:`.normalize_matmul`): ``baddbmm(bias, a, b, beta=, alpha=)`` becomes
``bmm(a, b) * alpha + bias * beta``; a two-operand ``einsum`` that is a batched matrix product
becomes permutes around a ``matmul``; a ``bmm`` over heads flattened into the batch whose result
is viewed [B, H, N, M] (DeBERTa, BLOOM) becomes a 4-D matmul of the viewed operands, and the
weights' ``bmm`` with v likewise. The attention matcher then sees one pattern, with its scale and
bias as logit ops and q, k, v as [B, H, N, D].

A dynamic graph builds some shape arguments as a node, ``torch.Size([s52, s27, 192])``, where a
static one passes the tuple ``(2, 9, 192)``: the sizes are inlined into the shape call, so that
the token-count literals are found (and cut) the same way in both.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from tokred.rewriter.analysis.graph import example_value
from tokred.rewriter.analysis.literals import size_arg_paths
from tokred.rewriter.normalize_matmul import einsum_as_matmul, fold_head_views, split_baddbmm

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
    respelled += _inline_sizes(gm.graph)
    respelled += split_baddbmm(gm.graph)
    respelled += einsum_as_matmul(gm.graph)
    respelled += fold_head_views(gm.graph)
    if respelled:
        gm.graph.lint()
        gm.recompile()
    return respelled


def _inline_sizes(graph: fx.Graph) -> int:
    """Shape calls whose one size argument is a ``torch.Size([...])`` node read its sizes instead;
    returns how many were changed (the Size node stays for any other reader)."""
    changed = 0
    for node in list(graph.nodes):
        if not (node.op == "call_function" and node.target is torch.Size and len(node.args) == 1
                and isinstance(node.args[0], (list, tuple))):
            continue
        for user in list(node.users):
            paths = size_arg_paths(user)
            if paths == [paths[0]] and len(paths[0]) == 1 and user.args[paths[0][0]] is node:
                args = list(user.args)
                args[paths[0][0]] = tuple(node.args[0])
                user.args = tuple(args)
                changed += 1
    return changed


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
