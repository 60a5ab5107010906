"""The parts of transformers that tokred's runtime relies on and that move between releases.

Supported: transformers >= 5.22 (``TRANSFORMERS_MIN``): the oldest release the version-sensitive
tests passed on (README, "Supported versions"). 5.0 failed them (decoder blocks return tuples,
cache layers cannot record a sliding window's past), 5.15 failed 9 (Gemma3's sliding layers under
the early-exit draft, ViT's SDPA called with a mask); some fallbacks below still cover older
spellings.

- The cache keyword: forward and generate take ``past_key_values=`` up to 5.23; 5.24 renamed it
  ``cache=`` (the old name warns, and goes away in 5.40 for forward, 6.0 for generate). tokred
  decides per model, from the signature of its forward, in :func:`cache_keyword`.
- The cache's per-layer tensors (``cache.layers[i].keys`` / ``.values`` [B, Hkv, L, D]), which the
  speculative runtime crops, shifts and swaps: read and written only through :func:`layer_states`
  and :func:`set_layer_states`.
- Replacing a module's forward for the duration of one call (the early-exit draft's shared cache).
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Iterator

import torch

from tokred.compat.torch_api import version_tuple

TRANSFORMERS_MIN = (5, 22)
OLD_CACHE_KEYWORD, NEW_CACHE_KEYWORD = "past_key_values", "cache"


def check_transformers_version() -> None:
    """Raise a clear error where the installed transformers is older than tokred supports."""
    import transformers

    if version_tuple(transformers.__version__) < TRANSFORMERS_MIN:
        raise RuntimeError(f"tokred's runtime needs transformers >= {'.'.join(map(str, TRANSFORMERS_MIN))}, "
                           f"found {transformers.__version__}")


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The eager module behind a torch.compile wrapper."""
    return getattr(model, "_orig_mod", model)


def cache_keyword(model: torch.nn.Module) -> str:
    """The keyword ``model``'s forward takes its KV cache by: ``"cache"`` where its signature has
    it (transformers >= 5.24), else ``"past_key_values"``."""
    try:
        parameters = inspect.signature(_unwrapped(model).forward).parameters
    except (TypeError, ValueError):
        parameters = {}
    return NEW_CACHE_KEYWORD if NEW_CACHE_KEYWORD in parameters else OLD_CACHE_KEYWORD


def cache_argument(model: torch.nn.Module, cache: Any) -> dict:
    """``{keyword: cache}`` for ``model(...)`` or ``model.generate(...)``, in the keyword the
    installed transformers takes: ``model.generate(ids, **cache_argument(model, cache))``."""
    return {cache_keyword(model): cache}


def returned_cache(output: Any) -> Any:
    """The KV cache a model output carries (``output.cache``, or ``past_key_values`` before 5.24;
    None where it carries none)."""
    for name in (NEW_CACHE_KEYWORD, OLD_CACHE_KEYWORD):
        fields = getattr(output, "__dataclass_fields__", None)
        if fields is not None and name in fields:
            return getattr(output, name)
    if isinstance(output, dict):
        return output.get(NEW_CACHE_KEYWORD, output.get(OLD_CACHE_KEYWORD))
    return None


def new_dynamic_cache():
    """An empty DynamicCache of full layers (no config, so sliding-window layers keep every entry)."""
    from transformers import DynamicCache

    return DynamicCache()


def croppable_cache(config) -> Any:
    """An empty DynamicCache for ``config`` whose layers can be cropped back to any length: its
    sliding-window layers record their past where transformers can (``activate_past_recording``,
    newer releases); where it cannot (5.0), a cache of full layers (the model's own sliding mask
    still applies; a sliding layer of 5.0 could not be cropped past its window)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    layers = list(cache.layers)
    if all(hasattr(layer, "activate_past_recording") for layer in layers if getattr(layer, "is_sliding", False)):
        for layer in layers:
            if hasattr(layer, "activate_past_recording"):
                layer.activate_past_recording()
        return cache
    return DynamicCache()


def cache_layers(cache: Any) -> list:
    """The filled per-layer objects of a transformers cache (those holding [B, H, L, D] states)."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise ValueError(f"unsupported KV cache type {type(cache).__name__}: no per-layer list (.layers); "
                         f"tokred needs transformers >= {'.'.join(map(str, TRANSFORMERS_MIN))}")
    return [layer for layer in layers if getattr(layer, "keys", None) is not None and layer.keys.dim() == 4]


def all_cache_layers(cache: Any) -> list:
    """Every per-layer object of a transformers cache, filled or not."""
    return list(cache.layers)


def layer_states(layer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, values) [B, Hkv, L, D] of one cache layer."""
    return layer.keys, layer.values


def set_layer_states(layer: Any, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Replace one cache layer's states (a crop, a shift, a swap: same rows and heads)."""
    layer.keys, layer.values = keys, values


@contextlib.contextmanager
def replaced_forwards(modules: list, forwards: list) -> Iterator[None]:
    """Within the block ``modules[i](...)`` runs ``forwards[i]``: an instance attribute shadows the
    class's forward (``nn.Module.__call__`` calls ``self.forward``); one already there (accelerate's
    hooks put one) is put back afterwards, also when the block raises."""
    own = [module.__dict__.get("forward") for module in modules]
    for module, forward in zip(modules, forwards):
        module.forward = forward
    try:
        yield
    finally:
        for module, previous in zip(modules, own):
            if previous is None:
                del module.forward
            else:
                module.forward = previous


def per_row_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether ``model`` takes ``logits_to_keep`` as a [B, 1] tensor of one position per row (newer
    transformers slice it with ``slice_logits_to_keep``; 5.0 indexes every row with the whole
    tensor, which would return [B, B, 1, V])."""
    from transformers import modeling_utils

    return accepts_keyword(model, "logits_to_keep") and hasattr(modeling_utils, "slice_logits_to_keep")


def accepts_keyword(model: torch.nn.Module, name: str) -> bool:
    """Whether ``model``'s forward takes the keyword ``name``."""
    try:
        return name in inspect.signature(_unwrapped(model).forward).parameters
    except (TypeError, ValueError):
        return False


__all__ = ["TRANSFORMERS_MIN", "check_transformers_version", "cache_keyword", "cache_argument", "returned_cache",
           "new_dynamic_cache", "croppable_cache", "cache_layers", "all_cache_layers", "layer_states", "set_layer_states",
           "replaced_forwards", "accepts_keyword", "per_row_logits_to_keep"]
