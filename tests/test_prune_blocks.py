"""Blocks written in less common ways, pruned as the plain-PyTorch reference prunes them.

- OPT's decoder layer runs its MLP on the stream flattened to [B*N, C] and views it back to
  [B, N, C] after the MLP's residual add: the block is found through the flatten, and the cut
  after it equals the reference (tests/prune_reference.py: ``hf_opt_forward``).
- Mixtral's MoE MLP routes the tokens: top-k experts per token, the k*N choices flattened and
  sorted by expert, the tokens gathered in that order for a grouped matmul, the inverse
  permutation written in place (``inv_perm[perm] = arange(k*N)``), the outputs viewed back as
  [N, k, C] and summed. Every count there (N, k*N) follows the cut; the prefill, its pruned cache
  and greedy decode steps equal the reference (``hf_decoder_forward``, Mixtral's own layers).
- EVA02's rotary table covers the patch tokens only ([N - 1, 2D], after the class token): with the
  class token always kept first, each kept patch takes its own row (``index[:, 1:] - 1``) and the
  sizes of N - 1 become M - 1 (``timm_eva_features``). Merged the same way, each merged token
  takes its representative's row (tests/tome_reference.py: ``timm_eva_features``).
- A parallel-residual ViT (timm's ``vit_*_xp``: attention and MLP read the same input, one add)
  has no stream between attention and MLP: its tokens are merged after the block, by the block's
  keys (``timm_parallel_vit_features``).
"""

from __future__ import annotations

import pytest
import torch

import prune_reference
import tokred
import tome_reference
from tokred.rewriter.report import REWRITTEN
from test_prune import assert_pruned_decode_equals_reference
from test_prune_parallel import ids
from zoo import GQA_HEADS, GQA_HIDDEN, GQA_KV_HEADS, INTERMEDIATE, VOCAB, _hf_build, max_abs_diff

TOL = 1e-4


def tiny_opt(layers: int = 3):
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=layers, num_attention_heads=4,
                       max_position_embeddings=64, word_embed_proj_dim=32)
    return _hf_build(OPTForCausalLM, config, "sdpa")


def tiny_mixtral(layers: int = 3):
    """transformers MixtralForCausalLM: GQA attention, a sparse MoE MLP (4 experts, top 2)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=VOCAB, hidden_size=GQA_HIDDEN, intermediate_size=INTERMEDIATE,
                           num_hidden_layers=layers, num_attention_heads=GQA_HEADS, num_key_value_heads=GQA_KV_HEADS,
                           num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64)
    return _hf_build(MixtralForCausalLM, config, "sdpa")


def decoder_logits(model, input_ids, opts):
    """The reference prefill's logits of a Llama-like decoder (Mixtral's layers as they are)."""
    return prune_reference.hf_decoder_forward(model, input_ids, opts, use_cache=False).logits


@pytest.mark.parametrize("build, reference", [(tiny_opt, prune_reference.hf_opt_forward),
                                              (tiny_mixtral, decoder_logits)],
                         ids=["opt", "mixtral"])
@pytest.mark.parametrize("prune", [
    {"keep": 0.5, "at": [0], "score": "query"},
    {"keep": [0.7, 0.6], "at": [0, 1], "score": "transition", "protect_last": 2},
], ids=["query-at0", "transition-two-cuts"])
def test_prefill_equals_the_reference(fresh_dynamo, build, reference, prune):
    model = build()
    backend = tokred.backend(inner="aot_eager", prune=prune)
    with torch.no_grad():
        got = torch.compile(model, backend=backend)(input_ids=ids(), use_cache=False).logits
        want = reference(model, ids(), prune_reference.prune_options(**prune))
        dense = model(input_ids=ids(), use_cache=False).logits
    torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)
    assert max_abs_diff(got, dense) > 1e-3  # it pruned
    report = backend.report
    assert [s.status for s in report.attention_sites].count(REWRITTEN) == len(prune["at"]), report
    assert report.blocks == 3, report


def test_mixtral_pruned_cache_and_decode_equal_the_reference(fresh_dynamo):
    assert_pruned_decode_equals_reference(tiny_mixtral(), ids(), {"keep": 0.5, "at": [0], "score": "query"})


def tiny_eva(depth: int = 3):
    """timm EVA02 (rotary position embedding of the 4 x 4 patches, a class token), 17 tokens."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=56, depth=depth, embed_dim=64,
                             num_heads=2).eval()


@pytest.mark.parametrize("prune", [
    {"keep": 0.5, "at": [0], "score": "cls"},
    {"keep": [0.7, 0.5], "at": [0, 1], "score": "transition"},
], ids=["cls-at0", "transition-two-cuts"])
def test_eva02_rotary_patches_equal_the_reference(fresh_dynamo, prune):
    model = tiny_eva()
    images = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(3))
    backend = tokred.backend(inner="aot_eager", prune=prune)
    with torch.no_grad():
        got = torch.compile(model.forward_features, backend=backend)(images)
        want = prune_reference.timm_eva_features(model, images, prune_reference.prune_options(**prune))
        dense = model.forward_features(images)
        torch.testing.assert_close(prune_reference.timm_eva_features(model, images, None), dense)  # a faithful model
    torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)
    assert max_abs_diff(got, dense) > 1e-3  # it pruned
    assert [s.status for s in backend.report.attention_sites].count(REWRITTEN) == len(prune["at"]), backend.report


def test_eva02_merge_equals_the_tome_reference(fresh_dynamo):
    model = tiny_eva()
    images = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(3))
    backend = tokred.backend(inner="aot_eager", merge={"r": 2})
    with torch.no_grad():
        got = torch.compile(model.forward_features, backend=backend)(images)
        want, tracker = tome_reference.timm_eva_features(model, images, r=2)
        dense, _ = tome_reference.timm_eva_features(model, images, r=0)
        torch.testing.assert_close(dense, model.forward_features(images))  # a faithful model
    assert tracker.r_done == [2, 2, 2]
    torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)
    assert [s.status for s in backend.report.attention_sites] == [REWRITTEN] * 3, backend.report


def test_parallel_residual_vit_merge_equals_the_tome_reference(fresh_dynamo):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_xp_224", pretrained=False, img_size=64, depth=3, embed_dim=64,
                              num_heads=2).eval()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    backend = tokred.backend(inner="aot_eager", merge={"r": 3})
    with torch.no_grad():
        got = torch.compile(model.forward_features, backend=backend)(images)
        want, tracker = tome_reference.timm_parallel_vit_features(model, images, r=3)
        dense, _ = tome_reference.timm_parallel_vit_features(model, images, r=0)
        torch.testing.assert_close(dense, model.forward_features(images))  # a faithful model
    assert tracker.r_done == [3, 3]
    torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)
    assert max_abs_diff(got, dense) > 1e-3  # it merged
    statuses = [s.status for s in backend.report.attention_sites]
    assert statuses == [REWRITTEN, REWRITTEN, "found"], backend.report
    assert "the last of its stack" in backend.report.attention_sites[2].reason, backend.report
