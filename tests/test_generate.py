"""tokred.generate, greedy: speculative decoding must reproduce the target's plain greedy decoding
token for token, for every kind of draft, on Llama, Qwen2, Gemma3 (sliding window) and GPT-2, with
batches of different prompt lengths and eos stop times; plus the KV-cache rollback, adaptive k, the
statistics and the argument checks.

The reference is an independent loop: one sequence at a time, no padding, no KV cache, the whole
prefix recomputed each step, argmax (first index on ties). Models run in float64 so that the batched,
cached forwards and the reference pick the same argmax without near-tie luck.
"""

from __future__ import annotations

import functools

import pytest
import torch

from tokred.runtime.generate import Draft, Drafter, DraftState, GenerateResult, generate
from tokred.runtime.speculative import BatchedDecoder, crop_tail, next_k, prompt_lookup

VOCAB = 97
MAX_NEW = 10


def _tiny(arch: str, layers: int = 2, hidden: int = 64, seed: int = 0) -> torch.nn.Module:
    """A random-weight causal LM of ``arch`` in float64, eval mode."""
    import transformers as tf

    torch.manual_seed(seed)
    common = {"vocab_size": VOCAB, "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": 4,
              "intermediate_size": 2 * hidden, "max_position_embeddings": 128}
    if arch == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(num_key_value_heads=2, **common))
    elif arch == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(num_key_value_heads=2, **common))
    elif arch == "gemma3":
        # Layer 0 slides over 5 tokens, fewer than a prompt plus its continuation: the window matters.
        types = ["sliding_attention", "full_attention"] * layers
        model = tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(num_key_value_heads=2, head_dim=16, sliding_window=5,
                                                         layer_types=types[:layers], **common))
    elif arch == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=hidden, n_layer=layers, n_head=4,
                                                 n_inner=2 * hidden, n_positions=128,
                                                 bos_token_id=1, eos_token_id=2))
    else:
        raise KeyError(arch)
    # Random weights at init scale give nearly flat logits; sharpen the head so greedy paths loop
    # (prompt lookup finds matches) and argmax gaps are wide.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    return model.eval().double()


@functools.cache
def target(arch: str) -> torch.nn.Module:
    return _tiny(arch)


@functools.cache
def draft_model() -> torch.nn.Module:
    """A smaller, unrelated random model with the same vocabulary (a poor draft)."""
    return _tiny("llama", layers=1, hidden=32, seed=7)


def reference_greedy(model, prompt: list[int], max_new: int, eos: int | None = None) -> list[int]:
    """Plain greedy decoding, one sequence, no cache: the new tokens (up to and including eos)."""
    ids = torch.tensor([prompt])
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new):
            token = int(model(input_ids=ids, use_cache=False).logits[0, -1].argmax())
            new.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
            if token == eos:
                break
    return new


def prompts() -> list[list[int]]:
    """Three prompts of different lengths; the first repeats itself (prompt lookup matches)."""
    g = torch.Generator().manual_seed(3)
    motif = torch.randint(0, VOCAB, (4,), generator=g).tolist()
    return [motif * 3, torch.randint(0, VOCAB, (5,), generator=g).tolist(),
            torch.randint(0, VOCAB, (9,), generator=g).tolist()]


@functools.cache
def references(arch: str) -> tuple:
    return tuple(tuple(reference_greedy(target(arch), p, MAX_NEW)) for p in prompts())


def left_padded(rows: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def generated(result: GenerateResult, input_width: int, row: int, pad: int | None = None) -> list[int]:
    new = result.sequences[row, input_width:].tolist()
    if pad is not None:
        while new and new[-1] == pad:
            new.pop()
    return new


class RandomDrafter(Drafter):
    """The worst case: uniformly random proposals (almost all rejected)."""

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)
        self.calls: list[DraftState] = []

    def propose(self, state: DraftState, k: int) -> Draft:
        self.calls.append(state)
        return Draft(torch.randint(0, VOCAB, (state.tokens.shape[0], k), generator=self.generator))


class OracleDrafter(Drafter):
    """The best case: the target's own greedy continuation of each row (all accepted), read from the
    reference runs: ``continuations[b]`` is row b's prompt followed by its reference greedy tokens."""

    def __init__(self, continuations: list[list[int]]):
        self.continuations = continuations

    def propose(self, state: DraftState, k: int) -> Draft:
        rows = []
        for b, full in enumerate(self.continuations):
            start = int(state.lengths[b])
            assert state.tokens[b, :start].tolist() == full[:start]  # the runtime committed the right tokens
            ahead = full[start:start + k]
            rows.append(ahead + [0] * (k - len(ahead)))
        return Draft(torch.tensor(rows), counts=torch.tensor([min(k, len(full) - int(n))
                                                              for full, n in zip(self.continuations, state.lengths)]))


def oracle(arch: str, rows: list[int] | None = None) -> OracleDrafter:
    picked = range(3) if rows is None else rows
    return OracleDrafter([prompts()[i] + list(references(arch)[i]) for i in picked])


DRAFTS = ["none", "prompt_lookup", "model", "random", "oracle", "early_exit", "early_exit_own_cache"]


def make_draft(kind: str, arch: str):
    from tokred.runtime.drafters import EarlyExitDraft

    return {"none": lambda: None, "prompt_lookup": lambda: "prompt_lookup", "model": draft_model,
            "random": RandomDrafter, "oracle": lambda: oracle(arch),
            "early_exit": lambda: EarlyExitDraft(target(arch), 1),  # shares the target's KV cache
            "early_exit_own_cache": lambda: EarlyExitDraft(target(arch), 1, share_cache=False)}[kind]()


# ---- greedy identity ----------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3", "gpt2"])
@pytest.mark.parametrize("kind", DRAFTS)
def test_batched_greedy_equals_plain_greedy(arch, kind):
    """Batch of 3 left-padded prompts of lengths 12, 5, 9: each row equals its own plain greedy run."""
    ids, mask = left_padded(prompts())
    result = generate(target(arch), ids, MAX_NEW, draft=make_draft(kind, arch), k=3, attention_mask=mask)
    assert result.sequences.shape == (3, ids.shape[1] + MAX_NEW)
    assert torch.equal(result.sequences[:, :ids.shape[1]], ids)
    for row, expected in enumerate(references(arch)):
        assert generated(result, ids.shape[1], row) == list(expected), f"row {row}"
    stats = result.stats
    assert stats.new_tokens == 3 * MAX_NEW
    assert 0 <= stats.accepted <= stats.proposed
    assert stats.target_forwards == 1 + stats.decode_steps
    if kind == "oracle":
        assert stats.accepted == stats.proposed > 0


@pytest.mark.parametrize("kind", ["none", "prompt_lookup", "model"])
def test_single_sequence(kind):
    """Batch 1, no padding at all."""
    prompt = prompts()[0]
    result = generate(target("llama"), torch.tensor([prompt]), MAX_NEW, draft=make_draft(kind, "llama"), k=4)
    assert generated(result, len(prompt), 0) == list(references("llama")[0])


def test_right_padded_prompts():
    rows = prompts()
    width = max(map(len, rows))
    ids = torch.tensor([r + [5] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    result = generate(target("llama"), ids, MAX_NEW, draft="prompt_lookup", attention_mask=mask)
    for row in range(3):
        assert generated(result, width, row) == list(references("llama")[row])


def test_early_exit_draft_greedy_identity():
    ids, mask = left_padded(prompts())
    result = generate(target("llama"), ids, MAX_NEW, draft="early_exit", exit_layer=1, attention_mask=mask)
    for row, expected in enumerate(references("llama")):
        assert generated(result, ids.shape[1], row) == list(expected)
    assert 0 <= result.stats.accepted <= result.stats.proposed


@pytest.mark.parametrize("dynamic", [False, True])
def test_compiled_model(fresh_dynamo, dynamic):
    """A model whose forward goes through torch.compile with the tokred backend (OptimizedModule)."""
    import tokred

    compiled = torch.compile(target("llama"), backend=tokred.backend(inner="eager"), dynamic=dynamic)
    ids, mask = left_padded(prompts()[:2])
    result = generate(compiled, ids, 4, draft="prompt_lookup", k=2, attention_mask=mask)
    for row in range(2):
        assert generated(result, ids.shape[1], row) == list(references("llama")[row][:4])


# ---- eos ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["none", "prompt_lookup", "oracle", "random", "early_exit"])
def test_eos_stops_rows_at_different_times(kind):
    """eos = a token row 0 emits mid-way: rows stop at their own first eos (or run to MAX_NEW), are
    padded after it, and nothing is emitted past it."""
    plain = references("gpt2")
    eos = plain[0][5]
    pad = VOCAB - 1 if eos != VOCAB - 1 else VOCAB - 2
    expected = [reference_greedy(target("gpt2"), p, MAX_NEW, eos=eos) for p in prompts()]
    assert len(expected[0]) < MAX_NEW  # row 0 stops early; the test is only meaningful then
    ids, mask = left_padded(prompts())
    draft = OracleDrafter([p + e for p, e in zip(prompts(), expected)]) if kind == "oracle" \
        else make_draft(kind, "gpt2")
    result = generate(target("gpt2"), ids, MAX_NEW, draft=draft, attention_mask=mask,
                      eos_token_id=eos, pad_token_id=pad)
    longest = max(map(len, expected))
    assert result.sequences.shape[1] == ids.shape[1] + longest
    for row in range(3):
        new = result.sequences[row, ids.shape[1]:].tolist()
        assert new[:len(expected[row])] == expected[row]
        assert all(t == pad for t in new[len(expected[row]):])
    assert result.stats.new_tokens == sum(map(len, expected))


def test_eos_in_the_first_token_and_max_new_tokens_one():
    prompt = prompts()[1]
    first = references("llama")[1][0]
    result = generate(target("llama"), torch.tensor([prompt]), MAX_NEW, draft="prompt_lookup", eos_token_id=[first])
    assert result.sequences[0, len(prompt):].tolist() == [first]
    result = generate(target("llama"), torch.tensor([prompt]), 1, draft=oracle("llama", [1]))
    assert result.sequences[0, len(prompt):].tolist() == [first]
    assert result.stats.target_forwards == 1 and result.stats.proposed == 0


# ---- the KV cache -------------------------------------------------------------------------------


def _fresh_last_logits(model, rows: list[list[int]]) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack([model(input_ids=torch.tensor([r]), use_cache=False).logits[0, -1] for r in rows])


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_rollback_then_forward_equals_fresh_forward(arch):
    """After a step where rows keep different numbers of new tokens (rejections), the next forward's
    logits equal a fresh, cache-free forward on each row's committed prefix."""
    model = target(arch)
    rows = [prompts()[0], prompts()[1]]
    with torch.no_grad():
        decoder = BatchedDecoder(model, 2, torch.device("cpu"))
        ids = torch.tensor([rows[0], rows[1] + [0] * (len(rows[0]) - len(rows[1]))])
        lengths = torch.tensor([len(rows[0]), len(rows[1])])
        decoder.step(ids, lengths, last_only=True)
        decoder.keep(lengths)
        proposal = torch.tensor([[11, 12, 13, 14], [21, 22, 23, 24]])
        decoder.step(proposal, torch.tensor([4, 3]))
        decoder.keep(torch.tensor([1, 3]))  # row 0 rejects 3, row 1 rejects none of its 3
        committed = [rows[0] + [11], rows[1] + [21, 22, 23]]
        nxt = torch.tensor([[31], [41]])
        logits = decoder.step(nxt, torch.tensor([1, 1]))[:, 0]
        decoder.keep(torch.tensor([1, 1]))
        expected = _fresh_last_logits(model, [committed[0] + [31], committed[1] + [41]])
        torch.testing.assert_close(logits, expected, rtol=1e-9, atol=1e-9)
        # A rollback of committed tokens (as a drafter does), then a forward again.
        decoder.rollback(torch.tensor([2, 0]))
        logits = decoder.step(torch.tensor([[51], [52]]), torch.tensor([1, 1]))[:, 0]
        decoder.keep(torch.tensor([1, 1]))
        expected = _fresh_last_logits(model, [rows[0] + [51], committed[1] + [41, 52]])
        torch.testing.assert_close(logits, expected, rtol=1e-9, atol=1e-9)


def test_crop_is_per_layer_by_count():
    """Layers of different lengths (a pruned prefill) each lose the same number of tokens."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for layer, length in enumerate((7, 4)):
        cache.update(torch.randn(1, 2, length, 8), torch.randn(1, 2, length, 8), layer)
    before = [layer.keys.clone() for layer in cache.layers]
    crop_tail(cache, 3)
    assert [layer.keys.shape[2] for layer in cache.layers] == [4, 1]
    for layer, old in zip(cache.layers, before):
        assert torch.equal(layer.keys, old[:, :, :-3])


# ---- drafting pieces ----------------------------------------------------------------------------


def test_prompt_lookup_prefers_longest_then_most_recent_match():
    context = torch.tensor([1, 2, 3, 9, 9, 7, 2, 3, 8, 5, 6, 1, 2, 3])
    # The trigram [1, 2, 3] occurs at 0 only: its continuation is 9, 9, 7.
    assert prompt_lookup(context, 3, 3).tolist() == [9, 9, 7]
    assert prompt_lookup(context, 3, 10).tolist() == context[3:].tolist()[:10]
    # With n <= 2 the most recent [2, 3] is at 6: continuation 8, 5.
    assert prompt_lookup(context, 2, 2).tolist() == [8, 5]
    assert prompt_lookup(torch.tensor([4, 5, 6]), 3, 4).tolist() == []
    assert prompt_lookup(torch.tensor([4]), 3, 4).tolist() == []


def test_prompt_lookup_min_ngram_floor():
    """Matches shorter than min_ngram propose nothing; longer ones are unaffected by the floor."""
    context = torch.tensor([1, 2, 3, 9, 9, 7, 2, 3, 8, 5, 6, 1, 2, 3])
    assert prompt_lookup(context, 3, 3, min_ngram=3).tolist() == [9, 9, 7]
    only_one = torch.tensor([5, 8, 6, 7, 8])  # the last token 8 occurred before, [7, 8] did not
    assert prompt_lookup(only_one, 3, 2, min_ngram=1).tolist() == [6, 7]
    assert prompt_lookup(only_one, 3, 2, min_ngram=2).tolist() == []


def test_prompt_lookup_drafter_respects_min_ngram():
    """With min_ngram = ngram = 4 on prompts without repeated 4-grams nothing is proposed (every step
    is a plain step), and the output still equals plain greedy."""
    prompt = prompts()[2]
    result = generate(target("llama"), torch.tensor([prompt]), MAX_NEW, draft="prompt_lookup", ngram=4, min_ngram=4)
    assert generated(result, len(prompt), 0) == list(references("llama")[2])
    context = prompt + list(references("llama")[2])
    grams = [tuple(context[i:i + 4]) for i in range(len(context) - 3)]
    assert len(set(grams)) == len(grams)  # the premise: no 4-gram repeats in this context
    assert result.stats.proposed == 0 and result.stats.decode_steps == MAX_NEW - 1
    # ngram=1 alone lowers the default floor with it (1-token matches draft again).
    ones = generate(target("llama"), torch.tensor([prompts()[0]]), MAX_NEW, draft="prompt_lookup", ngram=1)
    assert generated(ones, len(prompts()[0]), 0) == list(references("llama")[0]) and ones.stats.proposed > 0


def test_model_drafter_sees_reused_prefix():
    """DraftState.reused counts the previous context plus the accepted drafts; never above lengths."""
    drafter = RandomDrafter(seed=1)
    ids = torch.tensor([prompts()[2]])
    generate(target("llama"), ids, MAX_NEW, draft=drafter, k=3, adaptive_k=False)
    assert drafter.calls[0].reused.tolist() == [0]
    for before, after in zip(drafter.calls, drafter.calls[1:]):
        assert int(after.reused) >= int(before.lengths)
        assert int(after.reused) <= int(after.lengths) - 1


# ---- adaptive k ---------------------------------------------------------------------------------


def test_next_k_rule():
    assert next_k(2, 4, proposed=2, accepted=2) == 3
    assert next_k(4, 4, proposed=4, accepted=4) == 4
    assert next_k(4, 4, proposed=4, accepted=1) == 3
    assert next_k(1, 4, proposed=1, accepted=0) == 1
    assert next_k(3, 4, proposed=3, accepted=2) == 3
    assert next_k(3, 4, proposed=0, accepted=0) == 3


def test_adaptive_k_shrinks_on_rejection_and_stays_up_when_accepted():
    ids = torch.tensor([prompts()[1]])
    bad = generate(target("llama"), ids, MAX_NEW, draft=RandomDrafter(), k=4).stats
    assert bad.k_history[0] == 4 and min(bad.k_history) == 1
    assert bad.k_history == sorted(bad.k_history, reverse=True)  # random drafts never all pass here
    fixed = generate(target("llama"), ids, MAX_NEW, draft=RandomDrafter(), k=4, adaptive_k=False).stats
    assert fixed.k_history[:5] == [4] * 5  # only the tokens still wanted cut it, near the end
    good = generate(target("llama"), ids, MAX_NEW, draft=oracle("llama", [1]), k=4).stats
    room = [min(4, MAX_NEW - 2 - 5 * i) for i in range(len(good.k_history))]
    assert good.k_history == room  # k stays at its bound, cut only by the tokens still wanted
    # All accepted: each verification commits k + 1 tokens (the last one cut to what is left).
    steps = -(-(MAX_NEW - 1) // 5)
    assert good.target_forwards == 1 + steps and good.mean_accepted_length == pytest.approx((MAX_NEW - 1) / steps)


def test_stats_counts():
    ids, mask = left_padded(prompts())
    stats = generate(target("qwen2"), ids, MAX_NEW, draft="prompt_lookup", k=3, attention_mask=mask).stats
    assert stats.new_tokens == 3 * MAX_NEW
    assert stats.acceptance_rate == pytest.approx(stats.accepted / stats.proposed)
    # Every row generates MAX_NEW - 1 tokens after the prefill, over row_steps row-forwards.
    assert stats.mean_accepted_length == pytest.approx(3 * (MAX_NEW - 1) / stats.row_steps)
    assert stats.mean_accepted_length == pytest.approx(1 + stats.accepted / stats.row_steps)
    assert stats.time_to_first_token_s > 0 and stats.total_s >= stats.time_to_first_token_s
    assert stats.tokens_per_s == pytest.approx(stats.new_tokens / stats.total_s)
    only = generate(target("qwen2"), ids, MAX_NEW, attention_mask=mask, return_stats=False)
    assert isinstance(only, torch.Tensor) and torch.equal(only, generate(target("qwen2"), ids, MAX_NEW,
                                                                         attention_mask=mask).sequences)


def test_progress_bar_counts_new_tokens(capsys):
    generate(target("llama"), torch.tensor([prompts()[1]]), MAX_NEW, draft="prompt_lookup", progress=True)
    err = capsys.readouterr().err
    assert f"{MAX_NEW}/{MAX_NEW}" in err
    generate(target("llama"), torch.tensor([prompts()[1]]), MAX_NEW, progress=False)
    assert capsys.readouterr().err == ""


# ---- bad input ----------------------------------------------------------------------------------


class NoCacheLM(torch.nn.Module):
    """Returns logits only, like a causal LM without KV-cache support."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, 8)
        self.head = torch.nn.Linear(8, VOCAB)

    def forward(self, input_ids, **kwargs):
        from transformers.modeling_outputs import CausalLMOutputWithPast

        return CausalLMOutputWithPast(logits=self.head(self.embed(input_ids)))


@pytest.mark.parametrize("kwargs, message", [
    ({"k": 0}, "'k' must be an int >= 1"),
    ({"max_new_tokens": 0}, "'max_new_tokens'"),
    ({"ngram": 0}, "'ngram'"),
    ({"min_ngram": 0}, "'min_ngram' must be an int >= 1"),
    ({"ngram": 2, "min_ngram": 3}, r"'min_ngram' \(3\) must be <= 'ngram' \(2\)"),
    ({"temperature": 0.0}, "'temperature'"),
    ({"top_p": 1.5}, "'top_p'"),
    ({"draft": "medusa"}, "unknown 'draft' 'medusa'"),
    ({"draft": 3}, "unknown 'draft' of type int"),
    ({"eos_token_id": "x"}, "'eos_token_id'"),
    ({"exit_layer": 1}, "'exit_layer' is only used with draft='early_exit'"),
    ({"draft": "early_exit", "exit_layer": 2}, r"'exit_layer' must be an int in \[1, 1\]"),
    ({"draft": "early_exit", "exit_layer": 0}, "'exit_layer'"),
    ({"attention_mask": torch.ones(1, 3)}, "'attention_mask' has shape"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(target("llama"), torch.tensor([prompts()[1]]), **kwargs)


def test_bad_models_and_drafts():
    ids = torch.tensor([prompts()[1]])
    with pytest.raises(ValueError, match="'draft' model has vocabulary size 50"):
        import transformers as tf

        other = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1,
                                                   num_attention_heads=2, intermediate_size=32))
        generate(target("llama"), ids, 3, draft=other)
    with pytest.raises(ValueError, match="'model' returned no KV cache"):
        generate(NoCacheLM(), ids, 3)
    with pytest.raises(ValueError, match="'input_ids' must be an integer tensor"):
        generate(target("llama"), torch.zeros(5), 3)

    class OutOfRange(Drafter):
        def propose(self, state, k):
            return Draft(torch.full((1, k), VOCAB + 5))

    with pytest.raises(ValueError, match="token ids outside"):
        generate(target("llama"), ids, 5, draft=OutOfRange())
