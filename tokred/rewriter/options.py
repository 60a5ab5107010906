"""Validated tokred options.

Every option a user can pass to ``torch.compile(..., backend="tokred", options={...})``,
``tokred.backend(**options)``, ``tokred.explain`` or ``tokred.export_onnx`` goes through
:func:`parse_options`, which raises a ``ValueError`` naming the option before anything is compiled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

INNER_COMPILERS = ("inductor", "eager", "aot_eager")
# torch.compile's modes, passed to inductor.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# Which tokred ops a graph calls as Triton kernels on CUDA (triton_ops/common.py: graph_calls_kernel).
KERNEL_MODES = ("auto", "triton", "reference")
GLOBAL_OPTIONS = ("inner", "mode", "strict", "verify", "kernels", "cpu_kernel")


@dataclass(frozen=True)
class Options:
    """All tokred options, validated.

    inner:      the compiler the rewritten graph is handed to.
    mode:       inductor's mode, as ``torch.compile(mode=...)`` takes it (None: its default).
    strict:     a site that cannot be rewritten is an error instead of a report line.
    verify:     after each rewrite, check every rewritten node's shape and the output contract.
    kernels:    "auto", "triton" or "reference": which tokred ops run as Triton kernels on CUDA
                (None: "auto"; the environment variable TOKRED_KERNELS overrides it).
    cpu_kernel: False: sparse attention on CPU takes its torch paths, not tokred's C++ kernel
                (None: use it; TOKRED_CPU_KERNEL=0 overrides it).
    passes:     per-pass option dicts, keyed by pass name (validated by the pass's own schema).
    """

    inner: str = "inductor"
    mode: Optional[str] = None
    strict: bool = False
    verify: bool = True
    kernels: Optional[str] = None
    cpu_kernel: Optional[bool] = None
    passes: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @property
    def kernel_settings(self) -> dict:
        """The kernel choices given, as ``triton_ops.common.kernel_settings`` takes them."""
        given = {"kernels": self.kernels, "cpu_kernel": self.cpu_kernel}
        return {k: v for k, v in given.items() if v is not None}


# Pass option schemas are registered by the entry point (backend.py), which knows the passes;
# rewriter/ never imports passes/. A schema is a callable that validates and normalises one
# pass's dict, raising ValueError("option 'merge.r': ...") on bad input.
_PASS_SCHEMAS: dict[str, Any] = {}


def names_module(entry: str, path: str) -> bool:
    """Whether ``entry``, a module path a user gave for a block or layer, names the module at
    ``path`` or a module inside it: "language_model.layers.2" names "language_model.layers.2" and
    "language_model.layers.2.self_attn"; the model's own root may lead ("model.language_model.layers.2")."""
    entry, path = entry.strip("."), f".{path.strip('.')}."
    tails = [entry] + [entry[i + 1:] for i, c in enumerate(entry) if c == "."]  # the root dropped
    return bool(entry) and any(path.startswith(f".{tail}.") for tail in tails)


def is_layer_entry(value: Any) -> bool:
    """A block or layer as options name it: an index >= 0 in the captured graph, or a module path
    (not a number written as a string: "1" is refused rather than read as a module named 1)."""
    return (isinstance(value, int) and not isinstance(value, bool) and value >= 0) or \
        (isinstance(value, str) and bool(value.strip(".")) and not value.strip().isdigit())


def register_pass_options(name: str, validate) -> None:
    """Register ``validate(dict) -> dict`` for the pass option ``name``."""
    _PASS_SCHEMAS[name] = validate


def known_option_names() -> list[str]:
    return sorted([*GLOBAL_OPTIONS, *_PASS_SCHEMAS])


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
        if not isinstance(key, str) or (key not in GLOBAL_OPTIONS and key not in _PASS_SCHEMAS):
            raise ValueError(
                f"unknown tokred option {key!r}; known options: {', '.join(known_option_names())}"
            )
    inner = merged.get("inner", "inductor")
    if inner not in INNER_COMPILERS:
        raise ValueError(f"tokred option 'inner' must be one of {INNER_COMPILERS}, got {inner!r}")
    mode = merged.get("mode")
    if mode is not None and mode not in COMPILE_MODES:
        raise ValueError(f"tokred option 'mode' must be one of {COMPILE_MODES}, got {mode!r}")
    if mode not in (None, "default") and inner != "inductor":
        raise ValueError(f"tokred option 'mode' {mode!r} is inductor's; it needs inner='inductor', got {inner!r}")
    strict = _check_bool("strict", merged.get("strict", False))
    verify = _check_bool("verify", merged.get("verify", True))
    kernels = merged.get("kernels")
    if kernels is not None and kernels not in KERNEL_MODES:
        raise ValueError(f"tokred option 'kernels' must be one of {KERNEL_MODES}, got {kernels!r}")
    cpu_kernel = merged.get("cpu_kernel")
    if cpu_kernel is not None:
        _check_bool("cpu_kernel", cpu_kernel)
    passes = {}
    for name, validate in _PASS_SCHEMAS.items():
        if name in merged and merged[name] is not None:
            passes[name] = validate(merged[name])
    return Options(inner=inner, mode=mode, strict=strict, verify=verify, kernels=kernels,
                   cpu_kernel=cpu_kernel, passes=passes)
