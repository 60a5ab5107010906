"""Speculative decoding for transformers causal LMs: ``tokred.generate``.

A draft proposes up to k tokens per sequence; the target verifies them all in ONE forward (input:
the last committed token followed by the drafts) and keeps the longest accepted prefix plus one
token of its own; the KV cache is rolled back past the rejected drafts. Greedy output equals plain
greedy decoding of the target; sampling keeps the target's distribution (rejection sampling).

Drafts: ``None`` (plain decoding with the KV cache), ``"prompt_lookup"`` (n-gram matches in the
context), ``"early_exit"`` (the target's first layers, :class:`tokred.runtime.drafters.EarlyExitDraft`),
a separate transformers model with the same vocabulary, or any :class:`Drafter`.

Batches keep per-sequence acceptance: each sequence commits its own number of tokens per step
(see :mod:`tokred.runtime.speculative` for how the batched cache stays exact).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from tokred.compat import transformers_api
from tokred.runtime.speculative import (
    BatchedDecoder,
    greedy_accept,
    model_config,
    next_k,
    pick_rows,
    prompt_lookup,
    sample,
    speculative_sample,
)
from tokred.runtime.drafters import Draft, Drafter, DraftState, EarlyExitDraft, warp_probs

__all__ = [
    "Draft",
    "DraftState",
    "Drafter",
    "GenerateResult",
    "GenerateStats",
    "ModelDrafter",
    "PromptLookupDrafter",
    "generate",
    "warp_probs",
]

# ---- results -------------------------------------------------------------------------------------


@dataclass
class GenerateStats:
    """What a ``generate`` call did. Token counts are summed over the batch; a sequence's tokens after
    its eos are not counted.

    new_tokens:         generated tokens (eos included).
    target_forwards:    forwards of the target model (the prefill included).
    decode_steps:       target forwards after the prefill (one per verification or plain step).
    proposed:           draft tokens sent to verification (rows still generating only).
    accepted:           of those, accepted by the target.
    acceptance_rate:    accepted / proposed (0.0 when nothing was proposed).
    committed_in_decode, row_steps: tokens committed by decode steps, and (sequence, decode step)
                        pairs with the sequence still generating.
    mean_accepted_length: committed_in_decode / row_steps: tokens committed per sequence per target
                        forward (accepted drafts + the target's own token); 1.0 for plain decoding.
    time_to_first_token_s, total_s: wall time of the prefill (through the first token) and of the call.
    tokens_per_s:       new_tokens / total_s.
    k_history:          the draft length k asked for at each decode step (empty without a draft).
    """

    new_tokens: int = 0
    target_forwards: int = 0
    decode_steps: int = 0
    proposed: int = 0
    accepted: int = 0
    committed_in_decode: int = 0
    row_steps: int = 0
    time_to_first_token_s: float = 0.0
    total_s: float = 0.0
    k_history: list = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def mean_accepted_length(self) -> float:
        return self.committed_in_decode / self.row_steps if self.row_steps else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.total_s if self.total_s > 0 else 0.0

    def as_dict(self) -> dict:
        return {
            "new_tokens": self.new_tokens,
            "target_forwards": self.target_forwards,
            "decode_steps": self.decode_steps,
            "proposed": self.proposed,
            "accepted": self.accepted,
            "acceptance_rate": self.acceptance_rate,
            "mean_accepted_length": self.mean_accepted_length,
            "time_to_first_token_s": self.time_to_first_token_s,
            "total_s": self.total_s,
            "tokens_per_s": self.tokens_per_s,
            "k_history": list(self.k_history),
        }


@dataclass
class GenerateResult:
    """sequences: [B, T + new] int64: the input ids as given, then each row's generated tokens,
    padded after its eos (or where it stopped) with the pad token. stats: :class:`GenerateStats`."""

    sequences: torch.Tensor
    stats: GenerateStats


# ---- built-in drafters ---------------------------------------------------------------------------


class PromptLookupDrafter(Drafter):
    """Prompt lookup decoding: propose the tokens that followed the most recent earlier occurrence of
    the context's last n tokens (n from ``ngram`` down to ``min_ngram``; shorter matches propose
    nothing, see :func:`tokred.runtime.speculative.prompt_lookup`). Deterministic (q is one-hot)."""

    def __init__(self, ngram: int = 3, min_ngram: int = 2):
        if not 1 <= min_ngram <= ngram:
            raise ValueError(f"tokred.generate: 'min_ngram' must be in [1, ngram={ngram}], got {min_ngram!r}")
        self.ngram = ngram
        self.min_ngram = min_ngram

    def propose(self, state: DraftState, k: int) -> Draft:
        tokens = state.tokens.cpu()
        lengths = state.lengths.tolist()
        active = state.active.tolist()
        batch = tokens.shape[0]
        proposals = torch.zeros(batch, k, dtype=torch.long)
        counts = torch.zeros(batch, dtype=torch.long)
        for row in range(batch):
            if not active[row]:
                continue
            found = prompt_lookup(tokens[row, :lengths[row]], self.ngram, k, self.min_ngram)
            proposals[row, :found.shape[0]] = found
            counts[row] = found.shape[0]
        device = state.tokens.device
        return Draft(proposals.to(device), counts.to(device))


class ModelDrafter(Drafter):
    """A separate causal LM with the target's vocabulary drafts k tokens autoregressively with its own
    KV cache (kept across steps: only what the target rejected is rolled back). Greedy: its argmax;
    sampling: draws from its warped distribution q, returned for rejection sampling."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.decoder: BatchedDecoder | None = None

    def reset(self) -> None:
        self.decoder = None

    def propose(self, state: DraftState, k: int) -> Draft:
        batch = state.tokens.shape[0]
        device = state.tokens.device
        if self.decoder is None:
            self.decoder = BatchedDecoder(self.model, batch, device, name="draft")
        decoder, active = self.decoder, state.active
        # Keep what is still right (at most all but the last committed token, whose logits are needed).
        keep = torch.minimum(torch.minimum(decoder.n_real, state.reused), state.lengths - 1)
        decoder.rollback(decoder.n_real - keep, live=active)
        need = torch.where(active, state.lengths - decoder.n_real, torch.zeros_like(keep))
        width = max(int(need.max()), 1)
        index = (decoder.n_real.unsqueeze(1) + torch.arange(width, device=device)).clamp(max=state.tokens.shape[1] - 1)
        feed = state.tokens.gather(1, index)
        logits = decoder.step(feed, need, last_only=True)[:, 0]
        decoder.keep(need, live=active)

        tokens, probs = [], []
        for i in range(k):
            if state.do_sample:
                q = warp_probs(logits, state.temperature, state.top_p)
                token = sample(q, state.generator)
                probs.append(q)
            else:
                token = logits.argmax(dim=-1)
            tokens.append(token)
            if i + 1 < k:
                ones = active.long()
                logits = decoder.step(token.unsqueeze(1), ones, last_only=True)[:, 0]
                decoder.keep(ones, live=active)
        counts = torch.where(active, torch.full_like(keep, k), torch.zeros_like(keep))
        return Draft(torch.stack(tokens, dim=1), counts, torch.stack(probs, dim=1) if probs else None)


# ---- generate ------------------------------------------------------------------------------------

DRAFT_NAMES = ("prompt_lookup", "early_exit")


def generate(model: torch.nn.Module, input_ids: torch.Tensor, max_new_tokens: int = 32, *,
             draft=None, k: int = 4, adaptive_k: bool = True, do_sample: bool = False,
             temperature: float = 1.0, top_p: float = 1.0, eos_token_id=None, pad_token_id=None,
             attention_mask: torch.Tensor | None = None, seed: int | None = None, ngram: int = 3,
             min_ngram: int | None = None, exit_layer: int | None = None, return_stats: bool = True,
             progress: bool | None = None):
    """Generate up to ``max_new_tokens`` tokens per sequence with ``model`` (a transformers causal LM,
    or its ``torch.compile`` wrapper, e.g. with ``backend="tokred"``), speculatively when ``draft`` is
    given.

    input_ids:      [B, T] int64 prompts; with ``attention_mask`` [B, T] (1 = token, 0 = padding,
                    left or right) rows may have different lengths.
    draft:          None (plain decoding with the KV cache), "prompt_lookup", "early_exit" (the
                    target's first ``exit_layer`` layers, tokred.runtime.drafters.EarlyExitDraft),
                    a transformers causal LM with the same vocabulary, or a :class:`Drafter`.
    k:              the most draft tokens verified per target forward; ``adaptive_k`` moves the
                    draft length within [1, k] with the acceptance (see tokred.runtime.speculative.next_k).
    do_sample, temperature, top_p, seed: sampling (rejection sampling when drafting; the output is
                    distributed as the target's warped distribution); greedy otherwise (exactly the
                    target's greedy decoding, argmax with the first index on ties).
    eos_token_id:   int or ints; a sequence stops after emitting one (None: never stops early).
    pad_token_id:   fills each row after it stopped (default: the first eos id, else 0).
    ngram, min_ngram: prompt lookup matches the context's last n tokens for n from ``ngram`` down to
                    ``min_ngram`` (default min(2, ngram): a 1-token match drafts nothing; on CPU, where
                    verifying any draft costs ~1.75x a plain step, 1-token matches were a net loss).
    progress:       a tqdm bar over new tokens (None: when stderr is a terminal).

    On CPU (fp32), verification forwards of several tokens are cheaper with the model compiled as
    ``torch.compile(model, backend=tokred.backend(inner="eager", cpu_linear="onednn"))``
    (:mod:`tokred.passes.cpu_linear`: oneDNN linears on weights packed once; one-token steps keep
    their kernels); pass that compiled model here, for plain and speculative decoding alike.

    Returns a :class:`GenerateResult` (``.sequences`` [B, T + new], ``.stats``), or only the
    sequences when ``return_stats`` is False. ``new`` is the most tokens any row generated (<=
    max_new_tokens).
    """
    transformers_api.check_transformers_version()
    if min_ngram is None and isinstance(ngram, int):
        min_ngram = min(2, ngram)
    _check_args(input_ids, max_new_tokens, k, temperature, top_p, ngram, min_ngram, attention_mask)
    eos_ids = _eos_list(eos_token_id)
    if pad_token_id is None:
        pad_token_id = eos_ids[0] if eos_ids else 0
    drafter = _resolve_draft(model, draft, ngram, min_ngram, exit_layer)
    if drafter is not None:
        drafter.reset()
    show = sys.stderr.isatty() if progress is None else progress
    with torch.no_grad(), tqdm(total=max_new_tokens, disable=not show, unit="tok", leave=False) as bar:
        sequences, stats = _generate(model, input_ids, attention_mask, max_new_tokens, drafter, k, adaptive_k,
                                     do_sample, temperature, top_p, eos_ids, pad_token_id, seed, bar)
    return GenerateResult(sequences, stats) if return_stats else sequences


def _generate(model, input_ids, attention_mask, max_new_tokens, drafter, k_max, adaptive_k, do_sample,
              temperature, top_p, eos_ids, pad_token_id, seed, bar):
    start = time.perf_counter()
    device = input_ids.device
    batch = input_ids.shape[0]
    stats = GenerateStats()
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)

    prompt, prompt_lengths = _left_align(input_ids, attention_mask)
    # Committed tokens, left-aligned; one spare column takes writes past a row's end (masked writes).
    context = torch.full((batch, prompt.shape[1] + max_new_tokens + 1), pad_token_id, dtype=torch.long, device=device)
    context[:, :prompt.shape[1]] = prompt
    trash = context.shape[1] - 1
    lengths = prompt_lengths.clone()

    target = BatchedDecoder(model, batch, device, name="model")
    logits = target.step(prompt, prompt_lengths, last_only=True)[:, 0]
    target.keep(prompt_lengths)
    if drafter is not None:
        drafter.bind(target)  # the early-exit draft writes its layers' K/V into this cache
    vocab = logits.shape[-1]
    first = sample(warp_probs(logits, temperature, top_p), generator) if do_sample else logits.argmax(dim=-1)
    _synchronize(device)
    stats.time_to_first_token_s = time.perf_counter() - start

    active = torch.ones(batch, dtype=torch.bool, device=device)
    committed, n_commit = first.unsqueeze(1), torch.ones_like(lengths)
    reused = torch.zeros_like(lengths)
    k = k_max
    while True:
        # Commit this step's tokens (the first: the prefill's), cut at eos and at max_new_tokens.
        n_commit, stopped = _cut(committed, n_commit, eos, lengths - prompt_lengths, max_new_tokens)
        n_commit = torch.where(active, n_commit, torch.zeros_like(n_commit))
        columns = lengths.unsqueeze(1) + torch.arange(committed.shape[1], device=device)
        writes = torch.arange(committed.shape[1], device=device) < n_commit.unsqueeze(1)
        context.scatter_(1, torch.where(writes, columns, torch.full_like(columns, trash)), committed)
        lengths = lengths + n_commit
        last_token = pick_rows(committed, (n_commit - 1).clamp(min=0))
        stats.new_tokens += int(n_commit.sum())
        if stats.decode_steps:
            stats.committed_in_decode += int(n_commit[active].sum())
        before = int(bar.n)
        bar.update(int((lengths - prompt_lengths).max()) - before)
        active = active & ~stopped
        if not bool(active.any()):
            break

        remaining = max_new_tokens - (lengths - prompt_lengths)  # >= 1 on active rows
        room = int(remaining[active].max()) - 1  # a step commits drafts + 1 token
        counts = torch.zeros_like(lengths)
        drafts = torch.zeros(batch, 0, dtype=torch.long, device=device)
        draft_probs = None
        step_k = min(k, room)
        if drafter is not None and step_k >= 1:
            state = DraftState(context[:, :int(lengths.max())], lengths, torch.minimum(reused, lengths), active,
                               do_sample, temperature, top_p, generator)
            proposal = drafter.propose(state, step_k)
            drafts, counts, draft_probs = _check_draft(proposal, batch, step_k, vocab)
            counts = torch.minimum(counts, (remaining - 1).clamp(min=0))
            counts = torch.where(active, counts, torch.zeros_like(counts))
            stats.k_history.append(step_k)
        drafts_width = int(counts.max())
        drafts = drafts[:, :drafts_width]
        feed = torch.cat([last_token.unsqueeze(1), drafts], dim=1)
        feed_counts = torch.where(active, counts + 1, torch.zeros_like(counts))
        logits_all = drafter.verify(target, feed, feed_counts) if drafter is not None else \
            target.step(feed, feed_counts)
        if do_sample:
            target_probs = warp_probs(logits_all, temperature, top_p)
            q = draft_probs[:, :drafts_width] if draft_probs is not None else None
            accepted, next_token = speculative_sample(drafts, counts, q, target_probs, generator)
        else:
            accepted, next_token = greedy_accept(drafts, counts, logits_all)
        target.keep(accepted + 1, live=active)
        stats.decode_steps += 1
        stats.row_steps += int(active.sum())
        step_proposed, step_accepted = int(counts.sum()), int(accepted[active].sum())
        stats.proposed += step_proposed
        stats.accepted += step_accepted
        if adaptive_k and drafter is not None:
            k = next_k(k, k_max, step_proposed, step_accepted)
        reused = lengths + accepted
        # Row b commits its accepted drafts, then the target's token in place of the first rejected one.
        committed = torch.cat([drafts, torch.zeros_like(last_token).unsqueeze(1)], dim=1)
        committed.scatter_(1, accepted.unsqueeze(1), next_token.unsqueeze(1))
        n_commit = accepted + 1

    bar.refresh()  # the last update may have been throttled
    stats.target_forwards = target.forwards
    _synchronize(device)
    stats.total_s = time.perf_counter() - start
    return _output(input_ids, context, prompt_lengths, lengths, pad_token_id), stats


def _cut(committed: torch.Tensor, n_commit: torch.Tensor, eos: torch.Tensor, generated: torch.Tensor,
         max_new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """committed [B, m] tokens of which the first n_commit[b] are new for row b; generated [B] tokens
    so far. -> (how many to commit [B], the row stops [B] bool): up to and including the first eos,
    and no further than max_new_tokens."""
    positions = torch.arange(committed.shape[1], device=committed.device)
    valid = positions < n_commit.unsqueeze(1)
    is_eos = torch.isin(committed, eos) & valid if eos.numel() else torch.zeros_like(valid)
    first_eos = torch.where(is_eos, positions, committed.shape[1]).min(dim=1).values
    n = torch.minimum(torch.minimum(n_commit, first_eos + 1), max_new_tokens - generated)
    stopped = (first_eos < n_commit) & (first_eos + 1 <= n) | (generated + n >= max_new_tokens)
    return n, stopped


def _output(input_ids, context, prompt_lengths, lengths, pad_token_id) -> torch.Tensor:
    """[B, T + new]: input_ids as given, then row b's generated tokens, padded with pad_token_id."""
    generated = lengths - prompt_lengths
    width = int(generated.max())
    columns = prompt_lengths.unsqueeze(1) + torch.arange(width, device=context.device)
    new = context.gather(1, columns.clamp(max=context.shape[1] - 1))
    new = new.masked_fill(torch.arange(width, device=context.device) >= generated.unsqueeze(1), pad_token_id)
    return torch.cat([input_ids, new], dim=1)


def _left_align(input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
    """[B, T] ids and mask -> (ids [B, T'] with each row's real tokens first, in order, then filler
    (T' = the longest row), lengths [B])."""
    if attention_mask is None:
        return input_ids.long(), torch.full((input_ids.shape[0],), input_ids.shape[1], dtype=torch.long,
                                            device=input_ids.device)
    mask = attention_mask.to(input_ids.device).bool()
    lengths = mask.sum(dim=1)
    # Stable sort puts real tokens (key 0) first, keeping their order.
    order = torch.sort((~mask).long(), dim=1, stable=True).indices
    aligned = input_ids.long().gather(1, order)
    aligned = aligned.masked_fill(torch.arange(aligned.shape[1], device=aligned.device) >= lengths.unsqueeze(1), 0)
    return aligned[:, :int(lengths.max())], lengths


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- argument checks -----------------------------------------------------------------------------


def _check_args(input_ids, max_new_tokens, k, temperature, top_p, ngram, min_ngram, attention_mask) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
        raise ValueError("tokred.generate: 'input_ids' must be an integer tensor [batch, tokens]")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"tokred.generate: 'input_ids' is empty (shape {tuple(input_ids.shape)})")
    for name, value, low in (("max_new_tokens", max_new_tokens, 1), ("k", k, 1), ("ngram", ngram, 1),
                             ("min_ngram", min_ngram, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"tokred.generate: {name!r} must be an int >= {low}, got {value!r}")
    if min_ngram > ngram:
        raise ValueError(f"tokred.generate: 'min_ngram' ({min_ngram}) must be <= 'ngram' ({ngram})")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"tokred.generate: 'temperature' must be > 0, got {temperature!r}")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"tokred.generate: 'top_p' must be in (0, 1], got {top_p!r}")
    if attention_mask is not None:
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"tokred.generate: 'attention_mask' has shape {tuple(attention_mask.shape)}, "
                             f"'input_ids' {tuple(input_ids.shape)}")
        if bool((attention_mask.sum(dim=1) == 0).any()):
            raise ValueError("tokred.generate: 'attention_mask' has a row without tokens")


def _eos_list(eos_token_id) -> list:
    if eos_token_id is None:
        return []
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError(f"tokred.generate: 'eos_token_id' must be an int or ints >= 0, got {eos_token_id!r}")
    return ids


def _vocab_size(model) -> int | None:
    config = model_config(model)
    return getattr(config, "vocab_size", None) if config is not None else None


def _num_layers(model) -> int | None:
    config = model_config(model)
    return getattr(config, "num_hidden_layers", None) if config is not None else None


def _resolve_draft(model, draft, ngram: int, min_ngram: int, exit_layer: int | None) -> Drafter | None:
    if exit_layer is not None and draft != "early_exit":
        raise ValueError(f"tokred.generate: 'exit_layer' is only used with draft='early_exit' (draft={draft!r})")
    if draft is None:
        return None
    if isinstance(draft, Drafter):
        return draft
    if isinstance(draft, str):
        if draft == "prompt_lookup":
            return PromptLookupDrafter(ngram, min_ngram)
        if draft == "early_exit":
            return _early_exit(model, exit_layer)
        raise ValueError(f"tokred.generate: unknown 'draft' {draft!r}; expected None, "
                         f"{', '.join(repr(n) for n in DRAFT_NAMES)}, a Drafter or a causal LM")
    if isinstance(draft, torch.nn.Module):
        target_vocab, draft_vocab = _vocab_size(model), _vocab_size(draft)
        if draft_vocab is None:
            raise ValueError("tokred.generate: 'draft' model has no config.vocab_size; "
                             "pass a transformers causal LM or wrap it in a Drafter")
        if target_vocab is not None and draft_vocab != target_vocab:
            raise ValueError(f"tokred.generate: 'draft' model has vocabulary size {draft_vocab}, "
                             f"the target {target_vocab}; they must share the tokenizer")
        return ModelDrafter(draft)
    raise ValueError(f"tokred.generate: unknown 'draft' of type {type(draft).__name__}; expected None, "
                     f"{', '.join(repr(n) for n in DRAFT_NAMES)}, a Drafter or a causal LM")


def _early_exit(model, exit_layer: int | None) -> Drafter:
    layers = _num_layers(model)
    if exit_layer is None:
        if layers is None:
            raise ValueError("tokred.generate: give 'exit_layer' (the model's config has no num_hidden_layers)")
        exit_layer = max(1, layers // 2)
    if isinstance(exit_layer, bool) or not isinstance(exit_layer, int) or exit_layer < 1 or \
            (layers is not None and exit_layer >= layers):
        bound = f"[1, {layers - 1}]" if layers is not None else ">= 1"
        raise ValueError(f"tokred.generate: 'exit_layer' must be an int in {bound}, got {exit_layer!r}")
    return EarlyExitDraft(model, exit_layer)


def _check_draft(draft: Draft, batch: int, k: int, vocab: int):
    """Validate a drafter's proposals -> (tokens [B, k], counts [B], probs [B, k, V] or None)."""
    tokens = draft.tokens
    if tokens.dim() != 2 or tokens.shape[0] != batch or tokens.shape[1] > k:
        raise ValueError(f"tokred.generate: the drafter returned tokens of shape {tuple(tokens.shape)}, "
                         f"expected [{batch}, <= {k}]")
    counts = draft.counts if draft.counts is not None else torch.full((batch,), tokens.shape[1], dtype=torch.long,
                                                                      device=tokens.device)
    counts = counts.to(tokens.device).long().clamp(min=0, max=tokens.shape[1])
    probs = draft.probs
    if probs is not None and (probs.shape[:2] != tokens.shape or probs.shape[-1] != vocab):
        raise ValueError(f"tokred.generate: the drafter's probs have shape {tuple(probs.shape)}, expected "
                         f"[{batch}, {tokens.shape[1]}, {vocab}] (vocabulary of the target's logits)")
    if bool(((tokens < 0) | (tokens >= vocab)).any()):
        raise ValueError(f"tokred.generate: the drafter proposed token ids outside [0, {vocab})")
    return tokens.long(), counts, probs
