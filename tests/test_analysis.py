"""Pass-level unit tests of the graph analysis on small hand-built models.

Each model is captured by Dynamo (the graph a backend sees) and analysed; the tests check the facts
the passes rely on: sites, projection roles, blocks (pre- and post-norm), the token axis of
specific nodes, shape literals, prefix tokens and read-out positions.
"""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tokred.rewriter import analysis
from tokred.rewriter.analysis.graph import shape_of

B, N, C, H = 2, 9, 24, 3  # batch, tokens, width, heads: all different


def capture(model: nn.Module, *args):
    """Analyse the single graph Dynamo captures from ``model(*args)``."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend, fullgraph=True)(*args)
    torch._dynamo.reset()
    assert len(graphs) == 1
    return graphs[0], analysis.analyze(graphs[0])


class Block(nn.Module):
    """One transformer block; ``post_norm`` as BERT, else pre-norm as ViT; fused or separate qkv."""

    def __init__(self, post_norm=False, fused=True, manual=False):
        super().__init__()
        self.post_norm, self.fused, self.manual = post_norm, fused, manual
        self.norm1, self.norm2 = nn.LayerNorm(C), nn.LayerNorm(C)
        if fused:
            self.qkv = nn.Linear(C, 3 * C)
        else:
            self.q, self.k, self.v = nn.Linear(C, C), nn.Linear(C, C), nn.Linear(C, C)
        self.proj = nn.Linear(C, C)
        self.fc1, self.fc2 = nn.Linear(C, 2 * C), nn.Linear(2 * C, C)

    def attend(self, x, mask):
        b, n, _ = x.shape
        if self.fused:
            q, k, v = self.qkv(x).reshape(b, n, 3, H, C // H).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q, k, v = (lin(x).view(b, n, H, C // H).transpose(1, 2) for lin in (self.q, self.k, self.v))
        if self.manual:
            scores = q @ k.transpose(-2, -1) / (C // H) ** 0.5
            if mask is not None:
                scores = scores + mask
            out = F.dropout(scores.softmax(dim=-1), 0.0) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, C))

    def forward(self, x, mask=None):
        if self.post_norm:
            x = self.norm1(x + self.attend(x, mask))
            return self.norm2(x + self.fc2(F.gelu(self.fc1(x))))
        x = x + self.attend(self.norm1(x), mask)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class Encoder(nn.Module):
    """Tokens [B, N-1, C] behind a learned class token, two blocks, final norm, read-out of token 0."""

    def __init__(self, **block_kwargs):
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, C))
        self.blocks = nn.ModuleList(Block(**block_kwargs) for _ in range(2))
        self.norm = nn.LayerNorm(C)

    def forward(self, x, pad_mask=None):
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        mask = None
        if pad_mask is not None:
            keep = torch.cat([torch.ones_like(pad_mask[:, :1]), pad_mask], dim=1)
            mask = torch.zeros(keep.shape, dtype=x.dtype).masked_fill(keep == 0, float("-inf"))[:, None, None, :]
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)[:, 0], x


@pytest.mark.parametrize("post_norm", [False, True], ids=["pre_norm", "post_norm"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused_qkv", "separate_qkv"])
@pytest.mark.parametrize("manual", [False, True], ids=["sdpa", "manual"])
def test_sites_blocks_roles(post_norm, fused, manual):
    gm, facts = capture(Encoder(post_norm=post_norm, fused=fused, manual=manual), torch.randn(B, N - 1, C))
    assert [s.module for s in facts.attention_sites] == ["blocks.0", "blocks.1"]
    for site in facts.attention_sites:
        assert (site.kind, site.heads, site.kv_heads, site.head_dim, site.q_len) == \
            ("manual" if manual else "sdpa", H, H, C // H, N)
        assert not site.causal
        if manual:
            assert site.scale == pytest.approx((C // H) ** -0.5)
    assert len(facts.blocks) == 2
    for block in facts.blocks:
        assert block.post_norm == post_norm
        assert block.output is not None and block.mlp_add is not None
        assert (block.mid.target is F.layer_norm) == post_norm
    roles = sorted(p.role for p in facts.projections)
    attn_roles = ["qkv"] * 2 if fused else ["k", "k", "q", "q", "v", "v"]
    assert roles == sorted(attn_roles + ["out"] * 2 + ["mlp_in"] * 2 + ["mlp_out"] * 2)
    assert facts.token_count == N and facts.prefix_tokens == 1 and facts.readout_positions == [0]


def test_token_axis_of_specific_nodes():
    gm, facts = capture(Encoder(manual=True), torch.randn(B, N - 1, C), torch.ones(B, N - 1))
    axes = facts.token_axes
    site = facts.attention_sites[0]
    assert axes.of(site.q) == {2} and axes.of(site.k) == {2} and axes.of(site.v) == {2}
    assert axes.of(site.scores) == {2, 3}
    # the additive padding mask [B, 1, 1, N]: its key axis
    assert axes.of(site.mask) == {3}
    for block in facts.blocks:
        assert axes.of(block.input) == {1} and axes.of(block.output) == {1}
    # the raw input [B, N-1, C] (before the class token) is found from the attention, backwards
    x = next(n for n in gm.graph.nodes if n.op == "placeholder" and shape_of(n) == (B, N - 1, C))
    assert axes.of(x) == {1}
    # weights carry no token axis; the pooled read-out x[:, 0] has none either
    readout = next(n for n in gm.graph.nodes if n.target is operator.getitem and shape_of(n) == (B, C))
    assert axes.of(readout) == frozenset()


def test_a_slice_to_the_end_of_a_head_dim_is_not_a_token_dim():
    """Partial rotary (Phi, GPT-NeoX): ``q[..., r:]`` keeps the head dims past the rotary ones; here
    it has N of them, as GPT-NeoX's tiny config had, and it is still not a token dim."""
    d, rot = N + 4, 4

    class PartialRotary(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.proj = nn.Linear(H * d, 3 * H * d), nn.Linear(H * d, H * d)

        def forward(self, x):
            q, k, v = self.qkv(x).view(B, N, 3, H, d).permute(2, 0, 3, 1, 4)
            q = torch.cat([q[..., :rot] * 2.0, q[..., rot:]], dim=-1)
            out = F.scaled_dot_product_attention(q, k, v)
            return x + self.proj(out.transpose(1, 2).reshape(B, N, H * d))

    gm, facts = capture(PartialRotary(), torch.randn(B, N, H * d))
    rest = next(n for n in gm.graph.nodes if n.target is operator.getitem and shape_of(n) == (B, H, N, N))
    assert facts.token_axes.of(rest) == {2}


def test_shape_literals_are_token_dims_only():
    gm, facts = capture(Encoder(fused=True), torch.randn(B, N - 1, C))
    lits = facts.shape_literals
    # per block: reshape(b, n, 3, H, D) and reshape(b, n, C): two literals N, each on dim 1
    assert len(lits) == 4
    assert all(lit.value == N and lit.dim == 1 for lit in lits)
    # no literal equal to something else is taken (H=3 appears in the same reshape)
    assert {lit.node.name for lit in lits} == {n.name for n in gm.graph.nodes
                                                if n.op == "call_method" and n.target == "reshape"}


def test_gqa_rotary_causal_decoder():
    class Decoder(nn.Module):
        def __init__(self, heads=4, kv_heads=2, d=6):
            super().__init__()
            self.emb = nn.Embedding(50, heads * d)
            self.q = nn.Linear(heads * d, heads * d, bias=False)
            self.k = nn.Linear(heads * d, kv_heads * d, bias=False)
            self.v = nn.Linear(heads * d, kv_heads * d, bias=False)
            self.o = nn.Linear(heads * d, heads * d, bias=False)
            self.fc = nn.Linear(heads * d, heads * d)
            self.head = nn.Linear(heads * d, 50, bias=False)
            self.h, self.kvh, self.d = heads, kv_heads, d

        def forward(self, ids):
            b, n = ids.shape
            x = self.emb(ids)
            pos = torch.arange(n, dtype=torch.float32)[:, None] * torch.arange(self.d // 2)[None, :]
            cos, sin = torch.cat([pos.cos()] * 2, -1), torch.cat([pos.sin()] * 2, -1)

            def rope(t):
                t1, t2 = t[..., : self.d // 2], t[..., self.d // 2:]
                return t * cos + torch.cat([-t2, t1], -1) * sin

            q = rope(self.q(x).view(b, n, self.h, self.d).transpose(1, 2))
            k = rope(self.k(x).view(b, n, self.kvh, self.d).transpose(1, 2))
            v = self.v(x).view(b, n, self.kvh, self.d).transpose(1, 2)
            rep = self.h // self.kvh
            k = k[:, :, None].expand(b, self.kvh, rep, n, self.d).reshape(b, self.h, n, self.d)
            v = v[:, :, None].expand(b, self.kvh, rep, n, self.d).reshape(b, self.h, n, self.d)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.o(out.transpose(1, 2).reshape(b, n, -1))
            x = x + self.fc(x)
            return self.head(x)

    gm, facts = capture(Decoder(), torch.randint(0, 50, (B, 7)))
    (site,) = facts.attention_sites
    assert site.causal and site.gqa and site.kv_heads == 2 and site.heads == 4
    assert site.q_proj is not None and site.k_proj is not None and site.v_proj is not None
    assert site.k_proj is not site.v_proj
    roles = {p.role for p in facts.projections}
    assert {"q", "k", "v", "out", "mlp_out", "lm_head"} <= roles


def test_model_without_attention_has_no_facts():
    mlp = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    gm, facts = capture(mlp, torch.randn(B, 5))
    assert facts.attention_sites == [] and facts.blocks == [] and facts.token_count is None
    assert "no attention" in str(facts.to_report())
