"""VLMs end to end: FastV-style pruning of image tokens in the language model of tiny LLaVA
(CLIP + Llama) and PaliGemma (SigLIP + Gemma) models, through ``torch.compile`` and
``model.generate``.

transformers breaks a VLM's forward into several graphs (the vision tower, the image-token check,
the language model). The language model's graph receives embeddings, not ids, and builds its
stream with ``inputs_embeds.masked_scatter(image_mask, image_features)``: prune reads the
image-token positions from that mask (tokred/passes/prune_candidates.py). ``at`` names the
language model's block by module path, so the vision tower's graph is left alone.
"""

from __future__ import annotations

import pytest
import torch

import tokred

IMAGE = 5
N_TEXT = 30


def _llava():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=32)
    text = LlamaConfig(vocab_size=100, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE, vision_feature_layer=-1,
                         vision_feature_select_strategy="full")
    return LlavaForConditionalGeneration, config, 17  # 16 patches + [CLS] ("full")


def _paligemma():
    from transformers import GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                image_size=32, patch_size=8)
    text = GemmaConfig(vocab_size=100, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=12, max_position_embeddings=128)
    config = PaliGemmaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE, projection_dim=48)
    return PaliGemmaForConditionalGeneration, config, 16


BUILDERS = {"llava": _llava, "paligemma": _paligemma}


def build(name: str):
    """(model, input_ids [2, 30], pixel_values [2, 3, 32, 32], image tokens per row)."""
    cls, config, n_image = BUILDERS[name]()
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = cls(config).eval()
    ids = torch.randint(10, 90, (2, N_TEXT), generator=torch.Generator().manual_seed(1))
    start = 0 if name == "paligemma" else 3  # PaliGemma's image tokens lead the prompt
    ids[:, start:start + n_image] = IMAGE
    return model, ids, torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)), n_image


def _forward(model, backend, ids, pixels, **kwargs):
    """The model's output through ``torch.compile`` with ``backend``, without a cache.

    The reference is the model compiled plainly (``backend="eager"``), not run eagerly: under
    torch.compile transformers 5.24's PaliGemma builds another attention mask than in eager mode
    (logits differ by ~0.1 with no tokred involved); tokred's rewrites are checked against what the
    captured graph computes."""
    torch._dynamo.reset()
    with torch.no_grad():
        return torch.compile(model, backend=backend)(input_ids=ids, pixel_values=pixels, use_cache=False, **kwargs)


def _early_exit_logits(model, ids, pixels, after: int) -> torch.Tensor:
    """Logits [B, N, V] of every token as if it left the language model after block ``after``."""
    hidden = _forward(model, "eager", ids, pixels, output_hidden_states=True).hidden_states[after + 1]
    with torch.no_grad():
        return model.lm_head(model.model.language_model.norm(hidden))


def _prune(keep, at="model.language_model.layers.1"):
    return {"keep": keep, "at": [at], "prunable_ids": [IMAGE], "score": "query"}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_fastv_prunes_only_image_tokens_in_the_language_model(name, fresh_dynamo):
    model, ids, pixels, n_image = build(name)
    early = _early_exit_logits(model, ids, pixels, after=1)
    backend = tokred.backend(inner="eager", prune=_prune(0.25))
    logits = _forward(model, backend, ids, pixels).logits
    exited = (logits - early).abs().amax(dim=-1) < 1e-4  # [B, N]: left after the LM's block 1
    kept = round(0.25 * n_image)
    assert exited.sum(dim=1).tolist() == [n_image - kept] * 2
    assert not (exited & (ids != IMAGE)).any(), "a text token was pruned"
    sites = [r for report in backend.reports for r in report.attention_sites]
    rewritten = [r for r in sites if r.status == "rewritten"]
    assert [r.module for r in rewritten] == ["language_model.layers.1.self_attn"]
    assert f"{n_image} image-token positions per row" in rewritten[0].reason
    assert all(r.status == "found" for r in sites if "language_model" not in r.module)  # the vision tower


@pytest.mark.parametrize("name", list(BUILDERS))
def test_fastv_keep_all_is_identity(name, fresh_dynamo):
    model, ids, pixels, _ = build(name)
    dense = _forward(model, "eager", ids, pixels).logits
    got = _forward(model, tokred.backend(inner="eager", prune=_prune(1.0)), ids, pixels).logits
    torch.testing.assert_close(got, dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_generate_decodes_on_the_pruned_cache(name, fresh_dynamo):
    """model.generate on the compiled forward: the prefill is pruned, the layers after the cut
    cache only the kept tokens, and each decode step attends to that cache; keep=1.0 generates
    what the model does."""
    model, ids, pixels, n_image = build(name)
    ids, pixels = ids[:1], pixels[:1]
    with torch.no_grad():
        plain = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=4, do_sample=False)
    for keep in (1.0, 0.25):
        torch._dynamo.reset()
        backend = tokred.backend(inner="eager", prune=_prune(keep))
        model.forward = torch.compile(model.forward, backend=backend)
        with torch.no_grad():
            out = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=4, do_sample=False,
                                 return_dict_in_generate=True)
        del model.forward
        lengths = [layer.keys.shape[2] for layer in out.past_key_values.layers]
        steps = 4 - 1  # the last token generated is not in the cache
        kept = N_TEXT if keep == 1.0 else N_TEXT - n_image + round(keep * n_image)
        assert lengths == [N_TEXT + steps, N_TEXT + steps, kept + steps], keep
        if keep == 1.0:
            assert torch.equal(out.sequences, plain)
        first = backend.reports[0] if backend.reports else None
        assert any(r.status == "rewritten" for report in backend.reports for r in report.attention_sites), first


def test_at_by_module_path_names_blocks_of_one_tower(fresh_dynamo):
    """An index counts blocks per captured graph (the vision tower's and the language model's);
    a module path names one block of one model, and a graph without it is told so."""
    model, ids, pixels, _ = build("llava")
    backend = tokred.backend(inner="eager", prune={"keep": 0.5, "at": ["vision_tower.encoder.layers.0"],
                                                   "score": "cls"})
    with pytest.warns(tokred.TokredWarning, match="names none of this graph's blocks"):
        _forward(model, backend, ids, pixels)
    rewritten = [r.module for report in backend.reports for r in report.attention_sites if r.status == "rewritten"]
    assert len(rewritten) == 1 and rewritten[0].endswith("encoder.layers.0.self_attn")
    with pytest.raises(ValueError, match=r"prune\.at"):
        tokred.backend(prune={"at": [""]})
