"""Batched matmuls in one form before matching (part of :func:`tokred.rewriter.normalize.normalize`).

- ``baddbmm(bias, a, b, beta=β, alpha=α)`` -> ``bmm(a, b) * α + bias * β`` (BLOOM adds ALiBi so).
- Heads flattened into the batch: ``bmm(q, k^T)`` [B*H, N, M] viewed [B, H, N, M] becomes
  ``matmul(q', k'^T)`` of q and k unflattened to [B, H, ..] (a scale or bias between the bmm and
  the view moves with it); ``bmm(weights.view(B*H, N, M), v)`` becomes
  ``matmul(weights, v').flatten(0, 1)``. The same products, per batch and head, as before.

Each rewrite builds its new nodes first (their values inferred from their inputs'); where one
cannot be inferred the new nodes are dropped and the graph keeps its own spelling.
"""

from __future__ import annotations

import operator
from typing import Optional

import torch
from torch import fx

from tokred.rewriter.analysis.graph import DROPOUT_FUNCS, SOFTMAX_FUNCS, is_call, shape_of, size_key
from tokred.rewriter.analysis.logits import ADDS, CASTS, DIVS, MULS
from tokred.rewriter.verify import infer_node

SCALAR_OPS = MULS + DIVS
VIEWS = ("view", "reshape", torch.reshape)


class _Builder:
    """New nodes before ``anchor``, each with the anchor's provenance (module stack, source) and
    a value inferred from its inputs; :meth:`drop` erases them all."""

    def __init__(self, graph: fx.Graph, anchor: fx.Node):
        self.graph, self.anchor, self.nodes = graph, anchor, []

    def call(self, target, *args) -> fx.Node:
        with self.graph.inserting_before(self.anchor):
            kind = "call_method" if isinstance(target, str) else "call_function"
            node = self.graph.create_node(kind, target, args)
        node.meta = {k: v for k, v in self.anchor.meta.items() if k not in ("example_value", "val")}
        self.nodes.append(node)
        infer_node(node)
        return node

    def drop(self) -> None:
        for node in reversed(self.nodes):
            self.graph.erase_node(node)


def _replace(graph: fx.Graph, old: fx.Node, new: fx.Node) -> None:
    """``old``'s users read ``new``; ``old`` and the inputs left without users are erased."""
    old.replace_all_uses_with(new)
    dead = [old]
    while dead:
        node = dead.pop()
        if node.users or node.op != "call_function" and node.op != "call_method":
            continue
        inputs = node.all_input_nodes
        graph.erase_node(node)
        dead.extend(inputs)


def _rebuild(graph: fx.Graph, anchor: fx.Node, build) -> bool:
    """Run ``build(builder)`` -> the node to stand for ``anchor`` (None: no rewrite); True if done."""
    builder = _Builder(graph, anchor)
    try:
        new = build(builder)
    except Exception:  # a value that cannot be inferred: keep the graph's own spelling
        new = None
    if new is None:
        builder.drop()
        return False
    _replace(graph, anchor, new)
    return True


# ----------------------------------------------------------------------------- baddbmm

def split_baddbmm(graph: fx.Graph) -> int:
    """Every ``baddbmm`` as ``bmm(a, b) * alpha + bias * beta``; returns how many were split."""
    changed = 0
    for node in list(graph.nodes):
        if not is_call(node, torch.baddbmm, "baddbmm") or "out" in node.kwargs:
            continue
        rest, kwargs = list(node.args[1:]), dict(node.kwargs)
        bias = node.args[0] if node.args else kwargs.get("input")
        b1 = rest[0] if rest else kwargs.get("batch1")
        b2 = rest[1] if len(rest) > 1 else kwargs.get("batch2")
        beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
        if not all(isinstance(x, fx.Node) for x in (bias, b1, b2)) or len(rest) > 2:
            continue

        def build(b, bias=bias, b1=b1, b2=b2, beta=beta, alpha=alpha):
            product = b.call(torch.bmm, b1, b2)
            if alpha != 1:
                product = b.call(operator.mul, product, alpha)
            if beta == 0:  # torch ignores the input then (even a NaN in it)
                return product
            return b.call(operator.add, product, bias if beta == 1 else b.call(operator.mul, bias, beta))

        changed += _rebuild(graph, node, build)
    return changed


# ----------------------------------------------------------------------------- heads in the batch

def fold_head_views(graph: fx.Graph) -> int:
    """Attention computed by ``bmm`` over [B*H, ..] operands, written as 4-D matmuls over [B, H, ..];
    returns how many products were rewritten."""
    changed = 0
    alive = set(graph.nodes)
    for node in list(graph.nodes):
        if node not in alive:  # erased by an earlier rewrite
            continue
        heads, done = _split_heads(node), False
        if heads is not None:
            done = _rebuild(graph, node, lambda b, node=node, heads=heads: _split(b, node.args[0], heads))
        elif _weights_bmm(node) is not None:
            weights, v, heads = _weights_bmm(node)
            done = _rebuild(graph, node, lambda b, w=weights, v=v, h=heads: b.call(
                torch.flatten, b.call(torch.matmul, w, _unflatten(b, v, h)), 0, 1))
        if done:
            changed += 1
            alive = set(graph.nodes)
    return changed


def _split_heads(view: fx.Node) -> Optional[int]:
    """H where ``view`` turns a [B*H, N, M] product into [B, H, N, M] (last two dims kept)."""
    if not is_call(view, *VIEWS) or not isinstance(view.args[0], fx.Node) or len(view.args[0].users) != 1:
        return None
    before, after = shape_of(view.args[0]), shape_of(view)
    if not (before and after and len(before) == 3 and len(after) == 4 and isinstance(after[1], int)):
        return None
    keys = [size_key(s) for s in before], [size_key(s) for s in after]
    if keys[0][1:] != keys[1][2:] or size_key(after[0] * after[1]) != keys[0][0]:
        return None
    return after[1]


def _split(b: _Builder, x, heads: int) -> Optional[fx.Node]:
    """[B*H, N, M] ``x`` (a bmm, scaled or with a bias added) rebuilt over [B, H, N, M]; None if
    ``x`` is not such a product."""
    if not isinstance(x, fx.Node) or len(x.users) != 1:
        return None
    if is_call(x, torch.bmm, "bmm"):
        return b.call(torch.matmul, _unflatten_operand(b, x.args[0], heads), _unflatten_operand(b, x.args[1], heads))
    if is_call(x, *SCALAR_OPS):
        divides = x.target not in MULS
        for i in ((0,) if divides else (0, 1)):  # c * x as well as x * c; only x / c
            if _is_scalar(x.args[1 - i]):
                inner = _split(b, x.args[i], heads)
                return None if inner is None else b.call(x.target, *((inner, x.args[1]) if i == 0 else (x.args[0], inner)))
        return None
    if is_call(x, *ADDS):
        for i in (0, 1):
            product, side = x.args[i], x.args[1 - i]
            inner = _split(b, product, heads) if isinstance(product, fx.Node) and is_call(
                product, torch.bmm, "bmm", *SCALAR_OPS, *ADDS) else None
            if inner is not None:
                bias = _unflatten_bias(b, side, shape_of(product), heads)
                if bias is None:
                    return None
                return b.call(operator.add, *((inner, bias) if i == 0 else (bias, inner)))
    return None


def _is_scalar(x) -> bool:
    """A number, a SymFloat or a 0-dim tensor: it scales a [B*H, ..] and a [B, H, ..] tensor alike."""
    return not isinstance(x, fx.Node) or shape_of(x) in (None, ())


def _unflatten(b: _Builder, x: fx.Node, heads: int) -> fx.Node:
    return b.call(torch.unflatten, x, 0, (-1, heads))


def _unflatten_operand(b: _Builder, x, heads: int) -> fx.Node:
    """A bmm operand [B*H, ..] as [B, H, ..], unflattened below its transpose and scalings (so
    that the key keeps its spelling ``k^T * c`` with k as [B, H, N, D])."""
    if is_call(x, "transpose", torch.transpose) and len(x.args) == 3 and {d % 3 for d in x.args[1:]} == {1, 2}:
        return b.call(torch.transpose, _unflatten_operand(b, x.args[0], heads), -2, -1)
    if is_call(x, *SCALAR_OPS) and _is_scalar(x.args[1]):
        return b.call(x.target, _unflatten_operand(b, x.args[0], heads), x.args[1])
    return _unflatten(b, x, heads)


def _unflatten_bias(b: _Builder, side, product_shape, heads: int):
    """A bias added to a [B*H, N, M] product, as added to its [B, H, N, M] form (None: cannot)."""
    if not isinstance(side, fx.Node):
        return side
    shape = shape_of(side)
    if shape is None or len(shape) < 3:
        return side  # [N, M] or a scalar broadcasts the same against both forms
    if len(shape) == 3 and size_key(shape[0]) == size_key(product_shape[0]):
        return _unflatten(b, side, heads)
    if len(shape) == 3 and shape[0] == 1:
        return b.call(torch.unsqueeze, side, 0)
    return None


def _weights_bmm(node: fx.Node) -> Optional[tuple]:
    """(weights [B, H, N, M], v [B*H, M, D], H) where ``node`` is ``bmm(weights.view(B*H, N, M), v)``
    and the weights come from a softmax (through casts and dropout)."""
    if not is_call(node, torch.bmm, "bmm") or len(node.args) != 2:
        return None
    view, v = node.args
    if not is_call(view, *VIEWS) or len(view.users) != 1 or not isinstance(v, fx.Node):
        return None
    weights = view.args[0]
    before, after = shape_of(weights), shape_of(view)
    if not (before and after and len(before) == 4 and len(after) == 3 and isinstance(before[1], int)):
        return None
    if [size_key(s) for s in before[2:]] != [size_key(s) for s in after[1:]] or \
            size_key(before[0] * before[1]) != size_key(after[0]):
        return None
    source = weights
    while is_call(source, *CASTS) or (
            isinstance(source, fx.Node) and source.op == "call_function" and source.target in DROPOUT_FUNCS):
        source = source.args[0]
    if not is_call(source, *SOFTMAX_FUNCS, "softmax"):
        return None
    return weights, v, before[1]


# ----------------------------------------------------------------------------- einsum

def einsum_as_matmul(graph: fx.Graph) -> int:
    """Every two-operand ``einsum`` that is a batched matrix product (one contracted index, one
    free index per operand, the shared indices kept: XLNet's ``"ibnd,jbnd->bnij"``) as permutes
    around a ``matmul``; returns how many were rewritten."""
    changed = 0
    for node in list(graph.nodes):
        if not is_call(node, torch.einsum, torch.functional.einsum, "einsum") or node.kwargs:
            continue
        operands = node.args[1:] if len(node.args) != 2 or not isinstance(node.args[1], (list, tuple)) else node.args[1]
        plan = _matmul_plan(node.args[0], len(operands)) if isinstance(node.args[0], str) else None
        if plan is None or not all(isinstance(x, fx.Node) for x in operands):
            continue
        left, right, result = plan

        def build(b, a=operands[0], c=operands[1], left=left, right=right, result=result):
            product = b.call(torch.matmul, _permuted(b, a, left), _right_operand(b, c, right))
            return _permuted(b, product, result)

        changed += _rebuild(graph, node, build)
    return changed


def _matmul_plan(equation: str, count: int) -> Optional[tuple]:
    """The permutes that make ``equation`` a matmul: (left, right, result) dim orders, or None."""
    if count != 2 or "->" not in equation or "." in equation:
        return None
    inputs, out = equation.replace(" ", "").split("->")
    if inputs.count(",") != 1:
        return None
    a, b = inputs.split(",")
    if any(len(set(t)) != len(t) for t in (a, b, out)):
        return None
    batch = [i for i in out if i in a and i in b]
    contracted = [i for i in a if i in b and i not in out]
    free_a = [i for i in a if i in out and i not in b]
    free_b = [i for i in b if i in out and i not in a]
    if len(contracted) != 1 or len(free_a) != 1 or len(free_b) != 1 or \
            len(batch) + 2 != len(out) or len(a) != len(batch) + 2 or len(b) != len(batch) + 2:
        return None
    left = [a.index(i) for i in batch + free_a + contracted]
    right = [b.index(i) for i in batch + contracted + free_b]
    product = batch + free_a + free_b
    return left, right, [product.index(i) for i in out]


def _permuted(b: _Builder, x: fx.Node, order: list) -> fx.Node:
    return x if order == sorted(order) else b.call(torch.permute, x, tuple(order))


def _right_operand(b: _Builder, x: fx.Node, order: list) -> fx.Node:
    """The right matmul operand in ``order`` (batch, contracted, free); where that takes a permute,
    spelled as the transpose of x in (batch, free, contracted) order: a key then reads as
    ``k.transpose(-2, -1)`` with k [B, H, N, D], as the attention matcher reads keys."""
    swapped = order[:-2] + [order[-1], order[-2]]
    if order == sorted(order):
        return x
    return b.call(torch.transpose, _permuted(b, x, swapped), -2, -1)
