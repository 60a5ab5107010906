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
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch

from tokred.compat.torch_api import maybe_mark_dynamic
from tokred.compat.transformers_api import cache_argument, returned_cache


def _eager(model: torch.nn.Module) -> torch.nn.Module:
    """The module under a torch.compile wrapper (``_orig_mod``), or ``model`` itself."""
    return getattr(model, "_orig_mod", model)


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
        self.padded = any(bool((layer.keys == 0).all(-1).any()) for layer in self.cache.layers)
        if step_model is None:
            step_model = model if self.padded else _eager(model)
        self.step_model = step_model
        self.length = context_ids.shape[1]
        self.last_logits = out.logits[:, -1]
        self.cache_entries = [layer.keys.shape[-2] for layer in self.cache.layers]

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
        if question_ids.dim() != 2 or question_ids.shape[0] != self.last_logits.shape[0]:
            raise ValueError(f"CompressedContext.answer: question_ids must be [{self.last_logits.shape[0]}, tokens], "
                             f"got shape {tuple(question_ids.shape)}")
        cache, logits, position = copy.deepcopy(self.cache), self.last_logits, self.length
        with torch.no_grad():
            for i in range(question_ids.shape[1]):
                logits = self._step(cache, question_ids[:, i:i + 1], position)
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
                logits = self._step(cache, token, position)
                position += 1
        return torch.cat(tokens, 1) if tokens else question_ids[:, :0]
