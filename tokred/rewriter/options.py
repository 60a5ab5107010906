"""Validated tokred options.

Every option a user can pass to ``torch.compile(..., backend="tokred", options={...})``,
``tokred.backend(**options)``, ``tokred.explain`` or ``tokred.export_onnx`` goes through
:func:`parse_options`, which raises a ``ValueError`` naming the option before anything is compiled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

INNER_COMPILERS = ("inductor", "eager", "aot_eager")


@dataclass(frozen=True)
class Options:
    """All tokred options, validated.

    inner:   the compiler the rewritten graph is handed to.
    strict:  a site that cannot be rewritten is an error instead of a report line.
    verify:  after each rewrite, check every rewritten node's shape and the output contract.
    passes:  per-pass option dicts, keyed by pass name (validated by the pass's own schema).
    """

    inner: str = "inductor"
    strict: bool = False
    verify: bool = True
    passes: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


# Pass option schemas are registered by the entry point (backend.py), which knows the passes;
# rewriter/ never imports passes/. A schema is a callable that validates and normalises one
# pass's dict, raising ValueError("option 'merge.r': ...") on bad input.
_PASS_SCHEMAS: dict[str, Any] = {}


def register_pass_options(name: str, validate) -> None:
    """Register ``validate(dict) -> dict`` for the pass option ``name``."""
    _PASS_SCHEMAS[name] = validate


def known_option_names() -> list[str]:
    return sorted(["inner", "strict", "verify", *_PASS_SCHEMAS])


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"tokred option '{name}' must be True or False, got {value!r}")
    return value


def parse_options(options: Mapping[str, Any] | None = None, **more: Any) -> Options:
    """Validate user options; unknown keys and bad values raise ``ValueError`` naming the key."""
    if options is not None and not isinstance(options, Mapping):
        raise ValueError(f"tokred options must be a dict, got {type(options).__name__}")
    merged = {**(options or {}), **more}
    for key in merged:
        if not isinstance(key, str) or (key not in ("inner", "strict", "verify") and key not in _PASS_SCHEMAS):
            raise ValueError(
                f"unknown tokred option {key!r}; known options: {', '.join(known_option_names())}"
            )
    inner = merged.get("inner", "inductor")
    if inner not in INNER_COMPILERS:
        raise ValueError(f"tokred option 'inner' must be one of {INNER_COMPILERS}, got {inner!r}")
    strict = _check_bool("strict", merged.get("strict", False))
    verify = _check_bool("verify", merged.get("verify", True))
    passes = {}
    for name, validate in _PASS_SCHEMAS.items():
        if name in merged and merged[name] is not None:
            passes[name] = validate(merged[name])
    return Options(inner=inner, strict=strict, verify=verify, passes=passes)
