"""The early-exit draft (tokred.runtime.drafters) against an independent reference.

Reference: the model run with ``output_hidden_states=True``; ``hidden_states[L]`` (the residual
stream after L blocks) goes through the model's final norm and LM head, named here by their
attributes (``model.norm`` / GPT-2's ``transformer.ln_f``, ``lm_head``): the draft itself finds them
by graph analysis, so the two routes are independent. Tiny random-weight models, 4 layers, hidden 64.
"""

from __future__ import annotations

import functools

import pytest
import torch

pytest.importorskip("transformers")

from tokred.runtime.generate import DraftState, generate  # noqa: E402
from tokred.compat.transformers_api import cache_argument  # noqa: E402
from tokred.runtime.drafters import EarlyExitDraft, cached_slice  # noqa: E402

LAYERS, VOCAB = 4, 128
MODELS = ("llama", "qwen2", "gemma3", "gpt2")


def build(name: str) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64)
    if name == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**common))
    elif name == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**common))
    elif name == "gemma3":
        # sliding window 6 < the contexts below: the draft's cache crops cross the window
        config = tf.Gemma3TextConfig(head_dim=16, sliding_window=6, **common,
                                     layer_types=["sliding_attention", "full_attention"] * 2)
        model = tf.Gemma3ForCausalLM(config)
    else:
        model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=LAYERS, n_head=4,
                                                 n_inner=128, n_positions=64, bos_token_id=1, eos_token_id=2))
    return model.eval()


def reference_logits(model, name: str, ids: torch.Tensor, exit_layer: int) -> torch.Tensor:
    """[B, N, V]: final norm + LM head applied to the hidden states after ``exit_layer`` blocks."""
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states[exit_layer]
        norm = model.transformer.ln_f if name == "gpt2" else model.model.norm
        return model.lm_head(norm(hidden))


def reference_draft(model, name: str, context: torch.Tensor, exit_layer: int, k: int) -> list:
    """k greedy tokens of the reference draft, recomputed from the whole context at every step."""
    tokens = []
    for _ in range(k):
        logits = reference_logits(model, name, context[None], exit_layer)[0, -1]
        tokens.append(int(logits.argmax()))
        context = torch.cat([context, torch.tensor([tokens[-1]])])
    return tokens


@functools.lru_cache(maxsize=None)
def built(name: str) -> tuple:
    """(name, model, its slice), once per test session: a capture takes seconds."""
    model = build(name)
    return name, model, cached_slice(model)  # later EarlyExitDraft(model, L) reuse it


@pytest.fixture(params=MODELS)
def sliced(request):
    return built(request.param)


@pytest.fixture
def llama():
    """For the drafter's bookkeeping (batch rows, sampling, validation): one architecture is enough."""
    return built("llama")


def test_slice_found_by_analysis(sliced):
    name, model, slice_ = sliced
    assert slice_.blocks == LAYERS
    prefix = "transformer.h" if name == "gpt2" else "model.layers"
    assert slice_.exit_modules == [f"{prefix}.{i}" for i in range(LAYERS)]
    assert slice_.norm_modules == (["transformer.ln_f"] if name == "gpt2" else ["model.norm"])
    # the tail reads the target's own tensors: shared, not copied
    params = list(model.parameters())
    assert slice_.weights and all(any(w is p for p in params) for w in slice_.weights)


@pytest.mark.parametrize("exit_layer", [1, LAYERS - 1])
def test_draft_logits_equal_reference(sliced, exit_layer):
    name, model, slice_ = sliced
    draft = EarlyExitDraft(model, exit_layer, slice_)
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(exit_layer))
    expected = reference_logits(model, name, ids, exit_layer)
    torch.testing.assert_close(draft.logits(ids), expected, atol=1e-5, rtol=1e-5)
    # the same through the draft's own KV cache, fed in chunks (prefill, 3 tokens, 1 token, ...)
    cache = draft.new_cache()
    chunks = [draft.logits(ids[:, a:b], cache) for a, b in ((0, 5), (5, 8), (8, 9), (9, 11))]
    torch.testing.assert_close(torch.cat(chunks, dim=1), expected, atol=1e-5, rtol=1e-5)


def test_propose_follows_reference_across_rounds(sliced):
    """Greedy proposals equal the reference draft, and stay equal when the runtime accepts some of
    them and appends its own token (the draft's cache keeps what is reused and crops the rest)."""
    name, model, slice_ = sliced
    exit_layer, k = LAYERS - 1, 3
    draft = EarlyExitDraft(model, exit_layer, slice_)
    context = torch.randint(0, VOCAB, (9,), generator=torch.Generator().manual_seed(1))
    reused = 0
    for accepted in (2, 0, 3):
        state = DraftState(tokens=context[None], lengths=torch.tensor([len(context)]),
                           reused=torch.tensor([reused]), active=torch.tensor([True]))
        proposal = draft.propose(state, k)
        expected = reference_draft(model, name, context, exit_layer, k)
        assert proposal.tokens[0].tolist() == expected
        assert proposal.counts.tolist() == [k] and proposal.probs is None
        # the runtime commits `accepted` drafts and one token of its own (here: a different token)
        own = (expected[accepted] + 1) % VOCAB if accepted < k else 5
        reused = len(context) + accepted
        context = torch.cat([context, torch.tensor(expected[:accepted] + [own])])


def test_propose_batch_rows_and_inactive(llama):
    name, model, slice_ = llama
    draft = EarlyExitDraft(model, 2, slice_)
    rows = torch.randint(0, VOCAB, (3, 8), generator=torch.Generator().manual_seed(2))
    lengths = torch.tensor([8, 5, 6])
    state = DraftState(tokens=rows, lengths=lengths, reused=torch.zeros(3, dtype=torch.long),
                       active=torch.tensor([True, True, False]))
    proposal = draft.propose(state, 2)
    for b in (0, 1):
        assert proposal.tokens[b].tolist() == reference_draft(model, name, rows[b, :lengths[b]], 2, 2)
    assert proposal.counts.tolist() == [2, 2, 0]


def test_sampling_proposals_come_with_their_distribution(llama):
    name, model, slice_ = llama
    draft = EarlyExitDraft(model, 1, slice_)
    context = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(3))
    state = DraftState(tokens=context, lengths=torch.tensor([7]), reused=torch.tensor([0]),
                       active=torch.tensor([True]), do_sample=True, temperature=0.7, top_p=0.9,
                       generator=torch.Generator().manual_seed(4))
    proposal = draft.propose(state, 3)
    assert proposal.probs.shape == (1, 3, VOCAB)
    torch.testing.assert_close(proposal.probs.sum(-1), torch.ones(1, 3))
    # every proposal lies in its nucleus, and the first q is the warped reference distribution
    assert all(proposal.probs[0, j, proposal.tokens[0, j]] > 0 for j in range(3))
    logits = reference_logits(model, name, context, 1)[0, -1]
    probs = torch.softmax(logits / 0.7, -1)
    sorted_probs, order = probs.sort(descending=True)
    kept = order[(sorted_probs.cumsum(0) - sorted_probs) < 0.9]
    assert set(torch.nonzero(proposal.probs[0, 0]).flatten().tolist()) == set(kept.tolist())


@pytest.mark.parametrize("exit_layer", [0, LAYERS, -1, True, 1.5])
def test_exit_layer_out_of_range(llama, exit_layer):
    _, model, slice_ = llama
    with pytest.raises(ValueError, match="exit_layer"):
        EarlyExitDraft(model, exit_layer, slice_)


def plain_greedy(model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decoding without a cache: the argmax of a full forward, one token at a time."""
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = model(input_ids=ids, use_cache=False).logits[:, -1]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


def test_generate_early_exit_equals_plain_greedy(sliced):
    _, model, _ = sliced
    ids = torch.randint(3, VOCAB, (1, 10), generator=torch.Generator().manual_seed(5))
    expected = plain_greedy(model, ids, 8)
    for exit_layer in (1, LAYERS - 1):
        result = generate(model, ids, 8, draft="early_exit", exit_layer=exit_layer, k=3, adaptive_k=False,
                          progress=False)
        assert result.sequences.tolist() == expected.tolist(), exit_layer


# ---- the draft sharing the target's KV cache ---------------------------------------------------


def padded_batch(seed: int) -> tuple:
    """3 prompts of 10, 7 and 5 tokens, left-padded: ids [3, 10], mask [3, 10], the unpadded rows."""
    ids = torch.randint(3, VOCAB, (3, 10), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :5] = 0
    return ids, mask, [ids[b, mask[b].bool()] for b in range(3)]


@pytest.mark.parametrize("exit_layer", [1, LAYERS - 1])
def test_shared_cache_greedy_equals_plain_greedy(sliced, exit_layer):
    """Batch rows of different lengths, fixed and adaptive k: each row's tokens equal its plain
    greedy decoding, with the cache shared (no fallback warning)."""
    import warnings

    _, model, slice_ = sliced
    for seed, adaptive in ((6, False), (7, True)):
        ids, mask, rows = padded_batch(seed)
        expected = [plain_greedy(model, row[None], 12)[0, len(row):].tolist() for row in rows]
        draft = EarlyExitDraft(model, exit_layer, slice_)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            result = generate(model, ids, 12, draft=draft, k=3, adaptive_k=adaptive, attention_mask=mask,
                              progress=False)
        assert draft.own_cache_reason is None
        assert [result.sequences[b, ids.shape[1]:].tolist() for b in range(3)] == expected, (seed, adaptive)
        assert result.stats.proposed > 0


class CheckedSharedDraft(EarlyExitDraft):
    """Before every proposal (so after every round's verification and rollback), compares each
    active row's entries in the target's cache, every layer, with a fresh prefill of the row's
    committed tokens but the last (the runtime feeds that one with the drafts)."""

    def bind(self, target) -> None:
        super().bind(target)
        self.target, self.checks = target, 0

    def propose(self, state, k):
        from transformers import DynamicCache

        assert self.own_cache_reason is None
        layers = self.target.cache.layers
        assert len(layers) == LAYERS
        for b in range(state.tokens.shape[0]):
            if not bool(state.active[b]):
                continue
            committed = state.tokens[b, :int(state.lengths[b]) - 1]
            fresh = DynamicCache()  # full layers: keeps every entry of sliding-window layers too
            with torch.no_grad():
                self.model(input_ids=committed[None], **cache_argument(self.model, fresh), use_cache=True)
            n = committed.shape[0]
            assert int(self.target.n_real[b]) == n
            for shared, own in zip(layers, fresh.layers):
                torch.testing.assert_close(shared.keys[b, :, -n:], own.keys[0], atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(shared.values[b, :, -n:], own.values[0], atol=1e-5, rtol=1e-5)
        self.checks += 1
        return super().propose(state, k)


def test_shared_cache_equals_fresh_prefill_after_every_round(sliced):
    _, model, slice_ = sliced
    ids, mask, _ = padded_batch(8)
    draft = CheckedSharedDraft(model, 2, slice_)
    result = generate(model, ids, 12, draft=draft, k=3, attention_mask=mask, progress=False)
    assert draft.checks == len(result.stats.k_history) >= 3
    assert 0 < result.stats.row_steps - result.stats.decode_steps  # several rows verified per round


def attention_modules(model, name: str) -> list:
    """Each block's attention module, by attribute name (the draft finds blocks by analysis)."""
    blocks = model.transformer.h if name == "gpt2" else model.model.layers
    return [block.attn if name == "gpt2" else block.self_attn for block in blocks]


def layer_tokens(model, name: str, run) -> tuple:
    """(run's result, [tokens whose attention each layer computed], [calls of each layer's attention])."""
    tokens, calls = [0] * LAYERS, [0] * LAYERS
    handles = []
    for i, module in enumerate(attention_modules(model, name)):
        def count(module, args, kwargs, i=i):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            tokens[i] += hidden.shape[0] * hidden.shape[1]
            calls[i] += 1
        handles.append(module.register_forward_pre_hook(count, with_kwargs=True))
    try:
        return run(), tokens, calls
    finally:
        for handle in handles:
            handle.remove()


def test_shared_cache_evaluates_fewer_layers(sliced):
    """Counted with hooks on each block's attention: layers >= L evaluate the same tokens with and
    without sharing, layers < L fewer with it (no recomputation in the verification, one token per
    draft step); with sharing every layer evaluates exactly the prompt plus k + 1 tokens per row
    and round."""
    name, model, slice_ = sliced
    exit_layer = 2
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(9))

    def run(share):
        draft = EarlyExitDraft(model, exit_layer, slice_, share_cache=share)
        return generate(model, ids, 14, draft=draft, k=3, progress=False)

    shared, shared_tokens, shared_calls = layer_tokens(model, name, lambda: run(True))
    own, own_tokens, own_calls = layer_tokens(model, name, lambda: run(False))
    assert torch.equal(shared.sequences, own.sequences)
    assert shared.stats.k_history == own.stats.k_history
    rounds = shared.stats.k_history  # k of each drafting round; the other decode steps verify 1 token
    plain_steps = shared.stats.decode_steps - len(rounds)
    assert shared_tokens == [ids.numel() + 2 * (sum(k + 1 for k in rounds) + plain_steps)] * LAYERS
    assert shared_tokens[exit_layer:] == own_tokens[exit_layer:]
    assert all(s < o for s, o in zip(shared_tokens[:exit_layer], own_tokens[:exit_layer]))
    # calls of layers < L: shared, the prefill + k + 1 batched draft steps per round (+ plain steps);
    # own, the prefill + k draft forwards per active row and round + every verification
    assert shared_calls[:exit_layer] == [1 + sum(k + 1 for k in rounds) + plain_steps] * exit_layer
    assert all(s < o for s, o in zip(shared_calls[:exit_layer], own_calls[:exit_layer]))
    steps = shared.stats.decode_steps
    assert shared_calls[exit_layer:] == own_calls[exit_layer:] == [1 + steps] * (LAYERS - exit_layer)


def test_shared_cache_falls_back_for_another_target(llama):
    """A draft built on one model, used with another target object: a warning says why, the draft
    keeps its own cache, the output is still the target's greedy decoding."""
    name, model, slice_ = llama
    other = build("llama")  # same weights (seeded), another object
    draft = EarlyExitDraft(model, 2, slice_)
    ids = torch.randint(3, VOCAB, (1, 8), generator=torch.Generator().manual_seed(10))
    with pytest.warns(UserWarning, match="keeps its own KV cache: the draft was built on another model"):
        result = generate(other, ids, 6, draft=draft, k=2, progress=False)
    assert "another model object" in draft.own_cache_reason
    assert result.sequences.tolist() == plain_greedy(other, ids, 6).tolist()


def test_first_shared_step_is_checked_and_undone(llama):
    """The checks after the first draft step on the target's cache: layers other than 0..L-1 that
    grew, or a block output that is not a tensor, give a reason and the step's entries are removed."""
    from transformers import DynamicCache

    _, model, slice_ = llama
    draft = EarlyExitDraft(model, 2, slice_)
    cache = DynamicCache()
    for layer in range(LAYERS):
        cache.update(torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16), layer)
    before = [5] * LAYERS
    hidden = torch.zeros(1, 1, 64)
    for layer in (0, 1):
        cache.update(torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16), layer)
    assert draft._first_step_problem(before, cache, hidden) is None
    cache.update(torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16), 3)  # a layer >= L grew too
    reason = draft._first_step_problem(before, cache, hidden)
    assert "changed the target's cache layers [0, 1, 3]" in reason
    assert [layer.get_seq_length() for layer in cache.layers] == before
    for layer in (0, 1):
        cache.update(torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16), layer)
    assert "returns a tuple" in draft._first_step_problem(before, cache, (hidden,))
    assert [layer.get_seq_length() for layer in cache.layers] == before


def test_share_cache_option_checked(llama):
    _, model, slice_ = llama
    with pytest.raises(ValueError, match="'share_cache' must be True or False"):
        EarlyExitDraft(model, 1, slice_, share_cache="yes")


def test_shared_cache_samples_like_the_own_cache(llama):
    """Sampling: the shared-cache draft proposes from the same q as the own-cache draft (the same
    blocks on the same tokens), so with one seed both give the same tokens, acceptances included
    (rejection sampling keeps the target's distribution for any q: tests/test_generate_sampling.py)."""
    _, model, slice_ = llama
    ids = torch.randint(3, VOCAB, (1, 9), generator=torch.Generator().manual_seed(11))
    runs = []
    for share in (True, False):
        draft = EarlyExitDraft(model, 2, slice_, share_cache=share)
        runs.append(generate(model, ids, 16, draft=draft, k=3, do_sample=True, temperature=0.9, top_p=0.95,
                             seed=12, progress=False))
        assert draft.own_cache_reason == (None if share else "share_cache=False")
    shared, own = runs
    assert shared.sequences.tolist() == own.sequences.tolist()
    assert (shared.stats.proposed, shared.stats.accepted) == (own.stats.proposed, own.stats.accepted)
    assert shared.stats.accepted > 0
