"""Attention sites, projection sites and blocks of a Dynamo (torch-level) graph.

An attention site is an SDPA call or the written-out chain ``softmax(f(q @ k^T)) @ v`` (matched
rule by rule in :mod:`.logits`: scales, masks, biases, soft-caps, temperatures).
q, k, v are traced back through layout ops (view/reshape/permute/transpose/unbind/split/...),
GQA's repeat_kv (expand + reshape) and rotary arithmetic to the projections that made them.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx

from tokred.rewriter.analysis.graph import (
    DROPOUT_FUNCS, LINEAR_TARGETS, MATMUL_TARGETS, SDPA_TARGETS, SOFTMAX_FUNCS, arg, common_module_path, is_call,
    is_parameter_like, module_path, shape_of, size_key,
)
from tokred.rewriter.analysis.logits import (
    LOGIT_OP_WORDS, key_operand, match_logits, match_weights_matmul, query_scale, scalar_value,
)

# ops that move data around without mixing tokens or channels
LAYOUT_METHODS = {"view", "reshape", "permute", "transpose", "contiguous", "unflatten", "flatten",
                  "to", "float", "half", "type_as", "clone", "expand", "squeeze", "unsqueeze"}
LAYOUT_FUNCS = {torch.reshape, torch.permute, torch.transpose, torch.flatten, torch.unflatten,
                torch.squeeze, torch.unsqueeze}
SPLIT_CALLS = ("unbind", torch.unbind, "split", torch.split, "chunk", torch.chunk)
# rotary embeddings: q*cos + rotate_half(q)*sin, with rotate_half = cat(-x2, x1) of slices
ROTARY_FUNCS = {operator.add, operator.mul, operator.neg, torch.cat, operator.getitem, torch.add,
                torch.mul, torch.neg}
# The leading operands of the calls the analysis, the FLOP count and the passes read by position
# (node.args[i]), by their keyword names: models may pass them by keyword (timm's Eva:
# F.linear(x, weight=w, bias=b); transformers' Mamba: F.conv1d(input=x, weight=w, ...)).
OPERAND_NAMES = {
    **{target: ("input", "weight", "bias") for target in LINEAR_TARGETS},
    **{target: ("query", "key", "value") for target in SDPA_TARGETS},
    torch.addmm: ("input", "mat1", "mat2"),
    torch.matmul: ("input", "other"),
    torch.bmm: ("input", "mat2"),
    **{conv: ("input", "weight", "bias") for conv in (torch.conv1d, torch.conv2d, torch.conv3d, F.conv1d, F.conv2d,
                                                      F.conv3d)},
}


@dataclass
class ProjectionSite:
    """A linear-like node: linear, addmm (GPT-2 Conv1D), or matmul with a weight placeholder."""

    node: fx.Node
    weight: fx.Node
    in_features: int
    out_features: int
    module: str
    role: str = "other"  # q, k, v, qkv, kv, out, mlp_in, mlp_out, lm_head, other


@dataclass
class AttentionSite:
    """The attention core of one layer, with everything a pass needs to rewrite it.

    q, k, v: the tensors entering the core, [B, H, Nq, D] / [B, Hkv, Nk, D] (k as given to SDPA;
    for the manual chain ``k`` is the key before its transpose). ``out`` is the core's output
    [B, H, Nq, Dv]; ``out_proj`` the projection that consumes it; ``residual_add`` the add of its
    result into the residual stream.
    """

    kind: str  # "sdpa" | "manual"
    node: fx.Node  # the SDPA call, or the final (attn @ v) matmul
    q: fx.Node
    k: fx.Node
    v: fx.Node
    module: str
    heads: int
    kv_heads: int
    head_dim: int
    q_len: int
    kv_len: int
    batch: int
    causal: bool = False
    mask: Optional[fx.Node] = None  # the mask nearest q @ k^T (or SDPA's attn_mask); all of them: masks
    # every mask the logits go through, as (kind, node): "sdpa" (SDPA's attn_mask: bool = may
    # attend, float = added), "add" (added to the logits), "fill" (masked_fill: True = blocked) or
    # "keep" (where(m, logits, fill): True = kept); tokens.attention_bias reads them as one bias
    masks: tuple = ()
    scale: Optional[float] = None
    softmax: Optional[fx.Node] = None
    scores: Optional[fx.Node] = None  # q @ k^T (manual chain)
    # manual chain: the LogitSteps between q @ k^T and softmax that are neither a scale nor a mask
    # (a tanh soft-cap, a learned temperature, a second product of the query); a pass that
    # recomputes plain scaled logits skips them
    logit_ops: tuple = ()
    gqa: bool = False
    q_proj: Optional[fx.Node] = None
    k_proj: Optional[fx.Node] = None
    v_proj: Optional[fx.Node] = None
    out_proj: Optional[fx.Node] = None
    residual_add: Optional[fx.Node] = None
    layer: Optional[int] = None
    skip_reason: str = ""
    key_layout: str = ""  # why k is not [B, H, N, D] (a key laid out [B, H, D, N]); "" when it is
    role: str = "self-attention"  # attention_role: self-attention, cached decode, class, pooled-KV, cross

    @property
    def self_attention(self) -> bool:
        return size_key(self.q_len) == size_key(self.kv_len) and (self.q_proj is None or self.k_proj is None or
                                              _same_input(self.q_proj, self.k_proj))


@dataclass
class Block:
    """One transformer block on the residual stream.

    input:  the residual stream entering the block (feeds the attention branch and its residual add)
    mid:    the stream after the attention residual add (post-norm: after its norm); None in a
            parallel-residual block, which has no stream between its attention and its MLP
    output: the stream after the MLP residual add (post-norm: after its norm); None if not found

    A parallel-residual block (GPT-J, Phi, Falcon, GPT-NeoX: ``x + attn(ln(x)) + mlp(ln(x))``)
    has ``parallel`` set: its attention and MLP both read the block input; ``attn_add`` and
    ``mlp_add`` are the adds that bring each branch in, ``output`` the stream after both.
    """

    index: int
    attention: AttentionSite
    input: fx.Node
    attn_add: fx.Node
    mid: Optional[fx.Node]
    mlp_add: Optional[fx.Node] = None
    output: Optional[fx.Node] = None
    module: str = ""
    post_norm: bool = False
    parallel: bool = False
    # blocks chained on one residual stream share a stack: an encoder and its decoder, or two
    # towers, or stages with a pooling between them (another token count) are separate stacks
    stack: int = 0

    @property
    def unsupported(self) -> str:
        """Why a cut between this block's attention and its MLP (the local merge's) cannot be made
        ("" if it can try); a cut after the block (prune's, a global merge's in a parallel block)
        needs only ``output``."""
        return PARALLEL_RESIDUAL if self.parallel else ""


PARALLEL_RESIDUAL = ("parallel-residual block (attention and MLP read the same input): no stream between "
                     "them to merge on (the global mode merges after the block)")


def _same_input(a: fx.Node, b: fx.Node) -> bool:
    return a.args[0] is b.args[0] if a.args and b.args else False


# ----------------------------------------------------------------------------- normal form

def positional_operands(graph: fx.Graph) -> int:
    """Move the leading operands of linear, addmm, matmul, bmm and SDPA calls given by keyword into
    the positional arguments (``linear(x, weight=w, bias=b)`` -> ``linear(x, w, b)``), in place.

    The call is the same; everything that reads a projection's weight or an attention's q/k/v as
    ``node.args[i]`` then reads it whichever way the model wrote the call. Returns the calls changed.
    """
    changed = 0
    for node in graph.nodes:
        names = OPERAND_NAMES.get(node.target) if node.op == "call_function" else None
        if not names or not node.kwargs:
            continue
        args, kwargs = list(node.args), dict(node.kwargs)
        while len(args) < len(names) and names[len(args)] in kwargs:
            args.append(kwargs.pop(names[len(args)]))
        if len(args) != len(node.args):
            node.args, node.kwargs = tuple(args), kwargs
            changed += 1
    return changed


# ----------------------------------------------------------------------------- tracing helpers

def skip_layout(node, max_steps: int = 32) -> fx.Node:
    """Walk back through layout ops (single tensor input) to the node that made the data."""
    for _ in range(max_steps):
        if not isinstance(node, fx.Node):
            return node
        if is_call(node, *LAYOUT_METHODS, *LAYOUT_FUNCS) or (
                node.op == "call_function" and node.target in DROPOUT_FUNCS):
            node = node.args[0]
            continue
        if node.target is operator.getitem and isinstance(node.args[0], fx.Node):
            src = node.args[0]
            if is_call(src, *SPLIT_CALLS) or (isinstance(node.args[1], (slice, tuple)) and
                                              _is_noop_index(node.args[1])):
                node = src.args[0] if is_call(src, *SPLIT_CALLS) else src
                continue
        return node
    return node


def _is_noop_index(idx) -> bool:
    items = idx if isinstance(idx, tuple) else (idx,)
    return all(i is None or i is Ellipsis or (isinstance(i, slice) and i == slice(None)) for i in items)


def projection_input(node: fx.Node) -> fx.Node:
    """The activation a projection reads, before GPT-2 Conv1D's ``view(-1, C)``."""
    x = node.args[1] if node.target is torch.addmm else node.args[0]
    if is_call(x, "view", "reshape", torch.reshape) and isinstance(x.args[0], fx.Node):
        return x.args[0]
    return x


def is_projection_node(node) -> bool:
    """A linear (input, weight), addmm (bias, input, weight) or matmul by a parameter, with its
    operands positional (see :func:`positional_operands`)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    if node.target in LINEAR_TARGETS:
        return len(node.args) >= 2 and isinstance(node.args[1], fx.Node)
    if node.target is torch.addmm:
        return len(node.args) >= 3 and isinstance(node.args[2], fx.Node)
    if node.target in MATMUL_TARGETS:
        b = node.args[1] if len(node.args) >= 2 else None
        return isinstance(b, fx.Node) and is_parameter_like(b)
    return False


def trace_projection(node, max_depth: int = 48) -> Optional[fx.Node]:
    """The projection that produced ``node``: back through layout, GQA repeat and rotary ops.

    Rotary arithmetic mixes the tensor with cos/sin tables (parameter- or position-derived); the
    walk follows the operand that is not a table, i.e. the one that reaches a projection.
    """
    seen = set()
    frontier = [node]
    while frontier and max_depth > 0:
        max_depth -= 1
        cur = skip_layout(frontier.pop(0))
        if not isinstance(cur, fx.Node) or cur in seen:
            continue
        seen.add(cur)
        if is_projection_node(cur):
            return cur
        if cur.op == "call_function" and (cur.target in ROTARY_FUNCS or cur.target in MATMUL_TARGETS) \
                or is_call(cur, "add", "mul", "neg", "__getitem__"):
            frontier.extend(a for a in cur.all_input_nodes if not is_parameter_like(a))
    return None


# ----------------------------------------------------------------------------- attention sites

def find_sdpa_site(node: fx.Node) -> AttentionSite:
    q, k, v = node.args[0], node.args[1], node.args[2]
    mask = arg(node, 3, "attn_mask")
    causal = bool(arg(node, 5, "is_causal", False)) or _looks_causal(mask)
    scale = arg(node, 6, "scale")
    gqa = bool(node.kwargs.get("enable_gqa", False))
    site = _make_site("sdpa", node, q, k, v, mask, causal, scalar_value(scale), None, None, gqa)
    site.masks = (("sdpa", mask),) if isinstance(mask, fx.Node) else ()
    return site


def find_manual_site(softmax: fx.Node) -> Optional[AttentionSite]:
    """``softmax(f(q @ k^T)) [dropout] @ v`` around a softmax node (see :mod:`.logits`), or None."""
    chain = match_logits(softmax)
    found = match_weights_matmul(softmax) if chain is not None else None
    if found is None:
        return None
    out, _ = found
    scores = chain.scores
    k, key_factor = key_operand(scores.args[1])
    q = scores.args[0]
    # the scalings nearer q @ k^T than a soft-cap's tanh act on q @ k^T; the others after the tanh
    last_tanh = max((i for i, s in enumerate(chain.steps) if s.kind == "softcap"), default=-1)
    factors = [s.factor for s in chain.steps[last_tanh + 1:] if s.kind == "scale"]
    pre_scaled = query_scale(q)
    if pre_scaled is not None:
        factors.append(pre_scaled)
    if key_factor != 1.0:
        factors.append(key_factor)
    scale = math.prod(factors) if factors else None
    masks = tuple((s.kind, s.side) for s in chain.steps if s.kind in ("add", "fill", "keep")
                  and isinstance(s.side, fx.Node))
    mask = masks[-1][1] if masks else None  # the mask nearest q @ k^T
    causal = any(_looks_causal(m) for _, m in masks)
    site = _make_site("manual", out, q, k, out.args[1], mask, causal, scale, softmax, scores, False)
    site.logit_ops = tuple(chain.of_kind(*LOGIT_OP_WORDS))
    site.masks = masks
    return site


def logit_ops_text(site: AttentionSite) -> str:
    """The site's logit ops in words: "a tanh soft-cap", "a learned temperature", ..."""
    return " and ".join(dict.fromkeys(LOGIT_OP_WORDS[step.kind] for step in site.logit_ops))


def _looks_causal(mask) -> bool:
    """A mask built from tril/triu or an index comparison (q_idx >= kv_idx) within a few steps."""
    if not isinstance(mask, fx.Node):
        return False
    frontier, seen = [mask], set()
    while frontier and len(seen) < 64:
        cur = frontier.pop()
        if not isinstance(cur, fx.Node) or cur in seen:
            continue
        seen.add(cur)
        if is_call(cur, torch.tril, torch.triu, "tril", "triu", "triu_", "tril_"):
            return True
        if is_call(cur, operator.le, operator.ge, operator.lt, operator.gt, torch.le, torch.ge, "le", "ge"):
            a, b = cur.args[0], cur.args[1]
            if isinstance(a, fx.Node) and isinstance(b, fx.Node):
                sa, sb = shape_of(a), shape_of(b)
                if sa and sb and len(sa) == len(sb) and sa != sb:
                    return True
        frontier.extend(cur.all_input_nodes)
    return False


def _make_site(kind, node, q, k, v, mask, causal, scale, softmax, scores, gqa) -> AttentionSite:
    qs, ks = shape_of(q), shape_of(k)
    kv_heads = ks[-3] if ks and len(ks) >= 3 else 1
    # eager GQA (repeat_kv): k is expand+reshape of [B, Hkv, N, D]; report the pre-repeat heads
    pre = _pre_repeat_heads(k)
    if pre is not None:
        kv_heads, gqa = pre, True
    paths = [module_path(n) for n in (node, softmax, scores) if isinstance(n, fx.Node)]
    module = common_module_path(paths) if kind == "manual" else module_path(node)
    q_len, kv_len = qs[-2], ks[-2]
    scores_shape = shape_of(scores) if isinstance(scores, fx.Node) else None
    if scores_shape is not None and len(scores_shape) >= 2:  # the logits say it, whatever k's layout
        q_len, kv_len = scores_shape[-2], scores_shape[-1]
    site = AttentionSite(
        kind=kind, node=node, q=q, k=k, v=v, module=module,
        heads=qs[-3] if len(qs) >= 3 else 1, kv_heads=kv_heads, head_dim=qs[-1],
        q_len=q_len, kv_len=kv_len, batch=qs[0] if len(qs) >= 4 else 1, causal=causal, mask=mask,
        scale=scale, softmax=softmax, scores=scores, gqa=gqa or kv_heads != (qs[-3] if len(qs) >= 3 else 1),
    )
    site.q_proj, site.k_proj, site.v_proj = trace_projection(q), trace_projection(k), trace_projection(v)
    known = all(isinstance(d, int) for d in (*ks[-2:], kv_len, qs[-1]))
    if known and len(ks) >= 2 and (ks[-2], ks[-1]) != (kv_len, qs[-1]):
        site.key_layout = (f"the key enters the attention laid out {list(ks)} (already transposed, or its token "
                           f"axis elsewhere); tokred reads keys as [B, H, N, D]")
        site.skip_reason = site.key_layout
    return site


def _pre_repeat_heads(k) -> Optional[int]:
    """Heads before repeat_kv: reshape(expand(x[:, :, None], B, Hkv, n_rep, N, D), B, H, N, D)."""
    if not is_call(k, "reshape", "view", torch.reshape):
        cur = k
    else:
        cur = k.args[0]
    if is_call(cur, "contiguous"):
        cur = cur.args[0]
    if is_call(cur, "expand"):
        src = shape_of(cur.args[0])
        out = shape_of(cur)
        if src and out and len(out) == 5 and src[2] == 1 and out[2] > 1:
            return out[1]
    if is_call(cur, "repeat_interleave", torch.repeat_interleave):
        src = shape_of(cur.args[0])
        return src[1] if src and len(src) == 4 else None
    return None


def find_attention_sites(graph: fx.Graph) -> list:
    """All attention sites of ``graph``, in graph order."""
    sites = []
    for node in graph.nodes:
        if node.op == "call_function" and node.target in SDPA_TARGETS:
            sites.append(find_sdpa_site(node))
        elif is_call(node, *SOFTMAX_FUNCS, "softmax"):
            site = find_manual_site(node)
            if site is not None:
                sites.append(site)
    return sites


# ----------------------------------------------------------------------------- projections

def find_projections(graph: fx.Graph) -> list:
    """Every linear-like node with its weight and feature sizes (role filled in later)."""
    out = []
    for node in graph.nodes:
        if not is_projection_node(node):
            continue
        if node.target is torch.addmm:  # addmm(bias, x2d, weight[in, out])
            w = node.args[2]
            ws = shape_of(w)
            if not ws or len(ws) != 2:
                continue
            fin, fout = ws
        elif node.target in LINEAR_TARGETS:
            w = node.args[1]
            ws = shape_of(w)
            if not ws or len(ws) != 2:
                continue
            fout, fin = ws
        else:
            w = node.args[1]
            ws = shape_of(w)
            if not ws or len(ws) != 2:
                continue
            fin, fout = ws
        out.append(ProjectionSite(node=node, weight=w, in_features=fin, out_features=fout,
                                  module=module_path(node)))
    return out
