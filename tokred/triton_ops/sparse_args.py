"""The arguments of ``tokred::sparse_attention``: checks, defaults and the additive bias.

Shared by every implementation of the op (the entry point, the custom op and its fake, the
Triton launch, the torch paths), so each checks the same things with the same messages.

Shapes: q [B, H, Nq, D], k [B, Hkv, Nk, D], v [B, Hkv, Nk, Dv], H % Hkv == 0 (GQA: query head h
reads kv head h // (H // Hkv)); a block layout kv_count [B, H, NQB] and kv_index
[B, H, NQB, MAXK] (int32, NQB = cdiv(Nq, block_m)); an additive bias broadcastable to
[B, H, Nq, Nk].
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    """Raise unless q [B, H, Nq, D], k [B, Hkv, Nk, D], v [B, Hkv, Nk, Dv] with H % Hkv == 0."""
    torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4,
                 lambda: f"sparse_attention: expected 4-d q, k, v, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    torch._check(k.shape[0] == q.shape[0] and v.shape[0] == q.shape[0],
                 lambda: "sparse_attention: batch sizes of q, k, v differ")
    torch._check(k.shape[3] == q.shape[3], lambda: "sparse_attention: q and k head_dim differ")
    torch._check(v.shape[1] == k.shape[1] and v.shape[2] == k.shape[2],
                 lambda: "sparse_attention: k and v must have the same heads and length")
    torch._check(q.shape[1] % k.shape[1] == 0,
                 lambda: f"sparse_attention: query heads {q.shape[1]} not a multiple of kv heads {k.shape[1]}")
    torch._check(q.dtype == k.dtype == v.dtype and q.dtype.is_floating_point,
                 lambda: f"sparse_attention: q, k, v must share a float dtype, got {q.dtype}, {k.dtype}, {v.dtype}")


def check_layout(q: Tensor, kv_count: Tensor, kv_index: Tensor, block_m: int) -> None:
    """Raise unless kv_count [B, H, NQB] and kv_index [B, H, NQB, MAXK] are int32 for q's blocks."""
    torch._check(kv_count.dim() == 3 and kv_index.dim() == 4,
                 lambda: f"sparse_attention: kv_count [B, H, NQB], kv_index [B, H, NQB, MAXK], got "
                         f"{tuple(kv_count.shape)}, {tuple(kv_index.shape)}")
    torch._check(kv_count.dtype == torch.int32 and kv_index.dtype == torch.int32,
                 lambda: "sparse_attention: kv_count and kv_index must be int32")
    for dim in range(3):
        torch._check(kv_index.shape[dim] == kv_count.shape[dim],
                     lambda: "sparse_attention: kv_count and kv_index disagree")
    torch._check(kv_count.shape[2] == (q.shape[2] + block_m - 1) // block_m,
                 lambda: f"sparse_attention: {kv_count.shape[2]} query blocks for Nq={q.shape[2]}, block {block_m}")


def check_band(q: Tensor, k: Tensor, bias: Tensor | None, q_offset: int, band_window: int) -> None:
    """Raise unless a band request (``band_window`` > 0) comes with a causal prefill's shapes: no bias,
    q_offset 0, as many queries as keys (what ``band_path_applies`` decided it from)."""
    if band_window > 0:
        torch._check(bias is None and q_offset == 0 and q.shape[2] == k.shape[2],
                     lambda: "sparse_attention: band_window > 0 (the sink_window band path) needs a prefill "
                             f"without bias: q_offset 0 and Nq == Nk, got q_offset {q_offset}, Nq {q.shape[2]}, "
                             f"Nk {k.shape[2]}, bias {'given' if bias is not None else 'None'}")


def resolve(q: Tensor, k: Tensor, scale: float | None, q_offset: int | None) -> tuple[float, int]:
    """(scale, q_offset) with their defaults for q [B, H, Nq, D], k [B, Hkv, Nk, D]: 1/sqrt(D) and
    Nk - Nq (decode and prefill with a KV cache)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    q_offset = k.shape[2] - q.shape[2] if q_offset is None else int(q_offset)
    return scale, q_offset


def additive_mask(allowed: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Boolean ``allowed`` (True = may attend) -> an additive attention mask of the same shape in
    ``dtype``: 0 where allowed, -inf elsewhere."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, float("-inf"))


def additive_bias(attn_bias: Tensor | None, q: Tensor, k: Tensor) -> Tensor | None:
    """``attn_bias`` as a float tensor viewed as [B, H, Nq, Nk] (broadcast dims stay stride 0).

    A boolean bias follows SDPA: True = may attend, False = masked (-inf).
    """
    if attn_bias is None:
        return None
    shape = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    if attn_bias.dtype == torch.bool:
        attn_bias = additive_mask(attn_bias, q.dtype)
    while attn_bias.dim() < 4:
        attn_bias = attn_bias.unsqueeze(0)
    return attn_bias.expand(shape)
