"""Token merging (ToMe) written out in plain PyTorch over a model's own submodules and weights.

This is the independent reference the merge pass (tokred/passes/merge.py) is compared with
(DESIGN.md invariant 3). It is written from the method's description, not from tokred's code, and
in a deliberately different style: the matching and merging of one sample are Python loops over
token indices, so that every rule (alternate split, ties, stable order, size-weighted means, new
token order) is spelled out once and is easy to check by reading.

Global mode (ToMe), per transformer block:

    x = x + attn(norm(x))                              # logits + log(size) of each key (prop_attn)
    x = merge(x, metric = keys of this attention averaged over heads, r)
    x = x + mlp(norm(x))

after the last block every original position takes the value of the token it was merged into
(unmerge), then the model's final norm / pooler / head run on the original N tokens.

Local mode (tomesd), per block: the input of each branch (attention, MLP) is merged with the
branch input itself as metric and sizes 1 (plain means), the branch runs on the merged tokens, and
its output is unmerged before the residual add; the residual stream keeps all N tokens.

Forward functions: :func:`timm_vit_forward` (timm VisionTransformer and its distilled DeiT),
:func:`hf_vit_forward` (transformers ViTModel), :func:`hf_bert_forward` (transformers BertModel,
with padding) and :func:`timm_vit_local_forward` (tomesd on timm). Each returns what the model
returns (a tensor or the transformers output class), plus a :class:`MergeTracker` that records
which original tokens ended up together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor


# ----------------------------------------------------------------------------- one merge step

@dataclass
class MergeStep:
    """The result of merging the tokens of one sample.

    x:     [M, C] the new tokens
    size:  [M] how many original tokens each new token stands for
    dest:  list of N ints: for each token before the merge, the index of its new token
    rep:   list of M ints: for each new token, the token before the merge it keeps the place (and
           the padding status) of: its B token for a merged token, itself otherwise
    """

    x: Tensor
    size: Tensor
    dest: list
    rep: list


def first_argmax(row: Sequence[float]) -> int:
    """Index of the largest value; the lowest index among equal maxima (all -inf: index 0)."""
    best = 0
    for j in range(1, len(row)):
        if row[j] > row[best]:
            best = j
    return best


def bipartite_merge(x: Tensor, metric: Tensor, size: Tensor, padded: Tensor, r: int,
                    protected: int) -> MergeStep:
    """Merge ``r`` tokens of one sample by bipartite soft matching.

    x [N, C], metric [N, D], size [N] (float), padded [N] bool.

    The first ``protected`` tokens are set aside. The others are split alternately: set A takes
    the even offsets after the protected tokens, set B the odd ones. Scores are the cosine
    similarities of the metric rows, -inf between tokens of different padding status. Each A token
    takes its best B token; the A tokens are ordered by their best score, descending, ties keeping
    A order; the first ``r`` are merged into their B tokens (size-weighted means), the rest stay.
    New order: protected tokens, unmerged A tokens in A order, B tokens in B order. ``r`` is capped
    at half the unprotected tokens.
    """
    n = x.shape[0]
    r = min(r, (n - protected) // 2)
    a = list(range(protected, n, 2))
    b = list(range(protected + 1, n, 2))
    unit = metric.double() / metric.double().norm(dim=-1, keepdim=True)
    sims = (unit @ unit.T).tolist()  # [N, N] cosine similarities
    best_b, best_score = [], []
    for i in a:
        row = [sims[i][j] if bool(padded[i]) == bool(padded[j]) else float("-inf") for j in b]
        k = first_argmax(row)
        best_b.append(k)
        best_score.append(row[k])
    order = sorted(range(len(a)), key=lambda ai: -best_score[ai])  # sorted() is stable
    merged_a = set(order[:r])
    kept_a = [ai for ai in range(len(a)) if ai not in merged_a]

    rep = list(range(protected)) + [a[ai] for ai in kept_a] + b
    new_index = {token: m for m, token in enumerate(rep)}
    dest = [new_index.get(token) for token in range(n)]
    for ai in merged_a:
        dest[a[ai]] = new_index[b[best_b[ai]]]

    rows, sizes = [], []
    for m, token in enumerate(rep):
        members = [t for t in range(n) if dest[t] == m]
        if members == [token]:
            rows.append(x[token])  # a token nothing merged into keeps its exact value
            sizes.append(size[token])
            continue
        weights = size[members]
        rows.append((x[members] * weights[:, None]).sum(dim=0) / weights.sum())
        sizes.append(weights.sum())
    return MergeStep(x=torch.stack(rows), size=torch.stack(sizes), dest=dest, rep=rep)


def merge_batch(x: Tensor, metric: Tensor, size: Tensor, padded: Tensor, r: int, protected: int):
    """:func:`bipartite_merge` for every sample of a batch; all samples keep the same count M.

    x [B, N, C], metric [B, N, D], size [B, N], padded [B, N] -> (x [B, M, C], size [B, M],
    dest [B, N] int64, rep [B, M] int64).
    """
    steps = [bipartite_merge(x[i], metric[i], size[i], padded[i], r, protected) for i in range(x.shape[0])]
    return (torch.stack([s.x for s in steps]), torch.stack([s.size for s in steps]),
            torch.tensor([s.dest for s in steps]), torch.tensor([s.rep for s in steps]))


def unmerge(x: Tensor, dest: Tensor) -> Tensor:
    """x [B, M, C], dest [B, N] (new token of each position) -> [B, N, C]."""
    return torch.stack([x[i, dest[i]] for i in range(x.shape[0])])


# ----------------------------------------------------------------------------- state of a forward

class MergeTracker:
    """Per-sample bookkeeping of a ToMe forward.

    size [B, M] float (tokens each current token stands for), padded [B, M] bool (padding status
    of each current token), where [B, N0] (the current token each original position is in),
    r_done (the r applied at each block, after the cap).
    """

    def __init__(self, batch: int, n: int, padded: Optional[Tensor] = None):
        self.size = torch.ones(batch, n)
        self.padded = torch.zeros(batch, n, dtype=torch.bool) if padded is None else padded.clone()
        self.padded_original = self.padded.clone()
        self.has_padding = padded is not None
        self.where = torch.arange(n).repeat(batch, 1)
        self.r_done: list = []

    def key_bias(self, prop_attn: bool, dtype: torch.dtype) -> Tensor:
        """Additive attention bias over keys [B, 1, 1, M]: padding mask, plus log(size) if asked."""
        bias = torch.zeros(self.size.shape, dtype=dtype)
        if self.has_padding:
            bias = bias.masked_fill(self.padded, torch.finfo(dtype).min)
        if prop_attn:
            bias = bias + self.size.log().to(dtype)
        return bias[:, None, None, :]

    def merge(self, x: Tensor, metric: Tensor, r: int, protected: int) -> Tensor:
        """Merge ``r`` tokens of x [B, M, C] (metric [B, M, D]) -> [B, M - r', C]; update the state."""
        r_eff = min(r, (x.shape[1] - protected) // 2)
        self.r_done.append(r_eff)
        if r_eff <= 0:
            return x
        x, self.size, dest, rep = merge_batch(x, metric, self.size, self.padded, r_eff, protected)
        self.padded = self.padded.gather(1, rep)
        self.where = dest.gather(1, self.where)
        return x

    def unmerge(self, x: Tensor) -> Tensor:
        """x [B, M, C] -> [B, N0, C]: each original position takes its token's value."""
        return unmerge(x, self.where)

    def groups(self, sample: int) -> list:
        """The original positions in each current token of ``sample``: a list of M lists."""
        where = self.where[sample].tolist()
        return [[p for p, m in enumerate(where) if m == k] for k in range(int(self.size.shape[1]))]


def decreasing_schedule(r: int, depth: int) -> list:
    """r per block falling linearly from 2r (first block) to 0 (last): the same total as r per block."""
    if depth == 1:
        return [r]
    return [int(round(2 * r * (depth - 1 - i) / (depth - 1))) for i in range(depth)]


def per_block(r, depth: int) -> list:
    """r as a list with one value per block (an int is used in every block)."""
    rs = list(r) if isinstance(r, (list, tuple)) else [r] * depth
    assert len(rs) == depth, (rs, depth)
    return rs


# ----------------------------------------------------------------------------- attention

def attention(q: Tensor, k: Tensor, v: Tensor, scale: float, bias: Tensor) -> Tensor:
    """softmax(q k^T * scale + bias) v; q, k, v [B, H, N, D], bias [B, 1, 1, N] -> [B, H, N, D]."""
    logits = (q * scale) @ k.transpose(-2, -1) + bias
    return logits.softmax(dim=-1) @ v


def split_heads(t: Tensor, heads: int) -> Tensor:
    """[B, N, H*D] -> [B, H, N, D]."""
    b, n, _ = t.shape
    return t.reshape(b, n, heads, -1).transpose(1, 2)


def join_heads(t: Tensor) -> Tensor:
    """[B, H, N, D] -> [B, N, H*D]."""
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def timm_attention(attn, x: Tensor, bias: Tensor):
    """timm ``Attention`` on x [B, N, C] with an additive key bias -> (out [B, N, C], keys [B, H, N, D])."""
    b, n, _ = x.shape
    qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = attention(q, k, v, attn.scale, bias)
    return attn.proj(attn.norm(join_heads(out))), k


def hf_separate_qkv_attention(q_proj, k_proj, v_proj, heads: int, scale: float, x: Tensor, bias: Tensor):
    """Attention with separate q/k/v linears on x [B, N, C] -> (context [B, N, C], keys [B, H, N, D])."""
    q, k, v = (split_heads(proj(x), heads) for proj in (q_proj, k_proj, v_proj))
    return join_heads(attention(q, k, v, scale, bias)), k


# ----------------------------------------------------------------------------- timm ViT

def timm_embed(model, images: Tensor) -> Tensor:
    """Patch embedding, class/distillation tokens and position embedding: [B, N, C]."""
    x = model.patch_embed(images)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    return model.norm_pre(x)


def timm_head(model, x: Tensor) -> Tensor:
    """timm's head in eval: class token pooling (distilled: mean of the class and distillation heads)."""
    if hasattr(model, "head_dist"):
        return (model.head(model.head_drop(x[:, 0])) + model.head_dist(model.head_drop(x[:, 1]))) / 2
    assert model.global_pool == "token" and model.attn_pool is None, model.global_pool
    return model.head(model.head_drop(model.fc_norm(x[:, 0])))


def timm_vit_forward(model, images: Tensor, r=0, prop_attn: bool = True):
    """ToMe on a timm VisionTransformer (eval): (logits [B, classes], tracker).

    ``r``: an int for every block or a list with one value per block.
    """
    features, tracker = timm_vit_features(model, images, r, prop_attn)
    return timm_head(model, features), tracker


def timm_vit_features(model, images: Tensor, r=0, prop_attn: bool = True):
    """ToMe on timm's ``forward_features`` (blocks, unmerge, final norm): ([B, N, C], tracker).

    The protected tokens are the model's prefix tokens (class, distillation).
    """
    x = timm_embed(model, images)
    protected = model.num_prefix_tokens
    tracker = MergeTracker(x.shape[0], x.shape[1])
    for block, r_block in zip(model.blocks, per_block(r, len(model.blocks))):
        attn_out, keys = timm_attention(block.attn, block.norm1(x), tracker.key_bias(prop_attn, x.dtype))
        x = x + block.ls1(attn_out)  # drop_path is the identity in eval
        x = tracker.merge(x, keys.mean(dim=1), r_block, protected)
        x = x + block.ls2(block.mlp(block.norm2(x)))
    return model.norm(tracker.unmerge(x)), tracker


def timm_vit_local_forward(model, images: Tensor, r=0):
    """tomesd on a timm VisionTransformer: merge each branch input (metric: itself, sizes 1), run
    the branch on the merged tokens, unmerge its output before the residual add. -> logits."""
    x = timm_embed(model, images)
    protected = model.num_prefix_tokens
    batch, n = x.shape[0], x.shape[1]
    no_bias = torch.zeros(batch, 1, 1, 1, dtype=x.dtype)

    def branch(h: Tensor, run, r_block: int) -> Tensor:
        r_eff = min(r_block, (h.shape[1] - protected) // 2)
        if r_eff <= 0:
            return run(h)
        ones, not_padded = torch.ones(batch, n), torch.zeros(batch, n, dtype=torch.bool)
        merged, _, dest, _ = merge_batch(h, h, ones, not_padded, r_eff, protected)
        return unmerge(run(merged), dest)

    for block, r_block in zip(model.blocks, per_block(r, len(model.blocks))):
        x = x + block.ls1(branch(block.norm1(x), lambda h: timm_attention(block.attn, h, no_bias)[0], r_block))
        x = x + block.ls2(branch(block.norm2(x), block.mlp, r_block))
    return timm_head(model, model.norm(x))


# ----------------------------------------------------------------------------- transformers ViT

def hf_vit_forward(model, pixel_values: Tensor, r=0, prop_attn: bool = True):
    """ToMe on a transformers ViTModel (eval; pre-norm layers at ``model.layers``).

    -> (BaseModelOutputWithPooling(last_hidden_state [B, N, C], pooler_output [B, C]), tracker).
    """
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    x = model.embeddings(pixel_values)
    tracker = MergeTracker(x.shape[0], x.shape[1])
    for layer, r_block in zip(model.layers, per_block(r, len(model.layers))):
        att = layer.attention
        context, keys = hf_separate_qkv_attention(att.q_proj, att.k_proj, att.v_proj, att.num_attention_heads,
                                                  att.scaling, layer.layernorm_before(x),
                                                  tracker.key_bias(prop_attn, x.dtype))
        x = x + att.o_proj(context)  # the layer's dropout is the identity in eval
        x = tracker.merge(x, keys.mean(dim=1), r_block, protected=1)  # the class token
        x = x + layer.mlp(layer.layernorm_after(x))
    sequence = model.layernorm(tracker.unmerge(x))
    pooled = None
    if model.pooler is not None:
        pooled = model.pooler.activation(model.pooler.dense(sequence[:, 0]))
    return BaseModelOutputWithPooling(last_hidden_state=sequence, pooler_output=pooled), tracker


# ----------------------------------------------------------------------------- transformers BERT

def hf_bert_forward(model, input_ids: Tensor, attention_mask: Optional[Tensor] = None, r=0,
                    prop_attn: bool = True):
    """ToMe on a transformers BertModel (eval; post-norm layers), with a padding mask.

    The merge runs on the stream after the attention sub-layer's LayerNorm; [CLS] (position 0,
    read by the pooler) is protected; padded and real tokens never merge; later layers mask the
    keys that are padding (a merged token is padding if its B token is).
    -> (BaseModelOutputWithPoolingAndCrossAttentions(last_hidden_state, pooler_output), tracker).
    """
    from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions

    x = model.embeddings(input_ids=input_ids)
    padded = None if attention_mask is None else attention_mask == 0
    tracker = MergeTracker(x.shape[0], x.shape[1], padded)
    layers = model.encoder.layer
    for layer, r_block in zip(layers, per_block(r, len(layers))):
        sa, so = layer.attention.self, layer.attention.output
        context, keys = hf_separate_qkv_attention(sa.query, sa.key, sa.value, sa.num_attention_heads, sa.scaling,
                                                  x, tracker.key_bias(prop_attn, x.dtype))
        x = so.LayerNorm(so.dense(context) + x)  # dropouts are the identity in eval
        x = tracker.merge(x, keys.mean(dim=1), r_block, protected=1)  # [CLS]
        x = layer.output.LayerNorm(layer.output.dense(layer.intermediate(x)) + x)
    sequence = tracker.unmerge(x)
    pooled = None
    if model.pooler is not None:
        pooled = model.pooler.activation(model.pooler.dense(sequence[:, 0]))
    return BaseModelOutputWithPoolingAndCrossAttentions(last_hidden_state=sequence, pooler_output=pooled), tracker


# ----------------------------------------------------------------------------- dispatch

def reference_forward(zm, r=0, prop_attn: bool = True, mode: str = "global"):
    """The reference for a zoo entry on its example inputs, without autograd: (output, tracker).

    ``mode="local"`` (tomesd) is written for timm ViTs only; it returns no tracker (None).
    """
    name = zm.name
    with torch.no_grad():
        if mode == "local":
            assert name.startswith("timm_vit") or name.startswith("timm_deit"), name
            return timm_vit_local_forward(zm.model, zm.args[0], r), None
        if name.startswith("timm_vit") or name.startswith("timm_deit"):
            return timm_vit_forward(zm.model, zm.args[0], r, prop_attn)
        if name.startswith("hf_vit"):
            return hf_vit_forward(zm.model, zm.kwargs["pixel_values"], r, prop_attn)
        if name.startswith("hf_bert"):
            return hf_bert_forward(zm.model, zm.kwargs["input_ids"], zm.kwargs.get("attention_mask"), r, prop_attn)
    raise ValueError(f"no ToMe reference for zoo entry {name!r}")
