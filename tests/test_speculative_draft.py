"""The early-exit draft (tokred.passes.speculative) against an independent reference.

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

from tokred.generate import DraftState, generate  # noqa: E402
from tokred.passes.speculative import EarlyExitDraft, cached_slice  # noqa: E402

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
