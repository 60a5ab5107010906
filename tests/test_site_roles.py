"""Attention sites named by what they do: self-attention, cached decode, class attention
(CaiT), pooled-KV self-attention (PVT) and cross-attention; a key laid out [B, H, D, N] is not
read as H keys."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import tokred
from tokred.compat.transformers_api import cache_argument, returned_cache
from zoo import ZOO

C, H, N = 32, 4, 12


def _split(t: torch.Tensor) -> torch.Tensor:
    """[B, N, C] -> [B, H, N, D]."""
    b, n, _ = t.shape
    return t.reshape(b, n, H, C // H).transpose(1, 2)


class Attention(nn.Module):
    """One attention of the given kind on x [B, N, C] (and ``other`` [B, M, C] for cross)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.q, self.k, self.v, self.proj = (nn.Linear(C, C) for _ in range(4))

    def forward(self, x, other=None):
        if self.kind == "class":  # CaiT: the class token's query over every token
            q, kv_in = self.q(x[:, :1]), x
        elif self.kind == "pooled":  # PVT: keys and values from a 2x average-pooled sequence
            q, kv_in = self.q(x), F.avg_pool1d(x.transpose(1, 2), 2).transpose(1, 2)
        elif self.kind == "cross":
            q, kv_in = self.q(x), other
        else:
            q, kv_in = self.q(x), x
        q, k, v = _split(q), _split(self.k(kv_in)), _split(self.v(kv_in))
        if self.kind == "pretransposed":  # k^T laid out [B, H, D, N] straight from [B, N, H, D]
            b, n, _ = kv_in.shape
            kt = self.k(kv_in).reshape(b, n, H, C // H).permute(0, 2, 3, 1)
            attn = ((q @ kt) * (C // H) ** -0.5).softmax(dim=-1)
        else:
            attn = ((q @ k.transpose(-2, -1)) * (C // H) ** -0.5).softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(x.shape[0], -1, C)
        return self.proj(out)


@pytest.mark.parametrize("kind, role, kv_len", [
    ("self", "self-attention", N),
    ("class", "class attention", N),
    ("pooled", "pooled-KV self-attention", N // 2),
    ("cross", "cross-attention", 7),
    ("pretransposed", "self-attention", N),
])
def test_site_role_and_lengths(kind, role, kv_len, fresh_dynamo):
    model = Attention(kind).eval()
    args = (torch.randn(2, N, C),) + ((torch.randn(2, 7, C),) if kind == "cross" else ())
    report = tokred.explain(model, *args)
    site, = report.attention_sites
    assert site.role == role
    assert site.kv_shape[-2 if kind != "pretransposed" else -1] == kv_len
    assert role in report.table()
    if kind in ("class", "pooled", "cross"):
        q_len = 1 if kind == "class" else N
        queries = "1 query" if q_len == 1 else f"{q_len} queries"
        assert site.reason == f"{role} ({queries}, {kv_len} keys)"
    if kind == "pretransposed":
        assert site.status == "skipped" and "tokred reads keys as [B, H, N, D]" in site.reason
        assert "4 keys" not in site.reason


def test_decode_step_is_a_cached_decode(fresh_dynamo):
    z = ZOO["hf_llama_cache_sdpa"]()
    model, ids = z.model, z.kwargs["input_ids"]
    with torch.no_grad():
        cache = returned_cache(model(input_ids=ids, use_cache=True))
        backend = tokred.backend(inner="eager")
        torch.compile(model, backend=backend)(input_ids=ids[:, -1:], **cache_argument(model, cache), use_cache=True)
    roles = {r.role for report in backend.reports for r in report.attention_sites}
    assert roles == {"cached decode"}
    reason = backend.reports[0].attention_sites[0].reason
    assert reason.startswith(f"cached decode (1 query, {ids.shape[1] + 1} keys)"), reason
