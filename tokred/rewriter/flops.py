"""FLOPs of a captured graph, counted from the fake tensors in ``node.meta``.

Only the ops that dominate transformer cost are counted (multiply-add = 2 FLOPs): linear,
addmm, matmul/bmm, scaled_dot_product_attention, conv. Elementwise work is ignored.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import fx

from tokred.rewriter.analysis.graph import LINEAR_TARGETS, SDPA_TARGETS, is_matmul, shape_of


def node_flops(node: fx.Node) -> float:
    """FLOPs of one node (0 for ops not counted)."""
    out = shape_of(node)
    if out is None:
        return 0.0
    if node.op == "call_function" and node.target in LINEAR_TARGETS:
        w = shape_of(node.args[1])
        return 2.0 * math.prod(out) * (w[-1] if w else 0)
    if node.op == "call_function" and node.target is torch.addmm:
        a = shape_of(node.args[1])
        return 2.0 * math.prod(out) * (a[-1] if a else 0)
    if is_matmul(node):
        a = shape_of(node.args[0])
        return 2.0 * math.prod(out) * (a[-1] if a else 0)
    if node.op == "call_function" and node.target in SDPA_TARGETS:
        q, k = shape_of(node.args[0]), shape_of(node.args[1])
        if q is None or k is None:
            return 0.0
        # q @ k^T and p @ v: 2 * (B*H*Nq*Nk*D) each
        return 4.0 * math.prod(q[:-1]) * k[-2] * q[-1]
    if node.op == "call_function" and node.target in (torch.conv2d, F.conv2d, torch.conv1d, F.conv1d):
        w = shape_of(node.args[1])
        return 2.0 * math.prod(out) * math.prod(w[1:]) if w else 0.0
    return 0.0


def graph_flops(gm: fx.GraphModule) -> float:
    """Sum of :func:`node_flops` over the graph."""
    return float(sum(node_flops(n) for n in gm.graph.nodes))
