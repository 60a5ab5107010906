"""Pruning and merging at a symbolic token count: a graph compiled with ``dynamic=True`` (or made
dynamic by Dynamo after a second length) is reduced, and that one graph serves every length with
each length's own kept count, the reference's at that length. What needs N fixed is refused in
words.
"""

from __future__ import annotations

import pytest
import torch

import prune_reference
import tome_reference
import tokred
from tokred.rewriter.report import REWRITTEN, SKIPPED
from tokred.rewriter.tokens import kept_count
from zoo import ZOO

LENGTHS = (9, 13)  # odd prunable counts: half-up rounding shows
TOL = 1e-4


def ids_of(n: int, batch: int = 2) -> torch.Tensor:
    return torch.randint(10, 90, (batch, n), generator=torch.Generator().manual_seed(n))


def padding_mask(n: int) -> torch.Tensor:
    """[2, n]: row 1 ends in two padding tokens."""
    mask = torch.ones(2, n, dtype=torch.long)
    mask[1, n - 2:] = 0
    return mask


def dynamic_backend(model, **options):
    """(tokred backend, the model compiled with dynamic=True through it)."""
    backend = tokred.backend(inner="eager", **options)
    return backend, torch.compile(model, backend=backend, dynamic=True)


def assert_one_symbolic_cut(backend) -> None:
    """One graph served every length, and its cut is reported as a symbolic one."""
    assert len(backend.reports) == 1
    rewritten = [s for s in backend.report.attention_sites if s.status == REWRITTEN]
    assert len(rewritten) == 1 and "each call's token count: a symbolic token count" in rewritten[0].reason


@pytest.mark.parametrize("name, options", [
    ("hf_llama_sdpa", {"keep": 0.5, "at": 0}),
    ("hf_llama_sdpa", {"keep": 3, "at": 0, "score": "query", "query": 2, "pool": 3}),
    ("hf_qwen2_sdpa", {"keep": 0.4, "at": 0, "score": "transition", "protect_last": 2}),
], ids=["query", "count-query2-pool3", "transition-protect_last"])
def test_decoder_equals_the_reference_at_every_length(fresh_dynamo, name, options):
    z = ZOO[name]()
    backend, compiled = dynamic_backend(z.model, prune={**options, "at": [options["at"]]})
    opts = prune_reference.prune_options(**{"score": "query", **options})
    for n in LENGTHS:
        with torch.no_grad():
            got = compiled(input_ids=ids_of(n)).logits
        want = prune_reference.hf_decoder_forward(z.model, ids_of(n), opts, use_cache=False).logits
        torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)
    assert_one_symbolic_cut(backend)


@pytest.mark.parametrize("options", [{"keep": 0.5, "at": 0}, {"keep": 0.5, "at": 0, "fuse": True},
                                     {"keep": 0.7, "at": 0, "score": "transition", "range": (2, -1)}],
                         ids=["cls", "cls-fuse", "transition-range"])
def test_padded_encoder_equals_the_reference_at_every_length(fresh_dynamo, options):
    """BERT with a padding mask: the mask follows the kept tokens at every length."""
    z = ZOO["hf_bert_sdpa"]()
    backend, compiled = dynamic_backend(z.model, prune={**options, "at": [options["at"]]})
    opts = prune_reference.prune_options(**{"score": "cls", **options})
    for n in LENGTHS:
        with torch.no_grad():
            got = compiled(input_ids=ids_of(n), attention_mask=padding_mask(n)).last_hidden_state
            want = prune_reference.hf_bert_forward(z.model, ids_of(n), padding_mask(n), opts).last_hidden_state
        torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)
    assert_one_symbolic_cut(backend)


@pytest.mark.parametrize("name, options", [
    ("hf_gpt2_sdpa", {"keep": 0.5, "score": "diversity"}),  # fused qkv, views of B*N rows
    ("hf_gemma3_sdpa", {"keep": 0.5, "score": "query"}),  # a sliding-window mask, a scale read by .item()
    ("hf_bert_eager", {"keep": 0.5, "score": "cls", "fuse": True}),  # eager attention's scale and mask
], ids=["gpt2-diversity", "gemma3-query", "bert_eager-cls-fuse"])
def test_symbolic_compile_equals_the_static_one_at_each_length(fresh_dynamo, name, options):
    z = ZOO[name]()
    prune = {**options, "at": [0]}
    kwargs = (lambda n: {"attention_mask": padding_mask(n)}) if "attention_mask" in z.kwargs else (lambda n: {})
    with torch.no_grad():
        static = []
        for n in LENGTHS:
            fixed = tokred.backend(inner="eager", prune=prune)
            static.append(torch.compile(z.model, backend=fixed, dynamic=False)(input_ids=ids_of(n), **kwargs(n))[0])
            assert fixed.report.changed
            torch._dynamo.reset()
        backend, compiled = dynamic_backend(z.model, prune=prune)
        for n, want in zip(LENGTHS, static):
            torch.testing.assert_close(compiled(input_ids=ids_of(n), **kwargs(n))[0], want, atol=1e-5, rtol=1e-5)
    assert_one_symbolic_cut(backend)


def test_generate_prunes_every_prompt_length(fresh_dynamo):
    """model.generate on prompts of two lengths through one tokred-compiled forward: Dynamo makes
    the second prefill's length symbolic, and that prefill is pruned too; both continuations and
    both pruned caches are the reference's."""
    z = ZOO["hf_llama_cache_sdpa"]()
    model, steps = z.model, 5
    opts = prune_reference.prune_options(keep=0.5, at=0, score="query")
    backend = tokred.backend(inner="eager", prune={"keep": 0.5, "at": [0], "score": "query"})
    forward = model.forward
    model.forward = torch.compile(lambda *a, **k: forward(*a, **k), backend=backend)
    try:
        for n in LENGTHS:
            ids = ids_of(n, batch=1)
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                     pad_token_id=0, return_dict_in_generate=True)
            _, _, want, cache = prune_reference.hf_decoder_generate(model, ids, opts, steps)
            assert torch.equal(out.sequences[:, n:], want)
            kept = prune_reference.kept_count(0.5, n)
            assert [layer.keys.shape[2] for layer in out.past_key_values.layers] == \
                [n + steps - 1, kept + steps - 1]
            assert [layer.keys.shape[2] for layer in cache.layers] == [n + steps, kept + steps]
    finally:
        del model.forward
    prefills = [r for r in backend.reports if r.changed]
    assert len(prefills) == 2  # the first length static, every later one in the symbolic graph
    assert any("a symbolic token count" in s.reason for s in prefills[1].attention_sites)


@pytest.mark.parametrize("options, reason", [
    ({"prunable_ids": [5]}, "option 'prune.prunable_ids' with a symbolic token count"),
    ({"score": "random"}, "score 'random' with a symbolic token count"),
    ({"range": (2, 7)}, "option 'prune.range' (2, 7) with a symbolic token count"),
])
def test_what_needs_a_fixed_count_is_refused_in_words(fresh_dynamo, options, reason):
    z = ZOO["hf_llama_sdpa"]()
    backend, compiled = dynamic_backend(z.model, prune={"keep": 0.5, "at": [0], **options})
    with pytest.warns(tokred.TokredWarning, match="prune"), torch.no_grad():
        got = compiled(input_ids=ids_of(9)).logits
    torch.testing.assert_close(got, z.model(input_ids=ids_of(9)).logits)
    (site, _) = backend.report.attention_sites
    assert site.status == SKIPPED and reason in site.reason and "dynamic=False" in site.reason


@pytest.mark.parametrize("r", [2, [3, 1]], ids=["r2", "r3-1"])
def test_merge_equals_the_reference_at_every_length(fresh_dynamo, r):
    """ToMe at a symbolic N: r fixed, N - r symbolic, one graph; BERT's padding keeps its own
    matching group at every length."""
    z = ZOO["hf_bert_sdpa"]()
    backend, compiled = dynamic_backend(z.model, merge={"r": r})
    for n in LENGTHS:
        with torch.no_grad():
            got = compiled(input_ids=ids_of(n), attention_mask=padding_mask(n)).last_hidden_state
            want = tome_reference.hf_bert_forward(z.model, ids_of(n), padding_mask(n), r=r)[0].last_hidden_state
        torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)
    assert len(backend.reports) == 1
    assert all(s.status == REWRITTEN and "a symbolic token count" in s.reason for s in backend.report.attention_sites)


def test_merge_caps_r_per_block_and_long_calls_share_one_graph(fresh_dynamo):
    """r=3 on two blocks: calls long enough for r in every block share one graph (13, 17, 21);
    shorter ones (r capped at half a block's tokens, as a static compile caps it) compile others;
    each equals the reference at its own length."""
    z = ZOO["hf_bert_sdpa"]()
    backend, compiled = dynamic_backend(z.model, merge={"r": 3})

    def check(n):
        with torch.no_grad():
            got = compiled(input_ids=ids_of(n), attention_mask=padding_mask(n)).last_hidden_state
            want = tome_reference.hf_bert_forward(z.model, ids_of(n), padding_mask(n), r=3)[0].last_hidden_state
        torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)

    for n in (13, 17, 21):
        check(n)
    assert len(backend.reports) == 1
    for n in (9, 11, 5):
        check(n)
    assert len(backend.reports) > 1


def test_local_merge_at_a_symbolic_count_says_why(fresh_dynamo):
    z = ZOO["hf_bert_sdpa"]()
    backend, compiled = dynamic_backend(z.model, merge={"r": 2, "mode": "local"})
    with torch.no_grad():
        compiled(input_ids=ids_of(9), attention_mask=padding_mask(9))
    assert not backend.report.changed
    assert all("(local) the token count is dynamic" in s.reason for s in backend.report.attention_sites)


def test_kept_count_is_one_expression_for_every_length():
    """The count a symbolic graph computes is the static one at each N, with no guard on N."""
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    env = ShapeEnv()
    n = env.create_unbacked_symint()
    torch._check(n >= 0)
    for keep in (0.5, 0.7, 0.25, 3):
        expr = kept_count(keep, n)
        for value in range(12):
            got = int(expr.node.expr.subs(n.node.expr, value)) if isinstance(expr, torch.SymInt) else expr
            assert got == prune_reference.kept_count(keep, value) or value == 0 and got == 0
    assert not env.guards
