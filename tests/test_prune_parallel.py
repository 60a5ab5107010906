"""Pruning after parallel-residual blocks (Phi, GPT-J, Falcon, GPT-NeoX: ``x + attn(ln(x)) + mlp(ln(x))``).

Such a block has no stream between its attention and its MLP, but it has one after both: the cut
is made there (FastV's cut after block L), the later blocks run on the kept tokens and the pruned
ones exit early with their value after block L. Phi (partial rotary, fused MLP add) against the
plain-PyTorch reference, which runs the model's own layers whole; the prefill's cache keeps N
tokens up to the cut and M after, and greedy decode steps read it.
"""

from __future__ import annotations

import pytest
import torch

import prune_reference
import tokred
from tokred.rewriter.report import REWRITTEN
from test_prune import assert_pruned_decode_equals_reference
from zoo import GQA_HEADS, GQA_HIDDEN, GQA_KV_HEADS, INTERMEDIATE, VOCAB, _hf_build, max_abs_diff

TOL = 1e-4
STEPS = 3


def tiny_phi(layers: int = 3):
    """transformers PhiForCausalLM: parallel-residual blocks, GQA, rotary on half of each head."""
    from transformers import PhiConfig, PhiForCausalLM

    config = PhiConfig(vocab_size=VOCAB, hidden_size=GQA_HIDDEN, intermediate_size=INTERMEDIATE,
                       num_hidden_layers=layers, num_attention_heads=GQA_HEADS, num_key_value_heads=GQA_KV_HEADS,
                       partial_rotary_factor=0.5, max_position_embeddings=64)
    return _hf_build(PhiForCausalLM, config, "sdpa")


def ids(n: int = 14) -> torch.Tensor:
    return torch.randint(10, VOCAB - 10, (2, n), generator=torch.Generator().manual_seed(n))


@pytest.mark.parametrize("prune", [
    {"keep": 0.5, "at": [0], "score": "query"},
    {"keep": 0.4, "at": [1], "score": "transition", "protect_last": 2},
    {"keep": [0.7, 0.6], "at": [0, 1], "score": "query", "query": 2},
], ids=["query-at0", "transition-at1-protect_last", "two-cuts"])
def test_phi_prefill_equals_the_reference(fresh_dynamo, prune):
    model = tiny_phi()
    backend = tokred.backend(inner="aot_eager", prune=prune)
    with torch.no_grad():
        got = torch.compile(model, backend=backend)(input_ids=ids(), use_cache=False).logits
        want = prune_reference.hf_decoder_forward(model, ids(), prune_reference.prune_options(**prune),
                                                  use_cache=False).logits
    torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)
    with torch.no_grad():
        assert max_abs_diff(got, model(input_ids=ids(), use_cache=False).logits) > 1e-3  # it pruned
    rewritten = [s for s in backend.report.attention_sites if s.status == REWRITTEN]
    assert len(rewritten) == len(prune["at"]), backend.report


def test_phi_pruned_cache_and_decode_equal_the_reference(fresh_dynamo):
    assert_pruned_decode_equals_reference(tiny_phi(), ids(), {"keep": 0.5, "at": [0], "score": "query",
                                                              "protect_last": 2}, STEPS)
