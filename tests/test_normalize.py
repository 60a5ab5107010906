"""Graph normalization (tokred/rewriter/normalize.py): in-place arithmetic is respelled out of
place only where nothing can see the difference, and the attention written with it is found."""

from __future__ import annotations

import math
import operator

import pytest
import torch

import tokred
from tokred.rewriter.normalize import IN_PLACE_FUNCTIONS, IN_PLACE_METHODS, normalize


class InPlaceScaleAttention(torch.nn.Module):
    """Eager attention that scales its logits in place (``scores /= sqrt(d)``)."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.qkv, self.proj, self.heads = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim), heads

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1)
        scores /= math.sqrt(c // self.heads)
        return self.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c))


class Block(torch.nn.Module):
    def __init__(self, dim: int = 32):
        super().__init__()
        self.norm1, self.attn, self.norm2 = torch.nn.LayerNorm(dim), InPlaceScaleAttention(dim), torch.nn.LayerNorm(dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 64), torch.nn.GELU(), torch.nn.Linear(64, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def normalized(fn, *args):
    """(fn's graph after normalize, how many nodes it respelled, the compiled output)."""
    seen = []

    def backend(gm, example_inputs):
        seen.append((gm, normalize(gm)))
        return gm.forward

    out = torch.compile(fn, backend=backend, fullgraph=True)(*args)
    (gm, count), = seen
    return gm, count, out


def test_in_place_scaled_attention_is_found_and_merged(fresh_dynamo):
    torch.manual_seed(0)
    model = torch.nn.Sequential(Block(), Block()).eval()
    x = torch.randn(2, 16, 32)
    report = tokred.explain(model, x, merge={"r": 2})
    assert [s.kind for s in report.attention_sites] == ["manual", "manual"]
    assert all(s.status == "rewritten" for s in report.attention_sites)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend=tokred.backend(inner="eager"))(x), model(x))


def test_a_temporary_scaled_in_place_is_respelled(fresh_dynamo):
    def scale(a, b):
        s = a @ b
        s *= 0.5
        return s.softmax(-1)

    a, b = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 5, 4)
    gm, count, out = normalized(scale, a, b)
    assert count == 1 and any(n.target is operator.mul for n in gm.graph.nodes)
    torch.testing.assert_close(out, scale(a, b))


def _mutates_input(x):
    x.mul_(2)
    return x + 1


def _mutates_a_view(a):
    t = a * 1
    row = t[0]
    row += 1  # reaches t
    return t


def _read_after(a):
    s = a * 1
    keep = s
    s /= 2
    return keep + s  # keep is the same tensor: it sees the division


@pytest.mark.parametrize("fn", [_mutates_input, _mutates_a_view, _read_after])
def test_in_place_ops_others_can_see_stay_in_place(fn, fresh_dynamo):
    x = torch.randn(3, 4)
    expected_input = x.clone()
    expected = fn(expected_input)
    gm, count, out = normalized(fn, x)
    assert count == 0, fn.__name__
    assert any(n.target in IN_PLACE_FUNCTIONS or n.target in IN_PLACE_METHODS for n in gm.graph.nodes), \
        f"{fn.__name__}: Dynamo recorded no in-place op (the case tests nothing)"
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(x, expected_input)  # the same side effect on the caller's tensor


class CappedAttention(torch.nn.Module):
    """Eager attention with a learned per-head temperature and a Gemma-2-style tanh soft-cap."""

    def __init__(self, dim: int = 32, heads: int = 4, cap: float = 30.0):
        super().__init__()
        self.qkv, self.proj, self.heads, self.cap = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim), heads, cap
        self.temperature = torch.nn.Parameter(torch.rand(heads, 1, 1) + 0.5)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5
        scores = scores * self.temperature
        scores = torch.tanh(scores / self.cap) * self.cap
        return self.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c))


class CappedBlock(Block):
    def __init__(self, dim: int = 32):
        super().__init__(dim)
        self.attn = CappedAttention(dim)


def test_soft_capped_and_tempered_attention_is_found_and_each_pass_says_what_it_does(fresh_dynamo):
    """A soft-cap and a temperature between q @ k^T and softmax: the site is found with them as its
    logit ops; passes that recompute plain scaled attention skip it with that reason, merge
    (keys as its metric, size bias added right before softmax) still applies, and no options
    leave the model as it was."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(CappedBlock(), CappedBlock()).eval()
    x = torch.randn(2, 16, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend=tokred.backend(inner="eager"))(x), model(x))
    from tokred.rewriter import analysis

    captured = []
    torch._dynamo.reset()
    torch.compile(model, backend=lambda gm, inputs: captured.append(gm) or gm.forward)(x)
    sites = analysis.analyze(captured[0]).attention_sites
    assert len(sites) == 2 and all(len(site.logit_ops) == 2 for site in sites)
    torch._dynamo.reset()
    sparse = tokred.explain(model, x, sparse_attention={"pattern": "block_topk", "block": 4, "topk": 1})
    assert all(s.status == "skipped" and "tanh soft-cap and a learned temperature" in s.reason
               for s in sparse.attention_sites)
    torch._dynamo.reset()
    pruned = tokred.explain(model, x, prune={"keep": 0.5, "at": [0], "score": "query"})
    assert pruned.attention_sites[0].status == "skipped" and "soft-cap or a temperature" in pruned.attention_sites[0].reason
    torch._dynamo.reset()
    pruned = tokred.explain(model, x, prune={"keep": 0.5, "at": [0], "score": "transition"})
    assert pruned.attention_sites[0].status == "rewritten"
    torch._dynamo.reset()
    merged = tokred.explain(model, x, merge={"r": 2})
    assert all(s.status == "rewritten" for s in merged.attention_sites)
