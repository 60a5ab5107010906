"""One attention, many spellings (tokred/rewriter/normalize_matmul.py, rewriter/analysis/logits.py):
heads flattened into a bmm batch (DeBERTa), ALiBi through ``baddbmm`` (BLOOM), einsum (XLNet),
a scale on the key or in front of the logits, a position bias added before the mask (T5), a batchless ALiBi
table (MPT). Each spelling is found as the same site, compiles to the same output, and is merged
or pruned to the same output as the plain 4-D spelling of the same weights."""

from __future__ import annotations

import math

import pytest
import torch

import tokred
from prune_reference import Exits, apply_cut, plan_cut, prune_options

DIM, HEADS, N = 32, 4, 12
HEAD_DIM = DIM // HEADS


def alibi_slopes(heads: int = HEADS) -> torch.Tensor:
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / heads) for h in range(heads)])


class Attention(torch.nn.Module):
    """Self-attention over x [B, N, C] written in one of :data:`SPELLINGS`."""

    def __init__(self, spelling: str, causal: bool = False):
        super().__init__()
        self.spelling, self.causal = spelling, causal
        self.qkv, self.proj = torch.nn.Linear(DIM, 3 * DIM), torch.nn.Linear(DIM, DIM)
        self.relative = torch.nn.Parameter(torch.randn(HEADS, N, N) * 0.1)  # a learned position bias
        self.register_buffer("slopes", alibi_slopes())

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)  # [B, H, N, D]
        positions = torch.arange(n, device=x.device, dtype=x.dtype)
        alibi = self.slopes[:, None, None] * positions[None, None, :]  # [H, 1, N]: the key's position
        blocked = torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1) if self.causal else None
        s = self.spelling
        if s in ("matmul", "matmul_alibi", "matmul_relative", "key_scaled", "scale_first"):
            if s == "key_scaled":
                logits = q @ (k.transpose(-2, -1) / math.sqrt(HEAD_DIM)) + 0  # DeBERTa adds a 0 bias so
            elif s == "scale_first":
                logits = HEAD_DIM ** -0.5 * (q @ k.transpose(-2, -1))
            else:
                logits = (q @ k.transpose(-2, -1)) * HEAD_DIM ** -0.5
            if s == "matmul_alibi":
                logits = logits + alibi
            if s == "matmul_relative":
                logits = logits + self.relative[:, :n, :n]
            if blocked is not None:
                logits = logits.masked_fill(blocked, torch.finfo(x.dtype).min)
            out = logits.softmax(-1) @ v
        elif s == "einsum":  # q, k, v as [B, N, H, D], contracted by einsum (XLNet's style)
            qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
            logits = torch.einsum("bihd,bjhd->bhij", qt, kt) * HEAD_DIM ** -0.5
            if blocked is not None:
                logits = logits.masked_fill(blocked, torch.finfo(x.dtype).min)
            out = torch.einsum("bhij,bjhd->bihd", logits.softmax(-1), vt).transpose(1, 2)
        else:  # heads flattened into the batch, as [B*H, N, D]
            q3, k3, v3 = (t.reshape(b * HEADS, n, HEAD_DIM) for t in (q, k, v))
            if s == "bmm":  # DeBERTa-v2: the key scaled by a tensor computed from constants
                scale = torch.sqrt(torch.tensor(HEAD_DIM, dtype=torch.float) * 1)
                logits = torch.bmm(q3, k3.transpose(-1, -2) / scale.to(x.dtype))
            else:  # BLOOM: ALiBi [B*H, 1, N] through baddbmm
                bias = alibi.expand(HEADS, 1, n).repeat(b, 1, 1)
                logits = torch.baddbmm(bias, q3, k3.transpose(-1, -2), beta=1.0, alpha=HEAD_DIM ** -0.5)
            logits = logits.view(b, HEADS, n, -1)
            if blocked is not None:
                logits = logits.masked_fill(blocked, torch.finfo(x.dtype).min)
            weights = torch.nn.functional.dropout(logits.softmax(-1), 0.0, False)
            out = torch.bmm(weights.view(b * HEADS, n, n), v3).view(b, HEADS, n, HEAD_DIM)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Block(torch.nn.Module):
    def __init__(self, spelling: str, causal: bool):
        super().__init__()
        self.norm1, self.norm2 = torch.nn.LayerNorm(DIM), torch.nn.LayerNorm(DIM)
        self.attn = Attention(spelling, causal)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(DIM, 64), torch.nn.GELU(), torch.nn.Linear(64, DIM))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def model(spelling: str, causal: bool = False, depth: int = 3) -> torch.nn.Module:
    """The same weights for every spelling (one seed)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(*[Block(spelling, causal) for _ in range(depth)]).eval()


# spelling -> the plain 4-D spelling that computes the same function
SAME_AS = {"matmul": "matmul", "key_scaled": "matmul", "scale_first": "matmul", "bmm": "matmul", "einsum": "matmul",
           "baddbmm_alibi": "matmul_alibi", "matmul_alibi": "matmul_alibi", "matmul_relative": "matmul_relative"}
SPELLINGS = list(SAME_AS)


def inputs(batch: int = 2) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(batch, N, DIM)


def run(spelling: str, causal: bool = False, **options):
    m, x = model(spelling, causal), inputs()
    backend = tokred.backend(inner="eager", **options)
    with torch.no_grad():
        out = torch.compile(m, backend=backend, fullgraph=True)(x)
    return out, backend.report


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_each_spelling_is_one_site_with_its_scale_and_compiles_unchanged(fresh_dynamo, spelling):
    m, x = model(spelling), inputs()
    with torch.no_grad():
        eager = m(x)
    out, report = run(spelling)
    torch.testing.assert_close(out, eager)
    sites = report.attention_sites
    assert len(sites) == 3 and all(s.kind == "manual" and s.role == "self-attention" for s in sites), report
    assert all(s.heads == HEADS and list(s.q_shape) == [2, HEADS, N, HEAD_DIM] for s in sites), report
    assert report.blocks == 3, report


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_the_scale_and_the_masks_are_read_from_every_spelling(fresh_dynamo, spelling):
    from tokred.rewriter import analysis
    from tokred.rewriter.normalize import normalize

    seen = []

    def backend(gm, example_inputs):
        normalize(gm)
        seen.append(analysis.analyze(gm))
        return gm.forward

    with torch.no_grad():
        torch.compile(model(spelling, causal=True), backend=backend, fullgraph=True)(inputs())
    (facts,) = seen
    for site in facts.attention_sites:
        assert site.scale == pytest.approx(HEAD_DIM ** -0.5), spelling
        assert site.causal, spelling
        kinds = [kind for kind, _ in site.masks]
        assert kinds.count("fill") == 1 and len(kinds) == (2 if "alibi" in spelling or "relative" in spelling else 1)
        assert not site.logit_ops


@pytest.mark.parametrize("spelling", [s for s in SPELLINGS if SAME_AS[s] != s])
def test_merge_rewrites_every_spelling_alike(fresh_dynamo, spelling):
    plain, _ = run(SAME_AS[spelling], merge={"r": 2})
    out, report = run(spelling, merge={"r": 2})
    assert [s.status for s in report.attention_sites] == ["rewritten"] * 3, report
    torch.testing.assert_close(out, plain)


def reference_attention(attn: Attention, x: torch.Tensor, positions: torch.Tensor) -> tuple:
    """The attention of ``attn`` over tokens x [B, M, C] at their original ``positions`` [B, M],
    in plain PyTorch: (output [B, M, C], q, k, the additive bias [B, H, M, M])."""
    b, m, c = x.shape
    q, k, v = attn.qkv(x).reshape(b, m, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)
    bias = torch.zeros(b, HEADS, m, m)
    if "alibi" in attn.spelling:
        bias = bias + attn.slopes[None, :, None, None] * positions[:, None, None, :].float()
    if "relative" in attn.spelling:
        bias = bias + attn.relative[:, positions[:, :, None], positions[:, None, :]].permute(1, 0, 2, 3)
    if attn.causal:
        later = positions[:, None, None, :] > positions[:, None, :, None]
        bias = bias.masked_fill(later, torch.finfo(x.dtype).min)
    weights = (q @ k.transpose(-2, -1) * HEAD_DIM ** -0.5 + bias).softmax(-1)
    return attn.proj((weights @ v).transpose(1, 2).reshape(b, m, c)), q, k, bias


def reference_prune(m: torch.nn.Sequential, x: torch.Tensor, score: str, keep: float) -> torch.Tensor:
    """One cut after block 0 (prune_reference's scores and selection), later blocks on the kept
    tokens at their original positions, pruned tokens exiting early."""
    opts = prune_options(keep=keep, at=0, score=score)
    positions = torch.arange(x.shape[1]).expand(x.shape[0], -1)
    exits = Exits(x.shape[0], x.shape[1])
    for index, block in enumerate(m):
        attended, q, k, bias = reference_attention(block.attn, block.norm1(x), positions)
        x_in, x = x, x + attended
        x = x + block.mlp(block.norm2(x))
        if index == 0:
            cut = plan_cut(opts, 0, 0, [(q, k, HEAD_DIM ** -0.5, bias, x_in, x)])
            exits.cut(x, cut)
            x, positions = apply_cut(x, cut), positions.gather(1, cut.kept)
    return exits.restore(x)


@pytest.mark.parametrize("spelling", ["matmul_alibi", "baddbmm_alibi", "matmul_relative", "bmm", "einsum"])
@pytest.mark.parametrize("score", ["query", "transition"])
def test_causal_prune_of_every_spelling_equals_the_reference(fresh_dynamo, spelling, score):
    """A causal model is pruned after block 0 as the plain reference prunes it, in every spelling
    (merge refuses it: causal). The later blocks' position biases are gathered at the kept keys;
    an ALiBi table without a batch dim, [H, 1, N], is gathered per sample."""
    out, report = run(spelling, causal=True, prune={"keep": 0.5, "at": [0], "score": score})
    assert report.attention_sites[0].status == "rewritten", report
    _, merge_report = run(spelling, causal=True, merge={"r": 2})
    assert all("causal attention" in s.reason for s in merge_report.attention_sites), merge_report
    with torch.no_grad():
        torch.testing.assert_close(out, reference_prune(model(spelling, causal=True), inputs(), score, 0.5))
        keep_all, _ = run(spelling, causal=True, prune={"keep": 1.0, "at": [0], "score": score})
        torch.testing.assert_close(keep_all, model(spelling, causal=True)(inputs()))
