"""Sweep: tokred with no options leaves every timm vision transformer and every transformers model
it is given as it was, and never fails the compile.

    timm          every model whose name contains vit, deit, eva, beit, cait, swin, pit, xcit, convit
                  or levit (``timm.list_models``), built tiny with random weights
    transformers  every model type of ``transformers.CONFIG_MAPPING``, ``AutoModel.from_config`` of a
                  tiny config (2 layers, hidden 32..64)

Each model is compiled with ``torch.compile(model, backend=tokred.backend(inner="eager"))`` and must
equal eager (fp32, ``torch.testing.assert_close``); the report must not say that the analysis or a
pass failed (the backend swallows such a failure so that the user's compile goes on: here it fails
the test). What is not tokred's failure is skipped, with the reason: a model its library cannot build
at a tiny size, a transformers model that does not build or run eagerly on generic inputs, and a
graph Dynamo itself cannot capture (``backend="eager"`` fails the same way).

CI runs a fixed sample (:data:`TIMM_SAMPLE`, :data:`HF_SAMPLE`: one model per architecture family
that tokred must handle, under two minutes on two cores); ``pytest --long`` runs all of them (about
500 timm models and 300 model types: an hour on two cores).

Tiny timm models: timm's builder (``build_model_with_cfg``, which every entrypoint calls with the
model's arguments) is intercepted, and the arguments are shrunk: depth 2 (one block per stage of a
multi-stage model), width 64 with 2 heads, an image of 4 x 4 patches. Where the model cannot take all
of that, less is shrunk (:data:`SHRINK_LEVELS`); the smallest that builds and runs eagerly is used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import sys
import warnings
from functools import lru_cache
from typing import Any, Callable, Optional

import pytest
import torch

import tokred
from zoo import flatten_outputs

SEED = 0
MAX_PARAMS = 40_000_000  # larger than this even when shrunk: not built tiny
# The words tokred's report must not show: an analysis or pass failure, a raw trace.
FAILURE_WORDS = ("analysis failed", "not applied", "Traceback", "IndexError", "KeyError", "AttributeError",
                 "TypeError", "NetworkXError", "is not in the digraph", "shape propagation",
                 "FakeTensor", "object has no attribute")


# ============================================================================ timm: tiny models

TIMM_PATTERN = re.compile(r"vit|deit|eva|beit|cait|swin|pit|xcit|convit|levit")
TIMM_WIDTH, TIMM_HEADS = 64, 2
DEPTH_KEYS = ("depth", "depths", "layers", "stages")
WIDTH_KEYS = ("embed_dim", "embed_dims", "widths", "base_dims")
HEAD_KEYS = ("num_heads", "heads")
# Which shrinks to try, in order: the first that builds, runs and has at most MAX_PARAMS is used.
SHRINK_LEVELS = (("depth", "width", "image"), ("depth", "width"), ("depth", "image"), ("depth",), ())


def timm_names() -> list:
    import timm

    return [name for name in timm.list_models() if TIMM_PATTERN.search(name)]


def _shrink_depth(value):
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return min(value, 2)
    if isinstance(value, (list, tuple)):  # per stage: one block each (0 stays 0)
        inner = [_shrink_depth_stage(v) for v in value]
        return type(value)(inner)
    return value


def _shrink_depth_stage(value):
    if isinstance(value, (list, tuple)):
        return type(value)(_shrink_depth_stage(v) for v in value)
    return min(value, 1) if isinstance(value, int) and not isinstance(value, bool) else value


def _shrink_width(kwargs: dict) -> dict:
    """Width ~64 (stage widths divided by one factor) and few heads, keeping widths divisible by heads."""
    out = dict(kwargs)
    width_key = next((k for k in WIDTH_KEYS if k in kwargs), None)
    heads_key = next((k for k in HEAD_KEYS if k in kwargs), None)
    width, heads = kwargs.get(width_key), kwargs.get(heads_key)
    if isinstance(width, int) and width > TIMM_WIDTH:
        out[width_key] = TIMM_WIDTH
        if isinstance(heads, int):
            out[heads_key] = TIMM_HEADS
        elif isinstance(heads, (list, tuple)) and heads and all(isinstance(h, int) for h in heads):
            # per stage, widths double with the heads (Swin 96 (3, 6, 12, 24) -> 64 (2, 4, 8, 16))
            out[heads_key] = type(heads)(max(1, h * TIMM_HEADS // heads[0]) for h in heads)
    elif isinstance(width, (list, tuple)) and width and all(isinstance(w, int) for w in width):
        factor = max(1, width[0] // 32)
        out[width_key] = type(width)(max(16, w // factor // 16 * 16) for w in width)
        if isinstance(heads, (list, tuple)):
            out[heads_key] = type(heads)(max(1, h // factor) for h in heads)
    for key, small in (("head_dim", 32), ("intermediate_size", 128), ("out_features", 64)):
        if isinstance(kwargs.get(key), int) and kwargs[key] > small:
            out[key] = small
    if isinstance(kwargs.get("head_widths"), (list, tuple)):  # EfficientViT's classifier head
        out["head_widths"] = type(kwargs["head_widths"])(min(w, 256) for w in kwargs["head_widths"])
    return out


def _shrink_image(kwargs: dict) -> dict:
    patch = kwargs.get("patch_size")
    if not isinstance(patch, int) or "img_size" not in kwargs and "window_size" in kwargs:
        return kwargs
    return {**kwargs, "img_size": max(patch * 4, 32)}


def _shrink_cfg(cfg, parts: tuple):
    """A model config dataclass (NaFlexVit, MaxxVit, MultiScaleVit): its depth and width fields."""
    changes = {}
    fields = {f.name for f in dataclasses.fields(cfg)}
    if "depth" in parts:
        for key in DEPTH_KEYS:
            if key in fields:
                changes[key] = _shrink_depth(getattr(cfg, key))
    if "width" in parts:
        shrunk = _shrink_width({k: getattr(cfg, k) for k in (*WIDTH_KEYS, *HEAD_KEYS) if k in fields})
        changes.update(shrunk)
    return dataclasses.replace(cfg, **changes) if changes else cfg


def shrink_timm_kwargs(kwargs: dict, parts: tuple) -> dict:
    """The model arguments of a timm entrypoint, shrunk as ``parts`` says (depth, width, image)."""
    out = dict(kwargs)
    if "depth" in parts:
        depth = out.get("depth")
        for key in DEPTH_KEYS:
            if key in out:
                out[key] = _shrink_depth(out[key])
        if isinstance(depth, int) and depth > out["depth"]:  # per-block lists (Sapiens2's num_kv_heads)
            for key, value in kwargs.items():
                if isinstance(value, (list, tuple)) and len(value) == depth:
                    out[key] = type(value)(value[:out["depth"]])
        if isinstance(out.get("local_up_to_layer"), int):  # ConViT: GPSA blocks before the MHSA ones
            out["local_up_to_layer"] = 1
        if isinstance(out.get("global_attn_indexes"), (list, tuple)):  # SAM: its global-attention blocks
            out["global_attn_indexes"] = [1]
    if "width" in parts:
        out = _shrink_width(out)
    if "image" in parts:
        out = _shrink_image(out)
    for key in ("cfg", "model_cfg"):
        if dataclasses.is_dataclass(out.get(key)) and not isinstance(out[key], type):
            out[key] = _shrink_cfg(out[key], parts)
    return out


@contextlib.contextmanager
def shrunk_timm_builds(parts: tuple):
    """While active, timm builds every model with its arguments shrunk (``build_model_with_cfg``,
    as each timm model module imported it, is wrapped)."""
    import timm.models
    from timm.models import _builder

    original = _builder.build_model_with_cfg
    seen: dict = {}

    def build(model_cls, variant, pretrained, *args, **kwargs):
        kwargs = {**_default_size_args(model_cls, kwargs), **kwargs}
        seen["kwargs"] = kwargs
        return original(model_cls, variant, pretrained, *args, **shrink_timm_kwargs(kwargs, parts))

    modules = [m for name, m in list(sys.modules.items())
               if name.startswith("timm.models") and getattr(m, "build_model_with_cfg", None) is original]
    for module in modules:
        module.build_model_with_cfg = build
    try:
        yield seen
    finally:
        for module in modules:
            module.build_model_with_cfg = original


def _default_size_args(model_cls, kwargs: dict) -> dict:
    """The depth, width and head arguments the model class takes but the entrypoint left at their
    defaults (ConViT's depth), so that they are shrunk too."""
    import inspect

    try:
        params = inspect.signature(model_cls).parameters
    except (TypeError, ValueError):
        return {}
    keys = (*DEPTH_KEYS, *WIDTH_KEYS, *HEAD_KEYS, "patch_size")  # (img_size: timm sets it from the cfg)
    return {k: p.default for k, p in params.items()
            if k in keys and k not in kwargs and p.default is not inspect.Parameter.empty and p.default is not None}


@dataclasses.dataclass
class Built:
    """A tiny model and its inputs; ``skip``: why it was not built (then model is None)."""

    name: str
    model: Any = None
    args: tuple = ()
    kwargs: dict = dataclasses.field(default_factory=dict)
    skip: str = ""
    note: str = ""  # how it was built (the shrink used)


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _image_input(model, parts: tuple, kwargs_seen: dict) -> torch.Tensor:
    """[1, C, H, W]: the image size the model was built for, else its pretrained config's."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = tuple(cfg.get("input_size", (3, 224, 224)))
    built = shrink_timm_kwargs(kwargs_seen, parts).get("img_size")
    if isinstance(built, int):
        size = (size[0], built, built)
    elif isinstance(built, (list, tuple)) and len(built) == 2 and all(isinstance(v, int) for v in built):
        size = (size[0], *built)
    g = torch.Generator().manual_seed(SEED + 1)
    return torch.randn(1, *size, generator=g)


def build_timm(name: str) -> Built:
    """The smallest build of timm model ``name`` that runs eagerly, with its input [1, 3, H, W]."""
    import timm

    errors = []
    for parts in SHRINK_LEVELS:
        torch.manual_seed(SEED)
        try:
            with shrunk_timm_builds(parts) as seen, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with torch.device("meta"):  # count first: a large model must not be built
                    params = _params(timm.create_model(name, pretrained=False))
                if params > MAX_PARAMS:
                    errors.append(f"{'+'.join(parts) or 'default'}: {params / 1e6:.0f}M parameters")
                    continue
                model = timm.create_model(name, pretrained=False).eval()
            x = _image_input(model, parts, seen.get("kwargs", {}))
            with torch.no_grad():
                model(x)
        except Exception as exc:  # noqa: BLE001  (timm cannot build or run it this small: try larger)
            errors.append(f"{'+'.join(parts) or 'default'}: {type(exc).__name__}: {_first_line(exc)}")
            continue
        return Built(name, model, (x,), {}, note=f"shrunk: {'+'.join(parts) or 'nothing'}, "
                                                 f"{_params(model) / 1e6:.1f}M parameters, input {tuple(x.shape)}"
                                                 + (f" (smaller: {'; '.join(errors)})" if errors else ""))
    return Built(name, skip="timm cannot build it at a tiny size (" + "; ".join(errors) + ")")


def _first_line(exc: BaseException, limit: int = 160) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0][:limit] if lines else ""


# ============================================================================ transformers: tiny configs

HF_LAYERS, HF_HIDDEN, HF_HEADS, HF_KV_HEADS, HF_HEAD_DIM, HF_FFN = 2, 64, 4, 2, 16, 128
# config keys (as to_dict names them) -> the tiny value; set where the config has the key and its
# value is a larger int
HF_SIZES = {
    **dict.fromkeys(("num_hidden_layers", "num_layers", "n_layers", "n_layer", "encoder_layers",
                     "decoder_layers", "num_encoder_layers", "num_decoder_layers", "depth"), HF_LAYERS),
    **dict.fromkeys(("hidden_size", "d_model", "n_embd", "dim", "embed_dim", "hidden_dim_model"), HF_HIDDEN),
    **dict.fromkeys(("num_attention_heads", "n_head", "n_heads", "encoder_attention_heads",
                     "decoder_attention_heads", "num_heads"), HF_HEADS),
    "num_key_value_heads": HF_KV_HEADS,
    **dict.fromkeys(("head_dim", "d_kv", "d_head", "attention_head_dim"), HF_HEAD_DIM),
    **dict.fromkeys(("intermediate_size", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim", "d_ff", "n_inner",
                     "moe_intermediate_size", "shared_expert_intermediate_size"), HF_FFN),
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts"), 4),
    "num_experts_per_tok": 2,
    "rotary_dim": 8,  # GPT-J, CodeGen: at most the head dim
    **dict.fromkeys(("projection_size", "projection_dim"), HF_HIDDEN),
    # multi-head latent attention (DeepSeek-V2/V3)
    "qk_rope_head_dim": HF_HEAD_DIM, "qk_nope_head_dim": HF_HEAD_DIM, "v_head_dim": HF_HEAD_DIM, "kv_lora_rank": 16, "q_lora_rank": 32,
}
# keys derived from the layer count that the config recomputes when they are left out (backbones'
# stage names and the stages they return)
HF_DERIVED = ("out_features", "out_indices", "stage_names")
HF_TEXT_LEN = 12


def hf_model_types() -> list:
    """The model types ``AutoModel`` builds (transformers' MODEL_MAPPING_NAMES)."""
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    return sorted(MODEL_MAPPING_NAMES)


HF_LEVELS = (("layers", "width", "image"), ("layers", "width"), ("layers",))


def tiny_config_dict(d: dict, parts: tuple) -> dict:
    """A config's ``to_dict()`` shrunk as ``parts`` says: "layers" (HF_SIZES of value HF_LAYERS),
    "width" (the other HF_SIZES), "image" (4 x 4 patches); sub-configs too (any value that is
    itself a config dict). Per-layer lists (as long as the layer count) are cut to the new count."""
    out = {k: v for k, v in d.items() if k not in HF_DERIVED}
    layer_counts = {v for k, v in d.items() if k in HF_SIZES and HF_SIZES[k] == HF_LAYERS and isinstance(v, int)}
    for key, value in out.items():
        if isinstance(value, dict) and "model_type" in value:
            out[key] = tiny_config_dict(value, parts)
        elif key in HF_SIZES and isinstance(value, int) and not isinstance(value, bool) and value > HF_SIZES[key]:
            if ("layers" if HF_SIZES[key] == HF_LAYERS else "width") in parts:
                out[key] = HF_SIZES[key]
        elif isinstance(value, list) and len(value) in layer_counts and len(value) > HF_LAYERS and "layers" in parts:
            out[key] = value[:HF_LAYERS]
    patch = d.get("patch_size")
    if "image" in parts and isinstance(d.get("image_size"), int) and isinstance(patch, int) and \
            d["image_size"] > 4 * patch:
        out["image_size"] = 4 * patch
    return out


def build_hf(model_type: str) -> Built:
    """``AutoModel.from_config`` of a tiny config of ``model_type`` (the smallest of HF_LEVELS that
    builds with at most MAX_PARAMS parameters) and generic inputs that run eagerly."""
    from transformers import CONFIG_MAPPING, AutoModel

    errors = []
    for parts in HF_LEVELS:
        level = "+".join(parts)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                config_cls = CONFIG_MAPPING[model_type]
                config = config_cls(**tiny_config_dict(config_cls().to_dict(), parts))
                with torch.device("meta"):  # count first: a large default must not be built
                    params = _params(AutoModel.from_config(config))
                if params > MAX_PARAMS:
                    errors.append(f"{level}: {params / 1e6:.0f}M parameters")
                    continue
                torch.manual_seed(SEED)
                model = AutoModel.from_config(config).eval()
        except Exception as exc:  # noqa: BLE001  (transformers cannot build it)
            errors.append(f"{level}: build: {type(exc).__name__}: {_first_line(exc)}")
            continue
        for kwargs in hf_input_sets(model):
            try:
                with torch.no_grad(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    torch.manual_seed(SEED)
                    model(**kwargs)
            except Exception as exc:  # noqa: BLE001  (these inputs do not suit it)
                errors.append(f"{level}: inputs {sorted(kwargs)}: {type(exc).__name__}: {_first_line(exc)}")
                continue
            shapes = {k: tuple(v.shape) for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
            return Built(model_type, model, (), kwargs,
                         note=f"{type(model).__name__} ({level}), {_params(model) / 1e6:.1f}M parameters, "
                              f"inputs {shapes}")
    return Built(model_type, skip="transformers cannot build or run it tiny on generic inputs ("
                 + "; ".join(dict.fromkeys(errors)) + ")")


def hf_input_sets(model) -> list:
    """Candidate keyword inputs, in order: the model's main input (with decoder ids for an
    encoder-decoder), then every generic input its forward takes (CLIP: ids and images)."""
    import inspect

    config = model.config
    params = inspect.signature(model.forward).parameters
    g = torch.Generator().manual_seed(SEED + 1)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = getattr(text, "vocab_size", None) or getattr(config, "vocab_size", None) or 100
    vision = getattr(config, "vision_config", None) or config
    image = getattr(vision, "image_size", 32)
    image = tuple(image) if isinstance(image, (list, tuple)) else (image, image)
    channels = getattr(vision, "num_channels", 3)
    mel = next((getattr(config, k) for k in ("num_mel_bins", "feature_size", "input_feat_per_channel")
                if isinstance(getattr(config, k, None), int)), 80)
    frames = 2 * config.max_source_positions if isinstance(getattr(config, "max_source_positions", None), int) else 64
    frames_video = getattr(vision, "num_frames", None) or 4
    makers = {
        "input_ids": lambda: torch.randint(3, max(4, min(vocab, 1000)), (1, HF_TEXT_LEN), generator=g),
        "pixel_values": lambda: torch.randn(1, channels, *image, generator=g),
        "input_values": lambda: torch.randn(1, 4000, generator=g),
        "input_features": lambda: torch.randn(1, mel, frames, generator=g),
        # a task prompt's token ids (OneFormer: "the task is semantic", padded to task_seq_len)
        "task_inputs": lambda: torch.randint(3, max(4, min(vocab, 1000)),
                                             (1, getattr(config, "task_seq_len", HF_TEXT_LEN)), generator=g),
    }
    # other layouts some models take: video [B, T, C, H, W], features [B, T, mel] (Speech2Text)
    alternatives = {
        "pixel_values": lambda: torch.randn(1, frames_video, channels, *image, generator=g),
        "input_features": lambda: torch.randn(1, 64, mel, generator=g),
    }
    extra = {}
    if "use_cache" in params:
        extra["use_cache"] = False  # outputs without a cache object (compared as tensors)
    if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in params:
        extra["decoder_input_ids"] = torch.randint(3, max(4, min(vocab, 1000)), (1, 5), generator=g)
    main = getattr(model, "main_input_name", "input_ids")
    # a model with several main inputs names them in a list (OneFormer: image and task tokens)
    mains = list(main) if isinstance(main, (list, tuple)) else [main]
    main = mains[0]
    sets = []
    if all(m in makers and m in params for m in mains):
        sets.append({**{m: makers[m]() for m in mains}, **extra})
    every = {k: make() for k, make in makers.items() if k in params}
    if every and set(every) != set(mains):
        sets.append({**every, **extra})
    if main in alternatives and main in params:
        sets.append({main: alternatives[main](), **extra})
    return sets


def flatten(out: Any) -> list:
    """Every tensor in a model output: :func:`zoo.flatten_outputs`, and for other objects (an
    encoder-decoder cache, ...) the tensors in their attributes, by name."""
    try:
        return flatten_outputs(out)
    except TypeError:
        pass
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in flatten(item)]
    if isinstance(out, dict):
        return [t for value in out.values() for t in flatten(value)]
    if hasattr(out, "__dict__") and not isinstance(out, torch.nn.Module):
        return [t for _, value in sorted(vars(out).items()) for t in flatten(value)]
    return []


# ============================================================================ the check

def compile_and_compare(built: Built) -> str:
    """Compile with tokred (no options), compare with eager; returns the report's summary.

    Skips when Dynamo itself cannot capture the model (plain ``backend="eager"`` fails too), or when
    plain Dynamo's output differs from eager too and tokred's equals Dynamo's.
    """
    model = built.model
    with torch.no_grad():
        eager = run(model, built, None)
        backend = tokred.backend(inner="eager")
        try:
            out = run(model, built, backend)
        except Exception as exc:
            try:
                run(model, built, "eager")
            except Exception as dynamo_exc:  # noqa: BLE001
                pytest.skip(f"{built.name}: Dynamo itself cannot compile it: {type(dynamo_exc).__name__}: "
                            f"{_first_line(dynamo_exc)}")
            raise AssertionError(f"{built.name}: torch.compile with tokred failed "
                                 f"({built.note}): {type(exc).__name__}: {exc}") from exc
    report = backend.report
    text = "\n".join([*report.notes, *(f"{s.module}: {s.reason}" for s in report.attention_sites)])
    bad = [w for w in FAILURE_WORDS if w in text]
    assert not bad, f"{built.name}: the report shows a failure ({', '.join(bad)}):\n{report}"
    if mismatch(out, eager):
        with torch.no_grad():
            dynamo = run(model, built, "eager")
        if mismatch(dynamo, eager):
            assert not mismatch(out, dynamo), f"{built.name}: tokred differs from plain Dynamo: {mismatch(out, dynamo)}"
            pytest.skip(f"{built.name}: plain Dynamo differs from eager too ({mismatch(dynamo, eager)}); "
                        f"tokred equals Dynamo")
        raise AssertionError(f"{built.name} ({built.note}): {mismatch(out, eager)}")
    return f"{len(report.attention_sites)} attention sites, {report.blocks} blocks"


def run(model, built: Built, backend):
    """The model's output eagerly (``backend`` None) or compiled with ``backend`` (Dynamo reset
    around it), seeded."""
    torch._dynamo.reset()
    try:
        torch.manual_seed(SEED)
        if backend is None:
            return model(*built.args, **built.kwargs)
        return torch.compile(model, backend=backend)(*built.args, **built.kwargs)
    finally:
        torch._dynamo.reset()


def mismatch(got, expected) -> str:
    """Why two outputs are not equal (``torch.testing.assert_close``, fp32), "" if they are."""
    a, b = flatten(got), flatten(expected)
    if len(a) != len(b):
        return f"{len(a)} output tensors, expected {len(b)}"
    for i, (x, y) in enumerate(zip(a, b)):
        try:
            torch.testing.assert_close(x, y)
        except AssertionError as exc:
            return f"output {i}: {' '.join(str(exc).split())[:300]}"
    return ""


# ============================================================================ the tests

# CI's sample: one model per family and per form the analysis must get through (keyword operands,
# relative/rotary positions, class/distillation/register tokens, windows, parallel blocks, ...).
TIMM_SAMPLE = (
    "vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224", "vit_small_patch14_reg4_dinov2",
    "eva02_tiny_patch14_224",  # F.linear(x, weight=..., bias=...): the IndexError of issue 15
    "vit_relpos_small_patch16_224", "vit_base_patch16_rope_224", "beit_base_patch16_224", "cait_xxs24_224",
    "convit_tiny", "xcit_nano_12_p16_224", "levit_128s", "pit_ti_224", "swin_tiny_patch4_window7_224",
    "vit_base_patch16_siglip_224",  # attention pooling after the blocks
    "vit_base_patch16_xp_224",  # parallel-residual blocks
    "vit_small_patch16_18x2_224",  # two attention branches added at once
)
HF_SAMPLE = (
    "bert", "gpt2", "llama", "qwen3", "gemma3", "mixtral", "t5", "whisper", "vit", "clip",
    "gptj", "phi", "falcon", "gpt_neox",  # parallel-residual decoders
    "mamba",  # F.conv1d(x, weight=..., ...): keyword operands outside attention
    "bloom", "mpt", "deberta", "deberta-v2", "xlnet",  # baddbmm + ALiBi, batchless ALiBi, bmm over heads, einsum
    "opt",  # the MLP on the stream flattened to [B*N, C]
)


def _params_for(names: list, sample: tuple) -> list:
    missing = [n for n in sample if n not in names]
    assert not missing, f"sample models no longer listed: {missing}"
    return [pytest.param(n, id=n, marks=() if n in sample else (pytest.mark.long,)) for n in names]


def _timm_params() -> list:
    try:
        names = timm_names()
    except ImportError:  # timm is optional (the bench extra): the sample then skips
        names = list(TIMM_SAMPLE)
    return _params_for(names, TIMM_SAMPLE)


def _hf_params() -> list:
    try:
        names = hf_model_types()
    except ImportError:
        names = list(HF_SAMPLE)
    return _params_for(names, HF_SAMPLE)


OUTCOMES: dict = {}  # (library, outcome) -> names; summarised after the module


@pytest.fixture(scope="module", autouse=True)
def sweep_summary(request):
    """After the module: how many models were built, equal eager, skipped (and why), failed."""
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or not OUTCOMES:
        return
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        reporter.write_line("")
        for (library, outcome), names in sorted(OUTCOMES.items()):
            shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
            reporter.write_line(f"sweep {library}: {outcome}: {len(names)} ({shown})")


def _sweep(library: str, built: Built, sample: tuple) -> None:
    if built.skip:
        OUTCOMES.setdefault((library, "not built tiny"), []).append(built.name)
        assert built.name not in sample, f"{built.name} is in the CI sample and no longer builds: {built.skip}"
        pytest.skip(built.skip)
    try:
        compile_and_compare(built)
    except pytest.skip.Exception as exc:
        kind = "Dynamo cannot compile it" if "cannot compile" in str(exc) else "plain Dynamo differs from eager"
        OUTCOMES.setdefault((library, kind), []).append(built.name)
        raise
    except BaseException:
        OUTCOMES.setdefault((library, "FAILED"), []).append(built.name)
        raise
    OUTCOMES.setdefault((library, "compiled, equal to eager"), []).append(built.name)


@pytest.mark.parametrize("name", _timm_params())
def test_timm_model_compiles_unchanged(name):
    pytest.importorskip("timm")
    _sweep("timm", build_timm(name), TIMM_SAMPLE)


@pytest.mark.parametrize("model_type", _hf_params())
def test_transformers_model_compiles_unchanged(model_type):
    pytest.importorskip("transformers")
    _sweep("transformers", build_hf(model_type), HF_SAMPLE)


# A rewrite asked of a model tokred cannot rewrite: the model passes through unchanged, and the
# report says why in words.
PASS_THROUGH = [
    ("transformers", "phi", {"merge": {"r": 2}}, "causal attention"),
    ("timm", "vit_base_patch16_xp_224", {"merge": {"r": 2, "mode": "local"}}, "parallel-residual block"),
    ("timm", "vit_small_patch16_18x2_224", {"merge": {"r": 2}}, "parallel attention branches"),
    ("timm", "levit_128s", {"prune": {"keep": 0.5, "at": [0]}}, "no transformer blocks found"),
    ("transformers", "xlnet", {"merge": {"r": 2}}, "no transformer blocks found"),  # [N, B, C], einsum projections
    ("timm", "convit_tiny", {"prune": {"keep": 0.5, "at": [0]}}, "option 'prune.at': block 0 is not followed"),
]


@pytest.mark.parametrize("library, name, options, reason", PASS_THROUGH,
                         ids=[f"{name}-{next(iter(options))}" for _, name, options, _ in PASS_THROUGH])
def test_unrewritable_model_passes_through_with_a_reason(library, name, options, reason):
    pytest.importorskip("timm" if library == "timm" else "transformers")
    built = build_timm(name) if library == "timm" else build_hf(name)
    assert not built.skip, built.skip
    with torch.no_grad():
        eager = run(built.model, built, None)
        backend = tokred.backend(inner="eager", **options)
        out = run(built.model, built, backend)
    assert not mismatch(out, eager), f"{name} changed: {mismatch(out, eager)}"
    report = backend.report
    assert not report.changed and not any(s.status == "rewritten" for s in report.attention_sites), report
    lines = [*report.notes, *(s.reason for s in report.attention_sites)]
    text = "\n".join(lines)
    assert reason in text, f"{name}: the report does not say {reason!r}:\n{report}"
    bad = [w for w in FAILURE_WORDS if w in text]
    assert not bad, f"{name}: the report shows internals ({', '.join(bad)}):\n{report}"
    assert all("\n" not in line for line in lines), f"{name}: a reason spans several lines:\n{report}"
