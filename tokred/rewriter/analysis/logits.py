"""The written-out attention pattern, ``softmax(f(q @ k^T)) @ v``, matched rule by rule.

``f`` is any chain of logit ops between the scores matmul and the softmax. Each op is one rule: a
plain function of a node that returns the operand carrying the logits and a :class:`LogitStep`
saying what the op does to them, or None when the node is no such op. The match walks from the
softmax's input along the logits operand until it reaches the matmul; there is no depth limit and
no list of whole spellings (a new spelling is one more rule). One guard holds for every rule: the
operand carrying the logits has the softmax's last two dims, [.., Nq, Nk] (broadcast operands of
other shapes are masks, biases or scales, never the logits).

    chain = match_logits(softmax)      # LogitChain(scores=q @ k^T node, steps=...) or None
    out = match_weights_matmul(softmax)  # the (attn @ v) matmul, or None

The graph is normalized first (:mod:`tokred.rewriter.normalize`): in-place ops out of place,
``baddbmm`` as ``bmm`` plus its scale and bias, a ``bmm`` over flattened heads as a 4-D matmul.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import fx

from tokred.rewriter.analysis.graph import (
    DROPOUT_FUNCS, arg, evaluate_constant, example_value, is_call, is_matmul, shape_of, size_key,
)

CASTS = ("to", "float", "half", "bfloat16", "type", "type_as", "contiguous")
MULS = (operator.mul, torch.mul, "mul")
DIVS = (operator.truediv, torch.div, torch.true_divide, "div", "true_divide")
ADDS = (operator.add, torch.add, "add")
VIEWS = ("view", "reshape", torch.reshape, "unflatten", "flatten", torch.flatten)


@dataclass(frozen=True)
class LogitStep:
    """One op on the logits. kind: "cast", "view" (leading dims only), "scale" (by ``factor``),
    "temperature" (by the tensor ``side``), "softcap" (tanh), "add" (``side`` added: a mask or a
    bias), "fill" (``masked_fill(logits, side, ...)``: True = blocked), "keep" (``where(side,
    logits, ...)``: True = kept) or "product" (``side`` is a second product of the query, e.g.
    relative-position logits, added to q @ k^T)."""

    kind: str
    node: fx.Node
    side: Any = None
    factor: Optional[float] = None


@dataclass(frozen=True)
class LogitChain:
    """q @ k^T (``scores``) and the steps from it to the softmax, nearest the softmax first."""

    scores: fx.Node
    steps: tuple

    def of_kind(self, *kinds) -> list:
        return [s for s in self.steps if s.kind in kinds]


def scalar_value(x) -> Optional[float]:
    """A number, or a node holding one: a SymFloat (under ``dynamic=True`` Dynamo passes a model's
    float attributes, ``self.scaling``, as inputs read by ``.item()``; its value is read with a
    guard, as a static compile bakes the float in) or a one-element tensor computed from constants
    only (DeBERTa's ``torch.sqrt(torch.tensor(d))``)."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return float(x)
    if not isinstance(x, fx.Node):
        return None
    value = example_value(x)
    if isinstance(value, torch.SymFloat):
        try:
            return float(value)
        except Exception:  # an unbacked value (data-dependent): no number to read
            return None
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point() and value.dim() == 0:
        constant = evaluate_constant(x.graph.owning_module, x)
        return float(constant) if constant is not None else None
    return None


# ----------------------------------------------------------------------------- the rules
# Each rule: (node, carries) -> (logits operand, LogitStep) or None; ``carries(x)`` says whether
# an operand carries the logits (itself a chain down to q @ k^T with the softmax's last two dims).

def cast_rule(node, carries):
    if is_call(node, *CASTS) and carries(node.args[0]):
        return node.args[0], LogitStep("cast", node)
    return None


def view_rule(node, carries):
    """A view that splits or merges leading dims only (Swin's windows, a [B*H, N, N] batch)."""
    if not (is_call(node, *VIEWS) and isinstance(node.args[0], fx.Node) and carries(node.args[0])):
        return None
    before, after = shape_of(node.args[0]), shape_of(node)
    same_tail = before and after and [size_key(s) for s in before[-2:]] == [size_key(s) for s in after[-2:]]
    return (node.args[0], LogitStep("view", node)) if same_tail else None


def scale_rule(node, carries):
    """logits * c, c * logits, logits / c with c a number."""
    a, b = (node.args + (None, None))[:2]
    if is_call(node, *MULS):
        for logits, c in ((a, b), (b, a)):
            if scalar_value(c) is not None and carries(logits):
                return logits, LogitStep("scale", node, factor=scalar_value(c))
    if is_call(node, *DIVS) and scalar_value(b) and carries(a):
        return a, LogitStep("scale", node, factor=1.0 / scalar_value(b))
    return None


def temperature_rule(node, carries):
    """logits times (or over) a tensor from outside the chain: a learned temperature."""
    a, b = (node.args + (None, None))[:2]
    pairs = ((a, b), (b, a)) if is_call(node, *MULS) else ((a, b),) if is_call(node, *DIVS) else ()
    for logits, other in pairs:
        if isinstance(other, fx.Node) and carries(logits) and not carries(other):
            return logits, LogitStep("temperature", node, side=other)
    return None


def softcap_rule(node, carries):
    """The tanh of a soft-cap ``c * tanh(logits / c)`` (its scalings are scale steps)."""
    if is_call(node, torch.tanh, "tanh") and carries(node.args[0]):
        return node.args[0], LogitStep("softcap", node)
    return None


def add_rule(node, carries):
    """A mask or bias added to the logits; where both operands are products of the query (XLNet's
    and DeBERTa's relative-position logits), the first is q @ k^T and the second a "product"."""
    if not is_call(node, *ADDS) or len(node.args) < 2:
        return None
    a, b = node.args[0], node.args[1]
    if carries(a) and carries(b):
        return a, LogitStep("product", node, side=b)
    for logits, side in ((a, b), (b, a)):
        if carries(logits) and (isinstance(side, fx.Node) or scalar_value(side) is not None):
            return logits, LogitStep("add", node, side=side)  # a number added (DeBERTa's + 0) masks nothing
    return None


def fill_rule(node, carries):
    if is_call(node, "masked_fill", torch.masked_fill) and carries(node.args[0]):
        return node.args[0], LogitStep("fill", node, side=arg(node, 1, "mask"))
    return None


def keep_rule(node, carries):
    if is_call(node, torch.where) and len(node.args) >= 3 and carries(node.args[1]):
        return node.args[1], LogitStep("keep", node, side=node.args[0])
    return None


LOGIT_RULES: tuple[Callable, ...] = (cast_rule, view_rule, scale_rule, softcap_rule, add_rule, fill_rule,
                                     keep_rule, temperature_rule)


# ----------------------------------------------------------------------------- the match

def match_logits(softmax: fx.Node) -> Optional[LogitChain]:
    """The chain from q @ k^T to ``softmax`` (over its last dim), or None where the softmax's
    input is not such a chain."""
    shape = shape_of(softmax)
    dim = arg(softmax, 1, "dim", None)
    if shape is None or len(shape) < 3 or dim not in (-1, len(shape) - 1):
        return None
    tail = [size_key(s) for s in shape[-2:]]
    memo: dict = {}

    def step(node):
        for rule in LOGIT_RULES:
            found = rule(node, carries)
            if found is not None:
                return found
        return None

    def carries(node) -> bool:
        if not isinstance(node, fx.Node):
            return False
        if node not in memo:
            s = shape_of(node)
            memo[node] = False  # while deciding (a DAG has no cycle; this only stops a re-entry)
            memo[node] = bool(s) and len(s) >= 2 and [size_key(x) for x in s[-2:]] == tail and (
                is_matmul(node) or step(node) is not None)
        return memo[node]

    steps, cur = [], softmax.args[0]
    if not carries(cur):
        return None
    while not is_matmul(cur):
        cur, found = step(cur)
        steps.append(found)
    return LogitChain(scores=cur, steps=tuple(steps))


def match_weights_matmul(softmax: fx.Node) -> Optional[tuple]:
    """(the (attn @ v) matmul, the node it reads the weights from) after ``softmax``, through casts,
    dropout and leading-dim views; None where the weights are not its left operand."""
    cur = softmax
    while True:
        users = list(cur.users)
        if len(users) != 1:
            # the weights returned as an output as well: follow the one matmul user
            products = [u for u in users if is_matmul(u)]
            if len(products) != 1:
                return None
            user = products[0]
        else:
            user = users[0]
        if is_matmul(user):
            return (user, cur) if user.args[0] is cur else None
        passes = is_call(user, *CASTS) or (user.op == "call_function" and user.target in DROPOUT_FUNCS) or (
            is_call(user, *VIEWS) and view_rule(user, lambda n: n is cur) is not None)
        if not passes or user.args[0] is not cur:
            return None
        cur = user


def key_operand(kt) -> tuple:
    """``(k, factor)`` from the right operand of q @ k^T: the key before its transpose and any
    scale applied to it (DeBERTa scales ``k^T`` by ``1 / sqrt(d)``). A permute that does more than
    swap the last two dims (a key laid out [B, H, D, N] straight from [B, N, H, D]) is left as it
    is: its input is not the key as [B, H, N, D]."""
    factor = 1.0
    while isinstance(kt, fx.Node):
        a, b = (kt.args + (None, None))[:2]
        if is_call(kt, *MULS) and scalar_value(b) is not None:
            factor, kt = factor * scalar_value(b), a
        elif is_call(kt, *DIVS) and scalar_value(b):
            factor, kt = factor / scalar_value(b), a
        else:
            break
    if is_call(kt, "transpose", torch.transpose) or is_call(kt, "mT", "t"):
        return kt.args[0], factor
    if is_call(kt, "permute", torch.permute) and len(kt.args) >= 2:
        dims = kt.args[1:] if len(kt.args) > 2 or not isinstance(kt.args[1], (list, tuple)) else kt.args[1]
        rank = len(dims)
        norm = [d % rank for d in dims] if all(isinstance(d, int) for d in dims) else None
        if norm == list(range(rank - 2)) + [rank - 1, rank - 2]:
            return kt.args[0], factor
    return kt, factor


def query_scale(q) -> Optional[float]:
    """The scale of a pre-scaled query (timm's eager path: ``q = q * scale``), or None."""
    if is_call(q, *MULS) and scalar_value(q.args[1]) is not None:
        return scalar_value(q.args[1])
    if is_call(q, *DIVS) and scalar_value(q.args[1]):
        return 1.0 / scalar_value(q.args[1])
    return None


# words for the logit ops a pass that recomputes plain scaled logits cannot reproduce
LOGIT_OP_WORDS = {"softcap": "a tanh soft-cap", "temperature": "a learned temperature",
                  "product": "a second product of the query (relative-position logits)"}
