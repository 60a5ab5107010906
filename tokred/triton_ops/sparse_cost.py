"""FLOPs of ``tokred::sparse_attention``: one formula for ``FlopCounterMode`` and tokred's report.

The op evaluates, per batch row and query head, the (query, key) pairs of its layout's kept blocks
that its element rule allows (the pattern intersected with causality; key positions past Nk do
not exist). Each pair costs 2 * D FLOPs in q @ k^T and 2 * Dv in p @ v, as the dense count
charges them.

Pairs are put on the dense count's scale. The dense count (``FlopCounterMode``'s SDPA formula,
tokred's ``rewriter/flops.py``) charges every one of the Nq * Nk pairs, masked or not, so a
causal site's dense count is about twice the pairs the model attends. A rewritten site is charged

    kept pairs * Nq * Nk / (pairs the site's own causality allows)

i.e. the dense count times the pattern's density against the model's causal (or full) attention,
the density the report prints. A pattern that keeps every pair the model attends (sink_window
with sinks + window >= Nk) costs exactly the dense count; counting raw pairs instead would show
such an identity as halving a causal model's attention. A padding ``attn_bias`` is not looked at
(the dense count ignores masks too). block_topk's selection before the op (Quest's bound, two
small matrix products per head) is counted too (:func:`selection_flops`): FlopCounterMode sees
those products outside the op.

``register(op)`` (called where the op is defined) installs :func:`op_flops` with
``torch.utils.flop_counter.register_flop_formula``; the report counts a rewritten site with
:func:`pattern_flops`, which builds the layout from the sizes and calls the same
:func:`layout_flops`. block_topk's kept blocks depend on q and k; from sizes alone the count takes
the lowest-index candidates (full blocks, wholly visible: an upper bound, exact in a causal
prefill with ``local >= 1``, where every candidate block is full and visible).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tokred.compat.torch_api import disable_current_modes, is_fake
from tokred.triton_ops import common, sparse_rule
from tokred.triton_ops.sparse_blocks import dense_rule_mask, kept_from_layout, without_broadcast
from tokred.triton_ops.sparse_layout import kept_blocks
from tokred.triton_ops.sparse_pattern import CAUSAL_RULE, element_rule, interval_rule, layout_blocks


def overlap(a0: Tensor, a1: Tensor, b0: Tensor, b1: Tensor) -> Tensor:
    """Length of [a0, a1) & [b0, b1), elementwise (broadcast), never negative."""
    return (torch.minimum(a1, b1) - torch.maximum(a0, b0)).clamp_min(0)


def interval_tile_pairs(sinks: int, window: int, causal: bool, num_queries: int, num_keys: int, q_offset: int,
                        block_m: int, block_n: int) -> Tensor:
    """Allowed pairs per (query block, key block) of an interval rule (``interval_rule``'s
    (sinks, window, causal); window -1: no window, every key): int64 [NQB, NKB].

    Query row i at position p = q_offset + i sees keys j < sinks (and j <= p when causal) and
    p - window < j <= p; counted per row and key block in closed form (rows x blocks, not rows x keys).
    """
    p = q_offset + torch.arange(num_queries).unsqueeze(1)  # [Nq, 1]
    c0 = torch.arange(0, num_keys, block_n).unsqueeze(0)  # [1, NKB]
    c1 = (c0 + block_n).clamp_max(num_keys)
    zero = torch.zeros_like(p)
    if window < 0:
        per_row = overlap(zero, (p + 1).clamp_max(num_keys) if causal else zero + num_keys, c0, c1)
    else:
        s1 = torch.full_like(p, min(sinks, num_keys))
        s1 = torch.minimum(s1, p + 1) if causal else s1
        w0, w1 = (p - window + 1).clamp_min(0), (p + 1).clamp_max(num_keys)
        both = overlap(w0, torch.minimum(s1, w1), c0, c1)
        per_row = overlap(zero, s1, c0, c1) + overlap(w0, w1, c0, c1) - both
    rows = torch.arange(num_queries) // block_m
    tiles = torch.zeros(common.cdiv(num_queries, block_m), per_row.shape[1], dtype=torch.int64)
    return tiles.index_add_(0, rows, per_row)


def mask_tile_pairs(rule: str, batch: int, heads: int, num_queries: int, num_keys: int, q_offset: int,
                    block_m: int, block_n: int) -> Tensor:
    """Allowed pairs per tile of any rule, from the rule evaluated on every pair:
    int64 [B or 1, H or 1, NQB, NKB] (B, H where the rule reads b, h)."""
    names = sparse_rule.rule_names(rule)
    mask = dense_rule_mask(rule, batch if "b" in names else 1, heads if "h" in names else 1, num_queries,
                           num_keys, q_offset, "cpu")
    if mask is None:
        mask = torch.ones(1, 1, num_queries, num_keys, dtype=torch.bool)
    mask = mask.expand(*mask.shape[:2], num_queries, num_keys)
    nqb, nkb = common.cdiv(num_queries, block_m), common.cdiv(num_keys, block_n)
    padded = torch.nn.functional.pad(mask.to(torch.int64),
                                     (0, nkb * block_n - num_keys, 0, nqb * block_m - num_queries))
    return padded.view(*mask.shape[:2], nqb, block_m, nkb, block_n).sum((3, 5))


def rule_is_causal(rule: str) -> bool:
    """Whether the element rule holds causality (``pattern_rule`` writes it as the first term)."""
    intervals = interval_rule(rule)
    if intervals is not None:
        return intervals[2]
    return rule.startswith(f"({CAUSAL_RULE} & ")


def tile_pairs(rule: str, batch: int, heads: int, num_queries: int, num_keys: int, q_offset: int,
               block_m: int, block_n: int) -> Tensor:
    """Pairs the rule allows per tile: int64 [B or 1, H or 1, NQB, NKB]."""
    intervals = interval_rule(rule)
    if intervals is None:
        return mask_tile_pairs(rule, batch, heads, num_queries, num_keys, q_offset, block_m, block_n)
    return interval_tile_pairs(*intervals, num_queries, num_keys, q_offset, block_m, block_n)[None, None]


def causal_pairs(num_queries: int, num_keys: int, q_offset: int) -> int:
    """Pairs with key position <= query position (queries at q_offset ..): sum of min(p + 1, Nk)."""
    p = q_offset + torch.arange(num_queries)
    return int((p + 1).clamp(0, num_keys).sum())


def layout_flops(q_shape, k_shape, v_shape, kept: Tensor, rule: str, q_offset: int, block_m: int,
                 block_n: int) -> int:
    """The formula: FLOPs of the op for q [B, H, Nq, D], k [B, Hkv, Nk, D], v [B, Hkv, Nk, Dv] and
    kept blocks ``kept`` bool [B or 1, H or 1, NQB, NKB] (see the module docstring for the scale)."""
    batch, heads, num_queries, dim = (int(s) for s in q_shape)
    num_keys, value_dim = int(k_shape[2]), int(v_shape[3])
    tiles = tile_pairs(rule, batch, heads, num_queries, num_keys, q_offset, block_m, block_n)
    per = kept.to(torch.int64) * tiles
    kept_pairs = int(per.sum()) * (batch // per.shape[0]) * (heads // per.shape[1])
    per_head = causal_pairs(num_queries, num_keys, q_offset) if rule_is_causal(rule) else num_queries * num_keys
    if per_head == 0:
        return 0
    return round(2 * (dim + value_dim) * kept_pairs * num_queries * num_keys / per_head)


def op_flops(q, k, v, kv_count, kv_index, bias, scale, q_offset, block_m, block_n, rule, *args, out_val=None,
             **kwargs) -> int:
    """``FlopCounterMode``'s formula for the op (raw tensors): :func:`layout_flops` over the kept
    blocks the layout lists. A fake layout (a count under FakeTensorMode) has no values: every
    block is taken as kept, which is exact for sink_window and mask rules (their layouts are the
    blocks the rule meets) and the dense count of block_topk's causal rule (an upper bound)."""
    num_k_blocks = common.cdiv(k.shape[2], block_n)
    with disable_current_modes():  # plain tensors here, even when the op ran under FakeTensorMode
        if is_fake(kv_count) or is_fake(kv_index):
            kept = torch.ones(1, 1, common.cdiv(q.shape[2], block_m), num_k_blocks, dtype=torch.bool)
        else:
            count, index = without_broadcast(kv_count, (0, 1)), without_broadcast(kv_index, (0, 1))
            kept = kept_from_layout(count.cpu(), index.cpu(), num_k_blocks)
        return layout_flops(q.shape, k.shape, v.shape, kept, rule, int(q_offset), block_m, block_n)


def pattern_flops(pattern, q_shape, k_shape, v_shape, q_offset: int | None = None) -> int:
    """FLOPs of ``sparse_attention(q, k, v, pattern)`` from the shapes alone (the report's count):
    :func:`pattern_attention_flops` plus block_topk's selection (:func:`selection_flops`)."""
    return pattern_attention_flops(pattern, q_shape, k_shape, v_shape, q_offset) + \
        selection_flops(pattern, q_shape, k_shape)


def pattern_attention_flops(pattern, q_shape, k_shape, v_shape, q_offset: int | None = None) -> int:
    """The op's FLOPs over the layout the entry point would build at these sizes (block_topk: see
    the module docstring); equal to :func:`dense_flops` exactly when the pattern keeps every pair
    of the site's causal (or full) attention."""
    batch, heads, num_queries, _ = (int(s) for s in q_shape)
    num_keys = int(k_shape[2])
    q_offset = num_keys - num_queries if q_offset is None else q_offset
    with disable_current_modes():  # sizes in, an int out: never traced or faked
        rule = element_rule(pattern)
        # q and k only give sizes (and, for a mask rule reading b or h, B and H); zeros make every
        # block_topk bound equal, so ties keep the lowest-index candidates
        names = sparse_rule.rule_names(rule) if pattern.kind == "mask" else frozenset()
        q = torch.zeros(batch if "b" in names else 1, heads if "h" in names else 1, num_queries, 1)
        kept = kept_blocks(pattern, q, torch.zeros(1, 1, num_keys, 1), q_offset, rule)
        block_m, block_n = layout_blocks(pattern)
        return layout_flops(q_shape, k_shape, v_shape, kept, rule, q_offset, block_m, block_n)


def selection_flops(pattern, q_shape, k_shape) -> int:
    """block_topk's selection before the op: Quest's bound, two [NQB, D] @ [D, NKB] products per
    batch row and query head (``block_bounds_mean_query``); 0 for the other kinds."""
    if pattern.kind != "block_topk":
        return 0
    batch, heads, num_queries, dim = (int(s) for s in q_shape)
    nqb, nkb = common.cdiv(num_queries, pattern.block), common.cdiv(int(k_shape[2]), pattern.block)
    return 2 * 2 * batch * heads * nqb * nkb * dim


def dense_flops(q_shape, k_shape, v_shape) -> int:
    """The dense count of the same attention: 2 * B * H * Nq * Nk * (D + Dv)."""
    return 2 * math.prod(int(s) for s in q_shape[:3]) * int(k_shape[2]) * (int(q_shape[3]) + int(v_shape[3]))


def identity_reason(pattern, q_shape, k_shape, v_shape) -> str | None:
    """Why ``pattern`` keeps every pair of the causal (or full) attention at these sizes, in words
    (``window 2000 >= the 1024 tokens: identity``), judged by the formula: the op then costs
    :func:`dense_flops`. None where it drops a pair."""
    if pattern_attention_flops(pattern, q_shape, k_shape, v_shape) != dense_flops(q_shape, k_shape, v_shape):
        return None
    n = int(k_shape[2])
    if pattern.kind == "sink_window":
        head = f"window {pattern.window}" if pattern.window >= n else f"sinks {pattern.sinks} + window {pattern.window}"
        return f"{head} >= the {n} tokens: identity"
    if pattern.kind == "block_topk":
        return (f"topk {pattern.topk} with sinks {pattern.sinks} and local {pattern.local} keeps all "
                f"{common.cdiv(n, pattern.block)} key blocks of {pattern.block} at {n} tokens: identity")
    return f"the mask keeps every pair the model attends at {n} tokens: identity"


def register(op) -> None:
    """Install :func:`op_flops` as ``op``'s FLOP formula (``op``: ``torch.ops.tokred.sparse_attention``)."""
    from torch.utils.flop_counter import register_flop_formula

    register_flop_formula(op, get_raw=True)(op_flops)
