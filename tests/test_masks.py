"""Attention masks as the passes read them: every way a written-out attention applies a mask
(added, ``masked_fill`` with True = blocked, ``torch.where`` with True = kept, batchless [N, N])
means the same to prune and merge, padding is pruned first whatever the spelling, and an eager
decoder's causal mask is told from padding by its structure."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import tokred
from tokred.rewriter import tokens
from zoo import hf_llama

C, H, N, VOCAB = 32, 4, 10, 50
SPELLINGS = ("add", "fill", "keep")


def apply_mask(scores: torch.Tensor, pad: torch.Tensor, spelling: str) -> torch.Tensor:
    """scores [B, H, N, N] with the padding keys of ``pad`` [B, N] (1 = token) masked, spelled as
    models write it."""
    real = (pad != 0)[:, None, None, :]
    if spelling == "add":
        return scores + torch.zeros(real.shape).masked_fill(~real, float("-inf"))
    if spelling == "fill":
        return scores.masked_fill(~real, float("-inf"))
    return torch.where(real, scores, torch.full_like(scores, float("-inf")))


class Block(nn.Module):
    """Pre-norm block with written-out attention; ``causal``: a batchless [N, N] masked_fill too."""

    def __init__(self, spelling: str, causal: bool):
        super().__init__()
        self.spelling, self.causal = spelling, causal
        self.n1, self.n2 = nn.LayerNorm(C), nn.LayerNorm(C)
        self.qkv, self.proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
        self.fc1, self.fc2 = nn.Linear(C, 2 * C), nn.Linear(2 * C, C)

    def forward(self, x, pad):
        b, n, c = x.shape
        q, k, v = self.qkv(self.n1(x)).reshape(b, n, 3, H, c // H).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-2, -1)) * (c // H) ** -0.5
        if self.causal:
            scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        attn = apply_mask(scores, pad, self.spelling).softmax(dim=-1)
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))
        return x + self.fc2(F.gelu(self.fc1(self.n2(x))))


class Encoder(nn.Module):
    def __init__(self, spelling: str, causal: bool = False):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, C)
        self.blocks = nn.ModuleList(Block(spelling, causal) for _ in range(2))

    def forward(self, ids, pad):
        x = self.emb(ids)
        for block in self.blocks:
            x = block(x, pad)
        return x


def _inputs():
    ids = torch.randint(0, VOCAB, (2, N), generator=torch.Generator().manual_seed(1))
    pad = torch.ones(2, N, dtype=torch.long)
    pad[1, 6:] = 0
    return ids, pad


def _models(causal: bool) -> dict:
    """The same weights under each spelling of the padding mask."""
    torch.manual_seed(0)
    base = Encoder("add", causal).eval()
    models = {}
    for spelling in SPELLINGS:
        m = Encoder(spelling, causal).eval()
        m.load_state_dict(base.state_dict())
        models[spelling] = m
    return models


def _compiled(model, options, ids, pad):
    backend = tokred.backend(inner="eager", **options)
    with torch.no_grad():
        out = torch.compile(model, backend=backend)(ids, pad)
    return out, backend.report


def test_attention_bias_reads_each_spelling():
    blocked = torch.tensor([[False, True], [False, False]])
    expected = torch.tensor([[0.0, float("-inf")], [0.0, 0.0]]).reshape(1, 1, 2, 2)
    assert torch.equal(tokens.attention_bias(("fill",), blocked), expected)
    assert torch.equal(tokens.attention_bias(("keep",), ~blocked), expected)
    assert torch.equal(tokens.attention_bias(("sdpa",), ~blocked), expected)
    bias = torch.tensor([[0.5, -1.0], [2.0, 0.0]])
    assert torch.equal(tokens.attention_bias(("add", "fill"), bias, blocked), bias.reshape(1, 1, 2, 2) + expected)
    # padding keys of a batchless mask: key 1 of [N, N] is blocked for every query only if all rows block it
    assert tokens.padding_keys(torch.tensor([[True, False], [True, False]]), 3, 2).tolist() == [[False, True]] * 3


@pytest.mark.parametrize("causal", [False, True], ids=["padding", "padding+batchless_causal"])
@pytest.mark.parametrize("options", [
    {"prune": {"keep": 0.5, "at": [0], "score": "query"}},
    {"prune": {"keep": 0.5, "at": [0], "score": "query", "pool": 3}},
    {"prune": {"keep": 0.5, "at": [0], "score": "transition"}},
    {"prune": {"keep": 0.5, "at": [0], "score": "random"}},
    {"merge": {"r": 3}},
], ids=["prune_query", "prune_query_pool", "prune_transition", "prune_random", "merge"])
def test_mask_spellings_rewrite_alike(options, causal, fresh_dynamo):
    """Each spelling is rewritten, to the same output; padding is pruned before any real token."""
    ids, pad = _inputs()
    outs = {}
    for spelling, model in _models(causal).items():
        outs[spelling], report = _compiled(model, options, ids, pad)
        site = report.attention_sites[0]
        if "merge" in options and causal:  # found as causal through the batchless mask, whatever the spelling
            assert site.status == "skipped" and "causal" in site.reason, (spelling, site.reason)
            continue
        assert site.status == "rewritten", (spelling, site.reason)
    if "merge" in options and causal:
        return
    for spelling in SPELLINGS[1:]:
        torch.testing.assert_close(outs[spelling], outs["add"], atol=1e-5, rtol=1e-5, msg=spelling)
    if "prune" in options:
        model = _models(causal)["fill"]
        with torch.no_grad():
            after_block0 = model.blocks[0](model.emb(ids), pad)
        exited = (outs["fill"] - after_block0).abs().amax(dim=-1) < 1e-6  # [B, N]: pruned after block 0
        assert exited.sum(dim=1).tolist() == [5, 5]
        assert exited[1, 6:].all(), f"padding kept while real tokens were pruned: {exited[1].tolist()}"


def test_eager_decoder_causal_mask_is_not_padding(fresh_dynamo):
    """An eager Llama's causal mask comes from positions alone; prune with use_cache says why it
    cannot return a pruned cache in those words, not as a padded batch."""
    z = hf_llama("eager", use_cache=True)
    backend = tokred.backend(inner="eager", prune={"keep": 0.5, "at": [0], "score": "query"})
    with pytest.warns(tokred.TokredWarning):
        torch.compile(z.model, backend=backend)(**z.kwargs)
    reason = backend.report.attention_sites[0].reason
    assert "causal mask" in reason and "padded batch" not in reason, reason
    assert "attn_implementation='sdpa'" in reason
