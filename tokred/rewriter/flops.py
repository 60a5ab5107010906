"""FLOPs of a captured graph, counted from the fake tensors in ``node.meta``.

Counted (multiply-add = 2 FLOPs), as ``torch.utils.flop_counter.FlopCounterMode`` counts the same
graph run eagerly:

- linear, addmm, matmul/bmm, conv, oneDNN's packed linear (the ``cpu_linear`` pass);
- scaled_dot_product_attention: every one of the Nq x Nk pairs, masked or not (FlopCounterMode's
  convention), 2 * B * H * Nq * Nk * (D + Dv);
- the calls tokred inserts. A call target with a ``flops`` method states its own cost, from the
  example values of its arguments: the sparse attention call, whose formula
  (``tokred/triton_ops/sparse_cost.py``: the pairs its layout evaluates, on the dense count's
  scale) is the one registered for ``tokred::sparse_attention`` with FlopCounterMode. Every other
  tokred function (merge's ``tome_step``, prune's scorers and gathers) and ``tokred::`` op is run
  on fake CPU copies of its inputs under FlopCounterMode, which counts the matrix products inside:
  ToMe's matching (the A tokens' similarity to the B tokens, 2 * B * Na * Nb * D per merging
  block), pruning's attention rows (2 * B * H * R * N * D per score). On CPU, so that the count
  does not depend on the device: on CUDA these run as fused Triton ops (tome_match, prune_tokens)
  that have no FLOP formula, while their references on CPU are plain torch.

Not counted: elementwise work, sorts, gathers and scatters, and products that are not matrix
products for FlopCounterMode: diversity pruning's k-center distance updates (k picks, each a
[B, N, C] product-and-sum: 2 * B * k * N * C per cut, about k / (12 C) of the block's projections)
and ToMe's pairwise rank (comparisons, no multiply-adds).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import fx

from tokred.compat import torch_api
from tokred.rewriter.analysis.graph import LINEAR_TARGETS, SDPA_TARGETS, example_value, is_matmul, shape_of

log = logging.getLogger(__name__)

CONV_TARGETS = (torch.conv2d, F.conv2d, torch.conv1d, F.conv1d)


def node_flops(node: fx.Node) -> float:
    """FLOPs of one node (0 for ops not counted)."""
    if node.op == "call_function" and callable(getattr(node.target, "flops", None)):
        return float(_own_flops(node))
    if node.op == "call_function" and _is_tokred_call(node.target):
        return float(_counted_by_torch(node))
    out = shape_of(node)
    if out is None:
        return 0.0
    if node.op == "call_function" and node.target in LINEAR_TARGETS:
        w = shape_of(node.args[1])
        return 2.0 * math.prod(out) * (w[-1] if w else 0)
    if node.op == "call_function" and node.target is torch.addmm:
        a = shape_of(node.args[1])
        return 2.0 * math.prod(out) * (a[-1] if a else 0)
    if node.op == "call_function" and node.target is torch_api.onednn_linear_op():
        x = shape_of(node.args[0])  # the packed weight's shape is oneDNN's blocked layout
        return 2.0 * math.prod(out) * (x[-1] if x else 0)
    if is_matmul(node):
        a = shape_of(node.args[0])
        return 2.0 * math.prod(out) * (a[-1] if a else 0)
    if node.op == "call_function" and node.target in SDPA_TARGETS:
        q, k, v = (shape_of(a) for a in node.args[:3])
        if q is None or k is None:
            return 0.0
        # q @ k^T: 2 * B*H*Nq*Nk*D; p @ v: 2 * B*H*Nq*Nk*Dv
        return 2.0 * math.prod(q[:-1]) * k[-2] * (q[-1] + (v[-1] if v else q[-1]))
    if node.op == "call_function" and node.target in CONV_TARGETS:
        w = shape_of(node.args[1])
        return 2.0 * math.prod(out) * math.prod(w[1:]) if w else 0.0
    return 0.0


def graph_flops(gm: fx.GraphModule) -> float:
    """Sum of :func:`node_flops` over the graph."""
    return float(sum(node_flops(n) for n in gm.graph.nodes))


def _is_tokred_call(target) -> bool:
    """A function defined in tokred, or a ``torch.ops.tokred`` op."""
    if isinstance(target, torch_api.OP_TYPES):
        return getattr(target, "namespace", None) == "tokred"
    return callable(target) and str(getattr(target, "__module__", "")).startswith("tokred.")


def _example_args(node: fx.Node) -> tuple:
    """(args, kwargs) of ``node`` with every input node replaced by its example value."""
    return fx.node.map_arg((node.args, node.kwargs), example_value)


def _own_flops(node: fx.Node) -> int:
    """``node.target.flops(*args, **kwargs)`` on the example values, sizes at their example hints."""
    args, kwargs = _example_args(node)
    try:
        return int(node.target.flops(*args, **kwargs))
    except Exception:  # a figure of the report only: never fail a compile over it
        log.debug("tokred flops: %s states no count", node.name, exc_info=True)
        return 0


def _counted_by_torch(node: fx.Node) -> int:
    """FlopCounterMode's count of ``node.target`` run on fake CPU copies of its inputs."""
    args, kwargs = _example_args(node)
    fake_mode = torch_api.detect_fake_mode(torch_api.tree_leaves((args, kwargs)))
    if fake_mode is None:  # no fake inputs: running it would compute for real
        return 0
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with fake_mode, FlopCounterMode(display=False) as counter:
            cpu_args, cpu_kwargs = fx.node.map_aggregate(
                (args, kwargs), lambda t: t.to("cpu") if isinstance(t, torch.Tensor) else t)
            node.target(*cpu_args, **cpu_kwargs)
        return int(counter.get_total_flops())
    except Exception:  # data-dependent or device-specific code: uncounted, never a failed compile
        log.debug("tokred flops: %s not counted", node.name, exc_info=True)
        return 0
