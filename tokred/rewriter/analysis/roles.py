"""What an attention site does, named by its structure (self-attention, cached decode, class
attention, pooled-KV self-attention, cross-attention), for the report and the reasons it gives."""

from __future__ import annotations

import operator

import torch
from torch import fx

from tokred.compat import torch_api
from tokred.rewriter.analysis.graph import is_call, walk
from tokred.rewriter.analysis.sites import AttentionSite, projection_input, skip_layout


def attention_role(site: AttentionSite) -> str:
    """What a site's attention does, named by its structure: "self-attention", "cached decode"
    (new queries over keys concatenated to a cache input), "class attention" (queries from a slice
    of the tokens the keys come from, CaiT), "pooled-KV self-attention" (keys pooled from the
    queries' tokens, PVT/SegFormer) or "cross-attention" (keys from another sequence)."""
    same_len = _known_equal(site.q_len, site.kv_len)
    if same_len and site.self_attention:
        return "self-attention"
    if _concatenated_to_cache(site.k):
        return "cached decode"
    q_in = projection_input(site.q_proj) if site.q_proj is not None else None
    k_in = projection_input(site.k_proj) if site.k_proj is not None else None
    if isinstance(q_in, fx.Node) and isinstance(k_in, fx.Node) and q_in is not k_in:
        if _derived_from(q_in, k_in) and isinstance(site.q_len, int) and isinstance(site.kv_len, int) \
                and site.q_len < site.kv_len:
            return "class attention"
        if _derived_from(k_in, q_in) and isinstance(site.q_len, int) and isinstance(site.kv_len, int) \
                and site.kv_len < site.q_len:
            return "pooled-KV self-attention"
    return "self-attention" if same_len and q_in is k_in else "cross-attention"


def _known_equal(a, b) -> bool:
    """a == b for ints; for symbolic lengths only when it holds for every value (no guard is added:
    the analysis must not pin a dynamic graph's sizes)."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return torch_api.statically_known_true(a == b)


def _concatenated_to_cache(k: fx.Node) -> bool:
    """k (past GQA's repeat and layout ops) is a cat of a graph input (the cache) and new keys."""
    for _ in range(8):
        k = skip_layout(k)
        if not isinstance(k, fx.Node):
            return False
        if is_call(k, torch.cat):
            parts = k.args[0] if isinstance(k.args[0], (list, tuple)) else ()
            return any(isinstance(p, fx.Node) and skip_layout(p).op == "placeholder" for p in parts)
        if k.op == "call_function" and k.target is operator.getitem or is_call(k, "expand", "reshape"):
            k = k.args[0]
            continue
        return False
    return False


def _derived_from(node: fx.Node, source: fx.Node, max_nodes: int = 64) -> bool:
    """``node`` is computed from ``source`` within a few ops (a slice, a pooling, a norm)."""
    inputs = lambda n: () if n.op == "placeholder" else n.all_input_nodes
    return any(cur is source for cur in walk(node, inputs, max_nodes))
