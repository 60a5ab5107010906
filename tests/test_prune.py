"""The prune pass (tokred/passes/prune.py) against the plain-PyTorch reference (prune_reference.py).

The reference is checked first on its own: its selection rules on hand-built cases, keep=1.0
reproduces each plain model, its recomputed attention scores are the probabilities the models'
own eager attention returns, its pruned cache decodes like the model's own forward would.

Then every pass test compiles a tiny zoo model with ``tokred.backend(inner="aot_eager",
prune={...})`` and compares it with the reference on the same weights (ARCHITECTURE.md invariants 2
and 3): keep=1.0 is the identity for every scorer; each scorer equals the reference at several
cut points (one and two cuts), with ``range``/``protect_last``/``query``/``accumulate``/int and per-cut keep,
EViT's fused token on encoders, and on decoders with a KV cache the pruned prefill (logits and
cache) and three greedy decode steps on the pruned cache. The report names the rewritten sites,
what is not pruned says why, bad options are refused by name, and a pruned ViT exports to ONNX.

Compiled results are memoised per (model, depth, options), so tests that look at the same compile
from different sides pay for it once.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re

import pytest
import torch

import tokred
from tokred.compat.transformers_api import cache_argument, returned_cache
import zoo
from prune_reference import (DecoderResult, PruneOptions, apply_cut, attention_probs, causal_bias,
                             decoder_qk, hf_decoder_forward, hf_decoder_generate, hf_decoder_step,
                             k_center, kept_count, padding_keys, prune_options, prunable_positions,
                             reference_forward, select, split_heads, timm_vit_features, transition_scores)
from zoo import ZOO, flatten_outputs, max_abs_diff

TOL = 1e-4
IDENTITY_TOL = 1e-5
DECODE_STEPS = 3
MARGIN = 1e-4  # relative gap between the last kept and the first pruned score

ENCODER_SCORERS = ["cls", "query", "transition", "diversity", "random"]
DECODER_SCORERS = ["query", "transition", "diversity", "random"]


def test_prune_pass_is_registered():
    """The pass is in the backend's table: were it dropped, the pass tests below fail (not skip)."""
    from tokred.backend import PASSES

    assert "prune" in PASSES


# ----------------------------------------------------------------------------- helpers

@contextlib.contextmanager
def zoo_depth(depth: int):
    """Build zoo entries with ``depth`` blocks (the zoo reads its DEPTH when an entry is built)."""
    saved = zoo.DEPTH
    zoo.DEPTH = depth
    try:
        yield
    finally:
        zoo.DEPTH = saved


def build(name: str, depth: int = 2):
    with zoo_depth(depth):
        return ZOO[name]()


def ref_options(prune: dict) -> PruneOptions:
    """The reference's options for a pass option dict (the same keys)."""
    return prune_options(**prune)


def decoder_inputs(zm) -> torch.Tensor:
    return zm.kwargs["input_ids"]


@functools.lru_cache(maxsize=None)
def _compiled_run(name: str, depth: int, options_json: str, decode_steps: int):
    """(outputs, report): outputs is the model's output, or for a decoder with decode steps a
    tuple (prefill output, [step logits], tokens fed) from a manual greedy loop."""
    torch._dynamo.reset()
    zm = build(name, depth)
    be = tokred.backend(**json.loads(options_json))
    fn = torch.compile(zm.model, backend=be)
    try:
        with torch.no_grad():
            out = fn(*zm.args, **zm.kwargs)
            if decode_steps:
                out = (out, *greedy_steps(fn, zm.model, out, decode_steps))
    finally:
        torch._dynamo.reset()
    return out, be.report


def greedy_steps(fn, model, prefill, steps: int) -> tuple:
    """([step logits], tokens fed [B, steps], the last cache): greedy decode steps through ``fn``
    (a compiled forward of ``model``) on the cache its ``prefill`` output returned."""
    cache, token = returned_cache(prefill), prefill.logits[:, -1:].argmax(-1)
    logits, tokens = [], []
    for _ in range(steps):
        tokens.append(token)
        step = fn(input_ids=token, **cache_argument(model, cache), use_cache=True)
        cache, token = returned_cache(step), step.logits[:, -1:].argmax(-1)
        logits.append(step.logits)
    return logits, torch.cat(tokens, dim=1), cache


def assert_pruned_decode_equals_reference(model, ids: torch.Tensor, prune: dict, steps: int = DECODE_STEPS) -> None:
    """A transformers decoder compiled with ``prune``: its prefill logits, its pruned cache (N tokens
    in the layers up to the cut, M after) and ``steps`` greedy decode steps on that cache equal the
    reference's (``hf_decoder_generate``, the model's own layers)."""
    fn = torch.compile(model, backend=tokred.backend(inner="aot_eager", prune=prune))
    with torch.no_grad():
        out = fn(input_ids=ids, use_cache=True)
        got_steps, _, cache = greedy_steps(fn, model, out, steps)
        want_logits, want_steps, _, want_cache = hf_decoder_generate(model, ids, prune_options(**prune), steps)
    assert max_abs_diff(out.logits, want_logits) <= TOL
    lengths = [layer.keys.shape[2] for layer in cache.layers]
    assert lengths == [layer.keys.shape[2] for layer in want_cache.layers]
    assert lengths[0] == ids.shape[1] + steps > lengths[-1]  # layer 0 before the cut, the rest after
    assert max_abs_diff(cache, want_cache) <= TOL
    for got, want in zip(got_steps, want_steps):
        assert max_abs_diff(got, want) <= TOL


def compiled(name: str, prune: dict, depth: int = 2, inner: str = "aot_eager", decode_steps: int = 0):
    """(output, report) of zoo model ``name`` compiled by tokred with ``prune`` options (memoised)."""
    options = json.dumps({"inner": inner, "prune": prune}, sort_keys=True)
    return _compiled_run(name, depth, options, decode_steps)


def reference(name: str, prune: dict | None, depth: int = 2):
    """The reference output for a zoo entry (None: dense), comparable with the compiled output.

    Every cut's selection must be clear of float noise (MARGIN), else the case is ill-posed: a
    near tie could flip between two correct implementations; pick another keep value then.
    """
    zm = build(name, depth)
    cuts: list = []
    out = reference_forward(zm, None if prune is None else ref_options(prune), cuts)
    for i, cut in enumerate(cuts):
        assert cut.margin > MARGIN, f"cut {i}: near tie in the reference's selection ({cut.margin:.2e})"
    if isinstance(out, DecoderResult):
        return out.logits
    return out


def model_output(name: str, out):
    """The part of a compiled output the reference computes: logits for decoders, else all."""
    if name.startswith(("hf_llama", "hf_qwen2")):
        return out.logits
    return out


def output_scale(out) -> float:
    return max(t.abs().max().item() for t in flatten_outputs(out) if t.is_floating_point())


def assert_changed(pruned, dense) -> None:
    """Pruning changed the outputs by far more than the tolerance, so that equality with the
    reference is not vacuous."""
    assert max_abs_diff(pruned, dense) > max(10 * TOL, 1e-3 * output_scale(dense))


def dense_output(name: str, depth: int = 2):
    zm = build(name, depth)
    return model_output(name, zm())


# ----------------------------------------------------------------------------- the reference itself

def test_reference_kept_count():
    """keep * P rounded half up, at least 1, for a float; an int is a count capped at P."""
    assert kept_count(0.5, 10) == 5
    assert kept_count(0.25, 10) == 3  # 2.5 rounds up (Python's round would give 2)
    assert kept_count(0.7, 5) == 4  # 3.5 exactly, as written (the float 0.7 * 5 is 3.4999...)
    assert kept_count(0.01, 10) == 1
    assert kept_count(1.0, 7) == 7
    assert kept_count(3, 10) == 3 and kept_count(30, 10) == 10


def test_reference_prunable_positions():
    """Protected leading tokens, range (negative from the end) and protect_last."""
    assert prunable_positions(10, 1, None, 0) == list(range(1, 10))
    assert prunable_positions(10, 0, (2, 6), 0) == [2, 3, 4, 5]
    assert prunable_positions(10, 0, (-4, None), 0) == [6, 7, 8, 9]
    assert prunable_positions(10, 1, (0, -2), 3) == [1, 2, 3, 4, 5, 6]


def test_reference_selection_by_score():
    """The k highest scores among prunable positions, ties to the lower position; kept index
    ascending with the non-prunable positions; the fused token (cls weights, normalised over the
    pruned tokens) takes the side inputs of the highest-scored pruned token."""
    scores = torch.tensor([[9.0, 0.1, 0.5, 0.5, 0.2, 0.5, 0.3]])
    x = torch.arange(7 * 2, dtype=torch.float32).reshape(1, 7, 2)
    opts = prune_options(keep=2, at=0, score="cls")
    cut = select(scores, x, [1, 2, 3, 4, 5, 6], 2, opts)
    assert cut.kept.tolist() == [[0, 2, 3]] and cut.pruned == [[1, 4, 5, 6]]  # 2 and 3 beat 5 (tie)
    fused_opts = prune_options(keep=2, at=0, score="cls", fuse=True)
    cut = select(scores, x, [1, 2, 3, 4, 5, 6], 2, fused_opts)
    assert cut.kept.tolist() == [[0, 2, 3, 5]]  # the fused token's representative: 5 (score 0.5)
    w = torch.tensor([0.1, 0.2, 0.5, 0.3])
    want = (w[:, None] * x[0, [1, 4, 5, 6]]).sum(0) / w.sum()
    torch.testing.assert_close(apply_cut(x, cut)[0, -1], want)
    uniform = select(scores, x, [1, 2, 3, 4, 5, 6], 2, prune_options(keep=2, at=0, score="transition", fuse=True))
    assert uniform.kept.tolist() == [[0, 2, 3, 1]]  # uniform weights: the first pruned position
    torch.testing.assert_close(apply_cut(x, uniform)[0, -1], x[0, [1, 4, 5, 6]].mean(0))


def test_reference_k_center():
    """Greedy k-center on cosine distance: the farthest token from the mean first, then the one
    farthest from the selected set; ties to the lower position."""
    tokens = torch.tensor([[1.0, 0.0], [1.0, 0.05], [0.0, 1.0], [0.05, 1.0], [-1.0, 0.0], [1.0, 0.01]])
    # mean of 1..5 points to (+x, +y)/2-ish; token 4 (-x) is the farthest from it.
    chosen = k_center(tokens, [1, 2, 3, 4, 5], 3)
    assert chosen[0] == 4
    # then the farthest from 4 (-x): 1 and 5 are both ~2 away; 5 (1, 0.01) is nearer to -x's
    # opposite direction than 1 (1, 0.05)? cos(-x, 5) = -0.99995 vs cos(-x, 1) = -0.9988: 5 wins.
    assert chosen[1] == 5
    assert chosen[2] in (2, 3) and chosen[2] == 2  # 2 and 3 nearly tie; 2 is farther from {4, 5}
    tie = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, -1.0], [0.0, -1.0]])
    # mean (0.2, 0): 1, 2, 3, 4 are all at distance 1 from it -> 1; then 3 and 4 are both at
    # distance 2 from {1} -> 3 (exact ties go to the lowest position).
    assert k_center(tie, [0, 1, 2, 3, 4], 2) == [1, 3]


def test_reference_padding_keys():
    """Padding: keys that no query may attend (a padding mask); a causal mask has none."""
    pad = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, torch.finfo(torch.float32).min]])[:, None, None, :]
    assert padding_keys(pad, 2, 3).tolist() == [[False, False, False], [False, False, True]]
    causal = causal_bias(torch.arange(3).expand(2, 3), torch.float32)
    assert not padding_keys(causal, 2, 3).any()


def test_reference_transition_scores():
    x_in = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [2.0, 0.0]]])
    x_out = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [4.0, 0.0]]])
    s = transition_scores(x_in, x_out)[0]
    torch.testing.assert_close(s, torch.tensor([0.0, 1.0, 1.0]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["timm_vit_tiny_sdpa", "hf_bert_sdpa", "hf_bert_eager", "hf_llama_eager",
                                  "hf_qwen2_sdpa", "hf_llama_cache_sdpa"])
def test_reference_keep_all_is_the_model(name):
    """keep=1.0 with every scorer reproduces the plain model (and its cache)."""
    zm = build(name)
    dense = zm()
    scorers = DECODER_SCORERS if zm.causal else ENCODER_SCORERS
    for score in scorers:
        out = reference_forward(zm, prune_options(keep=1.0, at=[0, 1], score=score))
        if isinstance(out, DecoderResult):
            assert max_abs_diff(out.logits, dense.logits) <= IDENTITY_TOL, score
            if zm.kwargs.get("use_cache"):
                assert max_abs_diff(out.cache, dense.past_key_values) <= IDENTITY_TOL, score
        else:
            assert max_abs_diff(out, dense) <= IDENTITY_TOL, score


def test_reference_scores_are_the_models_attention():
    """The q/k the reference recomputes (masks, rotary, GQA) give the probabilities the models'
    own eager attention returns (output_attentions)."""
    zm = build("hf_llama_eager")
    ids = decoder_inputs(zm)
    with torch.no_grad():
        probs = zm.model(input_ids=ids, output_attentions=True).attentions[1]  # [B, H, N, N]
        inner = zm.model.model
        x = inner.embed_tokens(ids)
        n = ids.shape[1]
        position = torch.arange(n).expand(ids.shape[0], n)
        cos, sin = inner.rotary_emb(x, position_ids=position)
        x0 = inner.layers[0](x, attention_mask=causal_bias(position, x.dtype), position_embeddings=(cos, sin))
        q, k = decoder_qk(inner.layers[1], x0, cos, sin)
        mine = attention_probs(q, k, inner.layers[1].self_attn.scaling, causal_bias(position, x.dtype), [n - 3, n - 1])
    torch.testing.assert_close(mine, probs[:, :, [n - 3, n - 1]].mean(dim=(1, 2)), atol=1e-6, rtol=1e-5)

    bert = build("hf_bert_eager")
    with torch.no_grad():
        probs = bert.model(**bert.kwargs, output_attentions=True).attentions[0]
        x = bert.model.embeddings(input_ids=bert.kwargs["input_ids"])
        sa = bert.model.encoder.layer[0].attention.self
        mask = bert.kwargs["attention_mask"]
        bias = torch.where(mask.bool(), 0.0, torch.finfo(x.dtype).min)[:, None, None, :]
        mine = attention_probs(split_heads(sa.query(x), sa.attention_head_size),
                               split_heads(sa.key(x), sa.attention_head_size), sa.scaling, bias, [0])
    torch.testing.assert_close(mine, probs[:, :, 0].mean(1), atol=1e-6, rtol=1e-5)


def test_reference_pruned_tokens_exit_early():
    """A pruned token leaves with its value after the cut block: in the restored features it is
    the final norm of the dense stream after block 0; the kept tokens are changed."""
    zm = build("timm_vit_tiny_sdpa")
    model, images = zm.model, zm.args[0]
    opts = prune_options(keep=0.5, at=0, score="cls")
    with torch.no_grad():
        feats = timm_vit_features(model, images, opts)
        after0 = model.blocks[0](model._pos_embed(model.patch_embed(images)))
    exited = (feats - model.norm(after0)).abs().amax(-1) < 1e-6  # [B, N]
    n_prunable = zm.token_count - 1
    assert exited.sum(1).tolist() == [n_prunable - kept_count(0.5, n_prunable)] * 2
    assert not exited[:, 0].any()  # the class token is protected


def test_reference_cut_after_the_last_block_changes_nothing():
    """Pruning after the last block only decides which tokens exit there: the output is dense."""
    zm = build("hf_bert_sdpa")
    out = reference_forward(zm, prune_options(keep=0.3, at=1, score="random"))
    assert max_abs_diff(out, zm()) <= IDENTITY_TOL


def test_reference_pruned_cache_decodes_like_the_model():
    """After the reference's pruned prefill, the model's own forward on that cache (position from
    layer 0's length N) gives the logits of the reference's decode step."""
    zm = build("hf_llama_cache_sdpa")
    ids = decoder_inputs(zm)
    opts = prune_options(keep=0.5, at=0, score="query")
    with torch.no_grad():
        mine = hf_decoder_forward(zm.model, ids, opts)
        theirs = hf_decoder_forward(zm.model, ids, opts)
        token = mine.logits[:, -1:].argmax(-1)
        step = hf_decoder_step(zm.model, token, mine.cache, mine.n)
        own = zm.model(input_ids=token, **cache_argument(zm.model, theirs.cache), use_cache=True).logits
    k_keep = kept_count(0.5, zm.token_count)  # no protected token in a decoder
    assert mine.cache.layers[0].keys.shape[2] == zm.token_count + 1
    assert mine.cache.layers[1].keys.shape[2] == k_keep + 1
    torch.testing.assert_close(step, own, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- identity (keep=1.0)

# Quick by default: one compile per scorer family; the whole grid with pytest --long.
IDENTITY_CASES = ([("timm_vit_tiny_sdpa", s) for s in ENCODER_SCORERS] + [("hf_bert_eager", s) for s in ENCODER_SCORERS]
                  + [("hf_llama_sdpa", s) for s in DECODER_SCORERS] + [("hf_qwen2_sdpa", "query")])
IDENTITY_QUICK = [("timm_vit_tiny_sdpa", "cls"), ("timm_vit_tiny_sdpa", "diversity"), ("hf_bert_eager", "transition"),
                  ("hf_llama_sdpa", "query"), ("hf_llama_sdpa", "random")]


def params(cases: list, quick: list, ids=None) -> list:
    """pytest params of ``cases``; those not in ``quick`` run only with ``pytest --long``."""
    ids = ids or [None] * len(cases)
    return [pytest.param(*(c if isinstance(c, tuple) and len(c) == 2 and isinstance(c[1], str) else (c,)),
                         id=i, marks=() if c in quick else (pytest.mark.long,)) for c, i in zip(cases, ids)]


@pytest.mark.parametrize("name, score", params(IDENTITY_CASES, IDENTITY_QUICK, [f"{n}-{s}" for n, s in IDENTITY_CASES]))
def test_keep_all_is_identity(name, score):
    out, _ = compiled(name, {"keep": 1.0, "at": 0, "score": score})
    assert max_abs_diff(model_output(name, out), dense_output(name)) <= IDENTITY_TOL


# ----------------------------------------------------------------------------- equal to the reference

# (model, depth, prune options): every scorer on ViT and BERT (padding), the decoders' scorers on
# Llama/Qwen2 (GQA, rotary), one and two cuts, range, protect_last, query rows, int and per-cut keep.
REFERENCE_CASES = [
    ("timm_vit_tiny_sdpa", 2, {"keep": 0.5, "at": 0, "score": "cls"}),
    ("timm_vit_tiny_eager", 3, {"keep": 0.4, "at": 1, "score": "cls"}),
    ("timm_vit_tiny_sdpa", 2, {"keep": 0.5, "at": 0, "score": "query"}),
    ("timm_vit_tiny_sdpa", 2, {"keep": 0.4, "at": 0, "score": "transition"}),
    ("timm_vit_tiny_sdpa", 2, {"keep": 0.4, "at": 0, "score": "diversity"}),
    ("timm_vit_tiny_sdpa", 3, {"keep": 0.6, "at": 1, "score": "random", "seed": 3}),
    ("timm_vit_tiny_sdpa", 4, {"keep": [0.7, 0.5], "at": [0, 2], "score": "cls"}),
    ("timm_vit_tiny_eager", 4, {"keep": 0.6, "at": [1, 2], "score": "diversity"}),
    ("timm_vit_tiny_sdpa", 2, {"keep": 5, "at": 0, "score": "cls", "range": [5, 20], "protect_last": 3}),
    ("hf_bert_sdpa", 2, {"keep": 0.5, "at": 0, "score": "cls"}),
    ("hf_bert_eager", 2, {"keep": 0.5, "at": 0, "score": "query", "query": [0, 4]}),
    ("hf_bert_eager", 2, {"keep": 0.5, "at": 0, "score": "transition"}),
    ("hf_bert_sdpa", 2, {"keep": 0.5, "at": 0, "score": "diversity"}),
    ("hf_bert_sdpa", 2, {"keep": 0.5, "at": 0, "score": "random"}),
    ("hf_bert_sdpa", 3, {"keep": [0.6, 0.5], "at": [0, 1], "score": "cls"}),
    ("hf_llama_sdpa", 2, {"keep": 0.5, "at": 0, "score": "query"}),
    ("hf_llama_eager", 2, {"keep": 0.5, "at": 0, "score": "query", "query": [-4, -1], "protect_last": 2}),
    ("hf_llama_sdpa", 2, {"keep": 0.5, "at": 0, "score": "transition"}),
    ("hf_llama_eager", 2, {"keep": 0.5, "at": 0, "score": "diversity"}),
    ("hf_llama_sdpa", 2, {"keep": 4, "at": 0, "score": "random", "range": [2, -1]}),
    ("hf_llama_sdpa", 3, {"keep": 0.7, "at": [0, 1], "score": "query", "protect_last": 1}),
    ("hf_qwen2_sdpa", 2, {"keep": 0.5, "at": 0, "score": "query"}),
    ("hf_qwen2_sdpa", 2, {"keep": 0.6, "at": 0, "score": "transition"}),
    ("hf_qwen2_sdpa", 2, {"keep": 0.5, "at": 0, "score": "query", "query": 3, "protect_last": 3}),
    ("hf_llama_sdpa", 3, {"keep": 0.5, "at": 1, "score": "query", "query": 2, "accumulate": 2}),
    ("hf_bert_sdpa", 3, {"keep": 0.5, "at": 1, "score": "cls", "accumulate": 2}),
    ("timm_vit_tiny_sdpa", 5, {"keep": [0.7, 0.5], "at": [1, 3], "score": "transition", "accumulate": 2}),
    ("hf_llama_sdpa", 2, {"keep": 0.5, "at": 0, "score": "query", "query": 3, "pool": 3}),
    ("hf_bert_sdpa", 2, {"keep": 0.5, "at": 0, "score": "cls", "pool": 5}),
    ("timm_vit_tiny_sdpa", 3, {"keep": 0.5, "at": 1, "score": "transition", "pool": 3, "accumulate": 2}),
]

REFERENCE_QUICK = [0, 3, 4, 5, 6, 8, 9, 10, 14, 15, 16, 18, 20, 21, 23, 24, 25, 26, 27, 28]  # every scorer and option
POOL_CASES = [27, 28, 29]  # the pooled cases: each must keep another set than without pooling


def case_id(case) -> str:
    name, depth, prune = case
    return f"{name}-d{depth}-" + "-".join(f"{k}={v}" for k, v in prune.items()).replace(" ", "")


@pytest.mark.parametrize("case", params(REFERENCE_CASES, [REFERENCE_CASES[i] for i in REFERENCE_QUICK],
                                         [case_id(c) for c in REFERENCE_CASES]))
def test_equals_reference(case):
    name, depth, prune = case
    want = reference(name, prune, depth)
    assert_changed(want, dense_output(name, depth))
    out, report = compiled(name, prune, depth)
    assert report.changed
    assert max_abs_diff(model_output(name, out), want) <= TOL


@pytest.mark.parametrize("case", params([REFERENCE_CASES[i] for i in POOL_CASES],
                                        [REFERENCE_CASES[i] for i in POOL_CASES[:1]],
                                        [case_id(REFERENCE_CASES[i]) for i in POOL_CASES]))
def test_pool_changes_what_is_kept(case):
    """Pooling the scores (SnapKV) changes the kept set on these inputs, so the reference cases
    above test the pooling itself, and the report names it."""
    name, depth, prune = case
    plain = {key: value for key, value in prune.items() if key != "pool"}
    assert_changed(reference(name, prune, depth), reference(name, plain, depth))
    _, report = compiled(name, prune, depth)
    assert any(f"pool={prune['pool']}" in (site.reason or "") for site in report.attention_sites)


FUSE_CASES = [
    ("timm_vit_tiny_sdpa", 2, {"keep": 0.5, "at": 0, "score": "cls", "fuse": True}),
    ("timm_vit_tiny_eager", 2, {"keep": 0.5, "at": 0, "score": "transition", "fuse": True}),
    ("hf_bert_sdpa", 2, {"keep": 0.5, "at": 0, "score": "cls", "fuse": True}),
    ("hf_bert_eager", 2, {"keep": 0.4, "at": 0, "score": "random", "fuse": True}),
]


@pytest.mark.parametrize("case", params(FUSE_CASES, [FUSE_CASES[0], FUSE_CASES[3]], [case_id(c) for c in FUSE_CASES]))
def test_fuse_equals_reference(case):
    """EViT: one fused token (weighted mean of the pruned tokens) runs with the kept tokens and is
    dropped at restore; it changes the output compared with plain pruning."""
    name, depth, prune = case
    want = reference(name, prune, depth)
    plain = reference(name, {k: v for k, v in prune.items() if k != "fuse"}, depth)
    assert_changed(want, plain)
    out, _ = compiled(name, prune, depth)
    assert max_abs_diff(model_output(name, out), want) <= TOL


# ----------------------------------------------------------------------------- decoders with a cache

def _cache_case(name: str, depth: int, prune: dict):
    """(compiled (prefill, steps, tokens, cache), reference (prefill logits, steps, tokens, cache))."""
    out, report = compiled(name, prune, depth, decode_steps=DECODE_STEPS)
    zm = build(name, depth)
    with torch.no_grad():
        want = hf_decoder_generate(zm.model, decoder_inputs(zm), ref_options(prune), DECODE_STEPS)
    return out, want, report


CACHE_CASES = [
    ("hf_llama_cache_sdpa", 2, {"keep": 0.5, "at": 0, "score": "query", "protect_last": 2}),
    ("hf_llama_cache_sdpa", 3, {"keep": [0.7, 0.6], "at": [0, 1], "score": "transition"}),
    ("hf_llama_cache_sdpa", 2, {"keep": 0.5, "at": 0, "score": "query", "query": 3, "pool": 3, "protect_last": 2}),
]


@pytest.mark.parametrize("case", CACHE_CASES, ids=[case_id(c) for c in CACHE_CASES])
def test_cache_prefill_and_decode_equal_reference(case):
    """The pruned prefill's logits and cache (N tokens up to the cut, M after), then greedy decode
    steps at positions N, N+1, ... on the pruned cache."""
    name, depth, prune = case
    (prefill, steps, tokens, cache), (want_logits, want_steps, want_tokens, want_cache), _ = _cache_case(
        name, depth, prune)
    assert max_abs_diff(prefill.logits, want_logits) <= TOL
    n = want_logits.shape[1]
    lengths = [layer.keys.shape[2] for layer in cache.layers]
    assert lengths == [layer.keys.shape[2] for layer in want_cache.layers], lengths
    assert lengths[0] == n + DECODE_STEPS and lengths[-1] < n + DECODE_STEPS
    assert max_abs_diff(cache, want_cache) <= TOL
    assert torch.equal(tokens, want_tokens)
    for i, (got, want) in enumerate(zip(steps, want_steps)):
        assert max_abs_diff(got, want) <= TOL, f"decode step {i}"


@pytest.mark.long
def test_cache_decode_through_generate():
    """transformers' generate() on the tokred-compiled forward gives the reference's greedy tokens."""
    name, prune = "hf_llama_cache_sdpa", {"keep": 0.5, "at": 0, "score": "query"}
    zm = build(name)
    ids = decoder_inputs(zm)
    with torch.no_grad():
        _, _, want_tokens, _ = hf_decoder_generate(zm.model, ids, ref_options(prune), DECODE_STEPS)
    torch._dynamo.reset()
    be = tokred.backend(inner="aot_eager", prune=prune)
    zm.model.forward = torch.compile(zm.model.forward, backend=be)
    try:
        with torch.no_grad():
            got = zm.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                    max_new_tokens=DECODE_STEPS, pad_token_id=0)
    finally:
        torch._dynamo.reset()
    assert be.report.changed
    assert torch.equal(got[:, ids.shape[1]:], want_tokens)


# ----------------------------------------------------------------------------- report, pass-through

def test_report_names_the_rewritten_site():
    name = "timm_vit_tiny_sdpa"
    _, report = compiled(name, {"keep": 0.5, "at": 0, "score": "cls"})
    rewritten = [s for s in report.attention_sites if s.status == "rewritten"]
    assert rewritten and all("prune" in s.passes for s in rewritten), [(s.module, s.status, s.reason) for s in
                                                                      report.attention_sites]
    n = zoo.NUM_PATCHES + 1
    m = 1 + kept_count(0.5, n - 1)
    reasons = " ".join(s.reason for s in rewritten)
    assert re.search(rf"\b{n}\s*->\s*{m}\b", reasons), reasons
    assert 0 < report.flops_after < report.flops_before


def test_model_without_attention_passes_through():
    zm = build("torch_mlp")
    out, report = compiled("torch_mlp", {"keep": 0.5})
    assert not report.changed
    assert max_abs_diff(out, zm()) <= IDENTITY_TOL
    assert any("prune" in line for line in report.notes), report.notes


def test_cls_score_without_a_leading_protected_token_is_skipped():
    """A decoder has no token at position 0 that every token reports to: 'cls' is refused with a
    reason (or an error naming the option) and nothing is pruned silently."""
    name = "hf_llama_sdpa"
    try:
        out, report = compiled(name, {"keep": 0.5, "at": 0, "score": "cls"})
    except Exception as exc:  # noqa: BLE001 - the option error is allowed too
        assert "prune" in str(exc) and "cls" in str(exc), exc
        return
    assert not report.changed
    texts = " ".join([s.reason or "" for s in report.attention_sites] + report.notes)
    assert "cls" in texts, texts
    assert max_abs_diff(model_output(name, out), dense_output(name)) <= IDENTITY_TOL


def test_fuse_on_a_causal_model_is_refused():
    name = "hf_llama_sdpa"
    try:
        out, report = compiled(name, {"keep": 0.5, "at": 0, "score": "query", "fuse": True})
    except Exception as exc:  # noqa: BLE001 - ValueError at compile time (wrapped by dynamo) is allowed
        assert "fuse" in str(exc), exc
        return
    assert not report.changed
    texts = " ".join([s.reason or "" for s in report.attention_sites] + report.notes)
    assert "fuse" in texts and "causal" in texts, texts


def test_random_differs_from_cls():
    """Random scores keep other tokens than attention to the class token on a model with
    structure (random weights still give non-uniform attention)."""
    name = "timm_vit_tiny_sdpa"
    by_cls, _ = compiled(name, {"keep": 0.5, "at": 0, "score": "cls"})
    by_random, _ = compiled(name, {"keep": 0.5, "at": 0, "score": "random"})
    assert_changed(by_random, by_cls)


# ----------------------------------------------------------------------------- options

@pytest.mark.parametrize("prune, key", [
    ({"keep": 0.0}, "prune.keep"),
    ({"keep": 1.5}, "prune.keep"),
    ({"keep": -2}, "prune.keep"),
    ({"keep": "half"}, "prune.keep"),
    ({"keep": True}, "prune.keep"),
    ({"keep": [0.5, 0.5], "at": 1}, "prune.keep"),
    ({"at": -1}, "prune.at"),
    ({"at": "1"}, "prune.at"),
    ({"score": "norm"}, "prune.score"),
    ({"fuse": "yes"}, "prune.fuse"),
    ({"range": [1, 2, 3]}, "prune.range"),
    ({"protect_last": -1}, "prune.protect_last"),
    ({"query": 0}, "prune.query"),
    ({"query": "last"}, "prune.query"),
    ({"query": [1, 2, 3]}, "prune.query"),
    ({"accumulate": 0}, "prune.accumulate"),
    ({"score": "random", "accumulate": 2}, "prune.accumulate"),
    ({"at": 1, "accumulate": 3}, "prune.accumulate"),
    ({"at": [1, 2], "accumulate": 2}, "prune.accumulate"),
    ({"pool": 0}, "prune.pool"),
    ({"pool": 4}, "prune.pool"),
    ({"pool": True}, "prune.pool"),
    ({"score": "diversity", "pool": 3}, "prune.pool"),
    ({"seed": "a"}, "prune.seed"),
    ({"ratio": 0.5}, "prune.ratio"),
])
def test_bad_options_are_refused(prune, key):
    with pytest.raises(ValueError, match=re.escape(f"'{key}'")):
        tokred.backend(inner="aot_eager", prune=prune)


# ----------------------------------------------------------------------------- ONNX

@pytest.mark.parametrize("depth, prune", [
    (2, {"keep": 0.5, "at": 0, "score": "cls"}),
    (3, {"keep": 0.7, "at": 1, "score": "transition", "accumulate": 2}),
    (2, {"keep": 0.5, "at": 0, "score": "cls", "pool": 3}),
], ids=["cls", "transition-accumulate2", "cls-pool3"])
def test_pruned_vit_onnx_round_trip(tmp_path, depth, prune):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    zm = build("timm_vit_tiny_sdpa", depth)
    result = tokred.export_onnx(zm.model, zm.args, tmp_path / "vit_pruned.onnx", prune=prune)
    assert result.report.changed
    session = ort.InferenceSession(str(tmp_path / "vit_pruned.onnx"), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: zm.args[0].numpy()})[0])
    want = reference("timm_vit_tiny_sdpa", prune, depth)
    assert max_abs_diff(got, want) <= TOL


# ----------------------------------------------------------------------------- CUDA (Triton kernels)

CUDA_CASES = [REFERENCE_CASES[i] for i in (0, 4, 9, 15, 19)]  # cls, diversity, BERT cls, query, random+range
CUDA_TOL = 1e-3  # GPU SDPA/matmul kernels round differently; selections are clear of that (MARGIN)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", CUDA_CASES, ids=[case_id(c) for c in CUDA_CASES])
def test_cuda_equals_reference(case):
    """On CUDA the pass runs its Triton selection ops; the result still equals the CPU reference."""
    name, depth, prune = case
    want = reference(name, prune, depth)
    zm = build(name, depth)
    model = zm.model.cuda()
    args = tuple(a.cuda() for a in zm.args)
    kwargs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in zm.kwargs.items()}
    torch._dynamo.reset()
    be = tokred.backend(inner="inductor", prune=prune)
    try:
        with torch.no_grad():
            out = torch.compile(model, backend=be)(*args, **kwargs)
    finally:
        torch._dynamo.reset()
    assert be.report.changed
    got = model_output(name, out)
    got = got.cpu() if isinstance(got, torch.Tensor) else type(got)(**{k: v.cpu() for k, v in got.items()})
    assert max_abs_diff(got, want) <= CUDA_TOL
