"""tokred.generate, sampling: speculative (rejection) sampling must keep the target's distribution.

A tiny-vocabulary target (V = 8) makes the exact distribution of the first three generated tokens
computable by enumerating all 8 + 64 prefixes. Many samples are drawn at once (the prompt repeated
over a batch: every row is an independent sample, and the batch exercises per-row acceptance), and a
chi-square test at significance 0.001 compares the empirical joint distribution with the exact one.
A deliberately bad draft model (sharp and unrelated to the target) makes rejections frequent. The
negative control replaces the acceptance rule with "accept every draft" and checks that the same test
detects the bias.
"""

from __future__ import annotations

import functools
import importlib

import pytest
import torch

from tokred.runtime.generate import generate, warp_probs
from tokred.runtime.drafters import EarlyExitDraft
from tokred.runtime.speculative import (
    accepted_prefix,
    pick_rows,
    sample,
    speculative_sample,
)

VOCAB = 8
PROMPT = [3, 1, 4, 1, 5, 3, 1]
SAMPLES = 6000
NEW = 3
ALPHA = 1e-3

# The module, not the function: a package may re-export the function under the module's name.
generate_module = importlib.import_module("tokred.runtime.generate")


def _tiny(seed: int, sharpness: float) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                               num_attention_heads=2, num_key_value_heads=1, intermediate_size=32,
                                               max_position_embeddings=32))
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(sharpness)
    return model.eval().double()


@functools.cache
def target() -> torch.nn.Module:
    return _tiny(seed=0, sharpness=3.0)


@functools.cache
def bad_draft() -> torch.nn.Module:
    return _tiny(seed=11, sharpness=12.0)


def exact_joint(model, prompt: list[int], steps: int, temperature: float, top_p: float) -> torch.Tensor:
    """The target's distribution of its next ``steps`` tokens: [V] * steps, by enumeration."""
    joint = torch.ones(())
    prefixes = [()]
    for _ in range(steps):
        ids = torch.tensor([prompt + list(p) for p in prefixes])
        with torch.no_grad():
            probs = warp_probs(model(input_ids=ids, use_cache=False).logits[:, -1], temperature, top_p).double()
        joint = joint.unsqueeze(-1) * probs.view(*joint.shape, VOCAB)
        prefixes = [p + (t,) for p in prefixes for t in range(VOCAB)]
    return joint


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square goodness of fit; cells expecting fewer than 5 are pooled into one."""
    from scipy.stats import chi2

    counts, probs = counts.flatten().double(), probs.flatten().double()
    expected = probs * counts.sum()
    small = expected < 5
    observed = torch.cat([counts[~small], counts[small].sum().view(1)])
    expected = torch.cat([expected[~small], expected[small].sum().view(1)])
    if expected[-1] == 0:  # nothing pooled; a nonzero count there would be an impossible outcome
        assert observed[-1] == 0
        observed, expected = observed[:-1], expected[:-1]
    statistic = float(((observed - expected) ** 2 / expected).sum())
    return float(chi2.sf(statistic, df=observed.numel() - 1))


def sample_joint(draft, k: int, temperature: float, top_p: float, prompt=PROMPT, seed: int = 0):
    """Counts [V]*NEW of the first NEW generated tokens over SAMPLES rows, and the generate stats."""
    ids = torch.tensor([prompt]).repeat(SAMPLES, 1)
    result = generate(target(), ids, NEW, draft=draft, k=k, do_sample=True, temperature=temperature,
                      top_p=top_p, seed=seed)
    new = result.sequences[:, len(prompt):]
    assert new.shape == (SAMPLES, NEW)
    flat = (new * torch.tensor([VOCAB ** (NEW - 1 - i) for i in range(NEW)])).sum(dim=1)
    counts = torch.bincount(flat, minlength=VOCAB ** NEW).view([VOCAB] * NEW)
    return counts, result.stats


CASES = {
    # name: (draft, k, temperature, top_p, prompt)
    "draft_model_k2": (bad_draft, 2, 1.0, 1.0, PROMPT),
    "draft_model_k1_warped": (bad_draft, 1, 0.7, 0.8, PROMPT),
    "prompt_lookup_onehot_q": (lambda: "prompt_lookup", 2, 1.3, 1.0, [2, 6, 2, 6, 2, 6, 2]),
    "no_draft": (lambda: None, 2, 1.0, 0.9, PROMPT),
    # the target's first layer, writing its K/V into the target's cache (batched over the samples)
    "early_exit_shared_cache_warped": (lambda: EarlyExitDraft(target(), 1), 2, 0.8, 0.9, PROMPT),
}


@pytest.mark.parametrize("case", list(CASES))
def test_speculative_sampling_keeps_target_distribution(case):
    make, k, temperature, top_p, prompt = CASES[case]
    counts, stats = sample_joint(make(), k, temperature, top_p, prompt)
    exact = exact_joint(target(), prompt, NEW, temperature, top_p)
    p_value = chi_square_p_value(counts, exact)
    assert p_value > ALPHA, f"chi-square p = {p_value:.2e}"
    if case != "no_draft":
        # The draft was used and was bad: both acceptance and rejection happened.
        assert 0 < stats.accepted < stats.proposed


def _accept_every_draft(drafts, counts, draft_probs, target_probs, generator):
    """Biased: keeps every draft (no rejection), so the draft's distribution leaks through."""
    accepted = counts.clone()
    return accepted, sample(pick_rows(target_probs, accepted), generator)


def _resample_from_p(drafts, counts, draft_probs, target_probs, generator):
    """Biased (the classic slip): after a rejection draws from p instead of normalize(max(0, p - q))."""
    if drafts.shape[1] == 0:
        return counts * 0, sample(target_probs[:, 0], generator)
    p = target_probs[:, :-1].gather(-1, drafts.unsqueeze(-1)).squeeze(-1)
    q = draft_probs.gather(-1, drafts.unsqueeze(-1)).squeeze(-1)
    u = torch.rand(p.shape, generator=generator, dtype=p.dtype)
    accepted = accepted_prefix(u * q < p, counts)
    return accepted, sample(pick_rows(target_probs, accepted), generator)


@pytest.mark.parametrize("biased", [_accept_every_draft, _resample_from_p])
def test_negative_control_biased_samplers_are_detected(monkeypatch, biased):
    """The same chi-square test must reject a biased acceptance rule, else the tests above prove nothing."""
    monkeypatch.setattr(generate_module, "speculative_sample", biased)
    counts, _ = sample_joint(bad_draft(), 2, 1.0, 1.0)
    p_value = chi_square_p_value(counts, exact_joint(target(), PROMPT, NEW, 1.0, 1.0))
    assert p_value < ALPHA, f"the biased sampler was not detected (p = {p_value:.2e})"


def test_seed_makes_sampling_reproducible():
    ids = torch.tensor([PROMPT]).repeat(4, 1)
    runs = [generate(target(), ids, 6, draft=bad_draft(), do_sample=True, seed=s).sequences for s in (5, 5, 6)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


# ---- the acceptance rule on its own ---------------------------------------------------------------


@pytest.mark.parametrize("one_hot", [False, True])
def test_rejection_step_output_is_distributed_as_p(one_hot):
    """One verification position, many rows: the committed token (the accepted draft, or the
    residual draw after a rejection) is distributed as p, whatever q is."""
    rows = 60000
    generator = torch.Generator().manual_seed(0)
    p = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15], dtype=torch.float64)
    q = torch.tensor([0.5, 0.05, 0.3, 0.05, 0.1], dtype=torch.float64)
    if one_hot:
        drafts = torch.full((rows, 1), 2)
        draft_probs = None
    else:
        drafts = torch.multinomial(q.expand(rows, -1), 1, replacement=True, generator=generator)
        draft_probs = q.expand(rows, 1, -1)
    # Position 1's distribution (the bonus after an accepted draft) is irrelevant here: counts of one
    # token only look at what is committed at position 0.
    target_probs = torch.stack([p, torch.full_like(p, 0.2)]).expand(rows, -1, -1)
    accepted, next_token = speculative_sample(drafts, torch.ones(rows, dtype=torch.long), draft_probs,
                                              target_probs, generator)
    first = torch.where(accepted == 1, drafts[:, 0], next_token)
    counts = torch.bincount(first, minlength=5)
    assert chi_square_p_value(counts, p) > ALPHA
    # And the acceptance rate is sum(min(p, q)) (one-hot q: p of the drafted token).
    expected_rate = float(p[2]) if one_hot else float(torch.minimum(p, q).sum())
    assert float(accepted.double().mean()) == pytest.approx(expected_rate, abs=0.01)


def test_accept_prefix_stops_at_first_mismatch_and_counts():
    matches = torch.tensor([[True, True, False, True], [True, True, True, True], [False, True, True, True]])
    assert accepted_prefix(matches, torch.tensor([4, 2, 4])).tolist() == [2, 2, 0]


def test_warp_probs_temperature_and_nucleus():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    plain = torch.softmax(logits, -1)
    torch.testing.assert_close(warp_probs(logits), plain)
    torch.testing.assert_close(warp_probs(logits, temperature=0.5), torch.softmax(logits / 0.5, -1))
    # plain = [0.644, 0.237, 0.087, 0.032]: top_p 0.8 keeps the first two (0.644 < 0.8 <= 0.881).
    kept = plain[:2] / plain[:2].sum()
    torch.testing.assert_close(warp_probs(logits, top_p=0.8), torch.cat([kept, torch.zeros(2)]))
    # A nucleus smaller than the top token keeps the top token alone.
    torch.testing.assert_close(warp_probs(logits, top_p=0.1), torch.tensor([1.0, 0.0, 0.0, 0.0]))
    batched = warp_probs(torch.stack([logits, logits.flip(0)]), top_p=0.8)
    torch.testing.assert_close(batched[1], warp_probs(logits, top_p=0.8).flip(0))


def test_exact_joint_marginals_and_conditionals():
    """The enumeration: a distribution whose first-token marginal and whose conditional given a
    first token match direct forwards."""
    joint = exact_joint(target(), PROMPT, 2, 1.0, 1.0)
    assert joint.shape == (VOCAB, VOCAB)
    assert float(joint.sum()) == pytest.approx(1.0)
    with torch.no_grad():
        first = torch.softmax(target()(input_ids=torch.tensor([PROMPT])).logits[0, -1], -1)
        second = torch.softmax(target()(input_ids=torch.tensor([PROMPT + [6]])).logits[0, -1], -1)
    torch.testing.assert_close(joint.sum(dim=1), first)
    torch.testing.assert_close(joint[6] / joint[6].sum(), second)
