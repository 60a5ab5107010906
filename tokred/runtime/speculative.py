"""The machinery under :func:`tokred.generate`: a batched KV-cache decoder with per-sequence
lengths, and the acceptance rules of speculative decoding (greedy and rejection sampling).

How a batch keeps per-sequence acceptance exactly. Every row of the cache is *right-aligned*: row
b's ``n_real[b]`` real tokens are the last ``n_real[b]`` slots of the cache, the slots before them
are padding (masked out). A step appends n slots to every row; row b's new tokens are the first
``counts[b]`` of them and the rest are holes (masked, and causally after its real tokens, so no
real token ever sees a hole). After the step each row keeps ``keep[b] <= counts[b]`` of its new
slots: the tail common to all rows is cropped from every layer (``crop`` by a number of tokens,
so layers of different lengths stay consistent), and rows that drop more are shifted right by the
difference (one gather per layer, only when rows differ). The invariant holds again, so a row's
real tokens are contiguous: the attention mask is its padding, position ids count its real tokens,
and slot distance equals token distance (sliding-window attention stays exact).
"""

from __future__ import annotations

import torch

from tokred.compat import transformers_api

# ---- sampling math -------------------------------------------------------------------------------

def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """[B, V] probabilities -> [B] int64 draws."""
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def greedy_accept(drafts: torch.Tensor, counts: torch.Tensor,
                  target_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy verification. drafts [B, n-1], counts [B] valid drafts per row, target_logits
    [B, n, V] (position j predicts the token after draft j, position 0 the first draft).

    Returns (accepted [B]: the longest prefix of each row's drafts equal to the target's argmax,
    next_token [B]: the target's argmax after that prefix)."""
    choice = target_logits.argmax(dim=-1)  # [B, n]; first index on ties
    accepted = accepted_prefix(drafts == choice[:, :-1], counts)
    return accepted, pick_rows(choice, accepted)


def speculative_sample(drafts: torch.Tensor, counts: torch.Tensor, draft_probs: torch.Tensor | None,
                       target_probs: torch.Tensor,
                       generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rejection sampling (Leviathan et al. 2023; Chen et al. 2023). drafts [B, n-1], counts [B],
    draft_probs [B, n-1, V] or None (one-hot q: a deterministic draft), target_probs [B, n, V].

    Draft j is accepted with probability min(1, p_j(d) / q_j(d)); at the first rejection the next
    token is drawn from normalize(max(0, p_j - q_j)); after the last valid draft of a row (all
    accepted, or a row with fewer drafts) it is drawn from p. The output is distributed as p.
    Returns (accepted [B], next_token [B])."""
    batch, width = drafts.shape
    if width == 0:
        return counts.new_zeros(batch), sample(target_probs[:, 0], generator)
    p_draft = target_probs[:, :-1].gather(-1, drafts.unsqueeze(-1)).squeeze(-1)  # [B, n-1]
    if draft_probs is None:
        q_draft = torch.ones_like(p_draft)
    else:
        q_draft = draft_probs.gather(-1, drafts.unsqueeze(-1)).squeeze(-1).float()
    u = torch.rand(p_draft.shape, generator=generator, device=p_draft.device)
    accepted = accepted_prefix(u * q_draft < p_draft, counts)

    p_next = pick_rows(target_probs, accepted)  # [B, V]
    rejected = accepted < counts
    # The draft distribution at the rejected position (one-hot at the draft when deterministic).
    at = accepted.clamp(max=width - 1)
    if draft_probs is None:
        q_next = torch.zeros_like(p_next).scatter(-1, pick_rows(drafts, at).unsqueeze(-1), 1.0)
    else:
        q_next = pick_rows(draft_probs, at).float()
    residual = (p_next - q_next).clamp(min=0)
    mass = residual.sum(dim=-1, keepdim=True)
    # mass == 0 means p == q there: then the draft is never rejected; guard the division anyway.
    residual = torch.where(mass > 0, residual / mass.clamp(min=1e-30), p_next)
    next_dist = torch.where(rejected.unsqueeze(-1), residual, p_next)
    return accepted, sample(next_dist, generator)


def accepted_prefix(matches: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """matches [B, m] bool, counts [B] -> [B] length of the all-True prefix within the first counts[b]."""
    positions = torch.arange(matches.shape[1], device=matches.device)
    valid = matches & (positions < counts.unsqueeze(1))
    return valid.long().cumprod(dim=1).sum(dim=1)


def pick_rows(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values [B, n, ...], index [B] -> values[b, index[b]] for each b: [B, ...]."""
    return values[torch.arange(values.shape[0], device=values.device), index]


def next_k(k: int, k_max: int, proposed: int, accepted: int) -> int:
    """Adaptive draft length: grow by one when every proposal of the step was accepted, shrink by one
    when fewer than half were; bounded to [1, k_max]."""
    if proposed == 0:
        return k
    if accepted == proposed:
        return min(k + 1, k_max)
    if 2 * accepted < proposed:
        return max(k - 1, 1)
    return k


# ---- prompt lookup ------------------------------------------------------------------------------

def prompt_lookup(context: torch.Tensor, ngram: int, k: int, min_ngram: int = 1) -> torch.Tensor:
    """context [L] int64 -> up to k proposed tokens [m], m in [0, k]: the tokens that followed the
    most recent earlier occurrence of the context's last n tokens, for the longest n from ``ngram``
    down to ``min_ngram`` that has an occurrence with a continuation (none: m = 0).

    Why a floor: a match of one token predicts the next tokens poorly (on SmolLM2's input-grounded
    answers, 1-gram drafts were mostly rejected), and where verifying extra tokens costs more than a
    plain step (CPU: a 2-token forward costs ~1.75 single-token ones), proposing nothing is cheaper."""
    length = context.shape[0]
    for n in range(min(ngram, length - 1), min_ngram - 1, -1):
        suffix = context[length - n:]
        # Windows starting at 0 .. length-n-1: each has at least one token after it.
        windows = context[:length - 1].unfold(0, n, 1)
        hits = (windows == suffix).all(dim=1).nonzero()
        if hits.numel():
            start = int(hits[-1]) + n
            return context[start:start + k]
    return context[:0]


# ---- the batched decoder ------------------------------------------------------------------------

def model_config(model: torch.nn.Module):
    """The (text) config of a transformers model, or of the module a torch.compile wrapper holds."""
    inner = getattr(model, "_orig_mod", model)
    config = getattr(inner, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    return config


def new_cache():
    """A fresh KV cache: a DynamicCache of full layers. No config on purpose: sliding-window layers
    drop old entries, which a rollback could need; the model's sliding mask still applies."""
    return transformers_api.new_dynamic_cache()


def cache_layers(cache) -> list:
    """The per-layer objects of a transformers cache that hold keys/values [B, H, L, D]."""
    return transformers_api.cache_layers(cache)


def _map_layers(cache, fn) -> None:
    """Replace every filled layer's keys and values [B, H, L, D] by ``fn`` of them."""
    for layer in cache_layers(cache):
        keys, values = transformers_api.layer_states(layer)
        transformers_api.set_layer_states(layer, fn(keys), fn(values))


def crop_tail(cache, tokens: int) -> None:
    """Remove the last ``tokens`` slots of every layer (each layer by that count, whatever its length)."""
    if tokens > 0:
        _map_layers(cache, lambda states: states[..., :-tokens, :])


def drop_front(cache, tokens: int) -> None:
    """Remove the first ``tokens`` slots of every layer (padding common to all rows)."""
    if tokens > 0:
        _map_layers(cache, lambda states: states[..., tokens:, :])


def shift_rows_right(cache, shifts: torch.Tensor) -> None:
    """Shift row b of every layer right by shifts[b] slots: its last shifts[b] slots fall off, zeros
    (masked padding) come in on the left. shifts [B] int64 >= 0."""
    _map_layers(cache, lambda states: _shift_right(states, shifts))


def _shift_right(states: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """states [B, H, L, D], shifts [B] -> out[b, :, j] = states[b, :, j - shifts[b]] (zero if j < shifts[b])."""
    batch, heads, length, dim = states.shape
    source = torch.arange(length, device=states.device) - shifts.to(states.device).unsqueeze(1)  # [B, L]
    index = source.clamp(min=0)[:, None, :, None].expand(batch, heads, length, dim)
    shifted = states.gather(2, index)
    return shifted.masked_fill((source < 0)[:, None, :, None], 0)


class BatchedDecoder:
    """A causal LM with its KV cache and per-row lengths (right-aligned rows, see the module doc).

    ``step(tokens, counts)`` runs the model on n new slots per row and returns their logits;
    ``keep(kept)`` then commits the first kept[b] of row b's new slots and rolls back the rest.
    Every step must be followed by exactly one keep.
    """

    def __init__(self, model: torch.nn.Module, batch: int, device: torch.device, name: str = "model"):
        self.model = model
        self.name = name
        self.cache = new_cache()
        self.n_real = torch.zeros(batch, dtype=torch.long, device=device)
        self.slots = 0  # cache length (layer 0's; every layer's unless a pruned prefill made them differ)
        self.forwards = 0
        self._pending: int | None = None  # width of the last step, until keep
        self._logits_to_keep = transformers_api.per_row_logits_to_keep(model)
        self._cache_keyword = transformers_api.cache_keyword(model)

    def model_inputs(self, tokens: torch.Tensor, counts: torch.Tensor, n_real: torch.Tensor | None = None,
                     slots: int | None = None) -> dict:
        """The model's keyword arguments for a forward on tokens [B, n] appended to the cache (row b's
        new tokens are tokens[b, :counts[b]], the rest holes), when the cache holds ``slots`` slots of
        which the last ``n_real[b]`` [B] are row b's real tokens (default: the decoder's own counts).
        Returns input_ids, attention_mask [B, slots + n] (1 = attend), position_ids [B, n] (row b's
        new tokens continue at n_real[b]), this decoder's cache (under the keyword the model takes:
        ``cache`` or ``past_key_values``), use_cache.

        A drafter that runs part of the target on its cache (the early-exit draft's first L blocks)
        passes its own ``n_real``/``slots``: its earlier draft tokens count as real tokens there."""
        n_real = self.n_real if n_real is None else n_real
        slots = self.slots if slots is None else slots
        device = tokens.device
        offsets = torch.arange(tokens.shape[1], device=device)
        new_valid = offsets < counts.unsqueeze(1)  # [B, n]
        past_valid = torch.arange(slots, device=device) >= (slots - n_real).unsqueeze(1)
        attention_mask = torch.cat([past_valid, new_valid], dim=1).long()
        # Holes get the position of the row's last new token: in range, and never seen by a real token.
        last = (counts - 1).clamp(min=0).unsqueeze(1)
        position_ids = n_real.unsqueeze(1) + torch.minimum(offsets.unsqueeze(0), last)
        return {"input_ids": tokens, "attention_mask": attention_mask, "position_ids": position_ids,
                self._cache_keyword: self.cache, "use_cache": True}

    def step(self, tokens: torch.Tensor, counts: torch.Tensor,
             last_only: bool = False) -> torch.Tensor:
        """tokens [B, n] int64 (row b's new tokens are tokens[b, :counts[b]], the rest filler),
        counts [B] in [0, n] -> logits [B, n, V] (or [B, 1, V], the logits at slot counts[b]-1 of each
        row, when ``last_only``; rows with counts 0 then give filler)."""
        if self._pending is not None:
            raise RuntimeError("BatchedDecoder.step called twice without keep")
        batch, width = tokens.shape
        if self.forwards:
            # The cache's own length (layer 0's, which the model's mask is built for).
            self.slots = self.cache.get_seq_length()
        kwargs = self.model_inputs(tokens, counts)
        last = (counts - 1).clamp(min=0).unsqueeze(1)
        if last_only and self._logits_to_keep:
            kwargs["logits_to_keep"] = last.view(batch, 1)
        try:
            output = self.model(**kwargs)
        except TypeError as error:
            raise ValueError(f"tokred.generate: {self.name!r} cannot run with a KV cache "
                             f"({self._cache_keyword}, use_cache): {error}") from error
        self.forwards += 1
        returned = transformers_api.returned_cache(output)
        if returned is None:
            raise ValueError(f"tokred.generate: {self.name!r} returned no KV cache; "
                             "a causal LM with use_cache support is needed")
        if returned is not self.cache:
            self.cache = returned
        logits = output.logits if hasattr(output, "logits") else output[0]
        if last_only and logits.shape[1] != 1:
            logits = pick_rows(logits, last.squeeze(1)).unsqueeze(1)
        self._pending = width
        self.slots += width
        return logits

    def keep(self, kept: torch.Tensor, live: torch.Tensor | None = None) -> None:
        """Commit the first kept[b] new slots of row b (kept [B] in [0, counts[b]]), roll back the rest.
        Rows where ``live`` [B] bool is False (finished sequences) are left as they are: their cache
        content no longer matters, and skipping them avoids shifting every row for their sake."""
        width, self._pending = self._pending, None
        if width is None:
            raise RuntimeError("BatchedDecoder.keep called without a step")
        if live is not None:
            kept = torch.where(live, kept, torch.zeros_like(kept))
        self.n_real = self.n_real + kept
        self._drop_tail(width - kept, live)

    def rollback(self, dropped: torch.Tensor, live: torch.Tensor | None = None) -> None:
        """Forget the last dropped[b] committed tokens of row b (dropped [B] in [0, n_real[b]])."""
        if self._pending is not None:
            raise RuntimeError("BatchedDecoder.rollback called between step and keep")
        if live is not None:
            dropped = torch.where(live, dropped, torch.zeros_like(dropped))
        self.n_real = self.n_real - dropped
        self._drop_tail(dropped, live)

    def _drop_tail(self, dropped: torch.Tensor, live: torch.Tensor | None) -> None:
        """Remove the last dropped[b] slots of each live row (n_real already updated), restoring right
        alignment: crop the tail all live rows drop, shift the rows that drop more right by the
        difference, then drop the left padding all live rows share."""
        if live is None:
            live = torch.ones_like(dropped, dtype=torch.bool)
        if not bool(live.any()):
            return
        common = int(dropped[live].min())
        crop_tail(self.cache, common)
        self.slots -= common
        shifts = torch.where(live, dropped - common, torch.zeros_like(dropped))
        if bool((shifts > 0).any()):
            shift_rows_right(self.cache, shifts)
        padding = int((self.slots - self.n_real[live]).min())
        if padding > 0:
            drop_front(self.cache, padding)
            self.slots -= padding
