"""Compress a context's KV cache once, then answer several questions from it (question-agnostic).

    lm_kv = torch.compile(lm, backend="tokred", options={"kv_cache": {"method": "knorm", "keep": 0.25}})
    context = tokred.CompressedContext(lm_kv, context_ids)     # one compressed prefill
    first = context.answer(question_ids, max_new_tokens=16)    # [B, <= 16] greedy tokens
    second = context.answer(other_question_ids)                # the same compressed cache, unchanged

The prefill runs through the given (tokred-compiled) forward, so its kv_cache pass cuts every
layer's cache before any question is seen: kvpress's pipeline setting. Each answer copies that
cache, feeds the question one token at a time at positions N, N+1, ... (N: the context's length,
not the compressed cache's), then decodes greedily. One token per step is what keeps this right for
any cut: layers may hold different counts (PyramidKV), and a multi-token chunk would need a mask
that each layer's shorter cache does not match. Steps run on the eager model under the compiled one
(``step_model``), so no decode graph is compiled; except where the cut left padding slots (the
zero keys of ``heads="adaptive"``): then the steps run through the compiled forward, whose decode
graphs mask them, with the cache's length marked dynamic so that one decode graph serves every
step (each length compiled apart would reach Dynamo's recompile limit, and its eager fallback
would not mask the padding).

With ``kv_cache={"decode": {"every": E, "max": M}}`` the cache is also kept under a budget while
answering: once the layers hold M + E entries, the last ``chunk`` tokens fed are cropped from the
cache and fed again as one forward through the compiled model, whose kv_cache pass scores the cache
by that chunk's queries and cuts it back to M (their keys and values come back as they were: same
tokens, same positions). The chunk's graph has one shape at every cut, so it compiles once.
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch

from tokred.compat.torch_api import compile_backend, mark_static, maybe_mark_dynamic
from tokred.compat.transformers_api import cache_argument, cache_layers, layer_states, returned_cache, set_layer_states
from tokred.passes.kv_options import DecodeBudget, KVCacheOptions


def _eager(model: torch.nn.Module) -> torch.nn.Module:
    """The module under a torch.compile wrapper (``_orig_mod``), or ``model`` itself."""
    return getattr(model, "_orig_mod", model)


def decode_budget(model: torch.nn.Module) -> Optional[DecodeBudget]:
    """The ``kv_cache.decode`` budget ``model`` was compiled with by tokred (None: none, or not
    compiled by tokred): read from the backend object (``tokred.backend(...)``) or from the options
    torch.compile passed to ``backend="tokred"``."""
    backend, kwargs = compile_backend(model)
    passes = getattr(getattr(backend, "options", None), "passes", None)
    if passes is None:
        passes = kwargs.get("options") or {}
    value = passes.get("kv_cache") if hasattr(passes, "get") else None
    if value is None:
        return None
    return (value if isinstance(value, KVCacheOptions) else KVCacheOptions.parse(value)).decode


class CompressedContext:
    """A context prefilled once (``context_ids`` [B, N]) whose KV cache answers many questions.

    ``cache_entries``: the entries each layer kept (a list, one per layer) over ``length`` = N."""

    def __init__(self, model: torch.nn.Module, context_ids: torch.Tensor, step_model: Optional[torch.nn.Module] = None):
        if context_ids.dim() != 2:
            raise ValueError(f"CompressedContext: context_ids must be [batch, tokens], got shape {tuple(context_ids.shape)}")
        with torch.no_grad():
            out = model(input_ids=context_ids, use_cache=True)
        self.cache = returned_cache(out)
        if self.cache is None:
            raise ValueError("CompressedContext: the model returned no KV cache for use_cache=True (not a decoder?)")
        keys = [layer_states(layer)[0] for layer in cache_layers(self.cache)]
        self.padded = any(bool((k == 0).all(-1).any()) for k in keys)
        if step_model is None:
            step_model = model if self.padded else _eager(model)
        self.model, self.step_model, self.context_ids = model, step_model, context_ids
        self.length = context_ids.shape[1]
        self.last_logits = out.logits[:, -1]
        self.cache_entries = [k.shape[-2] for k in keys]
        self.budget = decode_budget(model)
        if self.budget is not None and len(set(self.cache_entries)) > 1:
            raise ValueError(f"CompressedContext: kv_cache.decode needs every layer's cache at one length (a re-fed "
                             f"chunk's mask spans one key length), but the layers hold {self.cache_entries} entries "
                             f"(sliding-window layers?)")
        self.decode_cuts = 0

    def _step(self, cache: Any, token: torch.Tensor, position: int) -> torch.Tensor:
        """One token [B, 1] at ``position`` on ``cache`` -> its next-token logits [B, V]."""
        if self.padded:  # each step's tensors (the copy's, then the graph's): marking writes to them
            for layer in cache.layers:
                maybe_mark_dynamic(layer.keys, 2)
                maybe_mark_dynamic(layer.values, 2)
        out = self.step_model(input_ids=token, position_ids=torch.full_like(token, position), use_cache=True,
                              **cache_argument(self.step_model, cache))
        return out.logits[:, -1]

    def answer(self, question_ids: torch.Tensor, max_new_tokens: int = 16,
               eos_token_id: Optional[int] = None) -> torch.Tensor:
        """Greedy answer to ``question_ids`` [B, Q] (Q may be 0: continue the context) read from a copy of
        the compressed cache. -> [B, T] new tokens, T <= max_new_tokens (fewer when every row has
        produced ``eos_token_id``)."""
        self._check_ids("answer", "question_ids", question_ids)
        cache, logits, position = copy.deepcopy(self.cache), self.last_logits, self.length
        fed = [self.context_ids]
        with torch.no_grad():
            for i in range(question_ids.shape[1]):
                logits = self._feed(cache, fed, question_ids[:, i:i + 1], position)
                position += 1
            tokens = []
            done = torch.zeros(question_ids.shape[0], dtype=torch.bool, device=question_ids.device)
            for _ in range(max_new_tokens):
                token = logits.argmax(-1, keepdim=True)
                tokens.append(token)
                if eos_token_id is not None:
                    done |= token[:, 0] == eos_token_id
                if len(tokens) == max_new_tokens or bool(done.all()):
                    break
                logits = self._feed(cache, fed, token, position)
                position += 1
        return torch.cat(tokens, 1) if tokens else question_ids[:, :0]

    def log_likelihood(self, continuation_ids: torch.Tensor) -> torch.Tensor:
        """Teacher-forced log-probabilities of ``continuation_ids`` [B, T] after the context, read
        from a copy of the compressed cache (one token per step, as :meth:`answer` feeds them, the
        decode budget kept): -> [B, T]; exp(-mean) is the continuation's perplexity."""
        self._check_ids("log_likelihood", "continuation_ids", continuation_ids)
        cache, logits, position = copy.deepcopy(self.cache), self.last_logits, self.length
        fed, scores = [self.context_ids], []
        with torch.no_grad():
            for i in range(continuation_ids.shape[1]):
                token = continuation_ids[:, i:i + 1]
                scores.append(logits.float().log_softmax(-1).gather(-1, token))
                if i + 1 < continuation_ids.shape[1]:
                    logits = self._feed(cache, fed, token, position)
                    position += 1
        return torch.cat(scores, 1)

    def _check_ids(self, method: str, name: str, ids: torch.Tensor) -> None:
        batch = self.last_logits.shape[0]
        if ids.dim() != 2 or ids.shape[0] != batch:
            raise ValueError(f"CompressedContext.{method}: {name} must be [{batch}, tokens], "
                             f"got shape {tuple(ids.shape)}")

    def _feed(self, cache: Any, fed: list, token: torch.Tensor, position: int) -> torch.Tensor:
        """Step ``token`` [B, 1] at ``position``, record it in ``fed`` and keep the cache in its
        decode budget. -> the next-token logits [B, V]."""
        logits = self._step(cache, token, position)
        fed.append(token)
        self._keep_in_budget(cache, fed, position + 1)
        return logits

    def _keep_in_budget(self, cache: Any, fed: list, position: int) -> None:
        """Cut ``cache`` back to ``budget.max`` once it holds ``max + every`` entries: the last
        ``chunk`` fed tokens (``fed``: [B, *] pieces, all fed so far; ``position``: the next one's)
        are cropped and fed again as one forward, whose graph cuts the cache."""
        budget = self.budget
        layers = cache_layers(cache)
        if budget is None or layer_states(layers[0])[0].shape[-2] < budget.max + budget.every:
            return
        chunk = torch.cat(fed, 1)[:, -budget.chunk:].contiguous()  # one stride at every cut: no recompile
        positions = torch.arange(position - budget.chunk, position, device=chunk.device).expand_as(chunk)
        positions = positions.contiguous()
        # the same shapes at every cut, marked static: one chunk graph, compiled once
        mark_static(chunk, 1)
        mark_static(positions, 1)
        for layer in layers:
            k, v = (t[:, :, :-budget.chunk] for t in layer_states(layer))
            mark_static(k, 2)
            mark_static(v, 2)
            set_layer_states(layer, k, v)
        self.model(input_ids=chunk, position_ids=positions, use_cache=True, **cache_argument(self.model, cache))
        lengths = {layer_states(layer)[0].shape[-2] for layer in cache_layers(cache)}
        if lengths != {budget.max}:
            raise RuntimeError(f"CompressedContext: the re-fed chunk's graph did not cut the cache to "
                               f"kv_cache.decode.max={budget.max} (the layers hold {sorted(lengths)}); the tokred "
                               f"report says why")
        self.decode_cuts += 1
