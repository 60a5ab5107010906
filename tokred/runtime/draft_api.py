"""The Drafter interface of tokred.generate (stable: every draft implements it): the per-row draft state,
a draft's proposal, and the probability warping drafts and the target share.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch


# ---- the Drafter interface (stable: other drafts implement it) ---------------------------------


@dataclass(frozen=True)
class DraftState:
    """What a drafter sees when asked for proposals. B = batch, S >= max(lengths), V = vocabulary.

    tokens:      [B, S] int64: each sequence's committed tokens (its prompt without padding, then
                 what was generated), left-aligned: row b is ``tokens[b, :lengths[b]]``; the rest
                 of the row is filler (do not read it).
    lengths:     [B] int64: committed tokens per sequence (>= 1).
    reused:      [B] int64: how many leading tokens of each row are unchanged from what this
                 drafter saw before: the previous call's context plus those of its drafts that
                 were accepted (0 on the first call of a ``generate``). A drafter with its own KV
                 cache keeps its first ``reused[b]`` entries of row b (if it had that many) and
                 feeds the rest of ``tokens[b, :lengths[b]]``. Always ``reused <= lengths``.
    active:      [B] bool: sequences still generating; proposals for the others are ignored.
    do_sample:   sampling (True) or greedy (False) decoding.
    temperature: > 0; applied (with top_p) to the draft's distribution q before rejection sampling:
                 use :func:`warp_probs` on the draft's logits.
    top_p:       in (0, 1].
    generator:   the torch.Generator to draw samples from (None: torch's default), so that a
                 seeded ``generate`` is reproducible.
    """

    tokens: torch.Tensor
    lengths: torch.Tensor
    reused: torch.Tensor
    active: torch.Tensor
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    generator: torch.Generator | None = None


@dataclass
class Draft:
    """Proposals for the target to verify. B = batch, k = the k asked for, V = vocabulary.

    tokens:  [B, k] int64 proposed tokens; row b's proposals are ``tokens[b, :counts[b]]``, the
             rest of the row is filler (any valid token id).
    counts:  [B] int64 in [0, k]: how many proposals each row has (a prompt lookup without a match
             has 0); None means k for every row.
    probs:   [B, k, V] float: the (warped, see :func:`warp_probs`) distribution q each proposal was
             drawn from, for rejection sampling; None for a deterministic draft (q is one-hot at
             the proposed token). Only read when sampling; greedy decoding ignores it. V must be
             the target's logits width.
    """

    tokens: torch.Tensor
    counts: torch.Tensor | None = None
    probs: torch.Tensor | None = None


class Drafter(abc.ABC):
    """Proposes draft tokens for the target to verify. One Drafter serves one ``generate`` call at a
    time; ``reset`` is called at the start of each.

    Greedy drafts (``state.do_sample`` False) should propose the draft's argmax (first index on
    ties) and may leave ``Draft.probs`` None. Sampling drafts draw each proposal from their warped
    distribution q with ``state.generator`` and return q in ``Draft.probs``. Whatever a drafter
    proposes, the output stays exact: a bad draft only costs speed.
    """

    def reset(self) -> None:
        """Forget all per-generation state (KV caches, counters). Default: nothing to forget."""

    @abc.abstractmethod
    def propose(self, state: DraftState, k: int) -> Draft:
        """Up to ``k`` (>= 1) proposals per sequence, continuing ``state.tokens[b, :state.lengths[b]]``."""

    def bind(self, target) -> None:
        """Called once per ``generate``, after the target's prefill, with the target's
        :class:`tokred.runtime.speculative.BatchedDecoder` (its KV cache ``target.cache`` with
        right-aligned rows, ``target.n_real`` [B] cached tokens per row: the committed ones but the
        last). Default: not needed. A drafter that computes part of the target's verification
        forward keeps it (the early-exit draft writes its layers' K/V into that cache)."""

    def verify(self, target, tokens: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The target's verification forward after a ``propose``: tokens [B, n] (the last committed
        token, then the drafts), counts [B] -> logits [B, n, V], with the cache extended by n slots
        per row in every layer (``target.keep`` follows). Also called for plain steps (no proposal).
        Default: ``target.step(tokens, counts)``; a drafter that already ran some of the target's
        layers on these tokens runs only the rest."""
        return target.step(tokens, counts)



def warp_probs(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0) -> torch.Tensor:
    """[..., V] logits -> [..., V] float32 probabilities of ``softmax(logits / temperature)``
    restricted to the nucleus: the most probable tokens whose mass first reaches ``top_p`` (the
    token that crosses the threshold is kept), renormalized."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return kept / kept.sum(dim=-1, keepdim=True)
