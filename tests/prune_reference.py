"""Token pruning written out in plain PyTorch over a model's own submodules and weights.

This is the independent reference the prune pass (tokred/passes/prune.py) is compared with
(ARCHITECTURE.md invariant 3). It is written from the spec (the scorers, the selection rule, EViT's fused
token, early exit, the pruned KV cache), not from tokred's graph code: the model's own modules run
layer by layer, the scores are recomputed here from each block's own q/k projections, and the kept
tokens carry their original positions (masks, rotary positions) with them.

One cut, at the OUTPUT of block L (after its MLP residual add):

    s   = score(block L)                      # [B, N] over the tokens at the cut
    P   = prunable positions (not protected, inside `range`, not among the last `protect_last`)
    k   = round(keep * P) (at least 1) or min(keep, P)
    kept = non-prunable + the k best of P, in ascending position order (ties: lower position)
    x   = x[kept] (+ one fused token at the end with `fuse`)

Later blocks run on the kept tokens; a pruned token exits early with its value after block L; at
the end every original position gets its token's value back and the final norm/heads run on N.

Forward functions: :func:`timm_vit_forward` (timm VisionTransformer), :func:`hf_bert_forward`
(transformers BertModel, padding mask) and :func:`hf_decoder_forward` (transformers
LlamaForCausalLM / Qwen2ForCausalLM, with its pruned KV cache) plus :func:`hf_decoder_step` (one
decode step on that cache). :func:`reference_forward` dispatches on a zoo entry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# the cache keyword of the installed transformers (only the spelling; the method is written out here)
from tokred.compat.transformers_api import cache_argument

SCORERS = ("cls", "query", "transition", "diversity", "random")


# ----------------------------------------------------------------------------- options

@dataclass
class PruneOptions:
    """The prune options, one entry per cut in ``keep``/``at`` (see /tmp/prune_spec.md).

    keep:  per cut, a float in (0, 1] (fraction of the prunable tokens) or an int >= 1 (count).
    at:    per cut, the 0-based block after whose output the cut is made (ascending).
    """

    keep: list
    at: list
    score: str
    fuse: bool = False
    range: Optional[tuple] = None
    protect_last: int = 0
    query: Optional[object] = None  # None (last token), int M (last M tokens) or a (start, end) pair
    seed: int = 0
    accumulate: int = 1  # blocks whose scores are combined, ending at the cut block
    pool: int = 1  # odd window of positions each score is averaged over (SnapKV); 1: none


def prune_options(keep=0.5, at=1, score="cls", fuse=False, range=None, protect_last=0, query=None,
                  seed=0, accumulate=1, pool=1) -> PruneOptions:
    """Normalise the user-level options (scalars or lists) to one value per cut."""
    at_list = [at] if isinstance(at, int) else list(at)
    keep_list = list(keep) if isinstance(keep, (list, tuple)) else [keep] * len(at_list)
    assert len(keep_list) == len(at_list), (keep_list, at_list)
    assert score in SCORERS, score
    return PruneOptions(keep_list, at_list, score, fuse, range, protect_last, query, seed, accumulate, pool)


def kept_count(keep, prunable: int) -> int:
    """How many of ``prunable`` tokens one cut keeps: keep * P rounded half up, >= 1, for a float
    (the decimal the user wrote, exactly: 0.7 * 5 = 3.5 -> 4), else min(keep, P)."""
    if isinstance(keep, float):
        return min(prunable, max(1, math.floor(Fraction(str(keep)) * prunable + Fraction(1, 2))))
    return min(int(keep), prunable)


def prunable_positions(n: int, protected: int, token_range: Optional[tuple], protect_last: int) -> list:
    """Indices 0..n-1 (tokens at the cut) that may be pruned: not among the first ``protected``,
    inside ``token_range`` (start, end; negative counts from the end, as in a Python slice) and
    not among the last ``protect_last``."""
    inside = range(n) if token_range is None else range(n)[slice(*token_range)]
    return [j for j in inside if j >= protected and j < n - protect_last]


# ----------------------------------------------------------------------------- scores

def attention_probs(q: Tensor, k: Tensor, scale: float, bias: Optional[Tensor], rows: Sequence[int]) -> Tensor:
    """Mean over heads and the query ``rows`` of the attention probabilities: [B, N].

    q [B, H, N, D] and k [B, Hkv, N, D] exactly as the attention reads them (after rotary, q/k
    norms); query head h reads kv head h // (H / Hkv). bias: None or an additive mask
    broadcastable to [B, H, N, N] (0 where allowed, a large negative number where not).
    """
    heads, kv_heads = q.shape[1], k.shape[1]
    k = k.repeat_interleave(heads // kv_heads, dim=1)
    rows = list(rows)
    logits = q[:, :, rows] @ k.transpose(-1, -2) * scale  # [B, H, R, N]
    if bias is not None:
        bias = bias.expand(q.shape[0], heads, q.shape[2], k.shape[2])
        logits = logits + bias[:, :, rows]
    return logits.softmax(dim=-1).mean(dim=(1, 2))


def transition_scores(x_in: Tensor, x_out: Tensor) -> Tensor:
    """TTV-style change of each token across the block: [B, N] from x_in, x_out [B, N, C].

    (1 - cos(x_in, x_out)) + | |x_out| - |x_in| | / (|x_in| + 1e-6).
    """
    n_in, n_out = x_in.norm(dim=-1), x_out.norm(dim=-1)
    cos = (x_in * x_out).sum(-1) / (n_in * n_out).clamp_min(1e-12)
    return (1 - cos) + (n_out - n_in).abs() / (n_in + 1e-6)


def random_scores(n: int, seed: int) -> Tensor:
    """[N] uniform scores from a generator seeded with ``seed`` (the same for every sample)."""
    return torch.rand(n, generator=torch.Generator().manual_seed(seed))


def cosine_distance(a: Tensor, b: Tensor) -> Tensor:
    """1 - cos between the rows of a [n, C] and b [m, C]: [n, m]."""
    a = a / a.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    b = b / b.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return 1 - a @ b.T


def k_center(tokens: Tensor, prunable: list, k: int, gaps: Optional[list] = None) -> list:
    """Greedy k-center on cosine distance over one sample's prunable tokens (tokens [N, C]).

    Start with the prunable token farthest from their mean, then repeatedly add the one whose
    distance to the nearest selected token is largest; ties go to the lowest position.
    Returns the k selected positions in the order they were selected. ``gaps`` (a list) receives,
    per step, the distance of the chosen token minus that of the runner-up.
    """
    candidates = tokens[prunable]  # [P, C]
    dist = cosine_distance(candidates, candidates)
    to_mean = cosine_distance(candidates, candidates.mean(0, keepdim=True))[:, 0]
    row = to_mean.tolist()
    chosen = [first_argmax(row)]
    nearest = dist[chosen[0]].clone()
    while True:
        if gaps is not None:
            rest = sorted((v for i, v in enumerate(row) if i not in chosen[:-1]), reverse=True)
            if len(rest) > 1:
                gaps.append(rest[0] - rest[1])
        if len(chosen) == k:
            break
        row = nearest.tolist()
        for c in chosen:
            row[c] = -math.inf
        best = first_argmax(row)
        chosen.append(best)
        nearest = torch.minimum(nearest, dist[best])
    return [prunable[c] for c in chosen]


def first_argmax(values: Sequence[float]) -> int:
    """Index of the largest value, the lowest one among equal maxima."""
    best = 0
    for j in range(1, len(values)):
        if values[j] > values[best]:
            best = j
    return best


# ----------------------------------------------------------------------------- one cut

@dataclass
class Cut:
    """What one cut keeps, per sample.

    kept:      [B, M] indices (into the tokens at the cut) of the tokens kept, ascending; with
               fuse, M counts the fused token too and its entry is the index whose side inputs
               it takes (the representative pruned token).
    pruned:    list of B lists of pruned indices.
    weights:   with fuse: [B, P - k] weights of the pruned tokens (sum 1), in ``pruned`` order.
    fused:     the last kept entry is a fused token.
    margin:    the smallest gap, over samples, between the last kept and the first pruned score
               (diversity: between the best and the runner-up of a greedy step), relative to the
               scores' scale; a tiny margin means float noise could flip the selection.
    """

    kept: Tensor
    pruned: list
    weights: Optional[Tensor] = None
    fused: bool = False
    margin: float = math.inf


def select(scores: Optional[Tensor], tokens: Tensor, prunable: list, k: int, opts: PruneOptions) -> Cut:
    """Choose the tokens one cut keeps. scores [B, N] (None for 'diversity'); tokens [B, N, C]
    is block L's output (the diversity metric)."""
    batch, n = tokens.shape[0], tokens.shape[1]
    fixed = [j for j in range(n) if j not in set(prunable)]
    kept_rows, pruned_rows, weight_rows, reps = [], [], [], []
    margin = math.inf
    for b in range(batch):
        if opts.score == "diversity":
            gaps: list = []
            chosen = k_center(tokens[b], prunable, k, gaps)
            margin = min([margin] + gaps)
        else:
            s = scores[b, prunable]
            ranked = torch.sort(s, descending=True, stable=True)
            chosen = [prunable[i] for i in ranked.indices[:k].tolist()]
            last_kept = ranked.values[k - 1] if k > 0 else None
            if k < len(prunable) and torch.isfinite(last_kept):  # -inf ties (padding) follow the position rule
                finite = ranked.values[torch.isfinite(ranked.values)]
                gap = (last_kept - ranked.values[k]) / finite.abs().max().clamp_min(1e-12)
                margin = min(margin, gap.item())
        kept = sorted(fixed + chosen)
        pruned = [j for j in prunable if j not in set(chosen)]
        kept_rows.append(kept)
        pruned_rows.append(pruned)
        if opts.fuse and pruned:
            if opts.score in ("cls", "query"):
                w = scores[b, pruned]
                weight_rows.append(w / w.sum())
                reps.append(pruned[first_argmax(w.tolist())])
            else:
                weight_rows.append(torch.full((len(pruned),), 1.0 / len(pruned)))
                reps.append(pruned[0])
    if opts.fuse and all(pruned_rows):
        kept_rows = [row + [rep] for row, rep in zip(kept_rows, reps)]
        return Cut(torch.tensor(kept_rows), pruned_rows, torch.stack(weight_rows).to(tokens.dtype), True, margin)
    return Cut(torch.tensor(kept_rows), pruned_rows, margin=margin)


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """x [B, N, ...] -> [B, M, ...] rows ``index`` [B, M] of each sample."""
    idx = index.reshape(*index.shape, *([1] * (x.dim() - 2))).expand(*index.shape, *x.shape[2:])
    return x.gather(1, idx)


def apply_cut(x: Tensor, cut: Cut) -> Tensor:
    """The kept tokens of x [B, N, C] (the stream after block L), plus the fused token."""
    if not cut.fused:
        return gather_tokens(x, cut.kept)
    kept = gather_tokens(x, cut.kept[:, :-1])
    fused = torch.stack([(cut.weights[b, :, None] * x[b, cut.pruned[b]]).sum(0) for b in range(x.shape[0])])
    return torch.cat([kept, fused[:, None]], dim=1)


class Exits:
    """Where each current token came from, and the values of the tokens that exited early.

    position: [B, M] original position of each current token (-1 for a fused token);
    out:      [B, N, C] the restored stream, filled in as tokens exit.
    """

    def __init__(self, batch: int, n: int):
        self.n = n
        self.position = torch.arange(n).expand(batch, n).clone()
        self.out: Optional[Tensor] = None

    def cut(self, x: Tensor, cut: Cut) -> None:
        """Record the pruned tokens' values (x [B, N_cut, C], after block L) and move on."""
        if self.out is None:
            self.out = torch.zeros(x.shape[0], self.n, x.shape[2], dtype=x.dtype)
        for b in range(x.shape[0]):
            for j in cut.pruned[b]:
                p = self.position[b, j].item()
                if p >= 0:
                    self.out[b, p] = x[b, j]
        new = self.position.gather(1, cut.kept)
        if cut.fused:
            new[:, -1] = -1
        self.position = new

    def restore(self, x: Tensor) -> Tensor:
        """[B, N, C]: the final tokens at their original positions, early exits elsewhere."""
        if self.out is None:
            return x
        out = self.out.clone()
        for b in range(x.shape[0]):
            for j in range(x.shape[1]):
                p = self.position[b, j].item()
                if p >= 0:
                    out[b, p] = x[b, j]
        return out


def scores_from(opts: PruneOptions, q: Optional[Tensor], k: Optional[Tensor], scale: float,
                bias: Optional[Tensor], x_in: Tensor, x_out: Tensor) -> Optional[Tensor]:
    """[B, N] scores of the tokens at the cut (None for 'diversity', which selects directly)."""
    n = x_in.shape[1]
    if opts.score == "cls":
        return attention_probs(q, k, scale, bias, [0])
    if opts.score == "query":
        if opts.query is None:
            rows = [n - 1]
        elif isinstance(opts.query, int):  # the last M tokens
            rows = list(range(n - opts.query, n))
        else:
            rows = list(range(n)[slice(*opts.query)])
        return attention_probs(q, k, scale, bias, rows)
    if opts.score == "transition":
        return transition_scores(x_in, x_out)
    if opts.score == "random":
        return random_scores(n, opts.seed).expand(x_in.shape[0], n)
    return None


def window_means(scores: Tensor, size: int) -> Tensor:
    """scores [B, N] -> [B, N]: entry i is the mean of the entries i - size // 2 .. i + size // 2
    that exist (a plain loop over the positions)."""
    half, n = size // 2, scores.shape[1]
    return torch.stack([scores[:, max(0, i - half):min(n, i + half + 1)].mean(dim=1) for i in range(n)], dim=1)


def padding_keys(bias: Optional[Tensor], batch: int, n: int) -> Tensor:
    """[B, N] bool: keys that no query may attend under the additive mask ``bias`` (padding; a
    causal mask has none)."""
    if bias is None:
        return torch.zeros(batch, n, dtype=torch.bool)
    blocked = bias.expand(batch, bias.shape[1], bias.shape[2], n) <= negative(bias.dtype) / 2
    return blocked.all(dim=2).all(dim=1)


def plan_cut(opts: PruneOptions, cut_number: int, protected: int, layers: list) -> Cut:
    """Scores and selection of the cut ``cut_number`` made after the last block of ``layers``: one
    (q, k, scale, bias, x_in, x_out) per block since the previous cut (x_in/x_out [B, N, C]: the
    block's input and output). ``opts.accumulate`` > 1 combines the scores of that many blocks:
    attention scores are averaged, transitions summed (TransPrune's accumulated TTV).

    Padding is pruned first by the scorers that do not read the attention (transition, random):
    their padding scores are -inf (the pass's rule, beyond /tmp/prune_spec.md: a padding token's
    state moves a lot across a block, and a random ranking would keep some). The attention
    scorers give padding keys zero attention anyway, unless ``opts.pool`` > 1 averages a padding
    key with its real neighbours: pooled scores put padding at -inf too. Diversity selects as it is.
    """
    assert len(layers) >= opts.accumulate, (len(layers), opts.accumulate)
    _, _, _, bias, x_in, x_out = layers[-1]
    n = x_in.shape[1]
    prunable = prunable_positions(n, protected, opts.range, opts.protect_last)
    count = kept_count(opts.keep[cut_number], len(prunable))
    per_block = [scores_from(opts, *layer) for layer in layers[len(layers) - opts.accumulate:]]
    scores = per_block[0]
    for more in per_block[1:]:
        scores = scores + more
    if scores is not None and opts.score in ("cls", "query"):
        scores = scores / len(per_block)
    if opts.pool > 1:
        scores = window_means(scores.float(), opts.pool)
    if opts.score in ("transition", "random") or opts.pool > 1:
        scores = scores.masked_fill(padding_keys(bias, x_in.shape[0], n), -math.inf)
    return select(scores, x_out, prunable, count, opts)


# ----------------------------------------------------------------------------- heads helpers

def split_heads(t: Tensor, head_dim: int) -> Tensor:
    """[B, N, H*D] -> [B, H, N, D]."""
    return t.reshape(t.shape[0], t.shape[1], -1, head_dim).transpose(1, 2)


def rotate(t: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding (half-split convention) of t [B, H, N, D] with cos/sin [B, N, R]: the first
    R <= D dims turn (partial rotary, as Phi's), the rest pass through."""
    rot, rest = t[..., :cos.shape[-1]], t[..., cos.shape[-1]:]
    half = rot.shape[-1] // 2
    turned = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    return torch.cat([rot * cos[:, None] + turned * sin[:, None], rest], dim=-1)


def negative(dtype) -> float:
    return torch.finfo(dtype).min


# ----------------------------------------------------------------------------- timm ViT

def timm_vit_features(model, images: Tensor, opts: Optional[PruneOptions], log: Optional[list] = None) -> Tensor:
    """Pruned timm ``forward_features``: [B, N, C] after the final norm (pruned tokens restored).

    The protected tokens are the model's prefix tokens (class, distillation, registers). ``log``
    (a list) receives each :class:`Cut`.
    """
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    exits = Exits(x.shape[0], x.shape[1])
    cuts = {} if opts is None else {at: i for i, at in enumerate(opts.at)}
    layers = []  # (q, k, scale, bias, x_in, x_out) of the blocks since the last cut
    for index, block in enumerate(model.blocks):
        x_in = x
        x = block(x)
        attn = block.attn
        qkv = attn.qkv(block.norm1(x_in)).reshape(x.shape[0], x.shape[1], 3, attn.num_heads, -1)
        q, k = qkv.permute(2, 0, 3, 1, 4)[:2]
        layers.append((attn.q_norm(q), attn.k_norm(k), attn.scale, None, x_in, x))
        if index in cuts:
            cut = plan_cut(opts, cuts[index], model.num_prefix_tokens, layers)
            if log is not None:
                log.append(cut)
            exits.cut(x, cut)
            x = apply_cut(x, cut)
            layers = []
    return model.norm(exits.restore(x))


def timm_eva_features(model, images: Tensor, opts: Optional[PruneOptions], log: Optional[list] = None) -> Tensor:
    """Pruned timm ``Eva.forward_features`` (EVA02: a rotary table [N - p, 2D] of the patch tokens
    after the p prefix tokens): every kept patch keeps its own rotary row, [N, C] after the norm."""
    from timm.layers import apply_rot_embed_cat

    x, table = model._pos_embed(model.patch_embed(images))
    x = model.norm_pre(x)
    p, batch, n = model.num_prefix_tokens, x.shape[0], x.shape[1]
    position = torch.arange(n).expand(batch, n).clone()
    exits = Exits(batch, n)
    cuts = {} if opts is None else {at: i for i, at in enumerate(opts.at)}
    layers = []
    for index, block in enumerate(model.blocks):
        rope = table[position[:, p:] - p][:, None]  # [B, 1, M - p, 2D]: the rows of the kept patches
        x_in, x = x, block(x, rope=rope)
        attn = block.attn
        h = block.norm1(x_in)
        bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)) if attn.q_bias is not None else None
        q, k, _ = F.linear(h, attn.qkv.weight, bias).reshape(batch, x.shape[1], 3, attn.num_heads, -1) \
            .permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = (torch.cat([t[:, :, :p], apply_rot_embed_cat(t[:, :, p:], rope)], dim=2) for t in (q, k))
        layers.append((q, k, attn.scale, None, x_in, x))
        if index in cuts:
            cut = plan_cut(opts, cuts[index], p, layers)
            if log is not None:
                log.append(cut)
            exits.cut(x, cut)
            x, position, layers = apply_cut(x, cut), position.gather(1, cut.kept), []
    return model.norm(exits.restore(x))


def timm_vit_forward(model, images: Tensor, opts: Optional[PruneOptions], log: Optional[list] = None) -> Tensor:
    """Pruned timm VisionTransformer: logits [B, classes]."""
    return model.forward_head(timm_vit_features(model, images, opts, log))


# ----------------------------------------------------------------------------- BERT

def hf_bert_forward(model, input_ids: Tensor, attention_mask: Optional[Tensor], opts: Optional[PruneOptions],
                    log: Optional[list] = None):
    """Pruned transformers BertModel (eval), with a padding mask.

    [CLS] (position 0, read by the pooler) is protected. Each kept token keeps its padding status:
    the additive key mask [B, 1, 1, N] is gathered with the tokens (a fused token takes the mask
    of its representative pruned token).
    -> BaseModelOutputWithPoolingAndCrossAttentions(last_hidden_state [B, N, C], pooler_output).
    """
    from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions

    x = model.embeddings(input_ids=input_ids)
    batch, n = x.shape[0], x.shape[1]
    if attention_mask is None:
        attention_mask = torch.ones(batch, n, dtype=torch.long)
    key_bias = torch.where(attention_mask.bool(), 0.0, negative(x.dtype)).to(x.dtype)  # [B, N]
    exits = Exits(batch, n)
    cuts = {} if opts is None else {at: i for i, at in enumerate(opts.at)}
    layers = []  # (q, k, scale, bias, x_in, x_out) of the blocks since the last cut
    for index, layer in enumerate(model.encoder.layer):
        x_in = x
        bias = key_bias[:, None, None, :]
        x = layer(x, attention_mask=bias)
        sa = layer.attention.self
        layers.append((split_heads(sa.query(x_in), sa.attention_head_size),
                       split_heads(sa.key(x_in), sa.attention_head_size), sa.scaling, bias, x_in, x))
        if index in cuts:
            cut = plan_cut(opts, cuts[index], 1, layers)
            if log is not None:
                log.append(cut)
            exits.cut(x, cut)
            x = apply_cut(x, cut)
            key_bias = key_bias.gather(1, cut.kept)
            layers = []
    sequence = exits.restore(x)
    pooled = None
    if model.pooler is not None:
        pooled = model.pooler.activation(model.pooler.dense(sequence[:, 0]))
    return BaseModelOutputWithPoolingAndCrossAttentions(last_hidden_state=sequence, pooler_output=pooled)


# ----------------------------------------------------------------------------- Llama / Qwen2

@dataclass
class DecoderResult:
    """logits [B, N, V]; cache: a transformers DynamicCache (layers <= last cut hold N tokens,
    later ones M); n: the prompt length N; kept: the original positions of the tokens each layer
    saw (per layer, [B, N_layer])."""

    logits: Tensor
    cache: object
    n: int
    kept: list = field(default_factory=list)


def causal_bias(position: Tensor, dtype) -> Tensor:
    """Additive causal mask [B, 1, M, M] between tokens at original positions ``position`` [B, M]:
    query i may read key j iff position[j] <= position[i]."""
    allowed = position[:, None, :] <= position[:, :, None]
    return torch.where(allowed, 0.0, negative(dtype)).to(dtype)[:, None]


def decoder_qk(layer, x_in: Tensor, cos: Tensor, sin: Tensor) -> tuple:
    """q [B, H, N, D] and k [B, Hkv, N, D] of a Llama/Qwen2/Phi decoder layer's attention, as its
    softmax reads them (q/k norms where the model has them, then rotary)."""
    attn = layer.self_attn
    h = layer.input_layernorm(x_in)
    q = split_heads(attn.q_proj(h), attn.head_dim)
    k = split_heads(attn.k_proj(h), attn.head_dim)
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    if getattr(attn, "q_layernorm", None) is not None:  # Phi's qk_layernorm, over each head's dims
        q, k = attn.q_layernorm(q), attn.k_layernorm(k)
    return rotate(q, cos, sin), rotate(k, cos, sin)


def final_norm(inner):
    """The decoder's norm after its last layer (Llama's ``norm``, Phi's ``final_layernorm``)."""
    return inner.norm if hasattr(inner, "norm") else inner.final_layernorm


def hf_decoder_forward(model, input_ids: Tensor, opts: Optional[PruneOptions], use_cache: bool = True,
                       log: Optional[list] = None) -> DecoderResult:
    """Pruned prefill of a transformers LlamaForCausalLM / Qwen2ForCausalLM / PhiForCausalLM (Phi's
    blocks are parallel-residual: the layer is run whole, as any other; no padding).

    Every kept token keeps its original position: its rotary angle and its causal mask row are
    those of that position. The cache is the model's own DynamicCache, filled by the layers.
    """
    from transformers import DynamicCache

    inner = model.model
    x = inner.embed_tokens(input_ids)
    batch, n = x.shape[0], x.shape[1]
    cache = DynamicCache(config=model.config) if use_cache else None
    position = torch.arange(n).expand(batch, n).clone()
    exits = Exits(batch, n)
    cuts = {} if opts is None else {at: i for i, at in enumerate(opts.at)}
    seen = []
    layers = []  # (q, k, scale, bias, x_in, x_out) of the blocks since the last cut
    for index, layer in enumerate(inner.layers):
        x_in = x
        cos, sin = inner.rotary_emb(x, position_ids=position)
        bias = causal_bias(position, x.dtype)
        seen.append(position)
        x = layer(x, attention_mask=bias, position_ids=position, **cache_argument(layer, cache), use_cache=use_cache,
                  position_embeddings=(cos, sin))
        layers.append((*decoder_qk(layer, x_in, cos, sin), layer.self_attn.scaling, bias, x_in, x))
        if index in cuts:
            cut = plan_cut(opts, cuts[index], 0, layers)
            if log is not None:
                log.append(cut)
            assert not cut.fused, "fuse is not defined for causal models"
            exits.cut(x, cut)
            x = apply_cut(x, cut)
            position = position.gather(1, cut.kept)
            layers = []
    logits = model.lm_head(final_norm(inner)(exits.restore(x)))
    return DecoderResult(logits, cache, n, seen)


def hf_opt_forward(model, input_ids: Tensor, opts: Optional[PruneOptions], log: Optional[list] = None) -> Tensor:
    """Pruned prefill of a transformers OPTForCausalLM (pre-norm; learned absolute positions added
    once at the embedding, so a kept token carries its position in its state): logits [B, N, V].
    The layers run whole on the kept tokens, with the causal mask of their original positions."""
    inner = model.model.decoder
    batch, n = input_ids.shape
    position = torch.arange(n).expand(batch, n).clone()
    table = inner.embed_positions
    x = inner.embed_tokens(input_ids) + table.weight[position + table.offset]
    if inner.project_in is not None:
        x = inner.project_in(x)
    exits = Exits(batch, n)
    cuts = {} if opts is None else {at: i for i, at in enumerate(opts.at)}
    layers = []
    for index, layer in enumerate(inner.layers):
        x_in, bias = x, causal_bias(position, x.dtype)
        out = layer(x, attention_mask=bias, position_ids=position)
        x = out[0] if isinstance(out, tuple) else out
        attn, h = layer.self_attn, layer.self_attn_layer_norm(x_in)
        head_dim = attn.head_dim
        layers.append((split_heads(attn.q_proj(h), head_dim), split_heads(attn.k_proj(h), head_dim), attn.scaling,
                       bias, x_in, x))
        if index in cuts:
            cut = plan_cut(opts, cuts[index], 0, layers)
            if log is not None:
                log.append(cut)
            exits.cut(x, cut)
            x, position, layers = apply_cut(x, cut), position.gather(1, cut.kept), []
    x = exits.restore(x)
    if inner.final_layer_norm is not None:
        x = inner.final_layer_norm(x)
    if inner.project_out is not None:
        x = inner.project_out(x)
    return model.lm_head(x)


def hf_decoder_step(model, token: Tensor, cache, position: int) -> Tensor:
    """One decode step on a (pruned) cache: token [B, 1] at ``position``; it reads every cached
    token of each layer (N in early layers, M in later ones). Appends to the cache. -> [B, 1, V]."""
    inner = model.model
    x = inner.embed_tokens(token)
    ids = torch.full((token.shape[0], 1), position, dtype=torch.long)
    cos, sin = inner.rotary_emb(x, position_ids=ids)
    for layer in inner.layers:
        # No mask: a single query at the newest position may read every cached token.
        x = layer(x, attention_mask=None, position_ids=ids, **cache_argument(layer, cache), use_cache=True,
                  position_embeddings=(cos, sin))
    return model.lm_head(final_norm(inner)(x))


def hf_decoder_generate(model, input_ids: Tensor, opts: Optional[PruneOptions], steps: int,
                        log: Optional[list] = None) -> tuple:
    """Pruned prefill then ``steps`` greedy decode steps.

    -> (prefill logits [B, N, V], [step logits [B, 1, V]] * steps, tokens [B, steps] generated,
    the final cache).
    """
    result = hf_decoder_forward(model, input_ids, opts, use_cache=True, log=log)
    token = result.logits[:, -1:].argmax(-1)
    step_logits, tokens = [], []
    for step in range(steps):
        tokens.append(token)
        logits = hf_decoder_step(model, token, result.cache, result.n + step)
        step_logits.append(logits)
        token = logits[:, -1:].argmax(-1)
    return result.logits, step_logits, torch.cat(tokens, dim=1), result.cache


# ----------------------------------------------------------------------------- dispatch

def reference_forward(zm, opts: Optional[PruneOptions], log: Optional[list] = None):
    """The reference for a zoo entry on its example inputs, without autograd (``opts`` None: dense).

    timm ViTs -> logits; BERT -> BaseModelOutputWithPoolingAndCrossAttentions; Llama/Qwen2 ->
    DecoderResult (logits and, where the entry asks for it, the cache). ``log`` receives the cuts.
    """
    name = zm.name
    with torch.no_grad():
        if name.startswith("timm_vit") or name.startswith("timm_deit"):
            return timm_vit_forward(zm.model, zm.args[0], opts, log)
        if name.startswith("hf_bert"):
            return hf_bert_forward(zm.model, zm.kwargs["input_ids"], zm.kwargs.get("attention_mask"), opts, log)
        if name.startswith("hf_llama") or name.startswith("hf_qwen2"):
            return hf_decoder_forward(zm.model, zm.kwargs["input_ids"], opts,
                                      use_cache=bool(zm.kwargs.get("use_cache")), log=log)
    raise ValueError(f"no pruning reference for zoo entry {name!r}")
