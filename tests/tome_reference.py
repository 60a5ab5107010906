"""Token merging (ToMe) written out in plain PyTorch over a model's own submodules and weights.

This is the independent reference the merge pass (tokred/passes/merge.py) is compared with
(ARCHITECTURE.md invariant 3). It is written from the method's description, not from tokred's code, and
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

Protected tokens (``protect``): "tome" (default) is ToMe's own partition, A/B over all tokens with
-inf scores for the protected ones (:func:`tome_partition_merge`); "set_aside" takes them out before
the split (:func:`set_aside_merge`). :func:`tome_code_merge` / :func:`timm_tome_patch_forward` are
ToMe's batched code and timm patch transcribed step for step, to check the "tome" loops against.

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
import torch.nn.functional as F
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
                    protected: int, protect: str = "tome") -> MergeStep:
    """Merge ``r`` tokens of one sample by bipartite soft matching; the first ``protected`` tokens
    are never merged, kept out of the matching as ``protect`` says ("tome" or "set_aside").

    x [N, C], metric [N, D], size [N] (float), padded [N] bool. ``r`` is capped at half the
    unprotected tokens.
    """
    if protect == "tome":
        return tome_partition_merge(x, metric, size, padded, r, protected)
    assert protect == "set_aside", protect
    return set_aside_merge(x, metric, size, padded, r, protected)


def cosine_table(metric: Tensor) -> list:
    """[N, N] cosine similarities of the metric rows, in float64, as nested lists."""
    unit = metric.double() / metric.double().norm(dim=-1, keepdim=True)
    return (unit @ unit.T).tolist()


def tome_partition_merge(x: Tensor, metric: Tensor, size: Tensor, padded: Tensor, r: int,
                         protected: int) -> MergeStep:
    """ToMe's own partition (facebookresearch/ToMe, ``bipartite_soft_matching``), per sample.

    Set A takes the even positions of *all* tokens, B the odd ones. A protected token in A gets a
    row of -inf scores (ToMe's class token), a protected B token a column of -inf (ToMe's
    distillation token); scores between tokens of different padding status are -inf too. Each A
    token takes its best B token (lowest B on ties); an A token with no finite score takes the
    first unprotected B token (ToMe has no padding; this way a protected token is never a
    destination). The A tokens are ranked by best score, descending, ties keeping A order, the
    protected ones last; the first ``r`` are merged. Kept A tokens: in A order if any token is
    protected (ToMe sorts them back when it has a class token), else in rank order. New order:
    the protected tokens in their order (ToMe's ``[class, dist, ...]``), the other kept A tokens,
    the other B tokens.
    """
    n = x.shape[0]
    r = min(r, (n - protected) // 2)
    a, b = list(range(0, n, 2)), list(range(1, n, 2))
    sims = cosine_table(metric)
    first_free_b = next(k for k, t in enumerate(b) if t >= protected) if r > 0 else 0
    best_b, best_score = [], []
    for i in a:
        row = [sims[i][j] if i >= protected and j >= protected and bool(padded[i]) == bool(padded[j])
               else float("-inf") for j in b]
        k = first_argmax(row)
        best_b.append(k if row[k] > float("-inf") else first_free_b)
        best_score.append(row[k])
    # sorted() is stable: equal keys keep A order
    order = sorted(range(len(a)), key=lambda ai: (a[ai] < protected, -best_score[ai]))
    kept_a = sorted(order[r:]) if protected else order[r:]
    kept_tokens = [a[ai] for ai in kept_a]
    rep = (list(range(protected)) + [t for t in kept_tokens if t >= protected] + [t for t in b if t >= protected])
    return assemble(x, size, rep, {a[ai]: b[best_b[ai]] for ai in order[:r]})


def set_aside_merge(x: Tensor, metric: Tensor, size: Tensor, padded: Tensor, r: int,
                    protected: int) -> MergeStep:
    """tokred's ``protect="set_aside"`` variant, per sample.

    The first ``protected`` tokens are set aside. The others are split alternately: set A takes
    the even offsets after the protected tokens, set B the odd ones. Scores are the cosine
    similarities of the metric rows, -inf between tokens of different padding status. Each A token
    takes its best B token; the A tokens are ordered by their best score, descending, ties keeping
    A order; the first ``r`` are merged into their B tokens (size-weighted means), the rest stay.
    New order: protected tokens, unmerged A tokens in A order, B tokens in B order.
    """
    n = x.shape[0]
    r = min(r, (n - protected) // 2)
    a = list(range(protected, n, 2))
    b = list(range(protected + 1, n, 2))
    sims = cosine_table(metric)
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
    return assemble(x, size, rep, {a[ai]: b[best_b[ai]] for ai in merged_a})


def assemble(x: Tensor, size: Tensor, rep: list, merged_into: dict) -> MergeStep:
    """The new tokens of one sample: ``rep`` lists the tokens that stay, in their new order;
    ``merged_into`` maps each merged token to the token it joins. Size-weighted means."""
    n = x.shape[0]
    new_index = {token: m for m, token in enumerate(rep)}
    dest = [new_index.get(token) for token in range(n)]
    for token, into in merged_into.items():
        dest[token] = new_index[into]
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


def tome_code_merge(x: Tensor, metric: Tensor, size: Optional[Tensor], r: int, class_token: bool,
                    distill_token: bool):
    """ToMe's batched ``bipartite_soft_matching`` + ``merge_wavg``, step for step as its code does it.

    x [B, N, C], metric [B, N, D], size [B, N, 1] or None -> (x [B, M, C], size [B, M, 1]).
    -inf score rows for the class token (A row 0) and columns for the distillation token (B row 0);
    A ranked by best score (argsort, descending; stable here, ToMe's is not); kept A sorted back to
    A order when there is a class token; sums of size-weighted tokens scattered into B, divided
    by the summed sizes; output [kept A, B], with the distillation token (B row 0) moved to
    position 1. No padding rule (ToMe has none).
    """
    batch, n, c = x.shape
    r = min(r, (n - int(class_token) - int(distill_token)) // 2)
    size = torch.ones(batch, n, 1) if size is None else size
    if r <= 0:
        return x, size
    unit = metric / metric.norm(dim=-1, keepdim=True)
    scores = unit[:, 0::2] @ unit[:, 1::2].transpose(1, 2)
    if class_token:
        scores[:, 0, :] = float("-inf")
    if distill_token:
        scores[:, :, 0] = float("-inf")
    node_max, node_idx = scores.max(dim=-1)
    ranked = node_max.argsort(dim=-1, descending=True, stable=True)
    src, unm = ranked[:, :r], ranked[:, r:]
    dst = node_idx.gather(1, src)
    if class_token:
        unm = unm.sort(dim=1).values

    def merge_sum(t: Tensor) -> Tensor:
        a, b = t[:, 0::2], t[:, 1::2]
        width = t.shape[-1]
        kept = a.gather(1, unm[..., None].expand(-1, -1, width))
        b = b.scatter_add(1, dst[..., None].expand(-1, -1, width), a.gather(1, src[..., None].expand(-1, -1, width)))
        if distill_token:
            return torch.cat([kept[:, :1], b[:, :1], kept[:, 1:], b[:, 1:]], dim=1)
        return torch.cat([kept, b], dim=1)

    total = merge_sum(size)
    return merge_sum(x * size) / total, total


def merge_batch(x: Tensor, metric: Tensor, size: Tensor, padded: Tensor, r: int, protected: int,
                protect: str = "tome"):
    """:func:`bipartite_merge` for every sample of a batch; all samples keep the same count M.

    x [B, N, C], metric [B, N, D], size [B, N], padded [B, N] -> (x [B, M, C], size [B, M],
    dest [B, N] int64, rep [B, M] int64).
    """
    steps = [bipartite_merge(x[i], metric[i], size[i], padded[i], r, protected, protect) for i in range(x.shape[0])]
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
        self.position = torch.arange(n).repeat(batch, 1)  # the original position of each token's representative
        self.r_done: list = []

    def key_bias(self, prop_attn: bool, dtype: torch.dtype) -> Tensor:
        """Additive attention bias over keys [B, 1, 1, M]: padding mask, plus log(size) if asked."""
        bias = torch.zeros(self.size.shape, dtype=dtype)
        if self.has_padding:
            bias = bias.masked_fill(self.padded, torch.finfo(dtype).min)
        if prop_attn:
            bias = bias + self.size.log().to(dtype)
        return bias[:, None, None, :]

    def merge(self, x: Tensor, metric: Tensor, r: int, protected: int, protect: str = "tome") -> Tensor:
        """Merge ``r`` tokens of x [B, M, C] (metric [B, M, D]) -> [B, M - r', C]; update the state."""
        r_eff = min(r, (x.shape[1] - protected) // 2)
        self.r_done.append(r_eff)
        if r_eff <= 0:
            return x
        x, self.size, dest, rep = merge_batch(x, metric, self.size, self.padded, r_eff, protected, protect)
        self.padded = self.padded.gather(1, rep)
        self.position = self.position.gather(1, rep)
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


def timm_vit_forward(model, images: Tensor, r=0, prop_attn: bool = True, protect: str = "tome"):
    """ToMe on a timm VisionTransformer (eval): (logits [B, classes], tracker).

    ``r``: an int for every block or a list with one value per block.
    """
    features, tracker = timm_vit_features(model, images, r, prop_attn, protect)
    return timm_head(model, features), tracker


def timm_vit_features(model, images: Tensor, r=0, prop_attn: bool = True, protect: str = "tome"):
    """ToMe on timm's ``forward_features`` (blocks, unmerge, final norm): ([B, N, C], tracker).

    The protected tokens are the model's prefix tokens (class, distillation).
    """
    x = timm_embed(model, images)
    protected = model.num_prefix_tokens
    tracker = MergeTracker(x.shape[0], x.shape[1])
    for block, r_block in zip(model.blocks, per_block(r, len(model.blocks))):
        attn_out, keys = timm_attention(block.attn, block.norm1(x), tracker.key_bias(prop_attn, x.dtype))
        x = x + block.ls1(attn_out)  # drop_path is the identity in eval
        x = tracker.merge(x, keys.mean(dim=1), r_block, protected, protect)
        x = x + block.ls2(block.mlp(block.norm2(x)))
    return model.norm(tracker.unmerge(x)), tracker


def timm_parallel_vit_features(model, images: Tensor, r=0, prop_attn: bool = True, protect: str = "tome"):
    """ToMe on a timm ViT of parallel-residual blocks (``ParallelScalingBlock``: ``x + attn(ln x) +
    mlp(ln x)`` in one add, no stream between attention and MLP): each block's r tokens are merged
    after the block, by the block's attention keys, and the next blocks run on the merged tokens;
    the last block merges nothing (no block would follow). -> ([B, N, C], tracker)."""
    x = timm_embed(model, images)
    protected = model.num_prefix_tokens
    tracker = MergeTracker(x.shape[0], x.shape[1])
    blocks = list(model.blocks)
    for index, (block, r_block) in enumerate(zip(blocks, per_block(r, len(blocks)))):
        b, n, _ = x.shape
        _, _, k, _ = torch.split(block.in_proj(block.in_norm(x)), block.in_split, dim=-1)
        keys = block.k_norm(k.view(b, n, block.num_heads, block.head_dim)).transpose(1, 2)
        x = block(x, attn_mask=tracker.key_bias(prop_attn, x.dtype) if prop_attn else None)
        if index < len(blocks) - 1:
            x = tracker.merge(x, keys.mean(dim=1), r_block, protected, protect)
    return model.norm(tracker.unmerge(x)), tracker


def timm_eva_features(model, images: Tensor, r=0, prop_attn: bool = True, protect: str = "tome"):
    """ToMe on timm's ``Eva.forward_features`` (EVA02: a rotary table of the patch tokens after the
    p prefix tokens): each merged token takes its representative's rotary row, as it takes its
    other positional inputs; the metric is the keys as the attention reads them (after rotary).
    -> ([B, N, C], tracker)."""
    from timm.layers import apply_rot_embed_cat

    x, table = model._pos_embed(model.patch_embed(images))
    x = model.norm_pre(x)
    p, (batch, n) = model.num_prefix_tokens, x.shape[:2]
    tracker = MergeTracker(batch, n)
    for block, r_block in zip(model.blocks, per_block(r, len(model.blocks))):
        attn, h = block.attn, block.norm1(x)
        m = h.shape[1]
        rope = table[tracker.position[:, p:] - p][:, None]  # [B, 1, M - p, 2D]
        bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)) if attn.q_bias is not None else None
        q, k, v = F.linear(h, attn.qkv.weight, bias).reshape(batch, m, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = (torch.cat([t[:, :, :p], apply_rot_embed_cat(t[:, :, p:], rope)], dim=2) for t in (q, k))
        out = attn.proj(attn.norm(join_heads(attention(q, k, v, attn.scale, tracker.key_bias(prop_attn, x.dtype)))))
        x = x + (out if block.gamma_1 is None else block.gamma_1 * out)
        x = tracker.merge(x, k.mean(dim=1), r_block, p, protect)
        mlp = block.mlp(block.norm2(x))
        x = x + (mlp if block.gamma_2 is None else block.gamma_2 * mlp)
    return model.norm(tracker.unmerge(x)), tracker


def timm_tome_patch_forward(model, images: Tensor, r=0, prop_attn: bool = True) -> Tensor:
    """What ToMe's own timm patch (``tome.patch.timm``) computes, block by block: logits [B, classes].

    Attention adds log(size) to its logits (prop_attn), then :func:`tome_code_merge` with the
    keys averaged over heads as metric, ``class_token`` if the model has one and
    ``distill_token`` if it has a distillation token; no unmerge (the head reads tokens 0 and 1,
    which ToMe keeps in place). Registers are not protected: ToMe does not know them.
    """
    x = timm_embed(model, images)
    size = None
    class_token = model.cls_token is not None
    distill_token = getattr(model, "dist_token", None) is not None
    for block, r_block in zip(model.blocks, per_block(r, len(model.blocks))):
        bias = torch.zeros(x.shape[0], 1, 1, x.shape[1])
        if prop_attn and size is not None:
            bias = size.log()[:, None, None, :, 0]
        attn_out, keys = timm_attention(block.attn, block.norm1(x), bias)
        x = x + block.ls1(attn_out)
        x, size = tome_code_merge(x, keys.mean(dim=1), size, r_block, class_token, distill_token)
        x = x + block.ls2(block.mlp(block.norm2(x)))
    return timm_head(model, model.norm(x))


def timm_vit_local_forward(model, images: Tensor, r=0, protect: str = "tome"):
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
        merged, _, dest, _ = merge_batch(h, h, ones, not_padded, r_eff, protected, protect)
        return unmerge(run(merged), dest)

    for block, r_block in zip(model.blocks, per_block(r, len(model.blocks))):
        x = x + block.ls1(branch(block.norm1(x), lambda h: timm_attention(block.attn, h, no_bias)[0], r_block))
        x = x + block.ls2(branch(block.norm2(x), block.mlp, r_block))
    return timm_head(model, model.norm(x))


# ----------------------------------------------------------------------------- transformers ViT

def hf_vit_forward(model, pixel_values: Tensor, r=0, prop_attn: bool = True, protect: str = "tome"):
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
        x = tracker.merge(x, keys.mean(dim=1), r_block, 1, protect)  # the class token
        x = x + layer.mlp(layer.layernorm_after(x))
    sequence = model.layernorm(tracker.unmerge(x))
    pooled = None
    if model.pooler is not None:
        pooled = model.pooler.activation(model.pooler.dense(sequence[:, 0]))
    return BaseModelOutputWithPooling(last_hidden_state=sequence, pooler_output=pooled), tracker


# ----------------------------------------------------------------------------- transformers BERT

def hf_bert_forward(model, input_ids: Tensor, attention_mask: Optional[Tensor] = None, r=0,
                    prop_attn: bool = True, protect: str = "tome"):
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
        x = tracker.merge(x, keys.mean(dim=1), r_block, 1, protect)  # [CLS]
        x = layer.output.LayerNorm(layer.output.dense(layer.intermediate(x)) + x)
    sequence = tracker.unmerge(x)
    pooled = None
    if model.pooler is not None:
        pooled = model.pooler.activation(model.pooler.dense(sequence[:, 0]))
    return BaseModelOutputWithPoolingAndCrossAttentions(last_hidden_state=sequence, pooler_output=pooled), tracker


# ----------------------------------------------------------------------------- dispatch

def reference_forward(zm, r=0, prop_attn: bool = True, mode: str = "global", protect: str = "tome"):
    """The reference for a zoo entry on its example inputs, without autograd: (output, tracker).

    ``mode="local"`` (tomesd) is written for timm ViTs only; it returns no tracker (None).
    """
    name = zm.name
    with torch.no_grad():
        if mode == "local":
            assert name.startswith("timm_vit") or name.startswith("timm_deit"), name
            return timm_vit_local_forward(zm.model, zm.args[0], r, protect), None
        if name.startswith("timm_vit") or name.startswith("timm_deit"):
            return timm_vit_forward(zm.model, zm.args[0], r, prop_attn, protect)
        if name.startswith("hf_vit"):
            return hf_vit_forward(zm.model, zm.kwargs["pixel_values"], r, prop_attn, protect)
        if name.startswith("hf_bert"):
            return hf_bert_forward(zm.model, zm.kwargs["input_ids"], zm.kwargs.get("attention_mask"), r, prop_attn,
                                   protect)
    raise ValueError(f"no ToMe reference for zoo entry {name!r}")
