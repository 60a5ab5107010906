"""What the sparse-attention pass reads off one attention site: its own mask (a graph constant
evaluated once, a causal or sliding-window mask recognised), the mask ops of a written-out softmax
chain, the un-repeated GQA keys and values, whether dropout is active, whether it attends over a
KV cache, and size checks that never guard a symbolic size.
"""

from __future__ import annotations

import operator
from typing import Optional

import networkx as nx
import torch
from torch import fx

from tokred.compat import torch_api
from tokred.rewriter.analysis.graph import DROPOUT_FUNCS, arg, is_call, shape_of
from tokred.rewriter.analysis.sites import skip_layout


# ----------------------------------------------------------------------------- the site's own mask

def allowed_from_bias(bias: torch.Tensor) -> Optional[torch.Tensor]:
    """A boolean "may attend" mask from a boolean or additive mask; None for a real bias (ALiBi)."""
    if bias.dtype == torch.bool:
        return bias
    if not bias.is_floating_point():
        return None
    very_negative = bias <= torch.finfo(bias.dtype).min / 2
    if torch.isneginf(bias).any() or very_negative.any():
        very_negative = very_negative | torch.isneginf(bias)
    if not torch.all((bias == 0) | very_negative):
        return None
    return ~very_negative


def own_window(allowed: torch.Tensor, n_q: int, n_k: int) -> Optional[int]:
    """``None`` if ``allowed`` [.., Nq, Nk] is not a causal (sliding-window) mask; else the window
    (``n_k`` or more for plain causal): the w with allowed[i, j] == (p - w < j <= p), p = n_k - n_q + i."""
    a = allowed.reshape(-1, n_q, n_k).cpu()  # a graph constant: compare it on the host
    if not torch.all(a == a[:1]):
        return None
    a = a[0]
    p = torch.arange(n_k - n_q, n_k).unsqueeze(1)
    j = torch.arange(n_k).unsqueeze(0)
    causal = j <= p
    if torch.equal(a, causal):
        return n_k
    w = int(a[-1].sum())
    return w if torch.equal(a, causal & (j > p - w)) else None


# ----------------------------------------------------------------------------- site inputs

def unrepeated_kv(node: fx.Node) -> fx.Node:
    """The [B, Hkv, N, D] tensor before repeat_kv (``expand(x[:, :, None]).reshape``) or
    ``repeat_interleave(x, n, dim=1)``; ``node`` itself when it is not a repeat."""
    cur = node.args[0] if is_call(node, "reshape", "view", torch.reshape) else None
    if cur is not None and is_call(cur, "contiguous"):
        cur = cur.args[0]
    if cur is not None and is_call(cur, "expand") and isinstance(cur.args[0], fx.Node):
        src = cur.args[0]
        if src.target is operator.getitem and isinstance(src.args[0], fx.Node):
            idx = src.args[1]
            items = idx if isinstance(idx, tuple) else (idx,)
            nones = [i for i, it in enumerate(items) if it is None]
            if nones == [2] and all(isinstance(it, slice) and it == slice(None) or it is None
                                    or it is Ellipsis for it in items):
                return _if_heads_divide(src.args[0], node)
    if is_call(node, "repeat_interleave", torch.repeat_interleave) and isinstance(node.args[0], fx.Node):
        dim = arg(node, 2, "dim")
        if dim == 1:
            return _if_heads_divide(node.args[0], node)
    return node


def _if_heads_divide(src: fx.Node, repeated: fx.Node) -> fx.Node:
    s, r = shape_of(src), shape_of(repeated)
    if s and r and len(s) == 4 and len(r) == 4 and s[0] == r[0] and s[2:] == r[2:] and r[1] % s[1] == 0:
        return src
    return repeated


def unscaled_query(q: fx.Node) -> fx.Node:
    """q before timm's ``q = q * scale`` (the scale is already in the site's scale)."""
    if is_call(q, operator.mul, torch.mul, "mul") and isinstance(q.args[0], fx.Node) and \
            isinstance(q.args[1], (int, float)) and not isinstance(q.args[1], bool):
        return q.args[0]
    return q


def manual_mask_ops(site, nxg: nx.DiGraph) -> Optional[list]:
    """The mask applications between the scores matmul and the softmax of a manual chain, as
    ``[(kind, mask_node)]`` with kind "add" (additive), "fill" (masked_fill: True = masked) or
    "keep" (where(mask, scores, x): True = kept). None if something else sits in between."""
    ops, cur = [], site.softmax.args[0]
    for _ in range(12):
        if cur is site.scores:
            return ops
        if not isinstance(cur, fx.Node):
            return None
        if is_call(cur, operator.mul, torch.mul, "mul", operator.truediv, torch.div, "div"):
            if not isinstance(cur.args[1], (int, float)):
                return None
            cur = cur.args[0]
        elif is_call(cur, operator.add, torch.add, "add"):
            a, b = cur.args[0], cur.args[1]
            if _on_path(nxg, a, site.scores):
                ops.append(("add", b))
                cur = a
            elif _on_path(nxg, b, site.scores):
                ops.append(("add", a))
                cur = b
            else:
                return None
        elif is_call(cur, "masked_fill", torch.masked_fill):
            ops.append(("fill", cur.args[1]))
            cur = cur.args[0]
        elif is_call(cur, torch.where):
            ops.append(("keep", cur.args[0]))
            cur = cur.args[1]
        elif is_call(cur, "to", "float", "type", "type_as", "contiguous"):
            cur = cur.args[0]
        else:
            return None
    return None


def _on_path(nxg: nx.DiGraph, node, target: fx.Node) -> bool:
    """Whether ``node`` is ``target`` or computed from it."""
    return isinstance(node, fx.Node) and node in nxg and (node is target or nx.has_path(nxg, target, node))


def training_dropout(site) -> bool:
    if site.kind == "sdpa":
        p = arg(site.node, 4, "dropout_p", 0.0)
        return not isinstance(p, (int, float)) or p > 0
    for node in site.node.all_input_nodes:
        if node.op == "call_function" and node.target in DROPOUT_FUNCS:
            p, training = arg(node, 1, "p", 0.5), arg(node, 2, "training", True)
            if training and p:
                return True
    return False


# ----------------------------------------------------------------------------- cache, sizes

def attends_over_cache(site) -> bool:
    """Self-attention of new tokens over a KV cache: the keys are the cached ones and new ones
    projected from the same hidden states as the queries (``cat(cache, k_proj(x))``)."""
    q_proj, k_proj = site.q_proj, site.k_proj
    if q_proj is None or k_proj is None or not q_proj.args or not k_proj.args:
        return False
    return q_proj.args[0] is k_proj.args[0] and _through_cat(site.k)


def _through_cat(node, depth: int = 24) -> bool:
    """Whether ``node`` is made by a cat along the token axis (the cache update), past layout ops."""
    for _ in range(depth):
        node = skip_layout(node)
        if not isinstance(node, fx.Node):
            return False
        if is_call(node, torch.cat, "cat", torch.concat):
            return True
        # repeat_kv after the cache: expand/reshape are layout ops; a getitem of the unsqueeze is not
        if node.target is operator.getitem and isinstance(node.args[0], fx.Node):
            node = node.args[0]
            continue
        return False
    return False


def known_true(condition) -> bool:
    """Whether ``condition`` (a bool, or a SymBool of symbolic sizes) holds for every value of the
    sizes; never guards the graph on it."""
    return condition if isinstance(condition, bool) else torch_api.statically_known_true(condition)


def size_hint(size, unknown: int) -> int:
    """An int size, or a symbolic size's value in the example inputs (``unknown`` without one): for
    the report only."""
    if isinstance(size, int):
        return size
    hint = size.node.hint
    return int(hint) if hint is not None else unknown


def broadcasts(shape: tuple, target: tuple) -> bool:
    shape = (1,) * (len(target) - len(shape)) + tuple(shape)
    return all(known_true(s == 1) or known_true(s == t) for s, t in zip(shape, target))
