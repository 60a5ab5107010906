"""A zoo of real architectures for tests: built by their own libraries from configs, random weights.

Import it as ``from zoo import ZOO, zoo_params`` (``tests/conftest.py`` puts ``tests/`` on
``sys.path``).

Every entry is tiny (depth 2, widths <= 128, vocab 100) so that capturing and compiling it on a
CPU takes seconds. Sizes are chosen so that the numbers a graph carries as shape literals are all
different within one model: batch 2, token count N (26/27/30 for images, 11 for text), heads,
head_dim and hidden. A literal equal to N in a ``view``/``reshape`` is therefore unambiguous.

Images are 40x40 with 8x8 patches: 25 patches (not 16, which would equal head_dim 16), plus the
model's prefix tokens (class, distillation, register tokens).

GQA decoders (Llama, Qwen2, Gemma3) use 12 query heads, 4 kv heads (3 query heads per kv head),
head_dim 8 and hidden 96, so that batch, kv heads, the repeat factor, heads, head_dim, N and hidden
are seven different numbers.

Each builder seeds torch itself, so ``ZOO[name]()`` returns the same weights and inputs every time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
from torch import nn

SEED = 0
BATCH = 2

# Vision: 40x40 images, 8x8 patches -> a 5x5 grid of 25 patches.
IMAGE_SIZE = 40
PATCH_SIZE = 8
NUM_PATCHES = (IMAGE_SIZE // PATCH_SIZE) ** 2

# Text: 11 tokens, vocabulary of 100.
SEQ_LEN = 11
VOCAB = 100

# Encoders and GPT-2: hidden 64 = 4 heads x head_dim 16, MLP 128.
HIDDEN = 64
HEADS = 4
HEAD_DIM = HIDDEN // HEADS
INTERMEDIATE = 128

# GQA decoders: hidden 96 = 12 heads x head_dim 8; 4 kv heads.
GQA_HIDDEN = 96
GQA_HEADS = 12
GQA_KV_HEADS = 4
GQA_HEAD_DIM = GQA_HIDDEN // GQA_HEADS

DEPTH = 2


@dataclass
class ZooModel:
    """A model ready to run: ``model(*args, **kwargs)``.

    n_attention:       number of attention layers (attention cores) in one forward.
    family:            'timm', 'hf' or 'torch'.
    impl:              'sdpa' (F.scaled_dot_product_attention) or 'eager' (softmax(q k^T) v written
                       out); None for models without attention.
    kind:              'encoder', 'decoder', 'vision' or 'other'.
    prefix_tokens:     class/distillation/register tokens in front of the patch tokens.
    token_count:       N, the tokens each attention layer sees (prefix tokens included); None
                       where there is no token axis.
    block_prefix:      qualified name of the module list holding the blocks, e.g. 'blocks'.
    attention_modules: qualified names of the innermost modules whose forward computes the
                       attention core (softmax or SDPA), in layer order.
    batch:             leading dim of every example input.
    heads, kv_heads, head_dim, hidden: the attention geometry (0 where there is no attention).
    causal:            the attention is causal (decoders).
    has_mask:          the example inputs carry an attention mask with padding.
    """

    name: str
    model: nn.Module
    args: tuple
    kwargs: dict
    n_attention: int
    family: str
    impl: Optional[str]
    kind: str
    prefix_tokens: int
    token_count: Optional[int]
    block_prefix: Optional[str]
    attention_modules: list = field(default_factory=list)
    batch: int = BATCH
    heads: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    hidden: int = 0
    causal: bool = False
    has_mask: bool = False

    def __call__(self) -> Any:
        """Run the model eagerly on its example inputs, without autograd."""
        with torch.no_grad():
            return self.model(*self.args, **self.kwargs)


def _images(seed: int = SEED) -> torch.Tensor:
    """[BATCH, 3, IMAGE_SIZE, IMAGE_SIZE] standard-normal pixels."""
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randn(BATCH, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)


def _token_ids(seed: int = SEED, low: int = 3) -> torch.Tensor:
    """[BATCH, SEQ_LEN] int64 token ids in [low, VOCAB); low skips special ids (pad, bos, eos)."""
    g = torch.Generator().manual_seed(seed + 2)
    return torch.randint(low, VOCAB, (BATCH, SEQ_LEN), generator=g)


def _padding_mask(pad: int = 3) -> torch.Tensor:
    """[BATCH, SEQ_LEN] int64 mask: row 0 all ones, row 1 with its last ``pad`` tokens padded."""
    mask = torch.ones(BATCH, SEQ_LEN, dtype=torch.long)
    mask[1, SEQ_LEN - pad:] = 0
    return mask


def _names(pattern: str, depth: int = DEPTH) -> list[str]:
    """['blocks.0.attn', 'blocks.1.attn'] from 'blocks.{}.attn'."""
    return [pattern.format(i) for i in range(depth)]


def _names_in(model: nn.Module, *patterns: str, depth: int = DEPTH) -> list[str]:
    """``_names`` of the first pattern whose modules all exist in ``model``: where transformers
    moved a model's layers between releases (ViT: ``encoder.layer`` up to 5.x, ``layers`` later)."""
    modules = dict(model.named_modules())
    for pattern in patterns:
        names = _names(pattern, depth)
        if all(name in modules for name in names):
            return names
    raise AssertionError(f"{type(model).__name__} has none of the layouts {patterns}")


# ----------------------------------------------------------------------------------------- timm

def _timm_set_fused(model: nn.Module, fused: bool) -> None:
    """Select SDPA (fused) or the written-out softmax attention in every timm attention module."""
    found = 0
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused
            found += 1
    assert found, "no timm module has a fused_attn flag"


def _timm_vit(name: str, timm_name: str, impl: str, prefix_tokens: int, embed_dim: int,
              num_heads: int, **kwargs: Any) -> ZooModel:
    import timm

    torch.manual_seed(SEED)
    model = timm.create_model(timm_name, pretrained=False, img_size=IMAGE_SIZE, patch_size=PATCH_SIZE,
                              depth=DEPTH, embed_dim=embed_dim, num_heads=num_heads, mlp_ratio=2.0,
                              num_classes=10, **kwargs)
    _timm_set_fused(model, impl == "sdpa")
    return ZooModel(name=name, model=model.eval(), args=(_images(),), kwargs={}, n_attention=DEPTH,
                    family="timm", impl=impl, kind="vision", prefix_tokens=prefix_tokens,
                    token_count=NUM_PATCHES + prefix_tokens, block_prefix="blocks",
                    attention_modules=_names("blocks.{}.attn"), heads=num_heads, kv_heads=num_heads,
                    head_dim=embed_dim // num_heads, hidden=embed_dim)


def timm_vit_tiny(impl: str) -> ZooModel:
    """timm ViT-Ti layout: class token; hidden 64, 4 heads of 16, N = 26."""
    return _timm_vit(f"timm_vit_tiny_{impl}", "vit_tiny_patch16_224", impl, 1, HIDDEN, HEADS)


def timm_vit_small(impl: str) -> ZooModel:
    """timm ViT-S layout: class token; hidden 96, 6 heads of 16, N = 26."""
    return _timm_vit(f"timm_vit_small_{impl}", "vit_small_patch16_224", impl, 1, 96, 6)


def timm_deit_tiny_distilled(impl: str) -> ZooModel:
    """timm DeiT-Ti distilled: class and distillation tokens; N = 27; two heads, outputs averaged."""
    return _timm_vit(f"timm_deit_tiny_distilled_{impl}", "deit_tiny_distilled_patch16_224", impl, 2,
                     HIDDEN, HEADS)


def timm_vit_reg4(impl: str) -> ZooModel:
    """timm DINOv2 ViT-S with 4 register tokens and a class token (no pos-embed on them); N = 30."""
    return _timm_vit(f"timm_vit_reg4_{impl}", "vit_small_patch14_reg4_dinov2", impl, 5, HIDDEN, HEADS)


def timm_resnet() -> ZooModel:
    """timm ResNet-18 with one block per stage, 32x32 input: no attention."""
    import timm

    torch.manual_seed(SEED)
    model = timm.create_model("resnet18", pretrained=False, layers=(1, 1, 1, 1), num_classes=10)
    g = torch.Generator().manual_seed(SEED + 1)
    x = torch.randn(BATCH, 3, 32, 32, generator=g)
    return ZooModel(name="timm_resnet", model=model.eval(), args=(x,), kwargs={}, n_attention=0,
                    family="timm", impl=None, kind="other", prefix_tokens=0, token_count=None,
                    block_prefix=None)


# ---------------------------------------------------------------------------------------- torch

class MLP(nn.Module):
    """[B, 20] -> [B, 10]: Linear, GELU, Linear, GELU, Linear. No attention, no token axis."""

    def __init__(self, d_in: int = 20, d_hidden: int = 48, d_out: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_hidden)
        self.fc3 = nn.Linear(d_hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(nn.functional.gelu(self.fc2(nn.functional.gelu(self.fc1(x)))))


def torch_mlp() -> ZooModel:
    torch.manual_seed(SEED)
    model = MLP()
    g = torch.Generator().manual_seed(SEED + 1)
    x = torch.randn(BATCH, 20, generator=g)
    return ZooModel(name="torch_mlp", model=model.eval(), args=(x,), kwargs={}, n_attention=0,
                    family="torch", impl=None, kind="other", prefix_tokens=0, token_count=None,
                    block_prefix=None)


# --------------------------------------------------------------------------------- transformers

def _hf_build(model_cls, config, impl: str) -> nn.Module:
    """Instantiate ``model_cls(config)`` with random weights (seeded) and the given attention."""
    config._attn_implementation = impl  # the 5.x config attribute behind attn_implementation=...
    torch.manual_seed(SEED)
    model = model_cls(config)
    model.set_attn_implementation(impl)
    assert model.config._attn_implementation == impl, (model_cls.__name__, model.config._attn_implementation)
    return model.eval()


def _block_prefix(model: nn.Module) -> str:
    """Where a ViT-like transformers model keeps its layers (moved between releases)."""
    return "layers" if "layers" in dict(model.named_modules()) else "encoder.layer"


def hf_vit(impl: str) -> ZooModel:
    """transformers ViTModel: class token, N = 26, hidden 64, 4 heads of 16."""
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(hidden_size=HIDDEN, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                       intermediate_size=INTERMEDIATE, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
    model = _hf_build(ViTModel, config, impl)
    return ZooModel(name=f"hf_vit_{impl}", model=model, args=(), kwargs={"pixel_values": _images()},
                    n_attention=DEPTH, family="hf", impl=impl, kind="vision", prefix_tokens=1,
                    token_count=NUM_PATCHES + 1, block_prefix=_block_prefix(model),
                    attention_modules=_names_in(model, "layers.{}.attention", "encoder.layer.{}.attention"), heads=HEADS,
                    kv_heads=HEADS, head_dim=HEAD_DIM, hidden=HIDDEN)


def hf_deit(impl: str) -> ZooModel:
    """transformers DeiTModel: class and distillation tokens, N = 27."""
    from transformers import DeiTConfig, DeiTModel

    config = DeiTConfig(hidden_size=HIDDEN, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                        intermediate_size=INTERMEDIATE, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
    model = _hf_build(DeiTModel, config, impl)
    return ZooModel(name=f"hf_deit_{impl}", model=model, args=(), kwargs={"pixel_values": _images()},
                    n_attention=DEPTH, family="hf", impl=impl, kind="vision", prefix_tokens=2,
                    token_count=NUM_PATCHES + 2, block_prefix=_block_prefix(model),
                    attention_modules=_names_in(model, "layers.{}.attention", "encoder.layer.{}.attention"), heads=HEADS,
                    kv_heads=HEADS, head_dim=HEAD_DIM, hidden=HIDDEN)


def hf_clip_vision(impl: str) -> ZooModel:
    """transformers CLIPVisionModel: class token, pre-LayerNorm, N = 26."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(hidden_size=HIDDEN, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                              intermediate_size=INTERMEDIATE, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE,
                              projection_dim=32)
    model = _hf_build(CLIPVisionModel, config, impl)
    return ZooModel(name=f"hf_clip_vision_{impl}", model=model, args=(), kwargs={"pixel_values": _images()},
                    n_attention=DEPTH, family="hf", impl=impl, kind="vision", prefix_tokens=1,
                    token_count=NUM_PATCHES + 1, block_prefix="encoder.layers",
                    attention_modules=_names("encoder.layers.{}.self_attn"), heads=HEADS,
                    kv_heads=HEADS, head_dim=HEAD_DIM, hidden=HIDDEN)


def _text_encoder_inputs() -> dict:
    return {"input_ids": _token_ids(), "attention_mask": _padding_mask()}


def hf_bert(impl: str) -> ZooModel:
    """transformers BertModel; row 1 of the batch is padded (attention mask)."""
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=DEPTH,
                        num_attention_heads=HEADS, intermediate_size=INTERMEDIATE,
                        max_position_embeddings=64)
    model = _hf_build(BertModel, config, impl)
    return ZooModel(name=f"hf_bert_{impl}", model=model, args=(), kwargs=_text_encoder_inputs(),
                    n_attention=DEPTH, family="hf", impl=impl, kind="encoder", prefix_tokens=0,
                    token_count=SEQ_LEN, block_prefix="encoder.layer",
                    attention_modules=_names("encoder.layer.{}.attention.self"), heads=HEADS,
                    kv_heads=HEADS, head_dim=HEAD_DIM, hidden=HIDDEN, has_mask=True)


def hf_roberta(impl: str) -> ZooModel:
    """transformers RobertaModel (positions offset by padding_idx + 1); row 1 padded."""
    from transformers import RobertaConfig, RobertaModel

    config = RobertaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=DEPTH,
                           num_attention_heads=HEADS, intermediate_size=INTERMEDIATE,
                           max_position_embeddings=64)
    model = _hf_build(RobertaModel, config, impl)
    return ZooModel(name=f"hf_roberta_{impl}", model=model, args=(), kwargs=_text_encoder_inputs(),
                    n_attention=DEPTH, family="hf", impl=impl, kind="encoder", prefix_tokens=0,
                    token_count=SEQ_LEN, block_prefix="encoder.layer",
                    attention_modules=_names("encoder.layer.{}.attention.self"), heads=HEADS,
                    kv_heads=HEADS, head_dim=HEAD_DIM, hidden=HIDDEN, has_mask=True)


def hf_distilbert(impl: str) -> ZooModel:
    """transformers DistilBertModel; row 1 padded."""
    from transformers import DistilBertConfig, DistilBertModel

    config = DistilBertConfig(vocab_size=VOCAB, dim=HIDDEN, n_layers=DEPTH, n_heads=HEADS,
                              hidden_dim=INTERMEDIATE, max_position_embeddings=64)
    model = _hf_build(DistilBertModel, config, impl)
    return ZooModel(name=f"hf_distilbert_{impl}", model=model, args=(), kwargs=_text_encoder_inputs(),
                    n_attention=DEPTH, family="hf", impl=impl, kind="encoder", prefix_tokens=0,
                    token_count=SEQ_LEN, block_prefix="transformer.layer",
                    attention_modules=_names("transformer.layer.{}.attention"), heads=HEADS,
                    kv_heads=HEADS, head_dim=HEAD_DIM, hidden=HIDDEN, has_mask=True)


def hf_gpt2(impl: str) -> ZooModel:
    """transformers GPT2Model (Conv1D projections, fused qkv), causal, no cache."""
    from transformers import GPT2Config, GPT2Model

    config = GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=DEPTH, n_head=HEADS, n_inner=INTERMEDIATE,
                        n_positions=64, bos_token_id=1, eos_token_id=2)
    model = _hf_build(GPT2Model, config, impl)
    return ZooModel(name=f"hf_gpt2_{impl}", model=model, args=(),
                    kwargs={"input_ids": _token_ids(), "use_cache": False}, n_attention=DEPTH, family="hf",
                    impl=impl, kind="decoder", prefix_tokens=0, token_count=SEQ_LEN, block_prefix="h",
                    attention_modules=_names("h.{}.attn"), heads=HEADS, kv_heads=HEADS,
                    head_dim=HEAD_DIM, hidden=HIDDEN, causal=True)


def _gqa_config(config_cls, **kwargs: Any):
    return config_cls(vocab_size=VOCAB, hidden_size=GQA_HIDDEN, num_hidden_layers=DEPTH,
                      num_attention_heads=GQA_HEADS, num_key_value_heads=GQA_KV_HEADS,
                      intermediate_size=INTERMEDIATE, max_position_embeddings=64, **kwargs)


def _decoder(name: str, model: nn.Module, impl: str, use_cache: bool = False) -> ZooModel:
    return ZooModel(name=name, model=model, args=(),
                    kwargs={"input_ids": _token_ids(), "use_cache": use_cache}, n_attention=DEPTH,
                    family="hf", impl=impl, kind="decoder", prefix_tokens=0, token_count=SEQ_LEN,
                    block_prefix="model.layers", attention_modules=_names("model.layers.{}.self_attn"),
                    heads=GQA_HEADS, kv_heads=GQA_KV_HEADS, head_dim=GQA_HEAD_DIM, hidden=GQA_HIDDEN,
                    causal=True)


def hf_llama(impl: str, use_cache: bool = False) -> ZooModel:
    """transformers LlamaForCausalLM: GQA (12 heads, 4 kv heads), rotary, causal."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = _hf_build(LlamaForCausalLM, _gqa_config(LlamaConfig), impl)
    name = f"hf_llama_cache_{impl}" if use_cache else f"hf_llama_{impl}"
    return _decoder(name, model, impl, use_cache)


def hf_qwen2(impl: str) -> ZooModel:
    """transformers Qwen2ForCausalLM: GQA with q/k/v biases, causal."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model = _hf_build(Qwen2ForCausalLM, _gqa_config(Qwen2Config), impl)
    return _decoder(f"hf_qwen2_{impl}", model, impl)


def hf_gemma3(impl: str) -> ZooModel:
    """transformers Gemma3ForCausalLM (text): GQA, q/k norms, layer 0 sliding window 6 < N, layer 1 full."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = _gqa_config(Gemma3TextConfig, head_dim=GQA_HEAD_DIM, sliding_window=6,
                         layer_types=["sliding_attention", "full_attention"])
    model = _hf_build(Gemma3ForCausalLM, config, impl)
    return _decoder(f"hf_gemma3_{impl}", model, impl)


# -------------------------------------------------------------------------------------- outputs

def flatten_outputs(out: Any) -> list[torch.Tensor]:
    """Every tensor in a model output, in a fixed order.

    Handles tensors, tuples/lists, dicts and transformers ``ModelOutput`` (a dict; ``None`` fields
    are absent), and transformers KV caches (each layer's keys then values). Anything else raises
    ``TypeError``, so that a comparison never skips an output silently.
    """
    if isinstance(out, torch.Tensor):
        return [out]
    if out is None or isinstance(out, (bool, int, float, str)):
        return []
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in flatten_outputs(item)]
    if isinstance(out, dict):
        return [t for value in out.values() for t in flatten_outputs(value)]
    layers = getattr(out, "layers", None)  # transformers Cache: .layers[i].keys / .values
    if layers is not None:
        return [t for layer in layers for t in flatten_outputs([layer.keys, layer.values])]
    raise TypeError(f"cannot flatten model output of type {type(out).__name__}")


def max_abs_diff(a: Any, b: Any) -> float:
    """Largest |a - b| over all tensors of two outputs with the same structure (shapes must match)."""
    ta, tb = flatten_outputs(a), flatten_outputs(b)
    assert len(ta) == len(tb), f"{len(ta)} tensors vs {len(tb)}"
    worst = 0.0
    for x, y in zip(ta, tb):
        assert x.shape == y.shape and x.dtype == y.dtype, (x.shape, x.dtype, y.shape, y.dtype)
        if x.numel():
            worst = max(worst, (x.double() - y.double()).abs().max().item())
    return worst


# ------------------------------------------------------------------------------------- registry

@dataclass(frozen=True)
class ZooInfo:
    """What an entry is, known without building it (for filtering parametrisations)."""

    family: str  # 'timm', 'hf', 'torch'
    impl: Optional[str]  # 'sdpa', 'eager', None
    kind: str  # 'encoder', 'decoder', 'vision', 'other'

    @property
    def has_attention(self) -> bool:
        return self.impl is not None


ZOO: dict[str, Callable[[], ZooModel]] = {}
ZOO_INFO: dict[str, ZooInfo] = {}


def _register(name: str, build: Callable[[], ZooModel], family: str, impl: Optional[str], kind: str) -> None:
    ZOO[name] = build
    ZOO_INFO[name] = ZooInfo(family, impl, kind)


for _impl in ("sdpa", "eager"):
    _register(f"timm_vit_tiny_{_impl}", partial(timm_vit_tiny, _impl), "timm", _impl, "vision")
    _register(f"timm_vit_small_{_impl}", partial(timm_vit_small, _impl), "timm", _impl, "vision")
    _register(f"timm_deit_tiny_distilled_{_impl}", partial(timm_deit_tiny_distilled, _impl), "timm", _impl, "vision")
    _register(f"timm_vit_reg4_{_impl}", partial(timm_vit_reg4, _impl), "timm", _impl, "vision")
for _impl in ("sdpa", "eager"):
    _register(f"hf_vit_{_impl}", partial(hf_vit, _impl), "hf", _impl, "vision")
    _register(f"hf_deit_{_impl}", partial(hf_deit, _impl), "hf", _impl, "vision")
    _register(f"hf_clip_vision_{_impl}", partial(hf_clip_vision, _impl), "hf", _impl, "vision")
    _register(f"hf_bert_{_impl}", partial(hf_bert, _impl), "hf", _impl, "encoder")
    _register(f"hf_roberta_{_impl}", partial(hf_roberta, _impl), "hf", _impl, "encoder")
    _register(f"hf_distilbert_{_impl}", partial(hf_distilbert, _impl), "hf", _impl, "encoder")
    _register(f"hf_gpt2_{_impl}", partial(hf_gpt2, _impl), "hf", _impl, "decoder")
    _register(f"hf_llama_{_impl}", partial(hf_llama, _impl), "hf", _impl, "decoder")
    _register(f"hf_qwen2_{_impl}", partial(hf_qwen2, _impl), "hf", _impl, "decoder")
    _register(f"hf_gemma3_{_impl}", partial(hf_gemma3, _impl), "hf", _impl, "decoder")
_register("hf_llama_cache_sdpa", partial(hf_llama, "sdpa", use_cache=True), "hf", "sdpa", "decoder")
_register("torch_mlp", torch_mlp, "torch", None, "other")
_register("timm_resnet", timm_resnet, "timm", None, "other")


def zoo_names(*, attention: Optional[bool] = None, family: Optional[str] = None,
              impl: Optional[str] = None, kind: Optional[str] = None) -> list[str]:
    """Names of zoo entries, filtered by what :data:`ZOO_INFO` says (no model is built).

    attention=True keeps models with attention, False those without; family/impl/kind as in
    :class:`ZooModel`.
    """
    return [name for name, info in ZOO_INFO.items()
            if (attention is None or info.has_attention == attention)
            and (family is None or info.family == family)
            and (impl is None or info.impl == impl)
            and (kind is None or info.kind == kind)]


def zoo_params(names: Optional[list[str]] = None, *, quick: Optional[list[str]] = None,
               **filters: Any) -> list:
    """``pytest.param(name, id=name)`` for each zoo entry, for ``@pytest.mark.parametrize``.

    ``filters`` are those of :func:`zoo_names`. Where ``quick`` is given, entries not in it are
    marked ``long`` (run only with ``pytest --long``). Use as ``parametrize("name", zoo_params())``
    and build with ``ZOO[name]()`` inside the test, so that collecting tests builds no model.
    """
    names = names if names is not None else zoo_names(**filters)
    unknown = [n for n in [*names, *(quick or [])] if n not in ZOO]
    assert not unknown, f"not in the zoo: {unknown}"
    return [pytest.param(name, id=name,
                         marks=() if quick is None or name in quick else (pytest.mark.long,))
            for name in names]
