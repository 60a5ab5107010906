"""The kv_cache pass (tokred/passes/kv_cache.py) against the plain-PyTorch reference (kv_reference.py).

Tiny GQA decoders (Llama, Qwen2: 12 query heads over 4 KV heads) compiled with
``tokred.backend(inner="aot_eager", kv_cache={...})``: for every method (and merging) the prefill's
logits are the dense ones, each layer's returned cache equals the reference's cut, and greedy decode
steps at positions N, N+1, ... on that cache give the reference's tokens and logits; keep=1.0 is the
identity; generate() runs on the compiled forward; PyramidKV's budgets; what is not compressed says
why; the report's bytes are the cache's; bad options are refused by name.
"""

from __future__ import annotations

import functools
import json
import warnings

import pytest
import torch

import tokred
from tokred.compat.transformers_api import returned_cache
from tokred.passes.kv_cache import KVCacheOptions, layer_budgets
import kv_reference
import zoo
from zoo import ZOO

N = 24
STEPS = 3
TOL = 1e-4
WINDOW = 4
METHODS = ["snapkv", "tova", "h2o", "knorm", "streaming", "random"]


def prompt(n: int = N, batch: int = 2) -> torch.Tensor:
    return torch.randint(3, zoo.VOCAB, (batch, n), generator=torch.Generator().manual_seed(1))


@functools.lru_cache(maxsize=None)
def model(name: str, depth: int = 2):
    saved, zoo.DEPTH = zoo.DEPTH, depth
    try:
        return ZOO[name]().model
    finally:
        zoo.DEPTH = saved


def method_options(method: str, **more) -> dict:
    opts = {"method": method, "keep": 0.5, **more}
    if method in ("snapkv", "h2o"):
        opts.setdefault("window", WINDOW)
    return opts


@functools.lru_cache(maxsize=None)
def compiled_run(name: str, options_json: str, depth: int = 2, n: int = N):
    """(prefill logits, [(keys, values) per layer], decode tokens, [decode logits], report) of the
    tokred-compiled model: a prefill, then STEPS greedy steps with the positions given."""
    return compiled_model_run(model(name, depth), json.loads(options_json), n)


def compiled_model_run(m, options: dict, n: int = N):
    """:func:`compiled_run` of a model object."""
    torch._dynamo.reset()
    be = tokred.backend(inner="aot_eager", kv_cache=options)
    fn = torch.compile(m, backend=be)
    ids = prompt(n)
    try:
        with torch.no_grad():
            out = fn(input_ids=ids, use_cache=True)
            cache = returned_cache(out)
            layers = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
            token, tokens, logits = out.logits[:, -1:].argmax(-1), [], []
            for step in range(STEPS):
                tokens.append(token)
                pos = torch.full((ids.shape[0], 1), n + step, dtype=torch.long)
                step_out = fn(input_ids=token, position_ids=pos, use_cache=True,
                              **tokred.cache_argument(m, cache))
                logits.append(step_out.logits)
                token = step_out.logits[:, -1:].argmax(-1)
    finally:
        torch._dynamo.reset()
    return out.logits, layers, torch.cat(tokens, 1), logits, be.report


def run(name: str, options: dict, depth: int = 2, n: int = N):
    return compiled_run(name, json.dumps(options, sort_keys=True), depth, n)


def reference(name: str, options: dict, depth: int = 2, n: int = N, budgets=None, m=None):
    m = model(name, depth) if m is None else m
    ids = prompt(n)
    logits, layers = kv_reference.compress(m, ids, budgets=budgets, **options)
    tokens, steps = kv_reference.decode(m, layers, logits[:, -1:].argmax(-1), n, STEPS)
    return logits, layers, tokens, steps


def assert_same_run(got, want) -> None:
    logits, layers, tokens, steps, _ = got
    want_logits, want_layers, want_tokens, want_steps = want
    torch.testing.assert_close(logits, want_logits, atol=TOL, rtol=TOL)
    assert [k.shape for k, _ in layers] == [k.shape for k, _ in want_layers]
    for i, ((k, v), (wk, wv)) in enumerate(zip(layers, want_layers)):
        torch.testing.assert_close(k, wk, atol=TOL, rtol=TOL, msg=lambda m: f"layer {i} keys: {m}")
        torch.testing.assert_close(v, wv, atol=TOL, rtol=TOL, msg=lambda m: f"layer {i} values: {m}")
    assert torch.equal(tokens, want_tokens)
    for got_step, want_step in zip(steps, want_steps):
        torch.testing.assert_close(got_step, want_step, atol=TOL, rtol=TOL)


def generate_compiled(m, be, prompts: list, warnings_are_errors: bool = False) -> list:
    """transformers' greedy generate() of STEPS tokens after each of ``prompts``, on ``m`` with its
    forward compiled by ``be`` (one compiled forward for all; the eager one put back after)."""
    eager = m.forward
    m.forward = torch.compile(eager, backend=be)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            if warnings_are_errors:
                warnings.simplefilter("error", tokred.TokredWarning)
            return [m.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=STEPS,
                               pad_token_id=0)[:, ids.shape[1]:] for ids in prompts]
    finally:
        m.forward = eager


def test_kv_cache_pass_is_registered():
    from tokred.backend import PASSES

    assert "kv_cache" in PASSES


# ----------------------------------------------------------------------------- reference equality

@pytest.mark.parametrize("method", METHODS)
def test_method_equals_reference(method):
    """Prefill logits dense, each layer's cache the reference's cut, decode on it the reference's."""
    options = method_options(method)
    got = run("hf_llama_cache_sdpa", options)
    assert_same_run(got, reference("hf_llama_cache_sdpa", options))
    assert [k.shape[2] for k, _ in got[1]] == [N // 2, N // 2]
    assert got[4].changed


@pytest.mark.parametrize("method", ["snapkv", "h2o"])
def test_moe_decoder_equals_reference(method):
    """Mixtral (GQA attention, a top-2 MoE MLP): the cache cut and decode as on Llama."""
    from test_prune_blocks import tiny_mixtral

    m = tiny_mixtral(2)
    options = method_options(method)
    got = compiled_model_run(m, options)
    assert_same_run(got, reference("mixtral", options, m=m))
    assert [k.shape[2] for k, _ in got[1]] == [N // 2, N // 2] and got[4].changed


@pytest.mark.parametrize("method", ["snapkv", "knorm"])
def test_merge_equals_reference(method):
    options = method_options(method, merge=True)
    assert_same_run(run("hf_llama_cache_sdpa", options), reference("hf_llama_cache_sdpa", options))


@pytest.mark.parametrize("method, heads", [("snapkv", "shared"), ("h2o", "shared"), ("tova", "uniform")])
def test_head_sharing_equals_reference(method, heads):
    """heads="shared": every KV head keeps the same positions (the layer's mean scores); TOVA's own
    default, which "uniform" turns off."""
    options = method_options(method, heads=heads)
    assert_same_run(run("hf_llama_cache_sdpa", options), reference("hf_llama_cache_sdpa", options))


def test_options_of_a_method_equal_reference():
    """sinks, protect_last, pool and an int keep, on Qwen2 (q/k/v biases)."""
    options = {"method": "snapkv", "keep": 9, "window": 3, "pool": 3, "sinks": 2, "protect_last": 5}
    assert_same_run(run("hf_qwen2_sdpa", options), reference("hf_qwen2_sdpa", options))


def test_pyramid_budgets_equal_reference():
    options = method_options("snapkv", layers="pyramid")
    got = run("hf_llama_cache_sdpa", options, depth=4)
    budgets = layer_budgets(0.5, N, 4, "pyramid", WINDOW)
    assert [k.shape[2] for k, _ in got[1]] == budgets
    assert budgets[0] > budgets[-1] and abs(sum(budgets) - 4 * N // 2) <= 2
    assert_same_run(got, reference("hf_llama_cache_sdpa", options, depth=4, budgets=budgets))


@pytest.mark.parametrize("method", ["snapkv", "streaming"])
def test_keep_everything_is_the_identity(method):
    """keep=1.0: the dense cache, the dense decode (invariant 2)."""
    got = run("hf_llama_cache_sdpa", method_options(method, keep=1.0))
    m = model("hf_llama_cache_sdpa")
    with torch.no_grad():
        dense = m(input_ids=prompt(), use_cache=True)
    layers = [(layer.keys, layer.values) for layer in returned_cache(dense).layers]
    for (k, v), (dense_k, dense_v) in zip(got[1], layers):
        assert torch.equal(k, dense_k) and torch.equal(v, dense_v)
    tokens, _ = kv_reference.decode(m, layers, dense.logits[:, -1:].argmax(-1), N, STEPS)
    assert torch.equal(got[2], tokens)


def test_generate_on_the_compiled_forward(fresh_dynamo):
    """transformers' generate() on the tokred-compiled forward: the reference's greedy tokens."""
    options = method_options("snapkv")
    m = model("hf_llama_cache_sdpa")
    ids = prompt()
    _, _, want, _ = reference("hf_llama_cache_sdpa", options)
    be = tokred.backend(inner="aot_eager", kv_cache=options)
    got, = generate_compiled(m, be, [ids], warnings_are_errors=True)  # the decode graphs warn nothing
    assert torch.equal(got, want)
    assert any("decode step" in note for note in be.report.notes)


def test_compressed_context_answers_questions_from_one_cut(fresh_dynamo):
    """Question-agnostic use: the context alone is compressed; each question is fed on a copy of that
    cache at positions N, N+1, ... and answered greedily, as the reference computes it; keep=1.0
    answers as the dense model's generate() on context + question."""
    m = model("hf_llama_cache_sdpa")
    context, questions = prompt(), [prompt(5).flip(1), prompt(3)]
    options = method_options("snapkv")
    compressed = tokred.CompressedContext(torch.compile(m, backend=tokred.backend(inner="aot_eager",
                                                                                  kv_cache=options)), context)
    assert compressed.cache_entries == [N // 2, N // 2] and compressed.length == N
    _, layers = kv_reference.compress(m, context, **options)
    for question in questions + questions[:1]:  # the first question again: the cut cache is unchanged
        want, _ = kv_reference.decode(m, layers, None, N, STEPS, forced=question)
        assert torch.equal(compressed.answer(question, max_new_tokens=STEPS), want)
    torch._dynamo.reset()
    dense = tokred.CompressedContext(torch.compile(m, backend=tokred.backend(
        inner="aot_eager", kv_cache=method_options("snapkv", keep=1.0))), context)
    full = torch.cat([context, questions[0]], 1)
    with torch.no_grad():
        want = m.generate(full, attention_mask=torch.ones_like(full), do_sample=False, max_new_tokens=STEPS,
                          pad_token_id=0)[:, full.shape[1]:]
    assert torch.equal(dense.answer(questions[0], max_new_tokens=STEPS), want)
    with pytest.raises(ValueError, match="question_ids must be"):
        dense.answer(questions[0][:1])


def test_gemma3_sliding_window_layers_keep_their_window():
    """Gemma3 (sliding-window layers between full ones, q/k norms): the full layers' caches are cut as
    the reference cuts them, the sliding layers' (already the last window) are left as they are, with
    the reason, and decode on that cache gives the reference's tokens and logits."""
    got = run("hf_gemma3_sdpa", method_options("snapkv"))
    want = reference("hf_gemma3_sdpa", method_options("snapkv"))
    assert_same_run(got, want)
    sliding = [s for s in got[4].attention_sites if "sliding-window layer" in s.reason]
    window = model("hf_gemma3_sdpa").config.sliding_window
    assert len(sliding) == 1 and [k.shape[2] for k, _ in got[1]] == [window - 1, N // 2]


def adaptive_reference(name: str, options: dict):
    """The reference's adaptive cut (each head's kept entries, zero-padded) and decode: the dense
    cache, each step attending only to the kept entries of each (layer, KV head)."""
    m, ids, kept_masks = model(name), prompt(), []
    logits, layers = kv_reference.compress(m, ids, kept_masks=kept_masks, **options)
    with torch.no_grad():
        dense = [(layer.keys, layer.values) for layer in returned_cache(m(input_ids=ids, use_cache=True)).layers]
    tokens, steps = kv_reference.decode(m, dense, logits[:, -1:].argmax(-1), N, STEPS, kept_masks=kept_masks)
    return (logits, layers, tokens, steps), kept_masks


@pytest.mark.parametrize("name, method, more", [
    ("hf_llama_cache_sdpa", "snapkv", {}), ("hf_qwen2_sdpa", "snapkv", {"window": 3, "pool": 3}),
    ("hf_llama_cache_sdpa", "h2o", {"protect_last": 1}), ("hf_llama_cache_sdpa", "knorm", {}),
    ("hf_llama_cache_sdpa", "random", {})])
def test_adaptive_heads_equal_reference(name, method, more):
    """heads="adaptive" (AdaKV): a layer keeps keep x N x Hkv entries, shared across its heads by
    score (each at least its floor, at most head_max x the per-head budget); the cache is stored
    rectangular, zero-padded, and the decode steps attend to the kept entries only (the reference
    masks a dense cache instead)."""
    options = method_options(method, keep=0.25, heads="adaptive", **more)
    got = run(name, options)
    want, kept_masks = adaptive_reference(name, options)
    assert_same_run(got, want)
    for (k, _), kept in zip(got[1], kept_masks):
        per_head = (k != 0).any(-1).sum(-1)  # [B, Hkv] real entries
        assert k.shape[2] == N // 2 and torch.equal(per_head, kept.sum(-1))
        assert (per_head.sum(-1) == 4 * (N // 4)).all()
        # the heads' shares differ (h2o's accumulated attention favours the first positions alike
        # in every head of these random models, so its heads may keep as many)
        assert per_head.min() < per_head.max() or method == "h2o"
    before, after = got[4].kv_cache_bytes
    assert after * 2 == before  # stored: half of the prompt's slots (head_max 2 x a quarter)
    # the decode steps' masks matter: the same padded cache decoded without them differs
    unmasked, _ = kv_reference.decode(model(name), got[1], want[0][:, -1:].argmax(-1), N, STEPS)
    assert not torch.equal(unmasked, got[2]) or not torch.allclose(
        kv_reference.decode(model(name), got[1], want[0][:, -1:].argmax(-1), N, 1)[1][0], got[3][0], atol=TOL)


def test_adaptive_heads_keep_everything_is_the_identity():
    got = run("hf_llama_cache_sdpa", method_options("snapkv", keep=1.0, heads="adaptive"))
    m = model("hf_llama_cache_sdpa")
    with torch.no_grad():
        dense = m(input_ids=prompt(), use_cache=True)
    for (k, v), layer in zip(got[1], returned_cache(dense).layers):
        assert torch.equal(k, layer.keys) and torch.equal(v, layer.values)
    tokens, steps = kv_reference.decode(m, got[1], dense.logits[:, -1:].argmax(-1), N, STEPS)
    assert torch.equal(got[2], tokens)
    for got_step, want_step in zip(got[3], steps):
        torch.testing.assert_close(got_step, want_step, atol=TOL, rtol=TOL)


def test_adaptive_heads_generate_on_the_compiled_forward(fresh_dynamo):
    """generate() on a forward compiled with heads="adaptive": its decode graphs mask the padding
    (the report says so) and the greedy tokens are the reference's."""
    options = method_options("snapkv", keep=0.25, heads="adaptive")
    m = model("hf_llama_cache_sdpa")
    ids = prompt()
    (_, _, want, _), _ = adaptive_reference("hf_llama_cache_sdpa", options)
    be = tokred.backend(inner="aot_eager", kv_cache=options)
    got, = generate_compiled(m, be, [ids])
    assert torch.equal(got, want)
    assert any("block their cache's padding slots" in note for note in be.report.notes)


def test_adaptive_heads_compressed_context_masks_the_padding(fresh_dynamo):
    """CompressedContext on an adaptive cut steps through the compiled forward (its decode graphs
    mask the padding), answering as the reference's masked decode does."""
    m = model("hf_llama_cache_sdpa")
    context, question = prompt(), prompt(4).flip(1)
    options = method_options("snapkv", keep=0.25, heads="adaptive")
    compressed = tokred.CompressedContext(torch.compile(m, backend=tokred.backend(inner="aot_eager",
                                                                                  kv_cache=options)), context)
    assert compressed.padded and compressed.cache_entries == [N // 2, N // 2]
    kept_masks = []
    kv_reference.compress(m, context, kept_masks=kept_masks, **options)
    with torch.no_grad():
        dense = [(layer.keys, layer.values) for layer in returned_cache(m(input_ids=context, use_cache=True)).layers]
    want, _ = kv_reference.decode(m, dense, None, N, STEPS, forced=question, kept_masks=kept_masks)
    assert torch.equal(compressed.answer(question, max_new_tokens=STEPS), want)


@pytest.mark.parametrize("method, chunk", [("snapkv", WINDOW), ("tova", 2), ("knorm", 2)])
def test_decode_budget_equals_reference(fresh_dynamo, method, chunk):
    """kv_cache.decode: while answering, the cache (12 entries after the prefill's cut) grows to
    max + every = 14 and is cut back to max = 10 by the scores of the last ``chunk`` tokens, fed
    again over the cropped cache; every cut as the reference makes it, the chunk's graph compiled
    once for all of them."""
    m = model("hf_llama_cache_sdpa")
    context, question = prompt(), prompt(3).flip(1)
    options = method_options(method, decode={"every": 4, "max": 10})
    be = tokred.backend(inner="aot_eager", kv_cache=options)
    compressed = tokred.CompressedContext(torch.compile(m, backend=be), context)
    got = compressed.answer(question, max_new_tokens=12)
    prefill = {k: v for k, v in options.items() if k != "decode"}
    _, layers = kv_reference.compress(m, context, **prefill)
    scoring = {k: v for k, v in prefill.items() if k != "keep"}
    want, cuts = kv_reference.answer_within_budget(m, layers, context, question, 12, 4, 10, chunk, **scoring)
    assert torch.equal(got, want)
    assert compressed.decode_cuts == cuts >= 3
    assert sum("kv_cache decode" in " ".join(r.notes) for r in be.reports) == 1
    assert any("model.generate decodes on the prefill's cut alone" in note for note in be.report.notes)


def test_log_likelihood_of_a_continuation_is_the_dense_models_at_keep_one(fresh_dynamo):
    """CompressedContext.log_likelihood at keep=1.0: the dense model's teacher-forced log-probs of
    the continuation (its perplexity); at keep=0.25 they differ."""
    m = model("hf_llama_cache_sdpa")
    context, continuation = prompt(), prompt(6).flip(1)
    with torch.no_grad():
        dense = m(input_ids=torch.cat([context, continuation], 1)).logits[:, N - 1:-1].float().log_softmax(-1)
    want = dense.gather(-1, continuation.unsqueeze(-1)).squeeze(-1)
    got = {}
    for keep in (1.0, 0.25):
        compressed = tokred.CompressedContext(torch.compile(m, backend=tokred.backend(
            inner="aot_eager", kv_cache=method_options("snapkv", keep=keep))), context)
        got[keep] = compressed.log_likelihood(continuation)
        torch._dynamo.reset()
    torch.testing.assert_close(got[1.0], want, atol=TOL, rtol=TOL)
    assert not torch.allclose(got[0.25], want, atol=TOL)
    with pytest.raises(ValueError, match="continuation_ids must be"):
        compressed.log_likelihood(continuation[:1])


def test_decode_budget_cuts_nothing_below_it(fresh_dynamo):
    """A budget the answer never reaches: the answer is the one without it."""
    m = model("hf_llama_cache_sdpa")
    context, question = prompt(), prompt(3)
    answers = []
    for decode in ({"every": 8, "max": 32}, None):
        options = method_options("snapkv", **({"decode": decode} if decode else {}))
        compressed = tokred.CompressedContext(torch.compile(m, backend=tokred.backend(inner="aot_eager",
                                                                                      kv_cache=options)), context)
        answers.append(compressed.answer(question, max_new_tokens=STEPS))
        assert compressed.decode_cuts == 0
    assert torch.equal(*answers)


@pytest.mark.parametrize("method, more", [("snapkv", {}), ("h2o", {"merge": True}), ("tova", {"keep": 9})])
def test_symbolic_token_count_compresses_every_prompt_length(fresh_dynamo, method, more):
    """dynamic=True: one prefill graph for every prompt length, the kept count computed per call
    (half up, or a count); each length's cache and decode steps are the reference's. (Not knorm
    here: layer 0's keys of one token at two positions have the same norm, rotary being a rotation,
    and the random prompts repeat tokens: a tie either order may break.)"""
    m = model("hf_llama_cache_sdpa")
    options = method_options(method, **more)
    be = tokred.backend(inner="aot_eager", kv_cache=options)
    fn = torch.compile(m, backend=be, dynamic=True)
    for n in (N, 19):
        ids = prompt(n)
        with torch.no_grad():
            out = fn(input_ids=ids, use_cache=True)
            cache = returned_cache(out)
            layers = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
            token, tokens = out.logits[:, -1:].argmax(-1), []
            for step in range(STEPS):
                tokens.append(token)
                step_out = fn(input_ids=token, position_ids=torch.full_like(token, n + step), use_cache=True,
                              **tokred.cache_argument(m, cache))
                token = step_out.logits[:, -1:].argmax(-1)
        want_logits, want_layers = kv_reference.compress(m, ids, **options)
        want_tokens, _ = kv_reference.decode(m, want_layers, want_logits[:, -1:].argmax(-1), n, STEPS)
        torch.testing.assert_close(out.logits, want_logits, atol=TOL, rtol=TOL)
        for (k, v), (wk, wv) in zip(layers, want_layers):
            torch.testing.assert_close(k, wk, atol=TOL, rtol=TOL)
            torch.testing.assert_close(v, wv, atol=TOL, rtol=TOL)
        assert torch.equal(torch.cat(tokens, 1), want_tokens)
    assert [k.shape[2] for k, _ in layers] == [9 if "keep" in more else 10] * 2  # 19 tokens: 9.5 rounds up
    assert any("of each call's tokens (a symbolic token count)" in note for note in be.report.notes)


def test_generate_on_two_prompt_lengths_compresses_both(fresh_dynamo):
    """model.generate on prompts of two lengths: Dynamo makes the second prefill's length symbolic
    (automatic dynamic shapes), and that prefill is compressed too: both answers the reference's."""
    options = method_options("snapkv")
    m = model("hf_llama_cache_sdpa")
    prompts = [prompt(N), prompt(19)]
    wants = []
    for ids in prompts:  # the reference first: it runs the eager forward
        logits, layers = kv_reference.compress(m, ids, **options)
        wants.append(kv_reference.decode(m, layers, logits[:, -1:].argmax(-1), ids.shape[1], STEPS)[0])
    be = tokred.backend(inner="aot_eager", kv_cache=options)
    for got, want in zip(generate_compiled(m, be, prompts), wants):
        assert torch.equal(got, want)
    assert any("a symbolic token count" in note for note in be.report.notes)


def test_symbolic_token_count_refusals_say_why(fresh_dynamo):
    m = model("hf_llama_cache_sdpa")
    be = tokred.backend(inner="aot_eager", kv_cache=method_options("snapkv", layers="pyramid"))
    with torch.no_grad():
        torch.compile(m, backend=be, dynamic=True)(input_ids=prompt(), use_cache=True)
    assert not be.report.changed
    assert all("PyramidKV's per-layer budgets needs it at compile time" in s.reason
               for s in be.report.attention_sites)


# ----------------------------------------------------------------------------- report and reasons

def test_report_says_tokens_and_bytes_per_layer():
    _, layers, _, _, report = run("hf_llama_cache_sdpa", method_options("knorm"))
    before, after = report.kv_cache_bytes
    kept_bytes = sum(t.numel() * t.element_size() for kv in layers for t in kv)
    assert after == kept_bytes and before == 2 * kept_bytes
    rewritten = [s for s in report.attention_sites if s.status == "rewritten"]
    assert len(rewritten) == 2
    assert all(f"caches {N // 2} of {N} tokens x 4 KV heads" in s.reason for s in rewritten)
    assert "KV cache after the prefill" in str(report)


def _compile_once(m, options: dict, **inputs):
    torch._dynamo.reset()
    be = tokred.backend(inner="aot_eager", kv_cache=options)
    try:
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = torch.compile(m, backend=be)(**inputs)
    finally:
        torch._dynamo.reset()
    return out, be.report, [str(w.message) for w in caught if issubclass(w.category, tokred.TokredWarning)]


def test_padded_batch_is_skipped_with_the_reason():
    m = model("hf_llama_cache_sdpa")
    ids = prompt()
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    out, report, warned = _compile_once(m, method_options("snapkv"), input_ids=ids, attention_mask=mask,
                                        use_cache=True)
    assert not report.changed
    assert all("attention mask" in s.reason for s in report.attention_sites)
    assert [layer.keys.shape[2] for layer in returned_cache(out).layers] == [N, N]
    assert warned and "kv_cache" in warned[0]


def test_without_use_cache_says_so():
    _, report, warned = _compile_once(model("hf_llama_cache_sdpa"), method_options("tova"), input_ids=prompt(),
                                      use_cache=False)
    assert not report.changed
    assert all("returns no KV cache" in s.reason for s in report.attention_sites)
    assert warned


def test_budget_below_the_always_kept_is_skipped():
    _, report, _ = _compile_once(model("hf_llama_cache_sdpa"), {"method": "snapkv", "keep": 2, "window": 4},
                                 input_ids=prompt(), use_cache=True)
    assert not report.changed
    assert all("fewer than the 4 always kept" in s.reason for s in report.attention_sites)


# ----------------------------------------------------------------------------- options

def test_option_defaults_per_method():
    assert KVCacheOptions.parse({}) == KVCacheOptions(method="snapkv", pool=5, protect_last=32)
    assert KVCacheOptions.parse({"method": "streaming"}).sinks == 4
    assert KVCacheOptions.parse({"method": "tova"}).protect_last == 1
    assert KVCacheOptions.parse(0.25).keep == 0.25


@pytest.mark.parametrize("value, named", [
    ({"method": "nope"}, "kv_cache.method"), ({"keep": 0.0}, "kv_cache.keep"), ({"keep": 1.5}, "kv_cache.keep"),
    ({"pool": 4}, "kv_cache.pool"), ({"method": "knorm", "pool": 3}, "kv_cache.pool"),
    ({"method": "knorm", "window": 3}, "kv_cache.window"), ({"layers": "cone"}, "kv_cache.layers"),
    ({"heads": "all"}, "kv_cache.heads"), ({"method": "streaming", "heads": "adaptive"}, "kv_cache.heads"),
    ({"head_max": 2.0}, "kv_cache.head_max"), ({"heads": "adaptive", "head_max": 0.5}, "kv_cache.head_max"),
    ({"heads": "adaptive", "merge": True}, "kv_cache.merge"),
    ({"merge": 1}, "kv_cache.merge"), ({"sinks": -1}, "kv_cache.sinks"),
    ({"decode": {"every": 64}}, "kv_cache.decode"), ({"decode": {"every": 64, "max": 8}}, "kv_cache.decode.max"),
    ({"method": "knorm", "decode": {"every": 1, "max": 8}}, "kv_cache.decode.every"),
    ({"decode": {"every": 64, "max": 512}, "layers": "pyramid"}, "kv_cache.decode"), ("snapkv", "kv_cache"),
])
def test_bad_options_are_refused_by_name(value, named):
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        tokred.backend(kv_cache=value)


def test_layer_budgets():
    assert layer_budgets(0.5, 100, 3, "uniform", 0) == [50, 50, 50]
    assert layer_budgets(30, 20, 2, "uniform", 0) == [20, 20]
    pyramid = layer_budgets(0.5, 100, 5, "pyramid", 0)
    assert pyramid == sorted(pyramid, reverse=True) and sum(pyramid) == 250
    assert min(layer_budgets(0.1, 100, 4, "pyramid", 8)) == 8
    assert layer_budgets(2, 100, 2, "uniform", 4) == [2, 2]  # below the always kept: refused by the pass
