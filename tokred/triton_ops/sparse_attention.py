"""Block-sparse attention: ``sparse_attention(q, k, v, pattern)`` and ``tokred::sparse_attention``.

Shapes: q [B, H, Nq, D], k [B, Hkv, Nk, D], v [B, Hkv, Nk, Dv], H % Hkv == 0 (GQA: query head h
reads kv head h // (H // Hkv)); output [B, H, Nq, Dv] in q's dtype (softmax accumulated in fp32).
Query row i sits at absolute position ``q_offset + i`` (default ``Nk - Nq``: decode and prefill
with a KV cache); key j at position j.

Patterns (``SparsePattern``), each optionally with causal masking (key position <= query
position) on top:

* ``sink_window``: query at position p sees keys j with ``p - window < j <= p`` (the window
  includes p itself) plus the first ``sinks`` keys (StreamingLLM).
* ``block_topk``: keys and queries in blocks of ``block`` (query blocks counted from the first
  query: rows ``[m*block, (m+1)*block)``; decode's single query is a block of one). A query block
  keeps whole key blocks: the first ``sinks`` blocks, the ``local`` blocks ending at the key block
  holding the block's last query position, and the ``topk`` best other blocks, all among the
  causally visible ones (key block start <= last query position; every block when not causal).
  "Best" is Quest's bound (Tang et al. 2024) taken for the block's mean query ``qbar`` (per query
  head, against the keys of its kv head): key block ``n`` summarised by per-channel ``kmin``,
  ``kmax`` scores ``u[n] = sum_c max(qbar_c * kmin_c, qbar_c * kmax_c)
  = relu(qbar) . kmax - relu(-qbar) . kmin``, an upper bound on ``qbar . k`` for every key k of
  the block, i.e. on the block-mean of the block's scores for that key. Highest ``u`` wins, ties
  go to the lower block index; a row with fewer than ``topk`` candidates keeps them all.
* ``mask``: ``mask_fn(b, h, q_idx, kv_idx) -> bool`` as in FlexAttention, with ``q_idx`` the
  query's absolute position. It is traced with torch.fx into a rule expression (sparse_rule.py)
  that runs in torch, inside the generated Triton kernel and in ONNX.

How it runs: the entry point turns the pattern into a block layout (per batch, query head and
query block: the sorted key blocks to visit, ``kv_index[B, H, NQB, MAXK]`` and their number
``kv_count[B, H, NQB]``; block_topk's computed from q and k on every call with torch ops that
compile and ONNX trace, sink_window's and mask's built once per shape by ``static_layout`` and
constants of a traced graph) and an element rule string, then calls
``torch.ops.tokred.sparse_attention``. On CUDA that is the generated
block-sparse flash-attention kernel (sparse_kernel.py); on CPU, for rules made of key intervals
(block_topk, sink_window: ``interval_rule``), tokred's C++ kernel (sparse_cpu.cpp, built on first
use: one gemm per query block against its kept keys, an exact row softmax, one gemm for the
output). Where that kernel is not built, and for mask rules, ``sparse_attention_blocks`` runs torch:
for each query block (or chunk of blocks sharing a layout), gather the kept key blocks and run
SDPA on them, so work is proportional to the blocks kept (block_topk's causal prefill instead
takes ``past_blocks_attention``: whole past blocks without a mask, merged with the own block by
log-sum-exp; causal sink_window's prefill takes ``sink_window_band_attention``: overlapping
contiguous key windows under one band mask, no gather; the entry point decides that, once, in
``band_path_applies``, and tells the op). On CPU inside a graph being compiled,
mask patterns (and sink_window where the C++ kernel is not built, but its causal prefill) lower to
flex_attention with the same blocks (inductor's CPU flex kernel measured faster than the gathered
blocks; see ``use_flex_path``).
``sparse_attention_reference`` is dense SDPA with the pattern's mask.

Rows with no visible key (possible with a padding ``attn_bias``) return zeros in every path.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from tokred.compat.torch_api import allow_in_graph, assume_constant_result, detect_fake_mode, disable_current_modes
from tokred.triton_ops import common, sparse_cost, sparse_cpu, sparse_rule
from tokred.triton_ops.common import HAS_TRITON

KINDS = ("sink_window", "block_topk", "mask")
OPTION = "sparse_attention.pattern"

# Query/key block sizes of the layout for patterns that do not fix them (sink_window, mask): one
# key block is one kernel iteration. 64 keeps masking waste at a window's edges small.
DEFAULT_BLOCK = 64


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
            raise ValueError(f"tokred option '{OPTION}.kind' must be one of {KINDS}, got {self.kind!r}")
        for name in ("sinks", "window", "topk", "local"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"tokred option '{OPTION}.{name}' must be an int >= 0, got {value!r}")
        if not isinstance(self.block, int) or isinstance(self.block, bool) or self.block < 1:
            raise ValueError(f"tokred option '{OPTION}.block' must be an int >= 1, got {self.block!r}")
        if self.kind == "sink_window" and self.sinks + self.window == 0:
            raise ValueError(f"tokred option '{OPTION}': sink_window needs sinks + window > 0 (no key is visible)")
        if self.kind == "mask" and not callable(self.mask_fn):
            raise ValueError(f"tokred option '{OPTION}.mask_fn' must be a callable for kind 'mask', "
                             f"got {self.mask_fn!r}")


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------


def check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    """Raise unless q [B, H, Nq, D], k [B, Hkv, Nk, D], v [B, Hkv, Nk, Dv] with H % Hkv == 0."""
    torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4,
                 lambda: f"sparse_attention: expected 4-d q, k, v, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    torch._check(k.shape[0] == q.shape[0] and v.shape[0] == q.shape[0],
                 lambda: "sparse_attention: batch sizes of q, k, v differ")
    torch._check(k.shape[3] == q.shape[3], lambda: "sparse_attention: q and k head_dim differ")
    torch._check(v.shape[1] == k.shape[1] and v.shape[2] == k.shape[2],
                 lambda: "sparse_attention: k and v must have the same heads and length")
    torch._check(q.shape[1] % k.shape[1] == 0,
                 lambda: f"sparse_attention: query heads {q.shape[1]} not a multiple of kv heads {k.shape[1]}")
    torch._check(q.dtype == k.dtype == v.dtype and q.dtype.is_floating_point,
                 lambda: f"sparse_attention: q, k, v must share a float dtype, got {q.dtype}, {k.dtype}, {v.dtype}")


def resolve(q: Tensor, k: Tensor, scale: float | None, q_offset: int | None) -> tuple[float, int]:
    """(scale, q_offset) with their defaults: 1/sqrt(D) and Nk - Nq."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    q_offset = k.shape[2] - q.shape[2] if q_offset is None else int(q_offset)
    return scale, q_offset


def additive_mask(allowed: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Boolean ``allowed`` (True = may attend) -> an additive attention mask of the same shape in
    ``dtype``: 0 where allowed, -inf elsewhere."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, float("-inf"))


def additive_bias(attn_bias: Tensor | None, q: Tensor, k: Tensor) -> Tensor | None:
    """``attn_bias`` as a float tensor viewed as [B, H, Nq, Nk] (broadcast dims stay stride 0).

    A boolean bias follows SDPA: True = may attend, False = masked (-inf).
    """
    if attn_bias is None:
        return None
    shape = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    if attn_bias.dtype == torch.bool:
        attn_bias = additive_mask(attn_bias, q.dtype)
    while attn_bias.dim() < 4:
        attn_bias = attn_bias.unsqueeze(0)
    return attn_bias.expand(shape)


# ----------------------------------------------------------------------------------------------
# Element rules and block layouts
# ----------------------------------------------------------------------------------------------


# The element rule of causal attention (all that block_topk's whole kept blocks need).
CAUSAL_RULE = "(kv_idx <= q_idx)"


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
    rule = sparse_rule.rule_from_mask_fn(pattern.mask_fn)
    return f"({causal} & {rule})" if pattern.causal else rule


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


def layout_blocks(pattern: SparsePattern) -> tuple[int, int]:
    """(block_m, block_n): query rows and keys per layout block (block_topk: its block)."""
    return pattern.block, pattern.block


def query_block_bounds(num_queries: int, block_m: int, q_offset: int, device) -> tuple[Tensor, Tensor]:
    """(first, last) absolute query position per query block, each [NQB] int64."""
    starts = torch.arange(0, num_queries, block_m, device=device)
    first = q_offset + starts
    last = q_offset + torch.clamp(starts + block_m, max=num_queries) - 1
    return first, last


def sink_window_blocks(pattern: SparsePattern, num_queries: int, num_keys: int, block_m: int, block_n: int,
                       q_offset: int, device) -> Tensor:
    """Kept key blocks of sink_window, [1, 1, NQB, NKB] bool: blocks holding any visible key."""
    first, last = query_block_bounds(num_queries, block_m, q_offset, device)
    key_first = torch.arange(0, num_keys, block_n, device=device)
    key_last = torch.clamp(key_first + block_n, max=num_keys) - 1
    first, last = first[:, None], last[:, None]
    # [NQB, NKB] even where no term below depends on the row (not causal, window 0)
    sink = (key_first < pattern.sinks).expand(first.shape[0], -1)
    if pattern.causal:
        sink = sink & (key_first <= last)
    window = (key_last > first - pattern.window) & (key_first <= last) if pattern.window > 0 else \
        torch.zeros_like(sink)
    return (sink | window)[None, None]


def blocks_of_rows(t: Tensor, block: int) -> Tensor:
    """``t [B, H, N, X]`` as blocks [B, H, cdiv(N, block), block, X], the last one zero-padded.

    Padded by a concatenation of ``pad + block`` zero rows, the extra block then dropped: never a
    zero-size padding, whose presence a graph with a symbolic N would otherwise guard on (and
    recompile for N a multiple of the block), and no F.pad, whose eager form takes no symbolic pad
    (shape propagation of a dynamic graph runs it).
    """
    batch, heads, num_rows, width = t.shape
    num_blocks = common.cdiv(num_rows, block)
    padded = torch.cat([t, t.new_zeros(batch, heads, num_blocks * block - num_rows + block, width)], dim=2)
    return padded.view(batch, heads, num_blocks + 1, block, width)[:, :, :num_blocks]


def block_bounds_mean_query(q: Tensor, k: Tensor, block: int) -> Tensor:
    """Quest bound per (query block, key block): [B, H, NQB, NKB] fp32 (see module docstring)."""
    batch, heads, num_queries, dim = q.shape
    kv_heads, num_keys = k.shape[1], k.shape[2]
    num_q_blocks, num_k_blocks = common.cdiv(num_queries, block), common.cdiv(num_keys, block)
    rows = torch.clamp(num_queries - torch.arange(num_q_blocks, device=q.device) * block, max=block)
    q_mean = blocks_of_rows(q.float(), block).sum(3) / rows[:, None].to(torch.float32)

    k_blocks = blocks_of_rows(k.float(), block)
    valid = (torch.arange(num_k_blocks * block, device=k.device) < num_keys).view(num_k_blocks, block, 1)
    k_min = torch.where(valid, k_blocks, float("inf")).amin(3)
    k_max = torch.where(valid, k_blocks, float("-inf")).amax(3)
    group = heads // kv_heads
    k_min = k_min.repeat_interleave(group, dim=1)  # [B, H, NKB, D]
    k_max = k_max.repeat_interleave(group, dim=1)
    return q_mean.clamp_min(0) @ k_max.transpose(-1, -2) - (-q_mean).clamp_min(0) @ k_min.transpose(-1, -2)


def block_topk_blocks(pattern: SparsePattern, q: Tensor, k: Tensor, q_offset: int) -> Tensor:
    """Kept key blocks of block_topk, [B, H, NQB, NKB] bool (see module docstring)."""
    block = pattern.block
    num_queries, num_keys = q.shape[2], k.shape[2]
    num_k_blocks = common.cdiv(num_keys, block)
    _, last = query_block_bounds(num_queries, block, q_offset, q.device)
    key_block = torch.arange(num_k_blocks, device=q.device)
    visible = key_block[None, :] * block <= last[:, None] if pattern.causal else \
        torch.ones(last.shape[0], num_k_blocks, dtype=torch.bool, device=q.device)
    own = torch.div(last, block, rounding_mode="floor")[:, None]
    forced = (key_block[None, :] < pattern.sinks) | ((key_block[None, :] <= own) & (key_block[None, :] > own - pattern.local))
    forced = forced & visible  # [NQB, NKB]
    candidate = visible & ~forced
    kept = forced[None, None].expand(q.shape[0], q.shape[1], -1, -1)
    topk = min(pattern.topk, num_k_blocks)
    if topk == 0:
        return kept
    scores = block_bounds_mean_query(q, k, block).masked_fill(~candidate, float("-inf"))
    if torch.onnx.is_in_onnx_export():
        # ONNX TopK orders equal values by lower index, as the stable sort does (torch.topk does
        # not promise an order on ties; the exporter has no stable sort).
        order = torch.topk(scores, topk, dim=-1).indices
    else:
        # Stable descending sort: equal bounds keep ascending block order, so the lower index wins.
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :topk]
    chosen = torch.zeros_like(kept).scatter(-1, order, candidate.expand_as(kept).gather(-1, order))
    return kept | chosen


def dense_rule_mask(rule: str, batch: int, heads: int, num_queries: int, num_keys: int, q_offset: int,
                    device) -> Tensor | None:
    """The rule evaluated on every (query, key): bool [B or 1, H or 1, Nq, Nk]; None for no rule."""
    b = torch.arange(batch, device=device).view(-1, 1, 1, 1)
    h = torch.arange(heads, device=device).view(1, -1, 1, 1)
    q_idx = (q_offset + torch.arange(num_queries, device=device)).view(1, 1, -1, 1)
    kv_idx = torch.arange(num_keys, device=device).view(1, 1, 1, -1)
    mask = sparse_rule.eval_rule_torch(rule, b, h, q_idx, kv_idx)
    if mask is None:
        return None
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    return mask


def blocks_of_mask(mask: Tensor, block_m: int, block_n: int) -> Tensor:
    """[B', H', Nq, Nk] bool -> [B', H', NQB, NKB]: blocks with any True."""
    num_queries, num_keys = mask.shape[-2:]
    nqb, nkb = common.cdiv(num_queries, block_m), common.cdiv(num_keys, block_n)
    mask = F.pad(mask, (0, nkb * block_n - num_keys, 0, nqb * block_m - num_queries))
    return mask.view(*mask.shape[:2], nqb, block_m, nkb, block_n).any(5).any(3)


def kept_blocks(pattern: SparsePattern, q: Tensor, k: Tensor, q_offset: int, rule: str) -> Tensor:
    """Kept key blocks per query block: bool [B or 1, H or 1, NQB, NKB] at ``layout_blocks``."""
    if pattern.kind == "block_topk":
        return block_topk_blocks(pattern, q, k, q_offset)
    return static_kept_blocks(static_layout_spec(pattern, rule), q.shape[0], q.shape[1], q.shape[2], k.shape[2],
                              q_offset, q.device)


def max_kept_blocks(pattern: SparsePattern, num_queries: int, num_keys: int) -> int:
    """A static bound on kept key blocks per query block (the layout's MAXK)."""
    if pattern.kind != "block_topk":
        return static_max_kept_blocks(static_layout_spec(pattern, ""), num_queries, num_keys)
    num_k_blocks = common.cdiv(num_keys, pattern.block)
    return max(1, min(pattern.sinks + pattern.local + pattern.topk, num_k_blocks))


def block_layout(kept: Tensor, max_blocks: int) -> tuple[Tensor, Tensor]:
    """(kv_count [.., NQB] int32, kv_index [.., NQB, max_blocks] int32) from kept [.., NQB, NKB].

    kv_index lists the kept blocks in ascending order; entries past kv_count repeat the last kept
    block (0 where none), so every entry is a valid block index.
    """
    count = kept.sum(-1, dtype=torch.int32)
    # Kept block n gets the key NKB - n (all distinct), others 0: the top max_blocks keys are the
    # kept blocks in ascending order. TopK rather than a stable sort: it exports to ONNX.
    num_blocks = kept.shape[-1]
    keys = kept.to(torch.float32) * (num_blocks - torch.arange(num_blocks, device=kept.device)).to(torch.float32)
    order = torch.topk(keys, max_blocks, dim=-1).indices
    entry = torch.arange(max_blocks, device=kept.device)
    last = order.gather(-1, (count.long() - 1).clamp_min(0)[..., None])
    index = torch.where(entry < count[..., None], order, last)
    return count, index.to(torch.int32)


def pattern_layout(pattern: SparsePattern, q: Tensor, k: Tensor, q_offset: int) -> tuple[Tensor, Tensor, str]:
    """(kv_count [B, H, NQB], kv_index [B, H, NQB, MAXK] (expanded views), rule) for the op.

    block_topk's layout is computed from q and k on every call; the static patterns' layouts come
    from ``static_layout`` (built once per shape).
    """
    rule = element_rule(pattern)
    if pattern.kind == "block_topk":
        tracing = torch.compiler.is_compiling() or detect_fake_mode((q, k)) is not None
        # eagerly on one thread: small ops, each slowed by OpenMP scheduling on a loaded machine
        # (N=4096, 2 threads, load ~3: 197 ms vs 11-17 ms on one, measured)
        with contextlib.nullcontext() if tracing else single_thread():
            kept = block_topk_blocks(pattern, q, k, q_offset)
            count, index = block_layout(kept, max_kept_blocks(pattern, q.shape[2], k.shape[2]))
    else:
        count, index = static_layout(q, k, q_offset, static_layout_spec(pattern, rule), False)
    batch, heads = q.shape[0], q.shape[1]
    return count.expand(batch, heads, -1), index.expand(batch, heads, -1, -1), rule


# ----------------------------------------------------------------------------------------------
# Static layouts (sink_window, mask): built once per shape
# ----------------------------------------------------------------------------------------------


@assume_constant_result
def static_layout_spec(pattern: SparsePattern, rule: str) -> tuple:
    """What a sink_window or mask layout depends on besides lengths, q_offset and device:
    ``(kind, sinks, window, block, causal, rule)``, all plain values so that the tuple can be an
    argument of ``static_layout`` in an FX graph (a pattern holding a mask function cannot). A
    constant for Dynamo: with dynamic=True it would otherwise make the pattern's ints symbolic."""
    return (pattern.kind, pattern.sinks, pattern.window, pattern.block, pattern.causal, rule)


def static_kept_blocks(spec: tuple, batch: int, heads: int, num_queries: int, num_keys: int, q_offset: int,
                       device) -> Tensor:
    """Kept key blocks of a sink_window or mask pattern (``spec`` from ``static_layout_spec``):
    bool [B or 1, H or 1, NQB, NKB], B and H only where a mask rule reads b or h."""
    kind, sinks, window, block, causal, rule = spec
    if kind == "sink_window":
        pattern = SparsePattern(kind, sinks=sinks, window=window, block=block, causal=causal)
        return sink_window_blocks(pattern, num_queries, num_keys, block, block, q_offset, device)
    return blocks_of_mask(dense_rule_mask(rule, batch, heads, num_queries, num_keys, q_offset, device), block, block)


def static_max_kept_blocks(spec: tuple, num_queries: int, num_keys: int) -> int:
    """A bound on kept key blocks per query block of a sink_window or mask layout, from the
    lengths alone (the layout's MAXK where the layout is traced with symbolic lengths)."""
    kind, sinks, window, block, _, _ = spec
    num_k_blocks = common.cdiv(num_keys, block)
    if kind != "sink_window":
        return max(1, num_k_blocks)
    # Blocks meeting the span [first - window + 1, last] of window + block - 1 positions, plus sinks.
    window_blocks = (window + min(block, num_queries) - 2) // block + 2 if window > 0 else 0
    return max(1, min(common.cdiv(sinks, block) + window_blocks, num_k_blocks))


def build_static_layout(spec: tuple, batch: int, heads: int, num_queries: int, num_keys: int, q_offset: int,
                        device, for_flex: bool, concrete: bool) -> tuple[Tensor, ...]:
    """A sink_window or mask layout built from scratch (what ``static_layout`` returns).

    ``concrete``: the lengths are ints and the tensors real, so a mask rule's MAXK can be its
    layout's own largest count rather than ``static_max_kept_blocks``, every key block (the
    per-head CPU path gathers MAXK blocks per query block).
    """
    kept = static_kept_blocks(spec, batch, heads, num_queries, num_keys, q_offset, device)
    if for_flex:
        return flex_block_tensors(spec, kept, num_queries, num_keys, q_offset)
    max_blocks = max(1, int(kept.sum(-1).max())) if concrete and spec[0] == "mask" else \
        static_max_kept_blocks(spec, num_queries, num_keys)
    return block_layout(kept, max_blocks)


# Layouts kept by ``static_layout``, least recently used dropped first. An entry is small (NQB x
# MAXK int32, or flex's block tensors), the bound only stops a run over ever new lengths (decode
# steps with a growing cache) from growing memory without limit.
STATIC_LAYOUT_CACHE_SIZE = 64
_STATIC_LAYOUTS: collections.OrderedDict[tuple, tuple[Tensor, ...]] = collections.OrderedDict()


@allow_in_graph
def static_layout(q: Tensor, k: Tensor, q_offset: int, spec: tuple, for_flex: bool) -> tuple[Tensor, ...]:
    """The block layout of a sink_window or mask pattern (``spec`` from ``static_layout_spec``),
    built once per (spec, lengths, q_offset, device; B and H where a mask rule reads b or h).

    Returns (kv_count [B', H', NQB] int32, kv_index [B', H', NQB, MAXK] int32), B' = B or 1 and
    H' = H or 1; with ``for_flex`` BlockMask's eight block tensors (``flex_block_tensors``). q and
    k only give lengths and device.

    Where it runs:
    * eagerly: a lookup in a bounded cache (``STATIC_LAYOUT_CACHE_SIZE`` entries);
    * traced with fake tensors and int lengths (aot_autograd under torch.compile, ONNX export):
      the cached tensors become constants of the traced graph (``lift_fresh_copy`` of a real
      tensor), so the compiled graph never rebuilds them (it copies the few KB per call);
    * traced with symbolic lengths (dynamic shapes): built in the traced graph, as it must be.
    Dynamo does not trace into it (``allow_in_graph``): it stays one call in Dynamo's graph, run
    by the backend's own trace as above (or eagerly by the "eager" backend).
    """
    kind, rule = spec[0], spec[5]
    names = sparse_rule.rule_names(rule) if kind == "mask" else frozenset()
    batch = q.shape[0] if "b" in names else 1
    heads = q.shape[1] if "h" in names else 1
    sizes = (batch, heads, q.shape[2], k.shape[2], q_offset)
    if any(isinstance(size, torch.SymInt) for size in sizes):
        return build_static_layout(spec, *sizes, q.device, for_flex, concrete=False)
    key = (spec, *sizes, q.device, for_flex)
    layout = _STATIC_LAYOUTS.pop(key, None)
    if layout is None:
        with disable_current_modes():  # real tensors, not recorded, even inside a fake-tensor trace
            layout = build_static_layout(spec, *sizes, q.device, for_flex, concrete=True)
    _STATIC_LAYOUTS[key] = layout  # (re)inserted last: most recently used
    while len(_STATIC_LAYOUTS) > STATIC_LAYOUT_CACHE_SIZE:
        _STATIC_LAYOUTS.popitem(last=False)
    if detect_fake_mode((q, k)) is not None:
        return tuple(torch.ops.aten.lift_fresh_copy(t) for t in layout)
    return layout


def pattern_mask(pattern: SparsePattern, q: Tensor, k: Tensor, q_offset: int | None = None) -> Tensor:
    """The exact allowed set: bool [B or 1, H or 1, Nq, Nk] (block_topk's depends on q and k)."""
    _, q_offset = resolve(q, k, None, q_offset)
    rule = element_rule(pattern)
    num_queries, num_keys = q.shape[2], k.shape[2]
    block_m, block_n = layout_blocks(pattern)
    kept = kept_blocks(pattern, q, k, q_offset, rule)
    rows = torch.arange(num_queries, device=q.device) // block_m
    cols = torch.arange(num_keys, device=q.device) // block_n
    mask = kept[:, :, rows][:, :, :, cols]
    rule_mask = dense_rule_mask(rule, q.shape[0], q.shape[1], num_queries, num_keys, q_offset, q.device)
    return mask if rule_mask is None else mask & rule_mask


# ----------------------------------------------------------------------------------------------
# Reference and CPU path
# ----------------------------------------------------------------------------------------------


# Thread counts saved by the active ``single_thread`` blocks (outermost first).
_SAVED_THREADS: list[int] = []


@contextlib.contextmanager
def single_thread():
    """Run the enclosed small elementwise/indexing ops on one CPU thread.

    On a loaded machine each multi-threaded op waits for every OpenMP thread to be scheduled
    (measured: a mask op of ~1 ms took 20-40 ms with 2 threads, 1 ms with 1); the SDPA calls run
    under ``all_threads`` instead.
    """
    _SAVED_THREADS.append(torch.get_num_threads())
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(_SAVED_THREADS.pop())


@contextlib.contextmanager
def all_threads():
    """Run the enclosed op with the thread count in force before any ``single_thread`` block."""
    threads = torch.get_num_threads()
    torch.set_num_threads(_SAVED_THREADS[0] if _SAVED_THREADS else threads)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def attention_with_mask(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, bias: Tensor | None,
                        scale: float) -> Tensor:
    """Dense SDPA of q [.., H, L, D] over k, v [.., Hkv, S, *] with bool ``mask`` and additive
    ``bias`` (both broadcastable to [.., H, L, S]); rows with no allowed key give zeros."""
    with single_thread():
        group = q.shape[-3] // k.shape[-3]
        if group > 1 and q.dim() != 4:  # SDPA's enable_gqa wants [B, H, L, D]
            k = k.repeat_interleave(group, dim=-3)
            v = v.repeat_interleave(group, dim=-3)
        additive = additive_mask(mask, q.dtype)
        if bias is not None:
            additive = additive + bias
        row_open = (additive > float("-inf")).any(-1, keepdim=True)
    with all_threads():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=additive, scale=scale,
                                             enable_gqa=q.shape[-3] != k.shape[-3])
    with single_thread():
        return torch.where(row_open, out, 0.0).to(q.dtype)


def sparse_attention_reference(q: Tensor, k: Tensor, v: Tensor, pattern: SparsePattern,
                               scale: float | None = None, q_offset: int | None = None,
                               attn_bias: Tensor | None = None) -> Tensor:
    """Dense masked SDPA with ``pattern_mask``: [B, H, Nq, Dv] (zeros where a row sees no key)."""
    check_qkv(q, k, v)
    scale, q_offset = resolve(q, k, scale, q_offset)
    mask = pattern_mask(pattern, q, k, q_offset)
    return attention_with_mask(q, k, v, mask, additive_bias(attn_bias, q, k), scale)


# Query rows per step of the shared-layout CPU path: large enough that SDPA runs at its dense
# throughput, small enough that the union of the step's key blocks stays close to each row's own
# (a window of w keys costs w + CHUNK_ROWS keys per row instead of w + block).
CHUNK_ROWS = 256


def without_broadcast(t: Tensor, dims: tuple[int, ...]) -> Tensor:
    """``t`` with each of ``dims`` that is an expanded (stride 0) dim narrowed to size 1."""
    for dim in dims:
        if t.shape[dim] > 1 and t.stride(dim) == 0:
            t = t.narrow(dim, 0, 1)
    return t


def kept_from_layout(kv_count: Tensor, kv_index: Tensor, num_k_blocks: int) -> Tensor:
    """[.., NQB] counts and [.., NQB, MAXK] indices -> kept blocks [.., NQB, NKB] bool."""
    entry = torch.arange(kv_index.shape[-1], device=kv_index.device) < kv_count[..., None]
    kept = torch.zeros(*kv_index.shape[:-1], num_k_blocks, dtype=torch.int32, device=kv_index.device)
    # Repeated indices (the padding entries) all write the same 0 or 1 value per slot via amax.
    kept.scatter_reduce_(-1, kv_index.long(), entry.to(torch.int32), reduce="amax")
    return kept.bool()


def sparse_attention_blocks(q: Tensor, k: Tensor, v: Tensor, kv_count: Tensor, kv_index: Tensor,
                            bias: Tensor | None, scale: float, q_offset: int, block_m: int, block_n: int,
                            rule: str, band_sinks: int = 0, band_window: int = 0) -> Tensor:
    """CPU path of the op (runs eagerly inside the opaque custom op): [B, H, Nq, Dv].

    Query block m of head h attends to key blocks ``kv_index[b, h, m, :kv_count[b, h, m]]``
    (``block_n`` keys each, ``block_m`` query rows per block), masked by ``rule`` and ``bias``
    [B, H, Nq, Nk]. Two strategies, both doing work proportional to the blocks kept:

    * layout shared by every batch row and head (sink_window, mask rules without b/h): steps of
      CHUNK_ROWS query rows, each one SDPA over the union of its blocks' key blocks (one copy of
      those keys, GQA inside SDPA), masked to each block's own blocks and the rule;
    * per-head layouts (block_topk): steps of as many query blocks as fit STEP_BYTES, each block
      with its own gathered key blocks, one batched SDPA per step.

    Two prefill shapes (no bias, q_offset 0, CPU) take paths without masks or gathers instead:
    block_topk's causal layout (``past_blocks_attention``) and, where the caller says so
    (``band_window`` > 0), causal sink_window (``sink_window_band_attention``, which reads neither
    the layout nor the rule).
    """
    intervals = interval_rule(rule)
    if intervals is not None and sparse_cpu.applies(q):
        return sparse_cpu.block_sparse_attention(q, k, v, kv_count, kv_index, bias, scale, q_offset, block_m, block_n,
                                                 intervals)
    if band_window > 0 and q.device.type == "cpu":
        return sink_window_band_attention(q, k, v, band_sinks, band_window, scale)
    count = without_broadcast(kv_count, (0, 1))
    index = without_broadcast(kv_index, (0, 1))
    if bias is not None:
        bias = without_broadcast(bias, (0, 1, 2))
    prefill = bias is None and q_offset == 0 and q.shape[2] == k.shape[2] and q.device.type == "cpu"
    if prefill and rule == CAUSAL_RULE and block_m == block_n:
        out = past_blocks_attention(q, k, v, count.expand(q.shape[0], q.shape[1], -1),
                                    index.expand(q.shape[0], q.shape[1], -1, -1), scale, block_m)
        if out is not None:
            return out
    with single_thread():  # the mask and gather ops; SDPA itself runs on all threads
        if count.shape[0] == 1 and count.shape[1] == 1:
            return shared_layout_attention(q, k, v, count[0, 0], index[0, 0], bias, scale, q_offset, block_m,
                                           block_n, rule)
        return per_head_layout_attention(q, k, v, count.expand(q.shape[0], q.shape[1], -1),
                                         index.expand(q.shape[0], q.shape[1], -1, -1), bias, scale, q_offset,
                                         block_m, block_n, rule)


def padded_rows(t: Tensor, rows: int) -> Tensor:
    """``t [.., N, X]`` zero-padded along dim -2 to ``rows`` rows; ``t`` itself (no copy, possibly
    not contiguous: callers reshape, not view) when it has them already."""
    return t if t.shape[-2] == rows else F.pad(t, (0, 0, 0, rows - t.shape[-2]))


def padded_bias_rows(bias: Tensor, rows: int) -> Tensor:
    """A bias [B', H', Nq or 1, Nk] padded to ``rows`` query rows (a broadcast row dim stays 1)."""
    return bias if bias.shape[2] == 1 else padded_rows(bias, rows)


def shared_layout_attention(q, k, v, count, index, bias, scale, q_offset, block_m, block_n, rule):
    """Strategy 1 of ``sparse_attention_blocks``: count [NQB], index [NQB, MAXK] for all (b, h).

    Query blocks are grouped into NC chunks of CHUNK_ROWS rows; chunk c attends to the union of
    its blocks' key blocks (S keys, padded to the largest union). Chunks ride in SDPA's batch dim
    ([B * NC, H, C, D] against [B * NC, Hkv, S, D], mask [B * NC, H or 1, C, S]), so the whole
    layer is a fixed, small number of ops whatever N is: on a loaded machine every op costs a
    scheduling delay, so op count matters as much as FLOPs.
    """
    batch, heads, num_queries, dim = q.shape
    kv_heads, num_keys = k.shape[1], k.shape[2]
    device = q.device
    kept = kept_from_layout(count, index, common.cdiv(num_keys, block_n))  # [NQB, NKB]
    per_chunk = max(1, CHUNK_ROWS // block_m)
    chunks = common.cdiv(kept.shape[0], per_chunk)
    chunk_rows = per_chunk * block_m
    kept = F.pad(kept, (0, 0, 0, chunks * per_chunk - kept.shape[0]))
    union = kept.view(chunks, per_chunk, -1).any(1)  # [NC, NKB]
    union_count, union_index = block_layout(union, max(1, int(union.sum(-1).max())))
    keys = (union_index.long()[..., None] * block_n + torch.arange(block_n, device=device)).flatten(1)  # [NC, S]
    entry = (torch.arange(union_index.shape[1], device=device) < union_count[:, None]).repeat_interleave(block_n, 1)
    keys_ok = entry & (keys < num_keys)
    keys = keys.clamp(max=num_keys - 1)
    rows = torch.arange(chunks * chunk_rows, device=device).view(chunks, chunk_rows, 1)  # query rows
    allowed = kept[rows // block_m, (keys // block_n)[:, None, :]] & keys_ok[:, None, :]  # [NC, C, S]
    by_rule = sparse_rule.eval_rule_torch(
        rule, torch.arange(batch, device=device).view(batch, 1, 1, 1, 1),
        torch.arange(heads, device=device).view(1, 1, heads, 1, 1), (q_offset + rows)[None, :, None],
        keys[None, :, None, None, :])
    allowed = allowed[None, :, None] if by_rule is None else allowed[None, :, None] & by_rule  # [B', NC, H', C, S]

    def chunks_first(t: Tensor) -> Tensor:  # [B, NC, H', C, S] (any B' of 1 expanded) -> [B * NC, H', C, S]
        return t.expand(batch, *t.shape[1:]).flatten(0, 1)

    step_bias = None
    if bias is not None:
        bias_rows = padded_bias_rows(bias, chunks * chunk_rows)
        row_index = rows if bias_rows.shape[2] > 1 else torch.zeros_like(rows[:, :1])
        step_bias = chunks_first(bias_rows[:, :, row_index, keys[:, None, :]].transpose(1, 2))
    q_chunks = padded_rows(q, chunks * chunk_rows).reshape(batch, heads, chunks, chunk_rows, dim)
    q_chunks = q_chunks.transpose(1, 2).flatten(0, 1)  # [B * NC, H, C, D]

    def gathered(t: Tensor) -> Tensor:  # [B, Hkv, Nk, X] -> [B * NC, Hkv, S, X]
        return t.index_select(2, keys.flatten()).view(batch, kv_heads, chunks, -1, t.shape[-1]).transpose(1, 2) \
            .flatten(0, 1)

    out = attention_with_mask(q_chunks, gathered(k), gathered(v), chunks_first(allowed), step_bias, scale)
    out = out.view(batch, chunks, heads, chunk_rows, -1).transpose(1, 2).flatten(2, 3)
    return out[:, :, :num_queries]


# Bytes of gathered K plus V per step of the per-head path: large steps (few ops) within memory.
STEP_BYTES = 256 * 2**20


def per_head_layout_attention(q, k, v, count, index, bias, scale, q_offset, block_m, block_n, rule):
    """Strategy 2 of ``sparse_attention_blocks``: count [B, H, NQB], index [B, H, NQB, MAXK].

    Each (b, h, query block) gets its own gathered key blocks (whole rows of the padded K/V
    viewed as blocks); steps of as many query blocks as fit STEP_BYTES run as one 4-d SDPA with
    (h, query block) flattened into the head dim.
    """
    batch, heads, num_queries, dim = q.shape
    kv_heads, num_keys = k.shape[1], k.shape[2]
    num_q_blocks, max_blocks = index.shape[2], index.shape[3]
    num_k_blocks = common.cdiv(num_keys, block_n)
    device = q.device
    pad_keys = num_k_blocks * block_n - num_keys
    k_blocks = F.pad(k, (0, 0, 0, pad_keys)).view(batch, kv_heads, num_k_blocks, block_n, dim)
    v_blocks = F.pad(v, (0, 0, 0, pad_keys)).view(batch, kv_heads, num_k_blocks, block_n, v.shape[-1])
    q_blocks = padded_rows(q, num_q_blocks * block_m).reshape(batch, heads, num_q_blocks, block_m, dim)
    bias_rows = None if bias is None else padded_bias_rows(bias, num_q_blocks * block_m)
    batch_index = torch.arange(batch, device=device).view(batch, 1, 1, 1)
    head_index = (torch.arange(heads, device=device) // (heads // kv_heads)).view(1, heads, 1, 1)
    step_bytes = batch * heads * max_blocks * block_n * (dim + v.shape[-1]) * q.element_size()
    per_step = max(1, STEP_BYTES // step_bytes)
    out = q.new_empty(batch, heads, num_q_blocks * block_m, v.shape[-1])
    for first in range(0, num_q_blocks, per_step):
        last = min(num_q_blocks, first + per_step)
        step_index = index[:, :, first:last].long()  # [B, H, G, MAXK]
        k_step = k_blocks[batch_index, head_index, step_index].flatten(-3, -2)  # [B, H, G, MAXK * bn, D]
        v_step = v_blocks[batch_index, head_index, step_index].flatten(-3, -2)
        keys = (step_index[..., None] * block_n + torch.arange(block_n, device=device)).flatten(-2)  # [B, H, G, L]
        entry = (torch.arange(max_blocks, device=device) < count[:, :, first:last, None]).repeat_interleave(block_n, -1)
        allowed = (entry & (keys < num_keys))[..., None, :]  # [B, H, G, 1, L]
        rows = torch.arange(first * block_m, last * block_m, device=device).view(1, 1, last - first, block_m, 1)
        by_rule = sparse_rule.eval_rule_torch(
            rule, torch.arange(batch, device=device).view(batch, 1, 1, 1, 1),
            torch.arange(heads, device=device).view(1, heads, 1, 1, 1), q_offset + rows, keys[..., None, :])
        if by_rule is not None:
            allowed = allowed & by_rule
        step_bias = None
        if bias_rows is not None:
            keys_in = keys.clamp(max=num_keys - 1)
            if bias_rows.shape[2] > 1:
                row_index = rows.expand(batch, heads, -1, -1, -1)
            else:
                row_index = torch.zeros(1, 1, 1, 1, 1, dtype=torch.long, device=device)
            step_bias = bias_rows.expand(batch, heads, -1, -1)[
                batch_index[..., None], torch.arange(heads, device=device).view(1, heads, 1, 1, 1), row_index,
                keys_in[..., None, :]]  # [B, H, G, bm or 1, L]
            step_bias = step_bias.flatten(1, 2)
        allowed = allowed.expand(batch, heads, last - first, block_m, -1).flatten(1, 2)
        step_out = attention_with_mask(q_blocks[:, :, first:last].flatten(1, 2), k_step.flatten(1, 2),
                                       v_step.flatten(1, 2), allowed, step_bias, scale)
        out[:, :, first * block_m:last * block_m] = step_out.view(batch, heads, -1, v.shape[-1])
    return out[:, :, :num_queries]


# Query rows per chunk of ``sink_window_band_attention``: a chunk of c rows attends to the same
# window + c - 1 keys, so each row pays c - 1 keys beyond its window; flash's query tile is 32
# rows below c = 192. 64 measured fastest on this CPU at window 1024 (32..256 within noise).
SINK_WINDOW_CHUNK = 64


def band_chunks(t: Tensor, start: int, rows: int, chunks: int, step: int) -> Tensor:
    """Overlapping views of one batch row ``t [H', N, X]``: [chunks, H', rows, X], chunk i being
    rows ``[start + i * step, start + i * step + rows)`` (no copy; flash reads the strides)."""
    heads, _, width = t.shape
    return t.as_strided((chunks, heads, rows, width), (step * t.stride(1), t.stride(0), t.stride(1), t.stride(2)),
                        t.storage_offset() + start * t.stride(1))


def band_mask(chunk: int, window: int, device) -> Tensor:
    """Additive fp32 mask [chunk, window + chunk - 1] of a chunk's window part: row r (query at
    position s + r) against column t (key at s - window + 1 + t) is 0 where r <= t <= r + window - 1
    (the key is in the query's window), -inf elsewhere. The same for every chunk."""
    rows = torch.arange(chunk, device=device)[:, None]
    cols = torch.arange(window + chunk - 1, device=device)[None, :]
    return additive_mask((cols >= rows) & (cols <= rows + window - 1))


def sink_window_band_attention(q: Tensor, k: Tensor, v: Tensor, sinks: int, window: int, scale: float,
                               chunk: int = SINK_WINDOW_CHUNK) -> Tensor:
    """Causal sink_window prefill without gathers: q [B, H, N, D], k/v [B, Hkv, N, *] -> [B, H, N, Dv].

    Queries at positions p < P0 = window + sinks - 1 see every key <= p (their window reaches the
    sinks): one causal SDPA over the first P0 tokens. A later query's window (p - window, p] lies
    after the sinks, so it is two disjoint key sets: the window part of a chunk of queries
    [s, s + c) reads the contiguous keys [s - window + 1, s + c) with a band mask that is the same
    for every chunk (``band_mask``), so all chunks run as one flash call over overlapping strided
    views of K and V (GQA inside flash); the sinks are keys [0, sinks) for every such query, one
    flash call without a mask. The two are merged by their log-sum-exps. Work: c - 1 keys per row
    beyond the pattern's own (plus the rows of a partial last chunk, run as a smaller call).
    """
    batch, heads, num_tokens, _ = q.shape
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = q.new_empty(batch, heads, num_tokens, v.shape[-1])
    prefix = min(num_tokens, window + sinks - 1)
    if prefix:
        out[:, :, :prefix] = flash(q[:, :, :prefix], k[:, :, :prefix], v[:, :, :prefix], is_causal=True,
                                   scale=scale)[0]
    rows = num_tokens - prefix
    if rows == 0:
        return out
    sink_out = sink_lse = None
    if sinks:
        sink_out, sink_lse = flash(q[:, :, prefix:], k[:, :, :sinks], v[:, :, :sinks], scale=scale)[:2]
    mask = band_mask(chunk, window, q.device)
    full, tail = divmod(rows, chunk)
    # (first row after the prefix, rows per chunk, number of chunks) of the full chunks and the tail
    parts = [(0, chunk, full), (full * chunk, tail, 1)]
    for b in range(batch):
        for first, size, count in parts:
            if size == 0 or count == 0:
                continue
            start = prefix + first
            keys = window + size - 1
            window_out, window_lse = flash(band_chunks(q[b], start, size, count, chunk),
                                           band_chunks(k[b], start - window + 1, keys, count, chunk),
                                           band_chunks(v[b], start - window + 1, keys, count, chunk),
                                           attn_mask=mask[:size, :keys], scale=scale)[:2]
            # [count, H, size, *] -> [H, count * size, *]: this part's rows in order
            window_out = window_out.transpose(0, 1).reshape(heads, count * size, -1)
            window_lse = window_lse.transpose(0, 1).reshape(heads, count * size)
            span = slice(start, start + count * size)
            if sink_out is None:
                out[b, :, span] = window_out
            else:
                sink_span = slice(first, first + count * size)
                out[b, :, span] = merge_by_lse(window_out, window_lse, sink_out[b, :, sink_span],
                                               sink_lse[b, :, sink_span]).to(out.dtype)
    return out


# Bytes of gathered K plus V per step of ``past_blocks_attention``: measured fastest around here
# (a step's copies stay in cache-friendly sizes, and few enough ops).
PAST_STEP_BYTES = 64 * 2**20


def past_blocks_layout(count: Tensor, index: Tensor) -> int | None:
    """P, the first query block of the uniform part, if the layout has the shape causal block_topk
    gives a prefill (count [B, H, NQB], index [B, H, NQB, MAXK]), else None.

    The shape: query block m keeps min(m + 1, MAXK) blocks, its own block m last. Blocks m < P =
    MAXK - 1 then keep every visible block (a dense causal prefix), and each block m >= P keeps
    MAXK - 1 distinct blocks strictly before m (ascending, so all < m) plus its own.
    """
    num_q_blocks, max_blocks = index.shape[2], index.shape[3]
    blocks = torch.arange(num_q_blocks, device=count.device)
    if not bool((count == torch.clamp(blocks + 1, max=max_blocks)).all()):
        return None
    prefix = min(num_q_blocks, max_blocks - 1)
    if not bool((index[:, :, prefix:, max_blocks - 1] == blocks[prefix:]).all()):
        return None
    return prefix


def merge_by_lse(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> Tensor:
    """Softmax attention over the union of two disjoint key sets from each set's output [.., L, Dv]
    and log-sum-exp [.., L]: the outputs weighted by each set's share of the total mass, in fp32.

    Set b's share is exp(lse_b) / (exp(lse_a) + exp(lse_b)) = sigmoid(lse_b - lse_a), so the merge
    is one lerp (one pass over the outputs; the max/exp/divide form took ~20x longer, measured).
    """
    share_b = torch.sigmoid(lse_b.float() - lse_a.float()).unsqueeze(-1)
    return torch.lerp(out_a.float(), out_b.float(), share_b)


def own_block_causal_mask(block: int, max_blocks: int, device) -> Tensor:
    """Additive fp32 mask [block, max_blocks * block] of a query block against its gathered key
    blocks, the own block last: 0 on the past blocks, the causal triangle (key row <= query row)
    on the own block. The same for every query block and head."""
    rows = torch.arange(block, device=device)[:, None]
    cols = torch.arange(max_blocks * block, device=device)[None, :] - (max_blocks - 1) * block
    return additive_mask(cols <= rows)


def past_blocks_attention(q: Tensor, k: Tensor, v: Tensor, count: Tensor, index: Tensor, scale: float,
                          block: int) -> Tensor | None:
    """Causal prefill over a block_topk-shaped layout: [B, H, N, Dv], or None where the layout is
    not of that shape (see ``past_blocks_layout``).

    q [B, H, N, D], k/v [B, Hkv, N, *], count [B, H, NQB], index [B, H, NQB, MAXK]. The dense
    prefix (query blocks < P) is one causal SDPA. Each later query block's MAXK blocks (MAXK - 1
    whole past blocks, then its own) are gathered as contiguous block rows and attended with CPU
    flash attention under one mask shared by every block and head (``own_block_causal_mask``: only
    the own block's triangle is masked). Steps of as many query blocks as fit ``PAST_STEP_BYTES``
    of gathered K and V gather into buffers reused from step to step (the gather is the cost beyond
    the kept blocks themselves; smaller steps looked faster on 1 thread but were ~4x slower on 2
    loaded threads, measured).
    """
    prefix = past_blocks_layout(count, index)
    if prefix is None:
        return None
    batch, heads, num_tokens, dim = q.shape
    kv_heads, dim_v = k.shape[1], v.shape[-1]
    num_blocks, max_blocks = index.shape[2], index.shape[3]
    out = q.new_empty(batch, heads, num_blocks * block, dim_v)
    rows = min(num_tokens, prefix * block)
    if rows:
        out[:, :, :rows] = F.scaled_dot_product_attention(q[:, :, :rows], k[:, :, :rows], v[:, :, :rows],
                                                          is_causal=True, scale=scale, enable_gqa=heads != kv_heads)
    if prefix == num_blocks:
        return out[:, :, :num_tokens]
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    # Padding rows (a last partial block) are zeros: they only ever meet padded keys in their own
    # block's causal part and are cut off at the end.
    q_blocks = padded_rows(q, num_blocks * block).reshape(batch * heads, num_blocks, block, dim)
    k_flat = padded_rows(k, num_blocks * block).reshape(batch * kv_heads * num_blocks, block * dim)  # a row per block
    v_flat = padded_rows(v, num_blocks * block).reshape(batch * kv_heads * num_blocks, block * dim_v)
    kv_row = ((torch.arange(batch, device=q.device).view(batch, 1, 1) * kv_heads
               + torch.arange(heads, device=q.device).view(1, heads, 1) // (heads // kv_heads)) * num_blocks)
    mask = own_block_causal_mask(block, max_blocks, q.device)
    bytes_per_block = batch * heads * max_blocks * block * (dim + dim_v) * q.element_size()
    per_step = max(1, PAST_STEP_BYTES // max(1, bytes_per_block))
    k_buffer = k_flat.new_empty(batch * heads * per_step * max_blocks, block * dim)
    v_buffer = v_flat.new_empty(batch * heads * per_step * max_blocks, block * dim_v)
    out_blocks = out.view(batch * heads, num_blocks, block, dim_v)
    for first in range(prefix, num_blocks, per_step):
        last = min(num_blocks, first + per_step)
        steps = last - first
        rows_kv = (index[:, :, first:last].long() + kv_row[..., None]).flatten()  # [B * H * G * MAXK]
        keys = torch.index_select(k_flat, 0, rows_kv, out=k_buffer[:rows_kv.shape[0]])
        values = torch.index_select(v_flat, 0, rows_kv, out=v_buffer[:rows_kv.shape[0]])
        # batch = (b, h), heads = the step's query blocks: q and out are views, no copy
        out_blocks[:, first:last] = flash(q_blocks[:, first:last],
                                          keys.view(batch * heads, steps, max_blocks * block, dim),
                                          values.view(batch * heads, steps, max_blocks * block, dim_v),
                                          attn_mask=mask, scale=scale)[0]
    return out[:, :, :num_tokens]


# ----------------------------------------------------------------------------------------------
# Custom op
# ----------------------------------------------------------------------------------------------


def check_layout(q: Tensor, kv_count: Tensor, kv_index: Tensor, block_m: int) -> None:
    """Raise unless kv_count [B, H, NQB] and kv_index [B, H, NQB, MAXK] are int32 for q's blocks."""
    torch._check(kv_count.dim() == 3 and kv_index.dim() == 4,
                 lambda: f"sparse_attention: kv_count [B, H, NQB], kv_index [B, H, NQB, MAXK], got "
                         f"{tuple(kv_count.shape)}, {tuple(kv_index.shape)}")
    torch._check(kv_count.dtype == torch.int32 and kv_index.dtype == torch.int32,
                 lambda: "sparse_attention: kv_count and kv_index must be int32")
    for dim in range(3):
        torch._check(kv_index.shape[dim] == kv_count.shape[dim],
                     lambda: "sparse_attention: kv_count and kv_index disagree")
    torch._check(kv_count.shape[2] == (q.shape[2] + block_m - 1) // block_m,
                 lambda: f"sparse_attention: {kv_count.shape[2]} query blocks for Nq={q.shape[2]}, block {block_m}")


def check_band(q: Tensor, k: Tensor, bias: Tensor | None, q_offset: int, band_window: int) -> None:
    """Raise unless a band request (``band_window`` > 0) comes with a causal prefill's shapes: no bias,
    q_offset 0, as many queries as keys (what ``band_path_applies`` decided it from)."""
    if band_window > 0:
        torch._check(bias is None and q_offset == 0 and q.shape[2] == k.shape[2],
                     lambda: "sparse_attention: band_window > 0 (the sink_window band path) needs a prefill "
                             f"without bias: q_offset 0 and Nq == Nk, got q_offset {q_offset}, Nq {q.shape[2]}, "
                             f"Nk {k.shape[2]}, bias {'given' if bias is not None else 'None'}")


@torch.library.custom_op("tokred::sparse_attention", mutates_args=())
def sparse_attention_op(q: Tensor, k: Tensor, v: Tensor, kv_count: Tensor, kv_index: Tensor,
                        bias: Tensor | None, scale: float, q_offset: int, block_m: int, block_n: int,
                        rule: str, band_sinks: int = 0, band_window: int = 0) -> Tensor:
    """Block-sparse attention over a block layout: q [B, H, Nq, D] -> [B, H, Nq, Dv] (see module doc).

    ``band_window`` > 0 says that layout & rule is causal sink_window(band_sinks, band_window) in a
    prefill (the caller's decision, ``band_path_applies``): the CPU path then runs
    ``sink_window_band_attention``, which reads neither the layout nor the rule. The CUDA kernel
    and the ONNX lowering read the layout and the rule either way (the same result).
    """
    check_qkv(q, k, v)
    check_layout(q, kv_count, kv_index, block_m)
    check_band(q, k, bias, q_offset, band_window)
    return sparse_attention_blocks(q, k, v, kv_count, kv_index, bias, scale, q_offset, block_m, block_n,
                                   rule, band_sinks, band_window).contiguous()


def _sparse_attention_cuda(q, k, v, kv_count, kv_index, bias, scale, q_offset, block_m, block_n, rule,
                           band_sinks=0, band_window=0):
    from tokred.triton_ops.sparse_kernel import sparse_attention_triton

    return sparse_attention_triton(q, k, v, kv_count, kv_index, bias, scale, q_offset, block_m, block_n, rule)


if HAS_TRITON:
    sparse_attention_op.register_kernel("cuda")(_sparse_attention_cuda)


@sparse_attention_op.register_fake
def _sparse_attention_fake(q, k, v, kv_count, kv_index, bias, scale, q_offset, block_m, block_n, rule,
                           band_sinks=0, band_window=0):
    check_qkv(q, k, v)
    check_layout(q, kv_count, kv_index, block_m)
    check_band(q, k, bias, q_offset, band_window)
    return q.new_empty((q.shape[0], q.shape[1], q.shape[2], v.shape[3]))


# FlopCounterMode counts the op by the pairs its layout evaluates; tokred's report uses the same formula.
sparse_cost.register(torch.ops.tokred.sparse_attention)


def full_blocks(spec: tuple, num_queries: int, num_keys: int, q_offset: int, device) -> Tensor | None:
    """Blocks where the element rule of a sink_window or mask pattern (``spec`` from
    ``static_layout_spec``) holds for every (query, key): [1, 1, NQB, NKB] bool, or None where
    unknown (kind "mask": every kept block is treated as partial)."""
    kind, sinks, window, block, causal, _ = spec
    if kind == "mask":
        return None
    first, last = query_block_bounds(num_queries, block, q_offset, device)
    key_first = torch.arange(0, num_keys, block, device=device)
    key_last = key_first + block - 1  # a partial last key block is never full (keys >= Nk)
    full = (key_last[None, :] < num_keys) & torch.ones(first.shape[0], 1, dtype=torch.bool, device=device)
    if causal:
        full = full & (key_last[None, :] <= first[:, None])
    in_window = last[:, None] - key_first[None, :] < window
    if not causal:
        in_window = in_window & (key_last[None, :] <= first[:, None])
    full = full & (in_window | (key_last[None, :] < sinks))
    return full[None, None]


def flex_block_tensors(spec: tuple, kept: Tensor, num_queries: int, num_keys: int,
                       q_offset: int) -> tuple[Tensor, ...]:
    """flex_attention's BlockMask tensors for ``kept`` [B', H', NQB, NKB] blocks of a sink_window or
    mask pattern, full and partial blocks split as create_block_mask splits them: (kv_num_blocks,
    kv_indices, full_kv_num_blocks, full_kv_indices, q_num_blocks, q_indices, full_q_num_blocks,
    full_q_indices), the order of ``BlockMask``'s constructor arguments."""
    from torch.nn.attention.flex_attention import BlockMask

    block = spec[3]
    num_k_blocks = kept.shape[-1]
    full = full_blocks(spec, num_queries, num_keys, q_offset, kept.device)
    full = kept & full if full is not None else torch.zeros_like(kept)
    partial_count, partial_index = block_layout(kept & ~full, num_k_blocks)
    full_count, full_index = block_layout(full, num_k_blocks)
    # compute_q_blocks stays on: without the q-block index inductor's CPU flex lowering found no
    # kernel choice (NoValidChoicesError, torch 2.14).
    mask = BlockMask.from_kv_blocks(partial_count, partial_index, full_count, full_index, BLOCK_SIZE=(block, block),
                                    seq_lengths=(num_queries, num_keys))
    return (mask.kv_num_blocks, mask.kv_indices, mask.full_kv_num_blocks, mask.full_kv_indices, mask.q_num_blocks,
            mask.q_indices, mask.full_q_num_blocks, mask.full_q_indices)


# Blocks the CPU flex path takes: multiples of this (see ``use_flex_path``).
FLEX_CPU_BLOCK_MULTIPLE = 16


def use_flex_path(pattern: SparsePattern, q: Tensor, k: Tensor, v: Tensor, attn_bias: Tensor | None,
                  band: bool) -> bool:
    """True where the CPU path should be flex_attention: a graph being compiled (inductor lowers
    flex to its CPU template, measured faster than the gathered-block op on this machine, see
    bench/results/sparse_attention_speed.md), no extra bias (the op handles padding masks), and a
    pattern whose allowed set is its element rule (sink_window, mask), and no gradient to carry.

    Not where tokred's CPU kernel (sparse_cpu.cpp) runs the pattern: sink_window, where the
    kernel measured 0.4-0.65x flex's time. Not for blocks that are not a multiple of
    ``FLEX_CPU_BLOCK_MULTIPLE``. Not where the op takes
    the band path (``band``, from ``band_path_applies``): it measured faster than flex there
    (1.1-1.3x the density bound, flex ~2x). Not block_topk: flex's mask_mod defines its result
    (flex's non-inductor implementation, run by backends like aot_eager, evaluates mask_mod
    everywhere and ignores the block list), so the selection would have to be looked up in
    mask_mod, and inductor's CPU flex lowering found no kernel for a mask_mod reading a tensor
    computed in the graph (NoValidChoicesError, torch 2.14).
    """
    tracing = torch.compiler.is_compiling() or detect_fake_mode((q,)) is not None
    # flex has no backward on CPU: a graph traced with gradients (a model called without no_grad)
    # takes the gathered-block op
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    # nor for ONNX: the BlockMask construction sorts stably, which the exporter cannot lower
    exporting = torch.onnx.is_in_onnx_export()
    # nor for blocks that are not a multiple of 16: torch 2.14's CPU flex kernel returned wrong
    # values (NaN, or errors of O(1)) for blocks of 8 and 24 (16, 32, 48, 64, 128 measured right)
    flex_block = pattern.block % FLEX_CPU_BLOCK_MULTIPLE == 0
    # nor where tokred's CPU kernel runs the op (sink_window): it measured faster than flex
    own_kernel = sparse_cpu.applies(q) and cpu_kernel_rule(pattern)
    return (tracing and not needs_grad and not exporting and flex_block and not q.is_cuda
            and attn_bias is None and pattern.kind != "block_topk" and not band and not own_kernel)


@assume_constant_result
def cpu_kernel_rule(pattern: SparsePattern) -> bool:
    """Whether the pattern's element rule is one the CPU kernel runs (``interval_rule``); a constant
    for Dynamo, like ``element_rule``."""
    return interval_rule(pattern_rule(pattern)) is not None


def cpu_runtime(pattern: SparsePattern) -> str:
    """Which code runs ``pattern`` on CPU, for the rewrite report."""
    if not cpu_kernel_rule(pattern):
        return "on CPU: torch ops (flex_attention inside inductor graphs)"
    usable, reason = sparse_cpu.kernel_status()
    return "on CPU: tokred's C++ kernel" if usable else f"on CPU: torch ops (the C++ kernel is {reason})"


def band_path_applies(pattern: SparsePattern, q: Tensor, k: Tensor, q_offset: int,
                      attn_bias: Tensor | None) -> bool:
    """Whether the op runs sink_window as ``sink_window_band_attention`` on CPU: a causal prefill
    (q_offset 0, as many queries as keys, no bias) with a window of at least one key. Decided here
    once, from the pattern and shapes; the op is told (its band_sinks/band_window arguments)."""
    return (pattern.kind == "sink_window" and pattern.causal and pattern.window > 0 and q_offset == 0
            and q.shape[2] == k.shape[2] and attn_bias is None and not q.is_cuda)


def flex_cpu_attention(q: Tensor, k: Tensor, v: Tensor, pattern: SparsePattern, rule: str, scale: float,
                       q_offset: int) -> Tensor:
    """torch's flex_attention over the pattern's kept blocks (a sink_window or mask pattern; the
    BlockMask tensors from ``static_layout``)."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    blocks = static_layout(q, k, q_offset, static_layout_spec(pattern, rule), True)
    rule_fn = sparse_rule.rule_fn(rule)

    def mask_mod(b, h, q_idx, kv_idx):
        return kv_idx >= 0 if rule_fn is None else rule_fn(b, h, q_idx + q_offset, kv_idx)

    mask = BlockMask((q.shape[2], k.shape[2]), *blocks, BLOCK_SIZE=layout_blocks(pattern), mask_mod=mask_mod)
    return flex_attention(q, k, v, block_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def sparse_attention(q: Tensor, k: Tensor, v: Tensor, pattern: SparsePattern, scale: float | None = None,
                     q_offset: int | None = None, attn_bias: Tensor | None = None) -> Tensor:
    """Sparse attention with ``pattern``: q [B, H, Nq, D], k/v [B, Hkv, Nk, D/Dv] -> [B, H, Nq, Dv].

    Takes the block layout (sink_window, mask: ``static_layout``, once per shape; block_topk: its
    selection from q and k) and rule, then runs, by where it is:
    * CUDA: ``torch.ops.tokred.sparse_attention`` -> the generated Triton kernel;
    * CPU inside a graph being compiled (Dynamo or the aot_autograd trace of a rewritten graph),
      no ``attn_bias``, a mask pattern (or sink_window but its causal prefill where the C++ kernel
      is not built): flex_attention with the same blocks (``flex_cpu_attention``);
    * CPU otherwise: the op's CPU paths (``sparse_attention_blocks``: the C++ kernel for
      block_topk and sink_window, else torch), told here whether sink_window takes the band path;
    * with gradients to carry (a model called without ``torch.no_grad``): the dense masked
      reference, which autograd differentiates (the op has no backward).
    Traceable by torch.compile (static and dynamic shapes) and by the ONNX exporter. One known
    failure, in torch 2.14's inductor rather than here: this function compiled with dynamic=True
    by inductor on CPU, for a mask pattern whose block is a multiple of 16 (the flex path), fails
    in inductor's CPU flex lowering; Dynamo shows the symbolic lengths as ints, so this function
    cannot route that case to the op. tokred's pass skips mask rules at symbolic lengths.
    """
    if not isinstance(pattern, SparsePattern):
        raise ValueError(f"tokred option '{OPTION}' must be a SparsePattern, got {type(pattern).__name__}")
    if not torch.compiler.is_compiling():
        check_qkv(q, k, v)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return sparse_attention_reference(q, k, v, pattern, scale, q_offset, attn_bias)
    scale, q_offset = resolve(q, k, scale, q_offset)
    band = band_path_applies(pattern, q, k, q_offset, attn_bias)
    if use_flex_path(pattern, q, k, v, attn_bias, band):
        return flex_cpu_attention(q, k, v, pattern, element_rule(pattern), scale, q_offset)
    kv_count, kv_index, rule = pattern_layout(pattern, q, k, q_offset)
    block_m, block_n = layout_blocks(pattern)
    band_sinks, band_window = (pattern.sinks, pattern.window) if band else (0, 0)
    return sparse_attention_op(q, k, v, kv_count, kv_index, additive_bias(attn_bias, q, k), scale, q_offset,
                               block_m, block_n, rule, band_sinks, band_window)


# ----------------------------------------------------------------------------------------------
# ONNX
# ----------------------------------------------------------------------------------------------


def onnx_lowering():
    """ONNX translation of ``tokred::sparse_attention``: dense masked attention in standard ops.

    The element mask is (key block listed in kv_index[:kv_count]) & rule & (key < Nk), the rule
    lowered by ``sparse_rule.eval_rule_onnx``; scores in fp32, rows with no allowed key give 0.
    """
    import onnx
    from onnxscript import opset18 as op

    def ints(*values):
        return op.Constant(value_ints=list(values))

    def size(x, axis):  # scalar int64
        return op.Squeeze(op.Shape(x, start=axis, end=axis + 1), ints(0))

    def arange(n):
        return op.Range(op.Constant(value_int=0), n, op.Constant(value_int=1))

    def tokred_sparse_attention(q, k, v, kv_count, kv_index, bias, scale: float, q_offset: int, block_m: int,
                                block_n: int, rule: str, band_sinks: int = 0, band_window: int = 0):
        # band_sinks/band_window only pick a CPU strategy: layout & rule give the same allowed set
        float_type = onnx.TensorProto.FLOAT
        qf, kf, vf = (op.Cast(t, to=float_type) for t in (q, k, v))
        heads, kv_heads = size(q, 1), size(k, 1)
        num_queries, num_keys = size(q, 2), size(k, 2)
        group = op.Div(heads, kv_heads)

        def repeat_heads(t):  # [B, Hkv, S, D] -> [B, H, S, D], head h reads h // group
            expanded = op.Expand(op.Unsqueeze(t, ints(2)),
                                 op.Concat(op.Shape(t, start=0, end=2), op.Reshape(group, ints(1)),
                                           op.Shape(t, start=2), axis=0))
            return op.Reshape(expanded, op.Concat(op.Shape(t, start=0, end=1), op.Reshape(heads, ints(1)),
                                                  op.Shape(t, start=2), axis=0))

        kf, vf = repeat_heads(kf), repeat_heads(vf)
        scores = op.Mul(op.MatMul(qf, op.Transpose(kf, perm=[0, 1, 3, 2])), op.Constant(value_float=scale))

        # Kept blocks [B, H, NQB, NKB] from the layout, then per element via the block of each row/key.
        num_k_blocks = op.Div(op.Add(num_keys, op.Constant(value_int=block_n - 1)), op.Constant(value_int=block_n))
        entries = op.Less(arange(size(kv_index, 3)), op.Unsqueeze(op.Cast(kv_count, to=onnx.TensorProto.INT64),
                                                                   ints(3)))
        hits = op.And(op.Equal(op.Unsqueeze(op.Cast(kv_index, to=onnx.TensorProto.INT64), ints(4)),
                               arange(num_k_blocks)), op.Unsqueeze(entries, ints(4)))
        kept = op.ReduceMax(op.Cast(hits, to=onnx.TensorProto.INT32), ints(3), keepdims=0)  # [B, H, NQB, NKB]
        q_rows = arange(num_queries)
        k_cols = arange(num_keys)
        kept = op.Gather(kept, op.Div(q_rows, op.Constant(value_int=block_m)), axis=2)
        kept = op.Gather(kept, op.Div(k_cols, op.Constant(value_int=block_n)), axis=3)
        allowed = op.Cast(kept, to=onnx.TensorProto.BOOL)
        if rule:
            names = {"b": op.Reshape(arange(size(q, 0)), ints(-1, 1, 1, 1)),
                     "h": op.Reshape(arange(heads), ints(1, -1, 1, 1)),
                     "q_idx": op.Reshape(op.Add(q_rows, op.Constant(value_int=q_offset)), ints(1, 1, -1, 1)),
                     "kv_idx": op.Reshape(k_cols, ints(1, 1, 1, -1))}
            allowed = op.And(allowed, sparse_rule.eval_rule_onnx(rule, op, names))
        neg_inf = op.Constant(value_float=float("-inf"))
        if bias is not None:
            scores = op.Add(scores, op.Cast(bias, to=float_type))
            allowed = op.And(allowed, op.Greater(op.Cast(bias, to=float_type), neg_inf))
        scores = op.Where(allowed, scores, neg_inf)
        weights = op.Softmax(scores, axis=-1)
        row_open = op.Cast(op.ReduceMax(op.Cast(allowed, to=onnx.TensorProto.INT32), ints(-1), keepdims=1),
                           to=onnx.TensorProto.BOOL)
        out = op.Where(row_open, op.MatMul(weights, vf), op.Constant(value_float=0.0))
        return op.CastLike(out, q)

    return tokred_sparse_attention
