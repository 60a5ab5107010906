"""An independent plain-PyTorch reference for the sparse attention pass.

The model runs eagerly with its attention function replaced, through transformers' own
``AttentionInterface`` registry, by a dense softmax attention whose "may attend" mask is the
model's mask (causal, padding, the model's own sliding window: transformers' eager mask) AND the
sparse pattern's mask, computed here from the pattern's definition:

- sink_window(sinks, window): query at position p sees key j iff p - window < j <= p or j < sinks
  (and j <= p);
- block_topk(block, topk, sinks, local): see :func:`block_topk_allowed` (which blocks count as
  visible follows causality only, not the model's padding: the selection is made first, then
  intersected with the model's mask);
- mask(fn): fn(b, h, q_idx, kv_idx) on index grids.

Nothing here imports tokred: the pass and its kernels are checked against this, not against
themselves.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Optional

import torch


def sink_window_allowed(n_q: int, n_k: int, sinks: int, window: int) -> torch.Tensor:
    """[Nq, Nk] bool; queries are the last n_q positions of the n_k keys."""
    p = torch.arange(n_k - n_q, n_k).unsqueeze(1)
    j = torch.arange(n_k).unsqueeze(0)
    return (j <= p) & ((j > p - window) | (j < sinks))


def mask_fn_allowed(fn: Callable, batch: int, heads: int, n_q: int, n_k: int) -> torch.Tensor:
    """[B, H, Nq, Nk] bool from a FlexAttention-style ``fn(b, h, q_idx, kv_idx)``."""
    b = torch.arange(batch).view(batch, 1, 1, 1)
    h = torch.arange(heads).view(1, heads, 1, 1)
    q_idx = torch.arange(n_k - n_q, n_k).view(1, 1, n_q, 1)
    kv_idx = torch.arange(n_k).view(1, 1, 1, n_k)
    return fn(b, h, q_idx, kv_idx).expand(batch, heads, n_q, n_k)


def block_topk_allowed(q: torch.Tensor, k: torch.Tensor, causal: bool, block: int, topk: int, sinks: int,
                       local: int) -> torch.Tensor:
    """[B, H, Nq, Nk] bool: the (query, key) pairs block top-k selection keeps (queries last in keys).

    q [B, H, Nq, D], k [B, H, Nk, D] (kv heads already repeated). Queries and keys are cut into
    blocks of ``block`` from their first row. For a query block whose last query sits at position
    ``last``, key block ``n`` is visible if it starts at or before ``last`` (every block when not
    causal). Kept: the first ``sinks`` blocks and the ``local`` blocks ending at block
    ``last // block`` (when visible), and of the other visible blocks the ``topk`` with the largest
    score (ties: lower block first), where the score of key block n for the block's mean query
    qbar is max over k in [kmin, kmax] (per channel) of qbar . k = sum_c max(qbar_c kmin_c, qbar_c
    kmax_c) (Quest's bound). Within kept blocks a causal pattern keeps key <= query.
    """
    bsz, heads, n_q, _ = q.shape
    n_k = k.shape[2]
    offset = n_k - n_q
    q_starts, k_starts = list(range(0, n_q, block)), list(range(0, n_k, block))
    allowed = torch.zeros(bsz, heads, n_q, n_k, dtype=torch.bool)
    for b in range(bsz):
        for h in range(heads):
            for qs in q_starts:
                qe = min(qs + block, n_q)
                last = offset + qe - 1
                qbar = q[b, h, qs:qe].double().mean(dim=0)
                visible = [n for n, ks in enumerate(k_starts) if not causal or ks <= last]
                own = last // block
                forced = [n for n in visible if n < sinks or own - local < n <= own]
                others = [n for n in visible if n not in forced]
                scores = {}
                for n in others:
                    kb = k[b, h, k_starts[n]:k_starts[n] + block].double()
                    kmin, kmax = kb.min(dim=0).values, kb.max(dim=0).values
                    scores[n] = float(torch.maximum(qbar * kmin, qbar * kmax).sum())
                best = sorted(others, key=lambda n: (-scores[n], n))[:topk]
                for n in forced + best:
                    allowed[b, h, qs:qe, k_starts[n]:k_starts[n] + block] = True
    if causal:
        p = torch.arange(offset, n_k).view(n_q, 1)
        allowed &= torch.arange(n_k).view(1, n_k) <= p
    return allowed


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """softmax(q k^T * scale, masked to ``allowed``) v in float64; q [B, H, Nq, D] -> [B, H, Nq, Dv]."""
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(dim=-1) @ v.double()).to(q.dtype)


def model_allowed(attention_mask: Optional[torch.Tensor], n_q: int, n_k: int, causal: bool) -> torch.Tensor:
    """The model's own "may attend" mask from transformers' eager (additive) mask."""
    if attention_mask is None:
        allowed = torch.ones(n_q, n_k, dtype=torch.bool)
        return allowed.tril(n_k - n_q)[None, None] if causal else allowed[None, None]
    if attention_mask.dtype == torch.bool:
        return attention_mask
    return attention_mask > torch.finfo(attention_mask.dtype).min / 2


def pattern_attention(spec: dict) -> Callable:
    """A transformers attention function (``AttentionInterface``) computing ``spec``'s pattern densely.

    ``spec`` is the tokred option dict: {"pattern": "sink_window", "sinks": s, "window": w}, etc.;
    with "layers", attention modules whose ``layer_idx`` is not listed stay dense.
    """

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        groups = query.shape[1] // key.shape[1]
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
        bsz, heads, n_q, d = query.shape
        n_k = key.shape[2]
        scale = scaling if scaling is not None else 1.0 / math.sqrt(d)
        causal = bool(getattr(module, "is_causal", False))
        base = model_allowed(attention_mask, n_q, n_k, causal)
        kind = spec["pattern"]
        layers = spec.get("layers")
        if layers is not None and getattr(module, "layer_idx", None) not in layers:
            pattern = torch.ones(1, 1, n_q, n_k, dtype=torch.bool)  # a layer left dense
        elif kind == "sink_window":
            pattern = sink_window_allowed(n_q, n_k, spec.get("sinks", 4), spec["window"])[None, None]
        elif kind == "block_topk":
            pattern = block_topk_allowed(query, key, causal, spec.get("block", 64), spec.get("topk", 16),
                                         spec.get("sinks", 0), spec.get("local", 1))
        else:
            pattern = mask_fn_allowed(spec["mask"], bsz, heads, n_q, n_k)
        out = dense_attention(query, key, value, base & pattern, scale)
        return out.transpose(1, 2).contiguous(), None

    return attention


@contextmanager
def reference_attention(model, spec: dict, name: str = "tokred_sparse_reference"):
    """Run ``model`` (a transformers model) with :func:`pattern_attention` as its attention.

    The attention gets transformers' eager mask (always a full additive [B, 1, Nq, Nk] mask).
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(name, pattern_attention(spec))
    AttentionMaskInterface.register(name, eager_mask)
    before = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield model
    finally:
        model.set_attn_implementation(before)
