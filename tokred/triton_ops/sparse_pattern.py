"""Sparse attention patterns: ``SparsePattern``, its validation, its element rule and its mask_mod.

Bottom layer of ``tokred::sparse_attention`` (it imports only ``sparse_rule``). A pattern says
which keys each query attends to; positions are absolute: query row i of q [B, H, Nq, D] sits at
``q_offset + i``, key j at j. Kinds (each optionally with causal masking, key <= query, on top):

* ``sink_window``: query at position p sees keys j with ``p - window < j <= p`` (the window
  includes p itself) plus the first ``sinks`` keys (StreamingLLM).
* ``block_topk``: whole key blocks chosen per query block from q and k (sparse_topk.py); its
  element rule is only the causal one.
* ``mask``: ``mask_fn(b, h, q_idx, kv_idx) -> bool`` as in FlexAttention, traced with torch.fx
  into the rule language (sparse_rule.py).

Two forms of the same per-(query, key) decision:

* ``element_rule(pattern)``: an expression string of the rule language, what every lowering
  reads (the generated Triton kernel pastes it in, the ONNX lowering emits ops for it, the C++
  kernel takes its key intervals, ``interval_rule``, and the torch paths evaluate it);
* ``pattern_mask_mod(pattern)``: a FlexAttention ``mask_mod`` composed with flex's
  ``and_masks`` / ``or_masks`` (the causal mask and-ed with the pattern's own), what the flex
  lowering (sparse_flex.py) runs and what a caller composes with a model's own mask.

Errors here are about the op's arguments (``ValueError: sparse attention pattern: ...``); the
names a user writes in tokred's options are the pass's business (tokred/passes/sparse_attention.py).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass

from tokred.compat.torch_api import assume_constant_result
from tokred.triton_ops import sparse_rule

KINDS = ("sink_window", "block_topk", "mask")

# Query/key block sizes of the layout for patterns that do not fix them (sink_window, mask): one
# key block is one kernel iteration. 64 keeps masking waste at a window's edges small.
DEFAULT_BLOCK = 64

# The element rule of causal attention (all that block_topk's whole kept blocks need).
CAUSAL_RULE = "(kv_idx <= q_idx)"


@dataclass(frozen=True)
class SparsePattern:
    """Which keys each query attends to (see the module docstring for the exact rules).

    kind: "sink_window" | "block_topk" | "mask".
    sinks: sink_window: first ``sinks`` key positions always visible; block_topk: first ``sinks``
        key blocks always kept.
    window: sink_window: query at p sees keys ``p - window < j <= p``.
    block: block_topk: query and key block size (also the layout block of the other kinds when
        set to something other than the default 64).
    topk: block_topk: key blocks chosen per query block and head besides sink and local blocks.
    local: block_topk: key blocks ending at the query's own block that are always kept.
    causal: key position <= query position, on top of the pattern.
    mask_fn: kind "mask": ``fn(b, h, q_idx, kv_idx) -> bool`` written with tensor ops.

    Raises ValueError (``sparse attention pattern: ...``) for a value the op cannot run.
    """

    kind: str
    sinks: int = 0
    window: int = 0
    block: int = 64
    topk: int = 16
    local: int = 1
    causal: bool = True
    mask_fn: Callable | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"sparse attention pattern: kind must be one of {KINDS}, got {self.kind!r}")
        for name in ("sinks", "window", "topk", "local"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"sparse attention pattern: {name} must be an int >= 0, got {value!r}")
        if not isinstance(self.block, int) or isinstance(self.block, bool) or self.block < 1:
            raise ValueError(f"sparse attention pattern: block must be an int >= 1, got {self.block!r}")
        if self.kind == "sink_window" and self.sinks + self.window == 0:
            raise ValueError("sparse attention pattern: sink_window needs sinks + window > 0 (no key is visible)")
        if self.kind == "mask" and not callable(self.mask_fn):
            raise ValueError(f"sparse attention pattern: mask_fn must be a callable for kind 'mask', "
                             f"got {self.mask_fn!r}")


def layout_blocks(pattern: SparsePattern) -> tuple[int, int]:
    """(block_m, block_n): query rows and keys per layout block (block_topk: its block)."""
    return pattern.block, pattern.block


# ----------------------------------------------------------------------------------------------
# The element rule (rule-language string)
# ----------------------------------------------------------------------------------------------


@assume_constant_result
def element_rule(pattern: SparsePattern) -> str:
    """The rule expression (sparse_rule language) that decides single (query, key) pairs.

    block_topk's kept blocks are whole blocks, so its rule is only the causal one. A constant
    for Dynamo (it is a string fixed by the pattern; tracing mask_fn with torch.fx inside a
    Dynamo frame is not possible).
    """
    rule = pattern_rule(pattern)
    if rule:
        sparse_rule.torch_rule_fn(rule)  # built here, eagerly, so Dynamo only looks it up
    return rule


@functools.lru_cache(maxsize=256)
def pattern_rule(pattern: SparsePattern) -> str:
    """``element_rule`` before registration (see there). Cached per pattern: tracing a mask_fn
    with torch.fx took milliseconds on every eager call."""
    causal = CAUSAL_RULE
    if pattern.kind == "sink_window":
        window = f"((kv_idx <= q_idx) & (q_idx - kv_idx < {pattern.window}))"
        sinks = f"(kv_idx < {pattern.sinks})"
        if pattern.causal:
            return f"({causal} & ({sinks} | (q_idx - kv_idx < {pattern.window})))"
        return f"({sinks} | {window})"
    if pattern.kind == "block_topk":
        return causal if pattern.causal else ""
    rule = traced_mask_rule(pattern)
    return f"({causal} & {rule})" if pattern.causal else rule


@functools.lru_cache(maxsize=256)
def traced_mask_rule(pattern: SparsePattern) -> str:
    """Kind "mask": ``mask_fn`` traced into the rule language (``sparse_rule.rule_from_mask_fn``),
    without the causal term."""
    return sparse_rule.rule_from_mask_fn(pattern.mask_fn)


@assume_constant_result
def mask_fn_rule(pattern: SparsePattern) -> str:
    """``traced_mask_rule`` with its torch function built, as a constant for Dynamo (as
    ``element_rule``: torch.fx cannot trace mask_fn inside a Dynamo frame)."""
    rule = traced_mask_rule(pattern)
    sparse_rule.torch_rule_fn(rule)
    return rule


@functools.lru_cache(maxsize=256)
def interval_rule(rule: str) -> tuple[int, int, bool] | None:
    """The rule as key intervals per row, (sinks, window, causal) in the terms of the CPU kernel
    (``sparse_cpu.block_sparse_attention``), or None for a rule that is not of that form (mask
    rules). The rules of block_topk (causal or none) and of sink_window are; a sink_window rule is
    recognised by writing it again from its two numbers (``pattern_rule``), not by parsing."""
    if rule == "":
        return 0, -1, False
    if rule == CAUSAL_RULE:
        return 0, -1, True
    numbers = [int(n) for n in re.findall(r"< (\d+)\)", rule)]
    if len(numbers) != 2 or numbers[0] + numbers[1] == 0:
        return None
    for causal in (True, False):
        if pattern_rule(SparsePattern("sink_window", sinks=numbers[0], window=numbers[1], causal=causal)) == rule:
            return numbers[0], numbers[1], causal
    return None


@assume_constant_result
def cpu_kernel_rule(pattern: SparsePattern) -> bool:
    """Whether the pattern's element rule is one the CPU kernel runs (``interval_rule``); a constant
    for Dynamo, like ``element_rule``."""
    return interval_rule(pattern_rule(pattern)) is not None


# ----------------------------------------------------------------------------------------------
# The element rule as a FlexAttention mask_mod
# ----------------------------------------------------------------------------------------------


def causal_mask(b, h, q_idx, kv_idx):
    """mask_mod of causal attention: key position <= query position (``CAUSAL_RULE``)."""
    return kv_idx <= q_idx


def sinks_mask(sinks: int) -> Callable:
    """mask_mod of the first ``sinks`` keys: ``kv_idx < sinks``."""
    def mask_mod(b, h, q_idx, kv_idx):
        return kv_idx < sinks
    return mask_mod


def window_mask(window: int) -> Callable:
    """mask_mod of keys less than ``window`` positions before the query: ``q_idx - kv_idx < window``
    (no lower bound on kv_idx: causal_mask adds it)."""
    def mask_mod(b, h, q_idx, kv_idx):
        return q_idx - kv_idx < window
    return mask_mod


def rule_mask(rule: str) -> Callable:
    """A rule-language expression (a traced mask_fn) as a mask_mod; the empty rule allows every key."""
    fn = sparse_rule.rule_fn(rule)
    if fn is None:
        def every_key(b, h, q_idx, kv_idx):
            return kv_idx >= 0
        return every_key
    return fn


def offset_mask(mask_mod: Callable, q_offset: int) -> Callable:
    """``mask_mod`` at absolute positions read by flex, whose q_idx is the query row: row i is
    position ``q_offset + i`` (a pattern's positions are absolute)."""
    if q_offset == 0:
        return mask_mod

    def shifted(b, h, q_idx, kv_idx):
        return mask_mod(b, h, q_idx + q_offset, kv_idx)
    return shifted


def pattern_mask_mod(pattern: SparsePattern, q_offset: int = 0) -> Callable:
    """The pattern's element rule as a FlexAttention mask_mod ``(b, h, q_idx, kv_idx) -> bool``
    (index tensors, broadcast), q_idx the query row (position ``q_offset + q_idx``).

    Built from parts with flex's ``and_masks``/``or_masks``, each part one term of
    ``pattern_rule``'s string, so both decide every pair alike (tests/test_kernels_sparse.py checks
    it): causal sink_window = causal & (sinks | window); non-causal sink_window = sinks | (causal &
    window); mask = causal & rule (the mask_fn's traced rule, the same one every lowering reads);
    block_topk = causal (whole blocks are its selection), or every key when not causal.
    """
    from torch.nn.attention.flex_attention import and_masks, or_masks

    if pattern.kind == "sink_window":
        sinks, window = sinks_mask(pattern.sinks), window_mask(pattern.window)
        mask_mod = and_masks(causal_mask, or_masks(sinks, window)) if pattern.causal else \
            or_masks(sinks, and_masks(causal_mask, window))
    elif pattern.kind == "block_topk":
        mask_mod = causal_mask if pattern.causal else rule_mask("")
    else:
        rule = rule_mask(mask_fn_rule(pattern))
        mask_mod = and_masks(causal_mask, rule) if pattern.causal else rule
    return offset_mask(mask_mod, q_offset)
