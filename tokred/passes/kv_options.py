"""The kv_cache pass's options: their parsing (every error names the option), defaults per method,
and the per-layer budgets (uniform, PyramidKV)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from tokred.rewriter.tokens import kept_count

METHODS = ("snapkv", "tova", "h2o", "knorm", "streaming", "random")
ATTENTION_METHODS = ("snapkv", "tova", "h2o")
POOLED_METHODS = ("snapkv", "h2o")
LAYER_BUDGETS = ("uniform", "pyramid")
HEAD_BUDGETS = ("uniform", "shared", "adaptive")
KNOWN = ("method", "keep", "window", "pool", "sinks", "protect_last", "layers", "heads", "head_max", "merge",
         "seed", "decode")
# AdaKV: every head keeps at least this fraction of the layer's per-head budget (its safeguard)
ADAPTIVE_FLOOR = 0.2
PYRAMID_SPREAD = 0.5  # layer 0 gets (1 + spread) x the uniform budget, the last layer (1 - spread) x


def _error(key: str, message: str) -> ValueError:
    return ValueError(f"tokred option 'kv_cache.{key}' {message}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _count(key: str, value, low: int = 0) -> int:
    if not _is_int(value) or value < low:
        raise _error(key, f"must be an int >= {low}, got {value!r}")
    return value


@dataclass(frozen=True)
class DecodeBudget:
    """Compression during decode: once a layer's cache holds ``max + every`` entries it is cut back
    to ``max`` by the method's scores. tokred's runtime does it by feeding the last ``chunk`` tokens
    again as one forward over the cache (cropped of them): the pass cuts that chunk's returned cache,
    scored by the chunk's queries (snapkv's observation window is the chunk)."""

    every: int
    max: int
    chunk: int


def _decode_budget(value: Any, method: str, window: int, always: int) -> Optional[DecodeBudget]:
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) - {"every", "max"} or not {"every", "max"} <= set(value):
        raise _error("decode", f"must be a dict {{'every': int, 'max': int}} (cut the cache back to max entries "
                     f"once it holds max + every), got {value!r}")
    every, most = _count("decode.every", value["every"], 1), _count("decode.max", value["max"], 1)
    # the chunk re-fed at each cut: snapkv's and h2o's observation window, else 2 tokens (a one-token
    # step is a decode step's graph, where nothing is cut)
    chunk = max(2, window) if method in POOLED_METHODS else 2
    if most < max(always, chunk):
        raise _error("decode.max", f"must be at least the {max(always, chunk)} entries always kept (sinks + "
                     f"protect_last) and re-fed at each cut, got {most}")
    if every < chunk:
        raise _error("decode.every", f"must be at least the {chunk} tokens re-fed at each cut, got {every}")
    return DecodeBudget(every=every, max=most, chunk=chunk)


@dataclass(frozen=True)
class KVCacheOptions:
    """method: how cache entries are scored (METHODS); keep: the fraction of the prompt's tokens
    each layer keeps, or a count; window: snapkv's observation window (and h2o's recent tokens);
    pool: an odd window the attention scores are averaged over; sinks / protect_last: leading /
    trailing tokens always kept (None: the method's default); layers: "uniform" or "pyramid"
    budgets; heads: "uniform" (every KV head keeps as many, by its own scores), "shared" (the same
    positions in every head, by the scores averaged over the layer's heads; TOVA's default) or
    "adaptive" (AdaKV: the layer's budget shared across its heads by score); head_max: with
    "adaptive", the most one head keeps as a multiple of the per-head budget (the cache's stored
    length); merge: evicted entries are merged into kept ones; seed: method "random"'s; decode:
    compression during decode (:class:`DecodeBudget`), None: the prefill's cut only."""

    method: str = "snapkv"
    keep: Any = 0.5
    window: int = 32
    pool: int = 1
    sinks: int = 0
    protect_last: int = 0
    layers: str = "uniform"
    heads: str = "uniform"
    head_max: float = 2.0
    merge: bool = False
    seed: int = 0
    decode: Optional[DecodeBudget] = None

    @classmethod
    def parse(cls, value: Any) -> "KVCacheOptions":
        if isinstance(value, float):
            value = {"keep": value}
        if not isinstance(value, dict):
            raise ValueError(f"tokred option 'kv_cache' must be a dict like {{'method': 'snapkv', 'keep': 0.5}}, "
                             f"got {value!r}")
        for key in value:
            if key not in KNOWN:
                raise ValueError(f"unknown tokred option 'kv_cache.{key}'; known: {', '.join(KNOWN)}")
        method = value.get("method", "snapkv")
        if method not in METHODS:
            raise _error("method", f"must be one of {METHODS}, got {method!r}")
        keep = value.get("keep", 0.5)
        if _is_int(keep):
            _count("keep", keep, 1)
        elif not (isinstance(keep, float) and 0.0 < keep <= 1.0):
            raise _error("keep", f"must be a fraction in (0, 1] or a count >= 1, got {keep!r}")
        window = _count("window", value.get("window", 32), 1)
        pool = value.get("pool", 5 if method == "snapkv" else 1)
        if not _is_int(pool) or pool < 1 or pool % 2 == 0:
            raise _error("pool", f"must be an odd window of positions >= 1 (1: no pooling), got {pool!r}")
        if pool > 1 and method not in POOLED_METHODS:
            raise _error("pool", f"applies to the methods {POOLED_METHODS} only, not {method!r}")
        if "window" in value and method not in POOLED_METHODS:
            raise _error("window", f"applies to the methods {POOLED_METHODS} only, not {method!r}")
        defaults = {"snapkv": (0, window), "h2o": (0, window), "tova": (0, 1), "streaming": (4, 0)}
        sinks, protect_last = defaults.get(method, (0, 0))
        sinks = _count("sinks", value.get("sinks", sinks))
        protect_last = _count("protect_last", value.get("protect_last", protect_last))
        layers = value.get("layers", "uniform")
        if layers not in LAYER_BUDGETS:
            raise _error("layers", f"must be one of {LAYER_BUDGETS}, got {layers!r}")
        heads = value.get("heads", "shared" if method == "tova" else "uniform")
        if heads not in HEAD_BUDGETS:
            raise _error("heads", f"must be 'uniform' (each KV head keeps as many entries, chosen by its own "
                         f"scores), 'shared' (one choice per layer, by the scores averaged over its heads) or "
                         f"'adaptive' (AdaKV: a layer's budget shared across its heads by score); got {heads!r}")
        if heads == "adaptive" and method == "streaming":
            raise _error("heads", "'adaptive' shares a layer's budget by score, and streaming's scores are the "
                         "positions, alike in every head: use 'uniform'")
        head_max = value.get("head_max", 2.0)
        if "head_max" in value and heads != "adaptive":
            raise _error("head_max", f"applies to heads='adaptive' only, not {heads!r}")
        if isinstance(head_max, bool) or not isinstance(head_max, (int, float)) or head_max < 1:
            raise _error("head_max", f"must be a number >= 1 (the most one head keeps, as a multiple of the "
                         f"layer's per-head budget), got {head_max!r}")
        merge = value.get("merge", False)
        if not isinstance(merge, bool):
            raise _error("merge", f"must be True or False, got {merge!r}")
        if merge and heads == "adaptive":
            raise _error("merge", "with heads='adaptive' is not implemented: merging needs every head's kept "
                         "entries to be real, and adaptive heads hold padding slots")
        seed = value.get("seed", 0)
        if not _is_int(seed):
            raise _error("seed", f"must be an int, got {seed!r}")
        decode = _decode_budget(value.get("decode"), method, window, sinks + protect_last)
        if decode is not None and (heads == "adaptive" or layers == "pyramid"):
            raise _error("decode", "is implemented for uniform budgets only (layers='uniform', heads 'uniform' or "
                         "'shared'): a re-fed chunk's causal mask spans one key length for every layer")
        return cls(method=method, keep=keep, window=window, pool=pool, sinks=sinks, protect_last=protect_last,
                   layers=layers, heads=heads, head_max=float(head_max), merge=merge, seed=seed, decode=decode)


def layer_budgets(keep, n: int, layers: int, schedule: str, always: int) -> list:
    """Entries each of ``layers`` layers keeps of ``n``: :func:`kept_count` in every layer, or
    PyramidKV's linear schedule from (1 + PYRAMID_SPREAD) x to
    (1 - PYRAMID_SPREAD) x that budget (the total the same up to rounding); never fewer than the
    ``always`` kept entries where the schedule (not ``keep`` itself) goes below them, never more
    than n. A ``keep`` below ``always`` is returned as it is: the pass refuses it with the reason."""
    base = kept_count(keep, n)
    if schedule == "uniform" or layers == 1:
        shares = [1.0] * layers
    else:
        shares = [1.0 + PYRAMID_SPREAD - 2 * PYRAMID_SPREAD * i / (layers - 1) for i in range(layers)]
    floor = min(always, n) if base >= min(always, n) else 0
    return [max(floor, min(n, int(round(base * s)))) for s in shares]
