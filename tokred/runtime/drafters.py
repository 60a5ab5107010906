"""Self-speculative early-exit draft: the target's first L blocks, then its final norm and LM head.

    draft = EarlyExitDraft(model, exit_layer=8)
    out = tokred.generate(model, ids, 64, draft=draft)          # or draft="early_exit", exit_layer=8
    logits = draft.logits(ids, draft.new_cache())               # [B, q, V]: the draft's own logits

How the draft is found (never from attribute names like ``model.model.layers``): the model's
forward is captured once by Dynamo (a capturing backend, as :mod:`tokred.export` does; a prefill
call ``input_ids [1, 8]`` without a cache) and analysed by :func:`tokred.rewriter.analysis.analyze`:

- the blocks (``facts.blocks``, in graph order) give the exit point: the module of block L-1
  (``Block.module``, read from the nodes' ``nn_module_stack``). The draft runs the model's own
  forward (embeddings, Gemma's embedding scale, rotary tables, masks: whatever the model does before
  its blocks) and stops it when that module returns, keeping its output, the residual stream after
  L blocks ([B, q, C]). Blocks L.. are never run.
- the head is the projection with role ``lm_head`` after the last block (``head`` where the
  analysis could not tie it to the token embedding table, as in GPT-2, whose token ids are reshaped
  before the lookup). The *tail* of the captured graph, every node between the last block's output
  and the logits (the final norm chain, including Gemma's ``1 + weight`` and any logit soft-capping,
  then the head), is copied into a small fx graph whose input is the residual stream: the draft
  applies exactly the computation the target applies after its last block, to block L's output.
  Views that were the identity at capture (GPT-2's ``view(output_shape)``) are dropped, so the tail
  serves any [B, q]. The tail's weights are the target's own parameter tensors, bound by identity
  from the captured call's inputs: nothing is copied.

KV cache, shared with the target (the default, LayerSkip-style): ``generate`` hands the drafter
the target's ``BatchedDecoder`` (``bind``: its cache with right-aligned rows and per-row counts).
A proposal runs k + 1 single-token steps of blocks < L for the whole batch on that cache (the last
committed token, then drafts 1..k; the last step only saves h_L), so layers < L already hold the
K/V of every token the target will verify, and the h_L of each is kept. The verification
(``verify``) then runs the model's own forward (masks, rotary tables, position ids as the target's
own step) with blocks < L replaced by a function that gives its cache layer back the draft's
entries and returns the saved h_L: transformers sizes its masks from layer 0's length, so layers
< L are cut to the others' length (views) before that forward. Blocks L.. run as usual, and the
runtime's ``keep`` crops every layer by the same count. Each token thus runs blocks < L once. The
first draft step checks that exactly layers 0..L-1 grew by one entry and that block L - 1 returned
a tensor; where that fails, or the target is another object (a torch.compile wrapper: its forward
is one graph that cannot start at block L), the draft warns and keeps its own cache
(``own_cache_reason`` says why).

Own cache (``share_cache=False``, or the fallback): one ``transformers.DynamicCache`` per batch row,
filled only in layers < L. Row b's cache holds the K/V of the committed tokens the draft has seen;
each ``propose`` keeps the first ``min(reused[b], cached)`` entries, feeds the rest of the committed
tokens in one forward, drafts k tokens, then crops its k - 1 draft entries back off. Sliding-window
layers record their past so that the crop is exact.

The forward stop: a forward hook on block L-1's module, registered only for the duration of a
draft call, raises an internal exception carrying the block's output; transformers' wrappers clean
up in ``finally`` blocks, so the model is unchanged for the target's own calls.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Optional

import torch

from tokred.compat import transformers_api
from tokred.rewriter.analysis.graph import resolve_module
from tokred.runtime.draft_api import DraftState, Draft, Drafter, warp_probs
from tokred.runtime.early_exit import (  # noqa: F401  (names kept importable from here)
    capture_graph, find_head, tail_graph, EarlyExitSlice, slice_early_exit, cached_slice, CAPTURE_TOKENS, IDENTITY_VIEWS,
)


__all__ = ["EarlyExitDraft", "EarlyExitSlice", "slice_early_exit", "cached_slice", "capture_graph", "tail_graph"]

# ----------------------------------------------------------------------------- running the draft

class _ExitReached(Exception):
    """Raised by the exit hook to stop the model's forward after block L; carries the block's output."""

    def __init__(self, output):
        super().__init__("early exit")
        self.output = output


def _exit_hook(module, args, output):
    raise _ExitReached(output)


def _hidden_of(output) -> torch.Tensor:
    """A block's output -> the residual stream [B, q, C] (the output itself, or a tuple's first item)."""
    return output if isinstance(output, torch.Tensor) else output[0]


@contextlib.contextmanager
def _exit_after(module: torch.nn.Module):
    handle = module.register_forward_hook(_exit_hook)
    try:
        yield
    finally:
        handle.remove()


def _crop_layers(cache, tokens: int) -> None:
    """Remove the last ``tokens`` entries from every filled layer of ``cache`` (layers < L)."""
    if tokens <= 0:
        return
    for layer in cache.layers:
        if getattr(layer, "is_initialized", False) and layer.get_seq_length() >= tokens:
            layer.crop(-tokens)


def _layer_lengths(cache) -> list:
    """Entries per layer of a transformers cache ([int] * layers)."""
    return [layer.get_seq_length() for layer in cache.layers]


@contextlib.contextmanager
def _blocks_replaced_by(modules: list, layers: list, hidden: torch.Tensor):
    """For one target forward on w = hidden.shape[1] new tokens per row whose K/V in the cache
    layers ``layers`` (one per module of ``modules``, the blocks < L) are already written, as their
    last w entries: those layers are cut to their length before the draft (views, no copy), because
    transformers sizes the masks from layer 0's length; then block i, instead of running, gives its
    layer back its entries and returns ``hidden`` [B, w, C] (the residual stream after block L - 1).
    Blocks L.. run as usual. Everything is restored on exit, also when the forward fails."""
    width = hidden.shape[1]
    full = [transformers_api.layer_states(layer) for layer in layers]
    for layer, (keys, values) in zip(layers, full):
        transformers_api.set_layer_states(layer, keys[..., :-width, :], values[..., :-width, :])
    skipped: list = []

    def skip(i: int):
        def forward(*args, **kwargs):
            transformers_api.set_layer_states(layers[i], *full[i])
            skipped.append(i)
            return hidden
        return forward

    try:
        with transformers_api.replaced_forwards(modules, [skip(i) for i in range(len(modules))]):
            yield
    finally:
        for layer, (keys, values) in zip(layers, full):
            transformers_api.set_layer_states(layer, keys, values)
    if sorted(skipped) != list(range(len(modules))):
        raise RuntimeError(f"early exit draft: the verification forward called the blocks < L {skipped}, "
                           f"expected each of 0..{len(modules) - 1} once")


class EarlyExitDraft(Drafter):
    """A :class:`tokred.runtime.drafters.Drafter`: the target's first ``exit_layer`` blocks, final norm and
    LM head, found by graph analysis (see the module docstring). Shares the target's weights, and
    by default its KV cache.

    exit_layer:  L, 1 <= L < n (n = blocks found); the draft's logits at a position are
                 ``head(norm(h_L))`` with h_L the residual stream after L blocks.
    share_cache: True: write the draft's K/V of layers < L into the target's cache and let the
                 verification run blocks L.. only (falls back to an own cache, with a warning, where
                 the target does not allow it: ``own_cache_reason`` says why). False: an own cache.
    """

    def __init__(self, model: torch.nn.Module, exit_layer: int, slice_: Optional[EarlyExitSlice] = None,
                 share_cache: bool = True):
        if isinstance(exit_layer, bool) or not isinstance(exit_layer, int):
            raise ValueError(f"tokred option 'exit_layer' must be an int, got {exit_layer!r}")
        if not isinstance(share_cache, bool):
            raise ValueError(f"tokred option 'share_cache' must be True or False, got {share_cache!r}")
        model = getattr(model, "_orig_mod", model)  # a torch.compile wrapper: draft on the eager module
        self.model = model
        self.slice = slice_ if slice_ is not None else cached_slice(model)
        n = self.slice.blocks
        if not 1 <= exit_layer < n:
            raise ValueError(f"tokred option 'exit_layer' must be in [1, {n - 1}] for a model of {n} blocks, "
                             f"got {exit_layer}")
        self.exit_layer = exit_layer
        self.exit_module = resolve_module(model, self.slice.exit_modules[exit_layer - 1])
        self.share_cache = share_cache
        # why the last generate's draft kept its own cache (None: it shared the target's)
        self.own_cache_reason: Optional[str] = None if share_cache else "share_cache=False"
        self.forwards = 0  # draft forwards run (each: L blocks, + the head on its last position)
        self.reset()

    # -- the sliced model
    def new_cache(self):
        """An empty draft-side KV cache whose layers can be cropped (see
        ``transformers_api.croppable_cache``)."""
        return transformers_api.croppable_cache(self.model.config)

    def _block_output(self, **kwargs):
        """The model's forward on ``kwargs``, stopped when block L - 1 returns: that block's output."""
        with _exit_after(self.exit_module), torch.no_grad():
            try:
                self.model(**kwargs)
            except _ExitReached as reached:
                return reached.output
        raise RuntimeError(f"early exit draft: block {self.exit_layer - 1} "
                           f"({self.slice.exit_modules[self.exit_layer - 1]}) was not run by the forward")

    def hidden(self, input_ids: torch.Tensor, cache=None) -> torch.Tensor:
        """[B, q] token ids (continuing ``cache``) -> the residual stream after L blocks [B, q, C]."""
        cache_argument = transformers_api.cache_argument(self.model, cache)
        return _hidden_of(self._block_output(input_ids=input_ids, **cache_argument, use_cache=cache is not None))

    def logits(self, input_ids: torch.Tensor, cache=None) -> torch.Tensor:
        """[B, q] token ids -> the draft's logits [B, q, V] (``cache`` is extended in layers < L)."""
        self.forwards += 1
        with torch.no_grad():
            return self.slice.head(self.hidden(input_ids, cache))

    def last_logits(self, input_ids: torch.Tensor, cache=None) -> torch.Tensor:
        """The draft's logits at the last position only, [B, 1, V] (the head runs on one token)."""
        self.forwards += 1
        with torch.no_grad():
            return self.slice.head(self.hidden(input_ids, cache)[:, -1:])

    # -- the Drafter interface
    def reset(self) -> None:
        self._caches: dict = {}   # own cache: row -> DynamicCache holding that row's committed tokens
        self._cached: dict = {}   # own cache: row -> committed tokens in that cache
        self._target = None       # shared cache: the target's BatchedDecoder (None: own cache)
        self._drafted = None      # shared cache: h_L [B, k + 1, C] of the last proposal, until verify
        self._checked = False     # shared cache: the first draft step's cache growth was checked

    def bind(self, target) -> None:
        """Share ``target``'s cache (:class:`tokred.runtime.speculative.BatchedDecoder`) if
        ``share_cache`` and the target allows it; else keep an own cache and warn why."""
        if not self.share_cache:
            return
        self.own_cache_reason = self._sharing_problem(target)
        if self.own_cache_reason is None:
            self._target = target
        else:
            warnings.warn(f"tokred.generate: the early-exit draft keeps its own KV cache: {self.own_cache_reason}",
                          stacklevel=4)

    def _sharing_problem(self, target) -> Optional[str]:
        """Why the draft cannot write into ``target``'s cache and skip blocks < L there (None: it can)."""
        from transformers.cache_utils import DynamicLayer

        if target.model is not self.model:
            if getattr(target.model, "_orig_mod", None) is self.model:
                return ("the target runs through torch.compile, whose verification forward is one compiled graph "
                        "that cannot start at block L")
            return "the draft was built on another model object than the target's"
        modules = [resolve_module(self.model, path) for path in self.slice.exit_modules]
        if len({id(m) for m in modules}) != len(modules):
            return "several blocks are one module object, so blocks < L cannot be skipped alone"
        layers = getattr(target.cache, "layers", None)
        if layers is None or len(layers) != self.slice.blocks:
            found = "no .layers" if layers is None else f"{len(layers)} layers"
            return f"the target's KV cache ({type(target.cache).__name__}) has {found} for {self.slice.blocks} blocks"
        if any(type(layer) is not DynamicLayer for layer in layers):
            kinds = sorted({type(layer).__name__ for layer in layers})
            return f"the target's cache layers are {kinds}, not DynamicLayer (cropped and cut by entry count)"
        if len(set(_layer_lengths(target.cache))) != 1:
            return "the target's cache layers differ in length"
        return None

    def propose(self, state: DraftState, k: int) -> Draft:
        """Up to ``k`` proposals per active row (greedy: argmax; sampling: drawn from warped q)."""
        if self._target is not None:
            draft = self._propose_shared(state, k)
            if draft is not None:
                return draft
        return self._propose_own(state, k)

    def verify(self, target, tokens: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """After a shared-cache proposal: the target's forward on ``tokens`` [B, w] from block L on,
        on the draft's saved h_L (layers < L already hold these tokens' K/V) -> logits [B, w, V]."""
        drafted, self._drafted = self._drafted, None
        if drafted is None:
            return target.step(tokens, counts)
        width = tokens.shape[1]
        if not 1 <= width <= drafted.shape[1]:
            raise RuntimeError(f"early exit draft: verification of {width} tokens after {drafted.shape[1]} draft steps")
        layers = target.cache.layers[:self.exit_layer]
        if drafted.shape[1] > width:  # draft steps past the tokens verified (generate cut the drafts)
            for layer in layers:
                layer.crop(width - drafted.shape[1])
        modules = [resolve_module(self.model, path) for path in self.slice.exit_modules[:self.exit_layer]]
        with _blocks_replaced_by(modules, layers, drafted[:, :width]), torch.no_grad():
            return target.step(tokens, counts)

    def _propose_shared(self, state: DraftState, k: int) -> Optional[Draft]:
        """k proposals for every row from k + 1 single-token steps of blocks < L on the target's
        cache (the last committed token, then drafts 1..k; the last step only saves h_L for the
        verification). Every row, active or not, gets a real slot per step, so its draft tokens
        continue its committed ones and the cache rows stay right-aligned. None (after undoing the
        step) when the first step shows the cache cannot be shared: the caller drafts with an own cache."""
        target = self._target
        batch = state.tokens.shape[0]
        if bool(((target.n_real != state.lengths - 1) & state.active).any()):
            raise RuntimeError("early exit draft: the target's cache does not hold each row's committed tokens "
                               "but the last")
        token = state.tokens[torch.arange(batch, device=state.tokens.device), state.lengths - 1]  # [B]
        start = target.cache.get_seq_length()
        one = torch.ones_like(state.lengths)
        hiddens, proposals, dists = [], [], []
        for step in range(k + 1):
            before = None if self._checked else _layer_lengths(target.cache)
            kwargs = target.model_inputs(token.unsqueeze(1), one, n_real=target.n_real + step, slots=start + step)
            output = self._block_output(**kwargs)
            self.forwards += 1
            if before is not None:
                problem = self._first_step_problem(before, target.cache, output)
                if problem is not None:
                    self._target, self.own_cache_reason = None, problem
                    warnings.warn(f"tokred.generate: the early-exit draft keeps its own KV cache: {problem}",
                                  stacklevel=5)
                    return None
                self._checked = True
            hiddens.append(_hidden_of(output))
            if step < k:
                with torch.no_grad():
                    logits = self.slice.head(hiddens[-1])[:, -1].float()  # [B, V]
                token, q = self._pick(logits, state)
                proposals.append(token)
                if q is not None:
                    dists.append(q)
        self._drafted = torch.cat(hiddens, dim=1)
        counts = torch.where(state.active, k, 0)
        return Draft(tokens=torch.stack(proposals, dim=1), counts=counts,
                     probs=torch.stack(dists, dim=1) if dists else None)

    def _first_step_problem(self, before: list, cache, output) -> Optional[str]:
        """After the first single-token draft step on the target's cache: None if exactly layers < L
        grew by one entry and block L - 1 returned a tensor (what the verification relies on); else
        the reason, with the step's entries removed again."""
        after = _layer_lengths(cache)
        expected = [n + 1 if i < self.exit_layer else n for i, n in enumerate(before)]
        if after == expected and isinstance(output, torch.Tensor):
            return None
        for layer, old, new in zip(transformers_api.all_cache_layers(cache), before, after):
            if new > old:
                keys, values = transformers_api.layer_states(layer)
                transformers_api.set_layer_states(layer, keys[..., :old, :], values[..., :old, :])
        if after != expected:
            grown = [i for i, (old, new) in enumerate(zip(before, after)) if new != old]
            return (f"a draft step of blocks < {self.exit_layer} changed the target's cache layers {grown}, "
                    "not layers 0..L-1 by one entry each")
        return f"block {self.exit_layer - 1} returns a {type(output).__name__}, not the residual stream tensor"

    def _propose_own(self, state: DraftState, k: int) -> Draft:
        """k proposals per active row with the draft's own cache, one row at a time."""
        batch = state.tokens.shape[0]
        tokens = torch.zeros(batch, k, dtype=torch.long, device=state.tokens.device)
        counts = torch.zeros(batch, dtype=torch.long, device=state.tokens.device)
        probs = None
        for b in range(batch):
            if not bool(state.active[b]):
                continue
            row_tokens, row_probs = self._propose_row(state, b, k)
            tokens[b] = row_tokens
            counts[b] = k
            if row_probs is not None:
                if probs is None:
                    probs = torch.zeros(batch, k, row_probs.shape[-1], dtype=row_probs.dtype,
                                        device=row_probs.device)
                probs[b] = row_probs
        return Draft(tokens=tokens, counts=counts, probs=probs)

    def _propose_row(self, state, b: int, k: int) -> tuple:
        """k draft tokens [k] for row b (and their q [k, V] when sampling); the row's cache ends
        at its committed tokens again afterwards."""
        length = int(state.lengths[b])
        context = state.tokens[b, :length]
        cache = self._caches.get(b)
        if cache is None:
            cache, cached = self.new_cache(), 0
        else:
            cached = self._cached[b]
            keep = min(int(state.reused[b]), cached, length - 1)  # feed at least one token
            _crop_layers(cache, cached - keep)
            cached = keep
        feed = context[cached:][None]
        proposals, dists = [], []
        for step in range(k):
            last = self.last_logits(feed, cache)[:, -1].float()  # [1, V]
            token, q = self._pick(last, state)
            proposals.append(token)
            if q is not None:
                dists.append(q)
            feed = token.view(1, 1)
        _crop_layers(cache, k - 1)  # the draft tokens' entries (the last proposal was never fed)
        self._caches[b], self._cached[b] = cache, length
        tokens = torch.cat(proposals)
        return tokens, (torch.cat(dists) if dists else None)

    @staticmethod
    def _pick(logits: torch.Tensor, state) -> tuple:
        """logits [B, V] -> (tokens [B], q [B, V] or None). Greedy: the argmax (first index on ties).
        Sampling: a draw from the warped q, and q."""
        if not state.do_sample:
            return logits.argmax(-1), None
        q = warp_probs(logits, state.temperature, state.top_p)
        token = torch.multinomial(q, 1, generator=state.generator).squeeze(-1)
        return token, q
