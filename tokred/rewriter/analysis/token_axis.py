"""The token axis: for every tensor node, which of its dimensions run over tokens.

A dataflow over the graph, forward and backward until nothing changes:
- seeds: the query/key/value tensors of every attention site (dim -2), user inputs and
  ``arange``/slices whose length equals a token count;
- forward: elementwise ops broadcast it, linear keeps it, view/reshape/permute/transpose move it,
  ``q @ k^T`` has a query and a key token axis, ``cat`` along it joins prefix tokens;
- backward: through layout, elementwise, norm and linear ops, so that e.g. the patch embedding of a
  ViT (born from a conv, where no size says "tokens") is found from the attention that reads it.

A token dim is recorded as an int (a dim of the node's shape). A dim that holds tokens flattened
with outer dims (GPT-2's ``x.view(-1, C)``: size B*N) is recorded too; it has size k*N.
Tuple-valued nodes (unbind, split, chunk) get a tuple of per-element sets.

Sizes are compared as size keys (``graph.size_key``): ints, or sympy expressions in a dynamic
graph, so that a symbolic token count (``s27``, flattened ``s52*s27``) is followed like a static
one, and no comparison evaluates a symbolic size.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import fx

from tokred.compat import torch_api
from tokred.rewriter.analysis.graph import (
    DROPOUT_FUNCS, LAYER_NORM_FUNCS, LINEAR_TARGETS, RMS_NORM_FUNCS, SDPA_TARGETS,
    example_value, is_call, is_matmul, is_state, shape_keys,
)

Dims = frozenset
EMPTY: Dims = frozenset()

RESHAPE_METHODS = {"view", "reshape", "flatten", "unflatten", "view_as", "reshape_as", "squeeze",
                   "unsqueeze"}
RESHAPE_FUNCS = {torch.reshape, torch.flatten, torch.unflatten, torch.squeeze, torch.unsqueeze}
# ops whose output is an elementwise, broadcasting function of their tensor inputs
ELEMENTWISE_FUNCS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.pow,
    operator.neg, operator.and_, operator.or_, operator.invert, operator.eq, operator.ne, operator.lt,
    operator.le, operator.gt, operator.ge, operator.iadd, operator.imul, operator.isub,
    torch.add, torch.sub, torch.mul, torch.div, torch.pow, torch.neg, torch.exp, torch.log,
    torch.rsqrt, torch.sqrt, torch.tanh, torch.sigmoid, torch.where, torch.masked_fill, torch.abs,
    torch.clamp, torch.cos, torch.sin, torch.erf, torch.maximum, torch.minimum, torch.logical_and,
    torch.logical_or, torch.logical_not, torch.eq, torch.ne, torch.lt, torch.gt, torch.le, torch.ge,
    F.gelu, F.relu, F.silu, F.softmax, F.log_softmax, F.sigmoid, F.tanh, torch.softmax,
    *torch_api.ACTIVATION_FUNCS,
    torch.relu, torch.nn.functional.hardtanh, torch.tril, torch.triu,
    *DROPOUT_FUNCS, *LAYER_NORM_FUNCS, *RMS_NORM_FUNCS,
}
ELEMENTWISE_METHODS = {
    "add", "sub", "mul", "div", "pow", "neg", "exp", "log", "rsqrt", "sqrt", "tanh", "sigmoid",
    "masked_fill", "masked_fill_", "float", "half", "bfloat16", "to", "type", "type_as", "contiguous",
    "clone", "detach", "bool", "int", "long", "abs", "clamp", "cos", "sin", "softmax", "log_softmax",
    "relu", "gelu", "silu", "__and__", "__or__", "eq", "ne", "lt", "gt", "le", "ge", "add_", "mul_",
    "div_", "tril", "triu", "expand", "expand_as", "sqrt", "erf", "logical_not", "__invert__",
}
REDUCTION_METHODS = {"mean", "sum", "amax", "amin", "max", "min", "norm", "var", "std", "argmax"}
REDUCTION_FUNCS = {torch.mean, torch.sum, torch.amax, torch.amin, torch.max, torch.min, torch.var,
                   torch.std, torch.norm, torch.argmax}
CREATION_FUNCS = {torch.zeros, torch.ones, torch.full, torch.empty, torch.randn, torch.rand}
SELECTIONS = ("topk", torch.topk, "sort", torch.sort)  # (values, indices) along one dim


class TokenAxes:
    """Token dims of every node; ``axes.of(node)`` gives a frozenset of dims (empty if none)."""

    def __init__(self, dims: dict, token_counts: set):
        self.dims = dims
        self.token_counts = token_counts

    def of(self, node: Any, element: Optional[int] = None) -> Dims:
        value = self.dims.get(node, EMPTY) if isinstance(node, fx.Node) else EMPTY
        if isinstance(value, tuple):
            return value[element] if element is not None and element < len(value) else EMPTY
        return value

    def carries_tokens(self, node: Any) -> bool:
        value = self.dims.get(node, EMPTY) if isinstance(node, fx.Node) else EMPTY
        return any(value) if isinstance(value, tuple) else bool(value)


# ----------------------------------------------------------------------------- shape helpers

def _norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def broadcast_map(in_shape: tuple, in_dims: Dims, out_shape: tuple) -> Dims:
    """Right-aligned broadcasting: the dims of ``out`` that an input's token dims land on."""
    off = len(out_shape) - len(in_shape)
    return frozenset(d + off for d in in_dims
                     if 0 <= d + off < len(out_shape) and d < len(in_shape)
                     and in_shape[d] == out_shape[d + off] and in_shape[d] != 1)


def broadcast_shape(shapes: list) -> tuple:
    """The broadcast of shapes given as size keys (``torch.broadcast_shapes`` takes no sympy sizes)."""
    ndim = max(len(s) for s in shapes)
    out = []
    for d in range(ndim):
        sizes = {s[d - ndim + len(s)] for s in shapes if d - ndim + len(s) >= 0} - {1}
        out.append(next(iter(sizes)) if sizes else 1)  # two different sizes would not broadcast
    return tuple(out)


def reshape_map(in_shape: tuple, in_dims: Dims, out_shape: tuple, token_counts: set = frozenset()) -> Dims:
    """Token dims after a contiguous reshape: a dim keeps its identity by its inner element count.

    ``in_shape[d]`` with ``prod(in_shape[d+1:]) == inner`` lands on the out dim with the same inner
    count and the same size, or a multiple of it (merged with outer dims, e.g. B*N), or a token count
    that divides it (a merged B*N dim split back into B, N).
    """
    out = set()
    for d in in_dims:
        if d >= len(in_shape) or in_shape[d] == 1:
            continue
        inner, outer, size = math.prod(in_shape[d + 1:]), math.prod(in_shape[:d]), in_shape[d]
        for counts, count, split in ((lambda e: math.prod(out_shape[e + 1:]), inner, lambda s: s in token_counts),
                                     # the same outer element count: merged with inner dims ([B*N, k] ->
                                     # [B*N*k], MoE's top-k choices flattened) or split back with the
                                     # tokens outer (B*N of them: a multiple of a token count)
                                     (lambda e: math.prod(out_shape[:e]), outer,
                                      lambda s: any(s % t == 0 for t in token_counts))):
            e = next((e for e in range(len(out_shape)) if counts(e) == count and out_shape[e] != 1 and (
                out_shape[e] % size == 0 or (size % out_shape[e] == 0 and split(out_shape[e])))), None)
            if e is not None:
                out.add(e)
                break
    return frozenset(out)


def permute_map(in_dims: Dims, perm: list) -> Dims:
    """Token dims after ``permute(perm)``: out dim i holds in dim perm[i]."""
    return frozenset(i for i, p in enumerate(perm) if p in in_dims)


def inverse_permute_map(out_dims: Dims, perm: list) -> Dims:
    return frozenset(perm[i] for i in out_dims if i < len(perm))


def transpose_perm(ndim: int, d0: int, d1: int) -> list:
    perm = list(range(ndim))
    d0, d1 = _norm_dim(d0, ndim), _norm_dim(d1, ndim)
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return perm


def _perm_of(node: fx.Node, ndim: int) -> Optional[list]:
    if is_call(node, "permute", torch.permute):
        dims = node.args[1:]
        if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
            dims = dims[0]
        return [_norm_dim(int(d), ndim) for d in dims]
    if is_call(node, "transpose", torch.transpose, "swapaxes", torch.swapaxes):
        return transpose_perm(ndim, int(node.args[1]), int(node.args[2]))
    if is_call(node, "t", torch.t) and ndim == 2:
        return [1, 0]
    return None


def _tensor_args(node: fx.Node) -> list:
    return [a for a in node.all_input_nodes if shape_keys(a) is not None]


def _selected_dim(node: fx.Node) -> Dims:
    """The dim a topk takes k of ({} for a sort: it keeps every element of its dim)."""
    if not is_call(node, "topk", torch.topk):
        return EMPTY
    shape = shape_keys(node.args[0])
    dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else -1)
    return frozenset({_norm_dim(dim, len(shape))}) if shape is not None and isinstance(dim, int) else EMPTY


def _reduced_dims(node: fx.Node, ndim: int) -> Optional[tuple]:
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    if dim is None:
        return None
    if isinstance(dim, int):
        dim = (dim,)
    if not isinstance(dim, (list, tuple)) or not all(isinstance(d, int) for d in dim):
        return None
    return tuple(_norm_dim(d, ndim) for d in dim)


# ----------------------------------------------------------------------------- forward rules

def forward_dims(node: fx.Node, get: Callable, token_counts: set):
    """Token dims of ``node`` from its inputs' (``get(node_or_(node, i))``)."""
    out_shape = shape_keys(node)
    if node.op == "placeholder":
        if is_state(node) or out_shape is None:
            return EMPTY
        # user inputs: ids, masks, positions [B, N]; dim 0 is the batch
        return frozenset(d for d in range(1, len(out_shape)) if out_shape[d] in token_counts)
    if node.op != "call_function" and node.op != "call_method":
        return EMPTY
    target = node.target

    if target is operator.getitem:
        src, idx = node.args[0], node.args[1]
        if isinstance(src, fx.Node) and isinstance(idx, int) and shape_keys(src) is None:
            value = get(src)
            return value[idx] if isinstance(value, tuple) and idx < len(value) else EMPTY
        if out_shape is None or shape_keys(src) is None:
            return EMPTY
        return _getitem_dims(shape_keys(src), get(src), idx, out_shape, get, token_counts)

    if is_call(node, "unbind", torch.unbind):
        x = node.args[0]
        shape, dims = shape_keys(x), get(x)
        dim = _norm_dim(int(node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)), len(shape))
        one = frozenset(d - (d > dim) for d in dims if d != dim)
        return tuple(one for _ in range(shape[dim])) if isinstance(shape[dim], int) else EMPTY
    if is_call(node, "split", torch.split, "chunk", torch.chunk, "tensor_split"):
        x = node.args[0]
        ev = example_value(node)
        n = len(ev) if isinstance(ev, (list, tuple)) else 0
        return tuple(get(x) for _ in range(n))
    if is_call(node, *SELECTIONS):
        # (values, indices): the same dims as the input, less the dim topk takes k of (a sort,
        # a permutation along its dim, keeps it: MoE routing sorts the [k*N] expert choices)
        dims = get(node.args[0]) - _selected_dim(node)
        return dims, dims

    if out_shape is None:
        return EMPTY
    ndim = len(out_shape)

    if target in SDPA_TARGETS:
        q = node.args[0]
        return broadcast_map(shape_keys(q), get(q), out_shape)
    if target in LINEAR_TARGETS or torch_api.is_grouped_mm(target):
        x = node.args[0]
        return frozenset(d for d in get(x) if d < len(shape_keys(x)) - 1)
    if is_call(node, "argsort", torch.argsort):
        return get(node.args[0])
    if target is torch.addmm:
        a = node.args[1]
        return frozenset(d for d in get(a) if d == 0)
    if is_matmul(node):
        a, b = node.args[0], node.args[1]
        sa, sb = shape_keys(a), shape_keys(b)
        if sa is None or sb is None or len(sa) < 2 or len(sb) < 2:
            return EMPTY
        da, db = get(a), get(b)
        dims = {d for d in broadcast_map(sa[:-2], frozenset(x for x in da if x < len(sa) - 2), out_shape[:-2])}
        dims |= broadcast_map(sb[:-2], frozenset(x for x in db if x < len(sb) - 2), out_shape[:-2])
        if len(sa) - 2 in da:
            dims.add(ndim - 2)
        if len(sb) - 1 in db:
            dims.add(ndim - 1)
        return frozenset(dims)
    perm = _perm_of(node, ndim)
    if perm is not None:
        return permute_map(get(node.args[0]), perm)
    if is_call(node, *RESHAPE_METHODS, *RESHAPE_FUNCS):
        x = node.args[0]
        return reshape_map(shape_keys(x), get(x), out_shape, token_counts) if shape_keys(x) is not None else EMPTY
    if is_call(node, "cat", torch.cat, torch.concat, torch.concatenate):
        tensors = node.args[0]
        dim = _norm_dim(int(node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)), ndim)
        dims = set()
        for t in tensors:
            if isinstance(t, fx.Node) and shape_keys(t) is not None and len(shape_keys(t)) == ndim:
                dims |= get(t)
        return frozenset(d for d in dims if d < ndim)
    if is_call(node, "stack", torch.stack):
        dim = _norm_dim(int(node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)), ndim)
        dims = set()
        for t in node.args[0]:
            if isinstance(t, fx.Node):
                dims |= {d + (d >= dim) for d in get(t)}
        return frozenset(dims)
    if target in (F.embedding, torch.embedding) or is_call(node, "embedding"):
        ids = node.args[0] if target is F.embedding else node.args[1]
        return get(ids)
    if is_call(node, *REDUCTION_METHODS, *REDUCTION_FUNCS):
        x = node.args[0]
        sx = shape_keys(x)
        red = _reduced_dims(node, len(sx))
        if red is None:
            return EMPTY
        keep = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
        dims = [d for d in get(x) if d not in red]
        if not keep:
            dims = [d - sum(r < d for r in red) for d in dims]
        return frozenset(d for d in dims if d < ndim)
    if is_call(node, torch.arange):
        return frozenset({0}) if out_shape and out_shape[0] in token_counts else EMPTY
    if target in CREATION_FUNCS or is_call(node, "new_ones", "new_zeros", "new_full", "new_empty"):
        return frozenset(d for d in range(1, ndim) if out_shape[d] in token_counts)
    if is_call(node, torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like,
               torch.rand_like, torch.randn_like):
        return get(node.args[0])

    # elementwise and anything else whose tensor inputs broadcast to the output
    dims = set()
    for a in _tensor_args(node):
        sa = shape_keys(a)
        if len(sa) <= ndim and all(s == 1 or s == o for s, o in zip(sa[::-1], out_shape[::-1])):
            dims |= broadcast_map(sa, get(a), out_shape)
    return frozenset(dims)


def _getitem_dims(in_shape: tuple, in_dims: Dims, idx, out_shape: tuple, get, token_counts) -> Dims:
    """Token dims after tensor indexing ``x[idx]`` (basic and simple advanced indexing)."""
    if not isinstance(idx, tuple):
        idx = (idx,)
    n_consumed = sum(1 for i in idx if i is not None and i is not Ellipsis)
    expanded = []
    for i in idx:
        if i is Ellipsis:
            expanded += [slice(None)] * (len(in_shape) - n_consumed)
        else:
            expanded.append(i)
    expanded += [slice(None)] * (len(in_shape) - sum(1 for i in expanded if i is not None))
    advanced = [i for i in expanded if isinstance(i, fx.Node)]
    dims, out_d, in_d = set(), 0, 0
    adv_positions = [p for p, i in enumerate(expanded) if isinstance(i, fx.Node)]
    adjacent = adv_positions == list(range(adv_positions[0], adv_positions[0] + len(adv_positions))) \
        if adv_positions else True
    adv_shape = None
    if advanced:
        shapes = [shape_keys(a) for a in advanced]
        if any(s is None for s in shapes):
            return EMPTY
        adv_shape = broadcast_shape(shapes)
    adv_start = None
    for p, i in enumerate(expanded):
        if i is None:
            out_d += 1
        elif isinstance(i, int):
            in_d += 1
        elif isinstance(i, slice):
            if out_d < len(out_shape):
                # a table cut to N (``pos[:, :N]``, ``ids[:, c:c + N]``) has a stop; a slice that runs
                # to the end (Phi's and GPT-NeoX's ``q[..., r:]``, the head dims past the rotary
                # ones) is the rest of its dim, a token count only by coincidence of sizes
                if in_d in in_dims or (out_shape[out_d] in token_counts and i.stop is not None and
                                       out_shape[out_d] != in_shape[in_d] and in_d > 0):
                    dims.add(out_d)
            in_d += 1
            out_d += 1
        elif isinstance(i, fx.Node):
            if adv_start is None:
                adv_start = out_d if adjacent else 0
                if not adjacent:
                    dims = {d + len(adv_shape) for d in dims}
                out_d += len(adv_shape) if adjacent else 0
            in_d += 1
        else:
            return EMPTY
    if advanced:
        for a in advanced:
            for d in broadcast_map(shape_keys(a), get(a), adv_shape):
                dims.add(adv_start + d)
    return frozenset(d for d in dims if d < len(out_shape))


# ----------------------------------------------------------------------------- backward rules

def backward_dims(node: fx.Node, out_dims, token_counts: set) -> dict:
    """Token dims that ``node``'s output dims imply for its inputs: {input_node: dims}."""
    result = {}
    out_shape = shape_keys(node)
    if isinstance(out_dims, tuple):
        # unbind / split / chunk: element dims back to the source
        if is_call(node, "unbind", torch.unbind):
            x = node.args[0]
            sx = shape_keys(x)
            dim = _norm_dim(int(node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)), len(sx))
            union = frozenset().union(*out_dims) if out_dims else EMPTY
            result[x] = frozenset(d + (d >= dim) for d in union)
        elif is_call(node, "split", torch.split, "chunk", torch.chunk):
            result[node.args[0]] = frozenset().union(*out_dims) if out_dims else EMPTY
        elif is_call(node, *SELECTIONS):
            result[node.args[0]] = (frozenset().union(*out_dims) if out_dims else EMPTY) - _selected_dim(node)
        return result
    if not out_dims or out_shape is None:
        return result
    ndim = len(out_shape)
    target = node.target
    if node.op not in ("call_function", "call_method"):
        return result
    if target is operator.getitem and isinstance(node.args[1], int) and shape_keys(node.args[0]) is None:
        return result  # handled by the tuple producer
    if target in LINEAR_TARGETS or torch_api.is_grouped_mm(target):
        result[node.args[0]] = frozenset(d for d in out_dims if d < ndim - 1)
        return result
    perm = _perm_of(node, ndim)
    if perm is not None:
        result[node.args[0]] = inverse_permute_map(out_dims, perm)
        return result
    if is_call(node, *RESHAPE_METHODS, *RESHAPE_FUNCS):
        x = node.args[0]
        if shape_keys(x) is not None:
            result[x] = reshape_map(out_shape, out_dims, shape_keys(x), token_counts)
        return result
    if is_call(node, "cat", torch.cat, torch.concat):
        dim = _norm_dim(int(node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)), ndim)
        for t in node.args[0]:
            if isinstance(t, fx.Node) and shape_keys(t) is not None and len(shape_keys(t)) == ndim:
                result[t] = frozenset(d for d in out_dims if d == dim or shape_keys(t)[d] == out_shape[d])
        return result
    elementwise = (node.op == "call_function" and target in ELEMENTWISE_FUNCS) or \
        (node.op == "call_method" and target in ELEMENTWISE_METHODS)
    if elementwise:
        inputs = _tensor_args(node)
        if target in LAYER_NORM_FUNCS or target in RMS_NORM_FUNCS:
            inputs = inputs[:1]
        for a in inputs:
            sa = shape_keys(a)
            if len(sa) > ndim:
                continue
            off = ndim - len(sa)
            result[a] = frozenset(d - off for d in out_dims if d - off >= 0 and sa[d - off] == out_shape[d]
                                  and sa[d - off] != 1)
    return result


def setitem_dims(node: fx.Node, get: Callable) -> dict:
    """``x[index] = value`` (an in-place write, no output): the value is laid out as the index,
    so it carries the index's token dims (MoE's ``inv_perm[perm] = arange(k*N)``)."""
    if node.target is not operator.setitem or len(node.args) != 3:
        return {}
    _, index, value = node.args
    si, sv = shape_keys(index), shape_keys(value)
    if si is None or sv is None:
        return {}
    return {value: broadcast_map(si, get(index), sv)}


# ----------------------------------------------------------------------------- the dataflow

def infer_token_axes(graph: fx.Graph, token_counts: set, seeds: dict, max_rounds: int = 6) -> TokenAxes:
    """Run the forward/backward dataflow to a fixed point; ``seeds`` maps nodes to known dims."""
    dims: dict = {n: frozenset(d) for n, d in seeds.items()}

    def get(n):
        return dims.get(n, EMPTY) if isinstance(n, fx.Node) else EMPTY

    def union(old, new):
        if isinstance(old, tuple) or isinstance(new, tuple):
            if not isinstance(new, tuple):
                return old
            if not isinstance(old, tuple):
                return new
            return tuple(a | b for a, b in zip(old, new))
        return old | new

    nodes = list(graph.nodes)
    for _ in range(max_rounds):
        changed = False
        for node in nodes:
            try:
                new = forward_dims(node, get, token_counts)
            except Exception:
                new = EMPTY
            old = dims.get(node, EMPTY)
            merged = union(old, new)
            if merged != old:
                dims[node] = merged
                changed = True
        for node in reversed(nodes):
            out = dims.get(node)
            if not out and node.target is not operator.setitem:
                continue
            try:
                back = backward_dims(node, out, token_counts) if out else setitem_dims(node, get)
            except Exception:
                back = {}
            for inp, d in back.items():
                if not isinstance(inp, fx.Node) or not d:
                    continue
                old = dims.get(inp, EMPTY)
                if isinstance(old, tuple):
                    continue
                if not old >= d:
                    dims[inp] = old | d
                    changed = True
        if not changed:
            break
    return TokenAxes(dims, token_counts)
