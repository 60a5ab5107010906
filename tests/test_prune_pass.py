"""Pass-level behaviour of token pruning that the reference tests (test_prune.py) do not cover:
prunable_ids (per-row prunable tokens), the KV-cache rule for padded batches, generation with a
pruned prefill through transformers' generate."""

from __future__ import annotations

import pytest
import torch

import tokred
from tokred.compat.transformers_api import returned_cache
from prune_reference import kept_count
from zoo import ZOO

IMAGE_TOKEN = 5


def _exit_after_first_block(model, ids) -> torch.Tensor:
    """Logits [B, N, V] of every token as if it left the model after block 0 (pruned tokens do)."""
    hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[1]
    return model.lm_head(model.model.norm(hidden))


def _image_ids(seed: int = 0) -> torch.Tensor:
    """[2, 12] ids with 5 IMAGE_TOKEN tokens per row, at different places in each row."""
    ids = torch.randint(10, 90, (2, 12), generator=torch.Generator().manual_seed(seed))
    ids[0, 2:7] = IMAGE_TOKEN
    ids[1, 4:9] = IMAGE_TOKEN
    return ids


@pytest.mark.parametrize("score", ["query", "transition", "random"])
def test_prunable_ids_prune_only_those_tokens(score, fresh_dynamo):
    z = ZOO["hf_llama_sdpa"]()
    ids = _image_ids()
    backend = tokred.backend(inner="eager", prune={"keep": 0.4, "at": [0], "score": score,
                                                   "prunable_ids": [IMAGE_TOKEN]})
    logits = torch.compile(z.model, backend=backend)(input_ids=ids).logits
    early = _exit_after_first_block(z.model, ids)
    with torch.no_grad():
        exited = ((logits - early).abs().amax(dim=-1) < 1e-5)  # [B, N]: tokens that left after block 0
    is_image = ids == IMAGE_TOKEN
    # keep 0.4 of 5 -> 2 kept, 3 pruned per row; only image tokens are pruned
    assert exited.sum(dim=1).tolist() == [3, 3]
    assert not (exited & ~is_image).any()
    record = backend.report.attention_sites[0]
    assert record.status == "rewritten" and "5 prunable_ids tokens per row" in record.reason


def test_prunable_ids_keep_all_is_identity(fresh_dynamo):
    z = ZOO["hf_llama_sdpa"]()
    ids = _image_ids()
    backend = tokred.backend(inner="eager", prune={"keep": 1.0, "at": [0], "prunable_ids": [IMAGE_TOKEN]})
    got = torch.compile(z.model, backend=backend)(input_ids=ids).logits
    assert torch.allclose(got, z.model(input_ids=ids).logits, atol=1e-5)


def test_prunable_ids_uneven_rows_are_reported(fresh_dynamo):
    z = ZOO["hf_llama_sdpa"]()
    ids = _image_ids()
    ids[1, 4] = 7  # row 1 now holds 4 image tokens, row 0 five
    backend = tokred.backend(inner="eager", prune={"keep": 0.5, "at": [0], "prunable_ids": [IMAGE_TOKEN]})
    got = torch.compile(z.model, backend=backend)(input_ids=ids).logits
    assert torch.allclose(got, z.model(input_ids=ids).logits, atol=1e-5)  # left unchanged
    record = backend.report.attention_sites[0]
    assert record.status == "skipped" and "different numbers" in record.reason


def test_prunable_ids_batch_with_another_count_fails_loudly(fresh_dynamo):
    z = ZOO["hf_llama_sdpa"]()
    ids = _image_ids()
    compiled = torch.compile(z.model, backend=tokred.backend(
        inner="eager", prune={"keep": 0.5, "at": [0], "prunable_ids": [IMAGE_TOKEN]}), dynamic=False)
    compiled(input_ids=ids)
    other = ids.clone()
    other[1, 4] = 7
    with pytest.raises(RuntimeError, match="prunable_ids"):
        compiled(input_ids=other)


def test_padded_prefill_with_kv_cache_is_not_pruned(fresh_dynamo):
    """transformers builds one decode mask over N + 1 keys for every layer: a pruned cache would not
    fit it, so a padded prefill returning its cache is left alone, with the reason."""
    z = ZOO["hf_llama_sdpa"]()
    ids = z.kwargs["input_ids"]
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    plain = z.model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    backend = tokred.backend(inner="eager", prune={"keep": 0.5, "at": [0]})
    z.model.forward = torch.compile(z.model.forward, backend=backend)
    got = z.model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(got, plain)
    prefill = backend.reports[0].attention_sites[0]
    assert prefill.status == "skipped" and "KV-cache output" in prefill.reason


def test_generate_with_pruned_prefill_runs_and_keep_all_is_identity(fresh_dynamo):
    z = ZOO["hf_llama_sdpa"]()
    ids = z.kwargs["input_ids"][:1]
    plain = z.model.generate(ids, max_new_tokens=4, do_sample=False)
    for keep, same in ((1.0, True), (0.5, None)):
        torch._dynamo.reset()
        backend = tokred.backend(inner="eager", prune={"keep": keep, "at": [0]})
        z.model.forward = torch.compile(z.model.forward, backend=backend)
        got = z.model.generate(ids, max_new_tokens=4, do_sample=False)
        del z.model.forward
        assert got.shape == plain.shape
        assert backend.reports[0].attention_sites[0].status == "rewritten"
        if same:
            assert torch.equal(got, plain)


@pytest.mark.parametrize("options, key", [
    ({"keep": 0.5, "at": [0], "prunable_ids": []}, "prune.prunable_ids"),
    ({"keep": 0.5, "at": [0], "prunable_ids": [-1]}, "prune.prunable_ids"),
])
def test_bad_prune_options_name_the_key(options, key, fresh_dynamo):
    z = ZOO["hf_llama_sdpa"]()
    with pytest.raises(Exception, match=key.replace(".", r"\.")):
        tokred.explain(z.model, *z.args, example_kwargs=z.kwargs, prune=options)


def test_block_beyond_the_graph_passes_through_with_the_option_named(fresh_dynamo):
    """An index past a graph's last block is not an error (another graph of the model, e.g. a
    VLM's other tower, may hold it): that graph is left as it was and a warning names the option."""
    z = ZOO["hf_llama_sdpa"]()
    backend = tokred.backend(inner="eager", prune={"keep": 0.5, "at": [1, 5]})
    with pytest.warns(tokred.TokredWarning, match=r"option 'prune\.at': block 1 is not followed"):
        got = torch.compile(z.model, backend=backend)(**z.kwargs).logits
    assert torch.equal(got, z.model(**z.kwargs).logits)
    assert not any(r.status == "rewritten" for r in backend.report.attention_sites)


@pytest.mark.parametrize("fuse", [False, True])
def test_trace_source_records_where_each_token_left(fuse, fresh_dynamo):
    """report.sources[run] [B, N]: the block after which a token was pruned (-1: kept to the end);
    the tokens it says left after block 0 are exactly those whose output is their block-0 value."""
    z = ZOO["hf_bert_sdpa"]() if fuse else ZOO["hf_llama_sdpa"]()
    model, ids = z.model, z.kwargs["input_ids"]
    report = tokred.explain(model, example_kwargs={"input_ids": ids},
                            prune={"keep": 0.5, "at": [0], "trace_source": True, "fuse": fuse})
    exits = report.sources[0]
    assert exits.shape == ids.shape and set(exits.unique().tolist()) <= {-1, 0}
    backend = tokred.backend(inner="eager", prune={"keep": 0.5, "at": [0], "fuse": fuse})
    torch._dynamo.reset()
    out = torch.compile(model, backend=backend)(input_ids=ids, output_hidden_states=False)
    with torch.no_grad():
        if fuse:  # BERT (post-norm): the last hidden state of a pruned token is its block-0 output
            early = model(input_ids=ids, output_hidden_states=True).hidden_states[1]
            got = out.last_hidden_state
        else:
            early, got = _exit_after_first_block(model, ids), out.logits
        left = (got - early).abs().amax(dim=-1) < 1e-5
    assert torch.equal(left, exits == 0)
    n, protected = ids.shape[1], 1 if fuse else 0
    assert (exits == 0).sum(dim=1).tolist() == [(n - protected) - kept_count(0.5, n - protected)] * ids.shape[0]


def test_generate_on_tokred_compiled_model_does_not_recompile_per_step(fresh_dynamo):
    """model.generate on the tokred-compiled forward: the prefill is pruned, the decode steps (one
    query token, a KV cache that grows) pass through unchanged without pinning the cache length.
    Dynamo compiles the prefill, the first step, and one step with a symbolic cache length (as for
    the dense model); a guard on a symbolic size would recompile at every step."""
    z = ZOO["hf_llama_sdpa"]()
    model, ids, new_tokens = z.model, z.kwargs["input_ids"][:1], 24
    n = ids.shape[1]
    torch._dynamo.config.recompile_limit = 64  # let the old behaviour show as a count, not a fallback
    backend = tokred.backend(inner="eager", prune={"keep": 0.5, "at": [0], "score": "query"})
    forward = model.forward
    model.forward = torch.compile(lambda *a, **k: forward(*a, **k), backend=backend)
    try:
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=0, return_dict_in_generate=True)
    finally:
        del model.forward
    assert [r.changed for r in backend.reports] == [True, False, False]  # prefill pruned, 2 step graphs
    cached = [layer.keys.shape[2] for layer in returned_cache(out).layers]
    total = n + new_tokens - 1
    assert cached == [total, total - (n - kept_count(0.5, n))]  # block 1 holds the kept prompt tokens only


@pytest.mark.parametrize("options", [{"prune": {"keep": 0.5, "at": ["encoder.block.0"], "score": "query"}},
                                     {"merge": {"r": 3}}], ids=["prune", "merge"])
def test_encoder_decoder_reduces_the_encoder_and_the_decoder_reads_its_restored_states(options, fresh_dynamo):
    """T5: the encoder and the decoder are separate stacks of blocks in one graph; a cut in the
    encoder ends at the encoder's last block, where its tokens are restored, and the decoder's
    cross-attention reads all of them. Pruned tokens leave the encoder with their block-0 value."""
    import test_sweep

    built = test_sweep.build_hf("t5")
    model, kwargs = built.model, {**built.kwargs, "use_cache": False}
    with torch.no_grad():
        dense = model(**kwargs, output_hidden_states=True)
        backend = tokred.backend(inner="eager", **options)
        got = torch.compile(model, backend=backend)(**kwargs)
    sites = backend.report.attention_sites
    assert [r.module for r in sites if r.status == "rewritten"][:1] == ["encoder.block.0.layer.0.SelfAttention"]
    assert not any(r.status == "rewritten" for r in sites if r.module.startswith("decoder"))
    encoded = got.encoder_last_hidden_state
    assert encoded.shape == dense.encoder_last_hidden_state.shape  # the decoder reads every position
    if "prune" in options:
        n = encoded.shape[1]
        early = model.encoder.final_layer_norm(dense.encoder_hidden_states[1])
        exited = (encoded - early).abs().amax(dim=-1) < 1e-5
        assert exited.sum(dim=1).tolist() == [n - kept_count(0.5, n)] * encoded.shape[0]
    with torch.no_grad():
        same = torch.compile(model, backend=tokred.backend(inner="eager", prune={"keep": 1.0, "at": [0]}))(**kwargs)
    torch.testing.assert_close(same.last_hidden_state, dense.last_hidden_state)
