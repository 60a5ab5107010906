"""Small transformer models written in many styles, for property-based fuzzing of tokred's analysis.

A :class:`ModelSpec` says how one model is written; :func:`build` makes it (plain ``nn.Module``s, no
library), :func:`example_inputs` its inputs and :func:`model_specs` is the hypothesis strategy that
draws specs. Every style below is one that real code uses (timm, HF eager/sdpa, hand-written
decoders), so that a graph the analysis misses here is a graph it would miss in the wild.

    tokens -> embed (ids: nn.Embedding, features: Linear) -> [prefix tokens cat'ed in front]
           -> [+ learned position embedding] -> depth x Block(x, mask, rope) -> [final norm] -> [head]

Shapes: batch B = 2, data tokens N_data, prefix P, N = P + N_data tokens in every block, width C,
heads H, kv heads Hkv (GQA: H % Hkv == 0), head_dim D = C / H.

Every block takes ``(x [B, N, C], mask, rope)`` positionally and returns x, so that a hook reference
(tests/test_token_count.py) can gather its side inputs: ``mask`` is None, an additive float mask
([B, 1, 1, N] / [B, 1, N, N] padding, [1, 1, N, N] causal) or a boolean one ([B, 1, N, N] /
[1, 1, N, N], True: attend); ``rope`` is None or (cos, sin), each [1, N, D]. A causal mask is either
built once by the model (part of ``mask``) or by each block from its own token count ([N, N]).

Sizes: the token count N differs from every other size in the graph (batch, heads, head_dim, ...),
so that a literal N in a shape argument is unambiguous (see tests/zoo.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

BATCH = 2
HEAD_FEATURES = 7  # the head's output size

QKV_STYLES = ("separate", "fused_unbind", "fused_chunk", "fused_split", "fused_heads")
# fused_unbind (timm: reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)) and fused_chunk
# (chunk(3, -1)) need q, k and v of one size: no GQA.
QKV_STYLES_GQA = ("separate", "fused_split", "fused_heads")
HEAD_LAYOUTS = ("view_transpose", "reshape_permute", "unflatten")
REPEAT_KV = ("expand", "repeat_interleave", "enable_gqa")  # enable_gqa: SDPA only
MASKS = ("none", "additive", "additive_full", "bool")
# is_causal: SDPA without a mask only; tril: a boolean ones(N, N).tril(); arange: a boolean index
# comparison arange(N)[:, None] >= arange(N)[None, :] (HF's sdpa mask); masked_fill: an additive
# zeros(N, N).masked_fill(~tril, -inf)
CAUSAL = ("none", "is_causal", "tril", "arange", "masked_fill")
HEADS = ("none", "tokens", "first", "mean")  # first: the class token (x[:, 0]); mean: mean pooling
SCALES_MANUAL = ("mul_scores", "div_scores", "pre_q")
SCALES_SDPA = ("default", "explicit")


@dataclass(frozen=True)
class ModelSpec:
    """How one generated model is written. ``expected_sites`` and ``prefix`` are what the analysis
    should find; ``token_count`` is N, the tokens every attention layer sees."""

    width: int  # C
    heads: int  # H
    kv_heads: int  # Hkv, divides H
    depth: int  # blocks, one attention each
    tokens: int  # N_data: tokens the input carries
    prefix: int  # P: learned tokens cat'ed in front (class/register tokens), 0-4
    prefix_pieces: int  # 1: one [1, P, C] parameter; 2: a class token [1, 1, C] and P-1 register tokens
    inputs: str  # "ids" (nn.Embedding) | "features" ([B, N_data, c_in] through a Linear)
    pos_embed: bool  # learned position embedding [1, N, C] added after the prefix cat
    qkv: str  # one of QKV_STYLES
    head_layout: str  # one of HEAD_LAYOUTS: how [B, N, C] becomes [B, H, N, D] and back
    repeat_kv: str  # one of REPEAT_KV; unused without GQA
    attention: str  # "sdpa" | "manual" (softmax(q k^T * scale [+ mask]) [dropout] @ v)
    scale: str  # manual: SCALES_MANUAL; sdpa: SCALES_SDPA
    dropout: bool  # manual: nn.Dropout(p=0) between softmax and the value matmul
    mask: str  # one of MASKS: a padding mask input [B, N_data] and how it reaches attention
    causal: str  # one of CAUSAL
    causal_in_model: bool  # the causal mask (tril/arange/masked_fill) is built once by the model, not per block
    rotary: bool  # rotary embedding on q and k (tables [1, N, D] built by the model)
    norm: str  # "layer" (nn.LayerNorm) | "rms" (hand-written RMSNorm)
    post_norm: bool  # x = norm(x + f(x)) instead of x = x + f(norm(x))
    final_norm: bool
    mlp: str  # "gelu" | "swiglu"
    head: str  # one of HEADS: a Linear head as a second output, on every token or pooled
    c_in: int = 5  # features
    vocab: int = 23  # ids
    batch: int = BATCH
    seed: int = 0

    def __post_init__(self):
        problems = []
        if self.width % self.heads or self.heads % self.kv_heads or self.head_dim % 2:
            problems.append("width = heads * head_dim (even), heads = kv_heads * n_rep")
        if self.gqa and self.qkv not in QKV_STYLES_GQA:
            problems.append(f"qkv={self.qkv!r} needs kv_heads == heads")
        if self.repeat_kv == "enable_gqa" and self.attention != "sdpa":
            problems.append("enable_gqa is an SDPA argument")
        if self.causal == "is_causal" and (self.attention != "sdpa" or self.mask != "none"):
            problems.append("is_causal: SDPA without an attention mask only")
        if self.causal_in_model and self.causal not in ("tril", "arange", "masked_fill"):
            problems.append("causal_in_model needs an explicit causal mask")
        if not 0 <= self.prefix <= 4 or (self.prefix_pieces == 2 and not self.prefix):
            problems.append("prefix: 0-4 tokens; two pieces need at least one")
        if problems:
            raise ValueError(f"invalid ModelSpec ({'; '.join(problems)}): {self.short()}")

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def token_count(self) -> int:
        return self.prefix + self.tokens

    @property
    def expected_sites(self) -> int:
        return self.depth

    @property
    def gqa(self) -> bool:
        return self.kv_heads != self.heads

    def sizes_besides_tokens(self) -> set:
        """Every other size a shape argument of the graph may hold (a token count must differ)."""
        h, hkv, d, c = self.heads, self.kv_heads, self.head_dim, self.width
        return {self.batch, h, hkv, h // hkv, d, d // 2, c, 2 * c, 4 * c, c + 2 * hkv * d, h + 2 * hkv, 3,
                self.c_in, self.vocab, hkv * d, HEAD_FEATURES}

    def short(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in asdict(self).items())


# ----------------------------------------------------------------------------- pieces

class RMSNorm(nn.Module):
    """Hand-written RMSNorm (as in HF Llama before F.rms_norm): x [.., C] -> [.., C]."""

    def __init__(self, width: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width) + 0.1 * torch.randn(width))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def make_norm(spec: ModelSpec) -> nn.Module:
    if spec.norm == "rms":
        return RMSNorm(spec.width)
    norm = nn.LayerNorm(spec.width)
    with torch.no_grad():  # not the identity, so that a misplaced norm shows in the output
        norm.weight.add_(0.1 * torch.randn(spec.width))
        norm.bias.add_(0.1 * torch.randn(spec.width))
    return norm


def rotate_half(x):
    """[.., D] -> [.., D]: (x1, x2) -> (-x2, x1)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x, cos, sin):
    """x [B, H, N, D], cos/sin [1, N, D] -> [B, H, N, D]."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


def repeat_kv(x, n_rep: int, style: str):
    """[B, Hkv, N, D] -> [B, Hkv * n_rep, N, D], each kv head repeated for its query heads."""
    if n_rep == 1:
        return x
    b, hkv, n, d = x.shape
    if style == "expand":  # HF: expand a new dim then fold it into the heads
        return x[:, :, None, :, :].expand(b, hkv, n_rep, n, d).reshape(b, hkv * n_rep, n, d)
    return x.repeat_interleave(n_rep, dim=1)


def split_heads(x, heads: int, layout: str):
    """[B, N, heads * D] -> [B, heads, N, D]."""
    b, n, c = x.shape
    d = c // heads
    if layout == "view_transpose":
        return x.view(b, n, heads, d).transpose(1, 2)
    if layout == "reshape_permute":
        return x.reshape(b, n, heads, d).permute(0, 2, 1, 3)
    return x.unflatten(-1, (heads, d)).transpose(1, 2)


def merge_heads(x, layout: str):
    """[B, H, N, D] -> [B, N, H * D]."""
    b, h, n, d = x.shape
    if layout == "view_transpose":
        return x.transpose(1, 2).contiguous().view(b, n, h * d)
    if layout == "reshape_permute":
        return x.permute(0, 2, 1, 3).reshape(b, n, h * d)
    return x.transpose(1, 2).flatten(2)


def causal_bool(n: int, device, form: str = "tril") -> torch.Tensor:
    """[N, N], True on and below the diagonal (query i attends keys <= i)."""
    if form == "arange":
        positions = torch.arange(n, device=device)
        return positions[:, None] >= positions[None, :]
    return torch.ones(n, n, dtype=torch.bool, device=device).tril()


def causal_additive(n: int, device) -> torch.Tensor:
    """[N, N], 0 on and below the diagonal, -inf above (built with masked_fill, as HF does)."""
    allowed = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    return torch.zeros(n, n, device=device).masked_fill(~allowed, float("-inf"))


# ----------------------------------------------------------------------------- attention

class Attention(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        c, h, hkv, d = spec.width, spec.heads, spec.kv_heads, spec.head_dim
        self.q_size, self.kv_size = h * d, hkv * d
        if spec.qkv == "separate":
            self.q_proj = nn.Linear(c, self.q_size)
            self.k_proj = nn.Linear(c, self.kv_size)
            self.v_proj = nn.Linear(c, self.kv_size)
        else:
            self.qkv = nn.Linear(c, self.q_size + 2 * self.kv_size)
        self.proj = nn.Linear(self.q_size, c)
        self.attn_drop = nn.Dropout(0.0)

    def project(self, x):
        """x [B, N, C] -> q [B, H, N, D], k and v [B, Hkv, N, D]."""
        s = self.spec
        h, hkv, d = s.heads, s.kv_heads, s.head_dim
        b, n, _ = x.shape
        if s.qkv == "separate":
            return (split_heads(self.q_proj(x), h, s.head_layout), split_heads(self.k_proj(x), hkv, s.head_layout),
                    split_heads(self.v_proj(x), hkv, s.head_layout))
        qkv = self.qkv(x)
        if s.qkv == "fused_unbind":  # timm
            q, k, v = qkv.reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
            return q, k, v
        if s.qkv == "fused_heads":  # one head axis for q, k and v heads, split after the transpose
            heads = qkv.reshape(b, n, h + 2 * hkv, d).transpose(1, 2)
            q, k, v = heads.split([h, hkv, hkv], dim=1)
            return q, k, v
        if s.qkv == "fused_chunk":
            q, k, v = qkv.chunk(3, dim=-1)
        else:  # fused_split
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        return split_heads(q, h, s.head_layout), split_heads(k, hkv, s.head_layout), split_heads(v, hkv, s.head_layout)

    def forward(self, x, mask, rope):
        """x [B, N, C]; mask: None, additive [B, 1, 1|N, N] or bool [B, 1, N, N]; rope: None or (cos, sin)."""
        s = self.spec
        q, k, v = self.project(x)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        n = x.shape[1]
        mask = self.with_causal(mask, n, x.device)
        if s.attention == "sdpa":
            out = self.sdpa(q, k, v, mask)
        else:
            out = self.manual(q, k, v, mask)
        return self.proj(merge_heads(out, s.head_layout))

    def with_causal(self, mask, n: int, device):
        """The padding mask combined with the block-built causal mask (None if there is no mask)."""
        s = self.spec
        if s.causal in ("none", "is_causal") or s.causal_in_model:
            return mask
        if s.causal in ("tril", "arange") or (s.mask == "bool" and mask is not None):
            causal = causal_bool(n, device, s.causal)
            if mask is None:
                return causal
            return mask & causal if mask.dtype == torch.bool else mask.masked_fill(~causal, float("-inf"))
        causal = causal_additive(n, device)
        return causal if mask is None else mask + causal

    def sdpa(self, q, k, v, mask):
        s = self.spec
        kwargs = {}
        if s.scale == "explicit":
            kwargs["scale"] = 1.0 / math.sqrt(s.head_dim)
        if s.gqa:
            if s.repeat_kv == "enable_gqa":
                kwargs["enable_gqa"] = True
            else:
                n_rep = s.heads // s.kv_heads
                k, v = repeat_kv(k, n_rep, s.repeat_kv), repeat_kv(v, n_rep, s.repeat_kv)
        if s.causal == "is_causal":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, **kwargs)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, **kwargs)

    def manual(self, q, k, v, mask):
        s = self.spec
        if s.gqa:
            n_rep = s.heads // s.kv_heads
            k, v = repeat_kv(k, n_rep, s.repeat_kv), repeat_kv(v, n_rep, s.repeat_kv)
        scale = s.head_dim ** -0.5
        if s.scale == "pre_q":  # timm eager
            q = q * scale
        scores = q @ k.transpose(-2, -1)
        if s.scale == "mul_scores":
            scores = scores * scale
        elif s.scale == "div_scores":  # HF BERT eager
            scores = scores / math.sqrt(s.head_dim)
        if mask is not None:
            if mask.dtype == torch.bool:
                scores = scores.masked_fill(~mask, float("-inf"))
            else:
                scores = scores + mask
        attn = scores.softmax(dim=-1)
        if s.dropout:
            attn = self.attn_drop(attn)
        return attn @ v


class Mlp(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        c, hidden = spec.width, 2 * spec.width
        self.gated = spec.mlp == "swiglu"
        self.fc1 = nn.Linear(c, 2 * hidden if self.gated else hidden)
        self.fc2 = nn.Linear(hidden, c)

    def forward(self, x):
        h = self.fc1(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h)
        return self.fc2(h)


class Block(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.post_norm = spec.post_norm
        self.norm1, self.attn = make_norm(spec), Attention(spec)
        self.norm2, self.mlp = make_norm(spec), Mlp(spec)

    def forward(self, x, mask, rope):
        """x [B, N, C] -> [B, N, C]."""
        if self.post_norm:
            x = self.norm1(x + self.attn(x, mask, rope))
            return self.norm2(x + self.mlp(x))
        x = x + self.attn(self.norm1(x), mask, rope)
        return x + self.mlp(self.norm2(x))


class FuzzModel(nn.Module):
    """forward(inputs [B, N_data] int64 or [B, N_data, c_in], padding_mask [B, N_data] or absent)."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        c = spec.width
        if spec.inputs == "ids":
            self.embed = nn.Embedding(spec.vocab, c)
        else:
            self.embed = nn.Linear(spec.c_in, c)
        if spec.prefix and spec.prefix_pieces == 2:
            self.cls_token = nn.Parameter(torch.randn(1, 1, c))
            self.reg_token = nn.Parameter(torch.randn(1, spec.prefix - 1, c)) if spec.prefix > 1 else None
        elif spec.prefix:
            self.prefix_tokens = nn.Parameter(torch.randn(1, spec.prefix, c))
        if spec.pos_embed:
            self.pos_embed = nn.Parameter(0.5 * torch.randn(1, spec.token_count, c))
        if spec.rotary:
            d = spec.head_dim
            self.register_buffer("inv_freq", 1.0 / (100.0 ** (torch.arange(0, d, 2).float() / d)), persistent=False)
        self.blocks = nn.ModuleList(Block(spec) for _ in range(spec.depth))
        self.norm = make_norm(spec) if spec.final_norm else nn.Identity()
        self.head = nn.Linear(c, HEAD_FEATURES) if spec.head != "none" else None

    def prefixed(self, x):
        """x [B, N_data, C] -> [B, N, C] with the prefix tokens in front."""
        s = self.spec
        b = x.shape[0]
        if not s.prefix:
            return x
        if s.prefix_pieces == 2:
            pieces = [self.cls_token.expand(b, -1, -1)]
            if self.reg_token is not None:
                pieces.append(self.reg_token.expand(b, -1, -1))
            return torch.cat(pieces + [x], dim=1)
        return torch.cat([self.prefix_tokens.expand(b, -1, -1), x], dim=1)

    def attention_mask(self, padding_mask, n: int, device):
        """padding_mask [B, N_data] (1: token, 0: padding) -> the mask every block gets, or None."""
        s = self.spec
        mask = None
        if padding_mask is not None and s.mask != "none":
            b = padding_mask.shape[0]
            keep = padding_mask  # [B, N]: prefix tokens are never padding
            if s.prefix:
                keep = torch.cat([padding_mask.new_ones(b, s.prefix), padding_mask], dim=1)
            if s.mask == "bool":
                mask = keep[:, None, None, :].bool().expand(b, 1, n, n)
            else:
                mask = (1.0 - keep[:, None, None, :].float()) * torch.finfo(torch.float32).min
                if s.mask == "additive_full":
                    mask = mask.expand(b, 1, n, n)
        if not s.causal_in_model or s.causal in ("none", "is_causal"):
            return mask
        if s.causal in ("tril", "arange") or s.mask == "bool":
            causal = causal_bool(n, device, s.causal)
            if mask is None:
                return causal[None, None]  # [1, 1, N, N]
            return mask & causal if mask.dtype == torch.bool else mask.masked_fill(~causal, float("-inf"))
        causal = causal_additive(n, device)[None, None]
        return causal if mask is None else mask + causal

    def rotary_tables(self, n: int, device):
        """(cos, sin), each [1, N, D]."""
        positions = torch.arange(n, device=device, dtype=torch.float32)
        freqs = positions[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)[None]
        return emb.cos(), emb.sin()

    def forward(self, inputs, padding_mask=None):
        x = self.prefixed(self.embed(inputs))
        if self.spec.pos_embed:
            x = x + self.pos_embed
        n = x.shape[1]
        mask = self.attention_mask(padding_mask, n, x.device)
        rope = self.rotary_tables(n, x.device) if self.spec.rotary else None
        for block in self.blocks:
            x = block(x, mask, rope)
        x = self.norm(x)
        if self.head is None:
            return x
        pooled = {"tokens": x, "first": x[:, 0], "mean": x.mean(dim=1)}[self.spec.head]
        return x, self.head(pooled)


def build(spec: ModelSpec) -> FuzzModel:
    """The model of ``spec`` in eval mode, with weights drawn from ``spec.seed``."""
    torch.manual_seed(spec.seed)
    return FuzzModel(spec).eval()


def example_inputs(spec: ModelSpec) -> tuple:
    """(inputs, [padding_mask]): the second sample has its last third padded (never its first token,
    so that no query row is fully masked, causal or not)."""
    gen = torch.Generator().manual_seed(spec.seed + 1)
    b, n = spec.batch, spec.tokens
    if spec.inputs == "ids":
        inputs = torch.randint(0, spec.vocab, (b, n), generator=gen)
    else:
        inputs = torch.randn(b, n, spec.c_in, generator=gen)
    if spec.mask == "none":
        return (inputs,)
    padding = torch.ones(b, n, dtype=torch.int64)
    padding[1, n - max(1, n // 3):] = 0
    return inputs, padding


# ----------------------------------------------------------------------------- hypothesis strategy

def model_specs(max_depth: int = 3, min_depth: int = 1):
    """Hypothesis strategy over valid :class:`ModelSpec` s (sizes kept tiny: C <= 48, N <= 20),
    with ``min_depth`` to ``max_depth`` blocks."""
    from hypothesis import assume, strategies as st

    @st.composite
    def draw_spec(draw) -> ModelSpec:
        head_dim = draw(st.sampled_from([4, 6, 8]))
        heads = draw(st.sampled_from([h for h in (1, 2, 3, 4, 6) if h * head_dim <= 48]))
        kv_heads = draw(st.sampled_from([k for k in range(1, heads + 1) if heads % k == 0]))
        width = heads * head_dim
        prefix = draw(st.integers(0, 4))
        tokens = draw(st.integers(max(3, 5 - prefix), 20 - prefix))
        attention = draw(st.sampled_from(["sdpa", "manual"]))
        gqa = kv_heads != heads
        qkv = draw(st.sampled_from(QKV_STYLES_GQA if gqa else QKV_STYLES))
        repeat = draw(st.sampled_from(REPEAT_KV if attention == "sdpa" else REPEAT_KV[:2]))
        mask = draw(st.sampled_from(MASKS))
        with_mask_or_manual = tuple(c for c in CAUSAL if c != "is_causal")
        causal = draw(st.sampled_from(CAUSAL if attention == "sdpa" and mask == "none" else with_mask_or_manual))
        spec = ModelSpec(
            width=width, heads=heads, kv_heads=kv_heads, depth=draw(st.integers(min_depth, max_depth)),
            tokens=tokens, prefix=prefix, prefix_pieces=draw(st.sampled_from([1, 2])) if prefix else 1,
            inputs=draw(st.sampled_from(["ids", "features"])), pos_embed=draw(st.booleans()),
            qkv=qkv, head_layout=draw(st.sampled_from(HEAD_LAYOUTS)),
            repeat_kv=repeat if gqa else "expand", attention=attention,
            scale=draw(st.sampled_from(SCALES_SDPA if attention == "sdpa" else SCALES_MANUAL)),
            dropout=attention == "manual" and draw(st.booleans()), mask=mask, causal=causal,
            causal_in_model=causal in ("tril", "arange", "masked_fill") and draw(st.booleans()),
            rotary=draw(st.booleans()), norm=draw(st.sampled_from(["layer", "rms"])),
            post_norm=draw(st.booleans()), final_norm=draw(st.booleans()),
            mlp=draw(st.sampled_from(["gelu", "swiglu"])), head=draw(st.sampled_from(HEADS)),
            seed=draw(st.integers(0, 2 ** 16)),
        )
        # a token count equal to another size would make shape literals ambiguous (see tests/zoo.py)
        assume(spec.token_count not in spec.sizes_besides_tokens())
        return spec

    return draw_spec()
