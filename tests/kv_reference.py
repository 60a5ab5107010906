"""An independent plain-PyTorch reference of KV-cache compression, written from the methods'
descriptions (SnapKV, TOVA, H2O, key norm, StreamingLLM, random; KV merging), not from tokred's
code: the model runs eagerly and densely, hooks record each layer's queries, and the returned
cache is cut per layer and head with full N x N attention maps, argsort and Python loops.
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F

from tokred.compat.transformers_api import returned_cache

DEFAULTS = {"snapkv": (0, "window"), "h2o": (0, "window"), "tova": (0, 1), "streaming": (4, 0)}


def queries_by_layer(model, input_ids: torch.Tensor, **inputs):
    """Run ``model`` densely with a cache (``inputs``: more keyword inputs, e.g. a cache to extend);
    -> (output, [q [B, H, N, D] per layer, rotary applied], [scale per layer])."""
    records = []

    def hook(module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        cos, sin = kwargs["position_embeddings"]
        b, n, _ = hidden.shape
        q = module.q_proj(hidden).view(b, n, -1, module.head_dim)
        q = (module.q_norm(q) if hasattr(module, "q_norm") else q).transpose(1, 2)  # Gemma3, Qwen3: per-head norm
        rotate = sys.modules[type(module).__module__].apply_rotary_pos_emb
        q, _ = rotate(q, q, cos, sin)
        records.append((q, module.scaling))

    layers = model.model.layers
    handles = [layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True) for layer in layers]
    try:
        with torch.no_grad():
            out = model(input_ids=input_ids, use_cache=True, **inputs)
    finally:
        for h in handles:
            h.remove()
    return out, [q for q, _ in records], [s for _, s in records]


def causal_attention(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """The causal attention map [B, H, R, N] of one layer's last R queries (R = N in a prefill)
    over its N keys (repeated per query head)."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    r, n = q.shape[2], k.shape[2]
    logits = (q.double() @ k.double().transpose(-1, -2)) * scale
    upper = torch.ones(r, n, dtype=torch.bool).triu(n - r + 1)
    return logits.masked_fill(upper, float("-inf")).softmax(-1)


def per_kv_head(scores: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[B, H, N] -> [B, Hkv, N]: the mean of each KV head's query heads."""
    b, h, n = scores.shape
    return scores.view(b, kv_heads, h // kv_heads, n).mean(2)


def method_scores(method: str, q, k, scale, window: int, pool: int, layer: int, seed: int,
                  shared: bool = False) -> torch.Tensor:
    """[B, Hkv, N] scores of one layer, higher kept; ``shared``: the same scores in every KV head
    (their mean), so every head keeps the same positions."""
    b, hkv, n, _ = k.shape
    if method in ("snapkv", "tova", "h2o"):
        attn = causal_attention(q, k, scale)
        r = q.shape[2]
        rows = {"snapkv": min(window, r), "tova": 1, "h2o": r}[method]
        scores = per_kv_head(attn[:, :, r - rows:].sum(2), hkv)
    elif method == "knorm":
        scores = -torch.linalg.vector_norm(k.double(), dim=-1)
    elif method == "streaming":
        scores = torch.arange(n, dtype=torch.float64).repeat(b, hkv, 1)
    else:
        g = torch.Generator().manual_seed(seed + layer)
        scores = torch.rand(hkv * n, generator=g).double().view(hkv, n).repeat(b, 1, 1)
    if shared:
        scores = scores.mean(1, keepdim=True).expand(b, hkv, n)
    if pool > 1:
        padded = F.pad(scores, (pool // 2, pool // 2))
        scores = torch.stack([padded[..., i:i + n] for i in range(pool)]).mean(0)
    return scores


def kept_positions(scores: torch.Tensor, kept: int, sinks: int, protect_last: int) -> torch.Tensor:
    """For each (b, head): sinks and last tokens, then the best others, sorted. -> [B, Hkv, kept]."""
    b, h, n = scores.shape
    out = torch.empty(b, h, kept, dtype=torch.long)
    for i in range(b):
        for j in range(h):
            always = [p for p in range(n) if p < sinks or p >= n - protect_last]
            others = [p for p in torch.argsort(scores[i, j], descending=True).tolist() if p not in always]
            out[i, j] = torch.tensor(sorted(always + others[:kept - len(always)]))
    return out


def adaptive_positions(scores: torch.Tensor, kept: int, sinks: int, protect_last: int, floor: int,
                       most: int) -> list:
    """AdaKV's budget, one (b, layer) at a time: every head first takes its sinks, last tokens and
    its ``floor`` best; the layer's other ``heads * kept`` - those entries go to the best scores
    left in any head, no head past ``most``. -> [b][head] sorted position lists."""
    b, h, n = scores.shape
    out = []
    for i in range(b):
        heads = []
        candidates = []
        for j in range(h):
            always = [p for p in range(n) if p < sinks or p >= n - protect_last]
            others = [p for p in torch.argsort(scores[i, j], descending=True).tolist() if p not in always]
            ranked = (always + others)[:most]
            first = max(floor, len(always))
            heads.append(ranked[:first])
            candidates += [(float(scores[i, j, p]), j, p) for p in ranked[first:]]
        left = h * kept - sum(len(x) for x in heads)
        for _, j, p in sorted(candidates, key=lambda c: -c[0])[:left]:
            heads[j].append(p)
        out.append([sorted(x) for x in heads])
    return out


def padded(x: torch.Tensor, positions: list, slots: int) -> torch.Tensor:
    """Each head's kept entries of x [B, Hkv, N, D] in position order, then zeros up to ``slots``."""
    out = torch.zeros(x.shape[0], x.shape[1], slots, x.shape[-1], dtype=x.dtype)
    for i, heads in enumerate(positions):
        for j, kept in enumerate(heads):
            out[i, j, :len(kept)] = x[i, j, kept]
    return out


def merged(k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> tuple:
    """Each evicted entry joins the kept entry of the same head whose key is the most similar
    (cosine); each kept entry is the plain mean of the entries that joined it and itself."""
    b, h, n, _ = k.shape
    ks, vs = [], []
    for i in range(b):
        kh, vh = [], []
        for j in range(h):
            kept = positions[i, j].tolist()
            groups = {p: [p] for p in kept}
            for p in range(n):
                if p not in groups:
                    sims = [F.cosine_similarity(k[i, j, p], k[i, j, c], dim=0) for c in kept]
                    groups[kept[int(torch.stack(sims).argmax())]].append(p)
            kh.append(torch.stack([k[i, j, groups[c]].mean(0) for c in kept]))
            vh.append(torch.stack([v[i, j, groups[c]].mean(0) for c in kept]))
        ks.append(torch.stack(kh))
        vs.append(torch.stack(vh))
    return torch.stack(ks), torch.stack(vs)


def compress(model, input_ids: torch.Tensor, method: str = "snapkv", keep=0.5, window: int = 32,
             pool=None, sinks=None, protect_last=None, merge: bool = False, seed: int = 0,
             budgets=None, layers: str = "uniform", heads=None, head_max: float = 2.0, kept_masks=None) -> tuple:
    """The dense prefill and its compressed cache: (logits [B, N, V], [(keys, values) per layer]);
    ``budgets``: each layer's kept count where ``layers`` is not "uniform"; ``kept_masks``: a list
    that receives each layer's [B, Hkv, N] kept positions (for :func:`decode` with heads="adaptive")."""
    assert layers == "uniform" or budgets is not None
    out, queries, scales = queries_by_layer(model, input_ids)
    cache = returned_cache(out)
    pool = pool if pool is not None else (5 if method == "snapkv" else 1)
    default_sinks, default_last = DEFAULTS.get(method, (0, 0))
    sinks = default_sinks if sinks is None else sinks
    protect_last = (window if default_last == "window" else default_last) if protect_last is None else protect_last
    sliding = [t == "sliding_attention" for t in getattr(model.config, "layer_types", None) or []]
    cut = []
    for layer, (q, scale, entry) in enumerate(zip(queries, scales, cache.layers)):
        k, v = entry.keys, entry.values
        if layer < len(sliding) and sliding[layer]:  # the model's own window bounds this cache already
            cut.append((k, v))
            continue
        n = k.shape[2]
        kept = budgets[layer] if budgets is not None else \
            (max(1, min(n, math.floor(keep * n + 0.5))) if isinstance(keep, float) else min(keep, n))
        shared = (heads or ("shared" if method == "tova" else "uniform")) == "shared"
        scores = method_scores(method, q, k, scale, window, pool, layer, seed, shared)
        if heads == "adaptive":
            most = min(n, math.ceil(head_max * kept))
            floor = min(kept, max(min(sinks + protect_last, n), round(0.2 * kept)))
            positions = adaptive_positions(scores, kept, min(sinks, n), min(protect_last, n), floor, most)
            cut.append((padded(k, positions, most), padded(v, positions, most)))
            mask = torch.zeros(k.shape[:3], dtype=torch.bool)
            for i, per_head in enumerate(positions):
                for j, kept_here in enumerate(per_head):
                    mask[i, j, kept_here] = True
            kept_masks.append(mask)
            continue
        positions = kept_positions(scores, kept, min(sinks, n), min(protect_last, n))
        if merge:
            cut.append(merged(k, v, positions))
        else:
            index = positions.unsqueeze(-1)
            cut.append((k.gather(2, index.expand(-1, -1, -1, k.shape[-1])),
                           v.gather(2, index.expand(-1, -1, -1, v.shape[-1]))))
    return out.logits, cut


def kept_attention(kept_masks: list):
    """An eager attention function for transformers' AttentionInterface that attends to a dense
    cache as if only the kept prefill entries of each (layer, KV head) were there: ``kept_masks``
    [B, Hkv, N] per layer; keys past N (the decode steps') always attend."""

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        kept = kept_masks[module.layer_idx]
        b, hkv, n = kept.shape
        allowed = torch.cat([kept, torch.ones(b, hkv, key.shape[2] - n, dtype=torch.bool)], dim=-1)
        group = query.shape[1] // key.shape[1]
        k, v = key.repeat_interleave(group, 1).double(), value.repeat_interleave(group, 1).double()
        allowed = allowed.repeat_interleave(group, 1)[:, :, None, :]
        logits = (query.double() @ k.transpose(-1, -2)) * scaling
        logits = logits.masked_fill(~allowed, float("-inf"))
        if attention_mask is not None:
            mask = attention_mask[..., :key.shape[2]]
            logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
        out = logits.softmax(-1) @ v
        return out.to(query.dtype).transpose(1, 2).contiguous(), None

    return attention


def decode(model, layers: list, first: torch.Tensor, n: int, steps: int, forced=None, kept_masks=None) -> tuple:
    """Greedy decode from a cache holding ``layers``' entries: the new tokens at positions n, n+1, ...
    ``forced`` [B, Q] (a question): fed first, at n..n+Q-1; ``first`` is then ignored and the greedy
    tokens start at n+Q from the last forced token's logits. ``kept_masks`` (heads="adaptive"):
    ``layers`` is the dense cache and each step attends only to these kept entries of it.
    -> (tokens [B, steps], [logits [B, 1, V] per step])."""
    if kept_masks is not None:
        from transformers import AttentionInterface

        AttentionInterface.register("tokred_kept_reference", kept_attention(kept_masks))
        saved = model.config._attn_implementation
        model.set_attn_implementation("tokred_kept_reference")
        try:
            return decode(model, layers, first, n, steps, forced)
        finally:
            model.set_attn_implementation(saved)
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)  # sliding-window layers (Gemma3) keep their window
    for i, (k, v) in enumerate(layers):
        cache.update(k.clone(), v.clone(), i)
    token, tokens, logits = first, [], []
    with torch.no_grad():
        for i in range(0 if forced is None else forced.shape[1]):
            pos = torch.full((forced.shape[0], 1), n, dtype=torch.long)
            out = model(input_ids=forced[:, i:i + 1], position_ids=pos, use_cache=True,
                        **{_cache_keyword(model): cache})
            token, n = out.logits[:, -1:].argmax(-1), n + 1
        for step in range(steps):
            tokens.append(token)
            pos = torch.full((token.shape[0], 1), n + step, dtype=torch.long)
            out = model(input_ids=token, position_ids=pos, use_cache=True, **{_cache_keyword(model): cache})
            logits.append(out.logits)
            token = out.logits[:, -1:].argmax(-1)
    return torch.cat(tokens, 1), logits


def _cache_keyword(model) -> str:
    from tokred.compat.transformers_api import cache_keyword

    return cache_keyword(model)


def answer_within_budget(model, layers: list, context: torch.Tensor, question: torch.Tensor, steps: int,
                         every: int, most: int, chunk: int, method: str, window: int = 32, pool=None, sinks=None,
                         protect_last=None, seed: int = 0, heads=None) -> tuple:
    """Greedy answer to ``question`` from a cache holding ``layers`` (the context's cut), the cache
    kept under ``most`` entries: whenever it holds most + every, its last ``chunk`` entries are
    dropped, the last ``chunk`` tokens fed are run again over it (eagerly, queries recorded), and
    the method's scores of that chunk's queries choose the ``most`` entries each head keeps.
    -> (tokens [B, steps], cuts made)."""
    from transformers import DynamicCache

    pool = pool if pool is not None else (5 if method == "snapkv" else 1)
    default_sinks, default_last = DEFAULTS.get(method, (0, 0))
    sinks = default_sinks if sinks is None else sinks
    protect_last = (window if default_last == "window" else default_last) if protect_last is None else protect_last
    shared = (heads or ("shared" if method == "tova" else "uniform")) == "shared"
    cache = DynamicCache(config=model.config)
    for i, (k, v) in enumerate(layers):
        cache.update(k.clone(), v.clone(), i)
    fed, n, cuts, tokens = [context], context.shape[1], 0, []

    def step(ids):
        nonlocal n, cuts
        out = model(input_ids=ids, position_ids=torch.full_like(ids, n), use_cache=True,
                    **{_cache_keyword(model): cache})
        n += 1
        fed.append(ids)
        if cache.layers[0].keys.shape[2] >= most + every:
            again = torch.cat(fed, 1)[:, -chunk:]
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys[:, :, :-chunk], layer.values[:, :, :-chunk]
            positions = torch.arange(n - chunk, n).expand_as(again)
            _, queries, scales = queries_by_layer(model, again, position_ids=positions,
                                                  **{_cache_keyword(model): cache})
            for index, (layer, q, scale) in enumerate(zip(cache.layers, queries, scales)):
                k, v = layer.keys, layer.values
                scores = method_scores(method, q, k, scale, window, pool, index, seed, shared)
                kept = kept_positions(scores, most, min(sinks, k.shape[2]), min(protect_last, k.shape[2]))
                gather = kept.unsqueeze(-1)
                layer.keys = k.gather(2, gather.expand(-1, -1, -1, k.shape[-1]))
                layer.values = v.gather(2, gather.expand(-1, -1, -1, v.shape[-1]))
            cuts += 1
        return out.logits[:, -1:]

    with torch.no_grad():
        for i in range(question.shape[1]):
            logits = step(question[:, i:i + 1])
        for _ in range(steps):
            token = logits.argmax(-1)
            tokens.append(token)
            if len(tokens) < steps:
                logits = step(token)
    return torch.cat(tokens, 1), cuts
