"""Changing the token count of a graph between two points of the residual stream.

    cut = reduce_tokens(gm, facts, block, make_index, keep=M)          # keep M tokens, others exit early
    cut = cut_tokens(gm, facts, start, end, make_reduction, keep=M)   # any reducing op (e.g. merging)

inserts, after ``block``'s output (or its mid point, between attention and MLP), a node that keeps
``M`` of the ``N`` tokens (``make_index(graph, stream) -> index node [B, M]``), and makes the rest of
the graph valid for M tokens:

- every literal N on a token dim of a shape argument downstream becomes M (ARCHITECTURE.md: token axis);
- side inputs that carry the token axis (attention masks, rotary tables, position ids) are gathered
  with the same index where the reduced region reads them;
- at the end of the last block the token axis is restored (``scatter_tokens`` into the stream as it
  was at the cut): removed tokens exit early with the value they had when removed, so everything
  after the blocks (final norm, pooling, heads, the graph outputs) sees N tokens again (invariant 1).

The rewrite is checked by fake-tensor shape propagation (in a pass: once, by the driver, of the
shapes each cut predicts); on any failure the graph is restored and a
:class:`RewriteError` names the node.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable, Optional

import networkx as nx
import torch
from torch import fx

import tokred.triton_ops  # noqa: F401  (registers the tokred:: ops used below)
from tokred.compat.torch_api import FakeTensor
from tokred.rewriter import tokens
from tokred.rewriter.analysis.graph import is_symbolic, shape_keys, shape_of, size_key, to_networkx
from tokred.rewriter.analysis.literals import get_path, literals_of, set_path
from tokred.rewriter.verify import (
    PredictedShapes, check_output_contract, cut_shape, cut_size, output_signature, propagate_shapes,
)


class RewriteError(ValueError):
    """A rewrite that cannot be done; the message names the graph node and the reason."""


@dataclass
class KVOutputs:
    """Whether KV-cache outputs may leave a cut with fewer tokens (truthy) and, if not, why not."""

    allowed: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.allowed


@dataclass
class Reduction:
    """What a token-reducing op inserted at the cut gives the surgery.

    stream:  the reduced stream [B, M, C] that replaces the stream for the region
    index:   [B, M] int64: for each kept (or merged) token, the original position whose side inputs
             (mask row/column, rotary row, position id) it takes
    restore: ``restore(graph, cut_stream, end) -> node`` [B, N, C]: puts the token axis back after
             ``end`` (exit early: scatter into the stream at the cut; unmerge: gather by a map)
    leading: the first ``leading`` entries of ``index`` are positions 0 .. leading - 1 in every
             sample (prefix tokens kept in place, as prune keeps its protected tokens): a side
             input of the N - leading tokens after them (EVA's rotary table of the patch tokens)
             is then gathered at ``index[:, leading:] - leading``, and its sizes cut to M - leading
    """

    stream: fx.Node
    index: fx.Node
    restore: Callable
    leading: int = 0


@dataclass
class TokenCut:
    """What :func:`reduce_tokens` did: where, the index node, and the nodes it added."""

    stream: fx.Node  # the stream at the cut [B, N, C]
    gathered: fx.Node  # the reduced stream [B, M, C]
    index: fx.Node  # [B, M]
    restored: Optional[fx.Node]  # [B, N, C] after ``end`` (None: nothing between the cut and end)
    region: list  # nodes computed on M tokens
    side_inputs: list  # (node, dims) gathered for the region
    literals: int  # literals rewritten
    token_dims: dict  # region node -> its token dims (from the analysis, before the rewrite)
    cache_outputs: frozenset = frozenset()  # positions of graph outputs that now hold M tokens (KV cache)
    reduction: Optional[Reduction] = None  # what make_reduction gave (a pass reads its own fields back)
    leading: int = 0  # the reduction's ``leading``: token dims of N - leading hold M - leading now


def keep_index(make_index: Callable) -> Callable:
    """A reduction that keeps the tokens ``make_index(graph, stream) -> [B, M]`` gives; the others
    exit early (restored with the value they had at the cut)."""

    def make(graph: fx.Graph, stream: fx.Node) -> Reduction:
        index = make_index(graph, stream)
        with graph.inserting_after(index):
            kept = graph.call_function(tokens.gather_stream, (stream, index))
        restore = lambda g, cut_stream, end: g.call_function(tokens.scatter_stream, (cut_stream, index, end))
        return Reduction(stream=kept, index=index, restore=restore)

    return make


def reduce_tokens(gm: fx.GraphModule, facts, block, make_index: Callable, keep: int,
                  where: str = "output", example_inputs=None, verify: bool = True) -> TokenCut:
    """Keep ``keep`` tokens after ``block`` (``where``: "output" or "mid"), the others exit early and
    are restored after the last block; see the module doc."""
    stream = block.output if where == "output" else block.mid
    if stream is None:
        raise RewriteError(f"block {block.module or block.index}: no residual stream node at its {where}")
    end = facts.blocks[-1].output
    if end is None:
        raise RewriteError(f"block {facts.blocks[-1].module}: its output (MLP residual add) was not found")
    return cut_tokens(gm, facts, stream, end, keep_index(make_index), keep, example_inputs, verify)


def cut_tokens(gm: fx.GraphModule, facts, start: fx.Node, end: fx.Node, make_reduction: Callable,
               keep: Optional[int], example_inputs=None, verify: bool = True, kv_outputs=False,
               shapes: Optional[PredictedShapes] = None) -> TokenCut:
    """Run the nodes between ``start`` and ``end`` (both [B, N, C]) on ``keep`` tokens.

    ``make_reduction(graph, start) -> Reduction`` inserts the reducing op (it is inserted just
    before the first node between that reads ``start``). Everything between that reads ``start``
    reads the reduced stream instead; readers of ``end`` read its restored value. Literals, side
    inputs and the token axes of the new nodes are kept consistent, so that later cuts compose with
    this one. Later cuts read the new node shapes: with ``shapes`` (the pass's
    :class:`PredictedShapes`) they are predicted, and the driver propagates and checks the graph
    once per pass; without, with ``example_inputs`` the whole graph is propagated again, and
    ``verify`` checks every region node's new shape and the output contract at once.

    ``keep`` None: the token count is symbolic (a dynamic graph) and the reduction computes the
    kept count at each call; literals then read it from the reduced stream (``size(1)``).

    ``kv_outputs`` (a bool or a :class:`KVOutputs` with the reason it is not allowed): a region
    tensor laid out as a KV cache ([B, H, N, D], tokens at dim 2) may leave the graph as an output
    with ``keep`` tokens (the pruned prefill's cache: decode steps attend to the kept tokens); the
    output contract then holds for every other output.
    """
    for node, where in ((start, "at the cut"), (end, "where the tokens are put back (after the last block)")):
        if not isinstance(node, fx.Node) or node.graph is not gm.graph:
            raise RewriteError(f"the residual stream {where} was not found")
    n = _token_count(facts, start)
    if keep is not None and not 0 < keep <= n:
        raise RewriteError(f"node {start.name}: cannot keep {keep} of {n} tokens")
    undo = GraphUndo(gm.graph)
    outputs_before = output_signature(gm)
    existing = set(gm.graph.nodes)
    try:
        cut = _reduce(gm, facts, start, end, make_reduction, keep, n, kv_outputs)
        gm.recompile()
        added = [node for node in gm.graph.nodes if node not in existing]
        if shapes is not None and shapes.predict(cut.region, cut.token_dims, n, keep, added, cut.leading):
            return cut
        if example_inputs is not None:
            before = {node: shape_keys(node) for node in cut.region}
            propagate_shapes(gm, example_inputs)
            if verify:  # a symbolic count (keep None) as the propagated one: sizes compare as keys
                kept = keep if keep is not None else shape_keys(cut.gathered)[1]
                _check_region_shapes(cut, before, kept, size_key(n))
                check_output_contract(outputs_before, output_signature(gm), skip=cut.cache_outputs)
        return cut
    except Exception as exc:
        undo.restore()
        gm.recompile()
        if isinstance(exc, RewriteError):
            raise
        raise RewriteError(f"reducing tokens after {start.name} failed: {exc}") from exc


def mask_node(graph: fx.Graph, masks: tuple) -> Optional[fx.Node]:
    """A node holding a site's ``masks`` (:func:`~tokred.rewriter.analysis.masks.site_masks`) in
    SDPA's convention, inserted at the graph's insertion point: the mask itself where it already is
    one (an SDPA attn_mask, or a float mask added to the logits), else a ``tokens.attention_bias``
    call; None when there is no mask."""
    if not masks:
        return None
    kind, node = masks[0]
    value = node.meta.get("example_value")
    if len(masks) == 1 and (kind == "sdpa" or (kind == "add" and value is not None and value.dtype.is_floating_point)):
        return node
    return graph.call_function(tokens.attention_bias, (tuple(k for k, _ in masks), *(n for _, n in masks)))


class GraphUndo:
    """Puts a graph back as it was: arguments, metadata shapes, and no added nodes.

    Restores in place (rather than swapping in a copy) so that the nodes the analysis holds stay the
    graph's nodes, and Dynamo's attributes on placeholders survive.
    """

    def __init__(self, graph: fx.Graph):
        self.graph = graph
        self.nodes = {node: (node.args, node.kwargs, node.meta.get("example_value"), node.meta.get("val"))
                      for node in graph.nodes}

    def restore(self) -> None:
        for node, (args, kwargs, example_value, val) in self.nodes.items():
            if node.args is not args or node.kwargs is not kwargs:
                node.args, node.kwargs = args, kwargs
            for key, value in (("example_value", example_value), ("val", val)):
                if value is not None:
                    node.meta[key] = value
                else:
                    node.meta.pop(key, None)
        added = [node for node in self.graph.nodes if node not in self.nodes]
        while added:  # erase users before what they use
            free = [node for node in added if not node.users]
            for node in free:
                self.graph.erase_node(node)
            added = [node for node in added if node not in free]


def _reduce(gm, facts, stream, last, make_reduction, keep, n, kv_outputs=False) -> TokenCut:
    graph = gm.graph
    axes = facts.token_axes
    nxg = to_networkx(graph)
    if stream is last:
        region = []
    else:
        region_set = (nx.descendants(nxg, stream) & (nx.ancestors(nxg, last) | {last}))
        region_set |= _writes_into(region_set)
        order = {node: i for i, node in enumerate(graph.nodes)}
        region = sorted(region_set, key=order.__getitem__)
    region_set = set(region)
    if 1 not in axes.of(stream):
        raise RewriteError(f"node {stream.name}: token axis is not dim 1 of the residual stream")
    cache_nodes = _check_escapes(nxg, stream, last, region_set, axes, kv_outputs)
    readers = [node for node in region if node in stream.users]  # in graph order
    if not readers:
        raise RewriteError(f"node {stream.name}: nothing between it and {last.name} reads it")

    # insert the reducing op just before the region first reads the stream: whatever the op reads
    # (keys, masks) is defined by then; inserting before a node keeps creation (topological) order
    existing = set(graph.nodes)
    with graph.inserting_before(readers[0]):
        reduction = make_reduction(graph, stream)
    index, gathered = reduction.index, reduction.stream
    for user in readers:
        user.replace_input_with(stream, gathered)
    axes.dims[gathered] = axes.of(stream)

    # side inputs: tensors from outside the region that carry the token axis where it reads them
    side = []
    gathered_side = {}
    added = {node for node in graph.nodes if node not in existing}
    n_key = size_key(n)
    lead = reduction.leading if isinstance(n, int) else 0  # (static counts only)
    tail_key, tail_index = (n - lead if lead else None), None
    for node in region:
        for inp in list(node.all_input_nodes):
            if inp in region_set or inp in added:
                continue
            dims = sorted(d for d in axes.of(inp) if shape_keys(inp)[d] == n_key)
            at = index
            if not dims and lead:  # a table of the tokens after the kept prefix
                dims = sorted(d for d in axes.of(inp) if shape_keys(inp)[d] == tail_key)
                if dims and tail_index is None:
                    with graph.inserting_after(index):
                        tail_index = graph.call_function(tokens.tail_index, (index, lead))
                at = tail_index
            if not dims:
                continue
            if inp not in gathered_side:
                with graph.inserting_before(node):  # its first reader: inp is defined by now
                    gathered_side[inp], new_dims = _gather_side_input(graph, inp, dims, node, at,
                                                                      shape_keys(stream)[0])
                axes.dims[gathered_side[inp]] = frozenset(new_dims)
                side.append((inp, tuple(dims)))
            node.replace_input_with(inp, gathered_side[inp])

    # literals: N on a token dim of a shape argument becomes M (k*N -> k*M for merged dims)
    rewritten = 0
    sizes = (n, keep) if keep is not None else None
    for node in region:
        found = literals_of(node, axes, {n_key})
        for lit in found:
            if not is_symbolic(lit.value):
                set_path(node, lit.path, cut_size(lit.value, n, keep))
            else:  # a node (a symbolic N, or B*N with a symbolic batch): computed in the graph
                sizes = sizes or _size_nodes(graph, stream, gathered)
                with graph.inserting_before(node):
                    set_path(node, lit.path, _symbolic_literal(graph, get_path(node, lit.path), lit, *sizes))
            rewritten += 1
        if lead:  # k * (N - leading): the tokens after the kept prefix, k * (M - leading) now
            done = {lit.path for lit in found}
            for lit in literals_of(node, axes, {tail_key}):
                if lit.path not in done and not is_symbolic(lit.value):
                    set_path(node, lit.path, cut_size(lit.value, n, keep, lead))
                    rewritten += 1

    restored = None
    if region:
        with graph.inserting_before(last.next):
            restored = reduction.restore(graph, stream, last)
        for user in list(last.users):
            if user is not restored:
                user.replace_input_with(last, restored)
        axes.dims[restored] = axes.of(last)
    graph.lint()
    return TokenCut(stream=stream, gathered=gathered, index=index, restored=restored, region=region,
                    side_inputs=side, literals=rewritten,
                    token_dims={node: axes.of(node) for node in region},
                    cache_outputs=output_positions(graph, cache_nodes), reduction=reduction, leading=lead)


def _size_nodes(graph: fx.Graph, stream: fx.Node, gathered: fx.Node) -> tuple:
    """Nodes of the token counts N (of ``stream``) and M (of ``gathered``), for the literals of a
    symbolic cut: Dynamo's shape arguments there are nodes too (``s27``, ``s52*s27``)."""
    with graph.inserting_after(gathered):
        m = graph.call_method("size", (gathered, 1))
    with graph.inserting_after(gathered):
        n = graph.call_method("size", (stream, 1))
    return n, m


def _symbolic_literal(graph: fx.Graph, arg: fx.Node, lit, n, m):
    """What stands for the symbolic literal ``arg`` (the size N, or k*N for merged dims) at M
    tokens: ``m`` itself, or the node ``arg // n * m`` (k may itself be symbolic: the batch size);
    n and m are ints or nodes."""
    if lit.value == lit.tokens:
        return m
    return graph.call_function(operator.mul, (graph.call_function(operator.floordiv, (arg, n)), m))


def _gather_side_input(graph: fx.Graph, inp: fx.Node, dims: list, reader: fx.Node, index: fx.Node,
                       batch) -> tuple:
    """Insert the gather of side input ``inp`` [B or 1, ..., N, ...] on its token ``dims``; returns the
    gathered node and its token dims (``batch``: the stream's batch size, as a size key).

    A tensor without a batch dim (its token axis at dim 0, as a causal mask ``ones(N, N).tril()``
    built in the model, or a dim 0 of another size, as MPT's ALiBi table [H, 1, N]) is given
    leading size-1 dims up to the rank it is broadcast to (its reader's, or the first op after
    rank-keeping reads such as slices that raises it) first, so that the per-sample gather
    broadcasts the same way.
    """
    shape = shape_keys(inp)
    if 0 in dims or shape[0] not in (batch, 1):
        rank, target = len(shape), _broadcast_rank(reader)
        if target <= rank:
            raise RewriteError(f"node {inp.name} (read by {reader.name}) carries the token axis but has no batch "
                               f"dim to gather per sample on, and is not broadcast against one")
        lead = target - rank
        for _ in range(lead):  # unsqueeze, not a reshape: its sizes may be symbolic
            inp = graph.call_method("unsqueeze", (inp, 0))
        dims = [d + lead for d in dims]
    for d in dims:
        inp = graph.call_function(tokens.gather_token_dim, (inp, index, d))
    return inp, dims


def _broadcast_rank(reader: fx.Node, hops: int = 4) -> int:
    """The rank a side input is broadcast to: its reader's output rank, or (where the reader keeps
    the rank, as a slice does) that of the reader's one user, a few nodes on."""
    rank = len(shape_of(reader) or ())
    for _ in range(hops):
        users = list(reader.users)
        if len(users) != 1 or len(shape_of(users[0]) or ()) <= rank:
            break
        reader = users[0]
        rank = len(shape_of(reader) or ())
    return rank


def _token_count(facts, stream: fx.Node) -> int:
    shape = shape_of(stream)
    if shape is None or len(shape) != 3:
        raise RewriteError(f"node {stream.name}: the residual stream is not a [B, N, C] tensor")
    return shape[1]


def _writes_into(region_set: set) -> set:
    """In-place writes into region tensors (``x[index] = value``: no output, so no path to the
    region's end) and the constants they write (MoE's ``inv_perm[perm] = arange(k*N)``, a literal
    that must count the kept tokens): part of the region."""
    writes = {user for node in region_set for user in node.users
              if user.target is operator.setitem and user.args[0] is node}
    constants = {inp for write in writes for inp in write.all_input_nodes
                 if inp not in region_set and inp.op == "call_function" and not inp.all_input_nodes
                 and all(u in writes for u in inp.users)}
    return writes | constants


def _check_escapes(nxg, stream, last, region_set, axes, kv_outputs=False) -> set:
    """Region nodes read outside the region (other than by the restore point) must not carry tokens.

    Example: HF ``output_attentions`` returns per-layer attention maps [B, H, N, N]; their removed
    rows cannot be restored, so such a graph is not rewritten. With ``kv_outputs``, KV-cache tensors
    ([B, H, N, D] with the token axis at dim 2) read only by the graph output are allowed out with
    fewer tokens; returns those nodes.
    """
    cache = set()
    for node in region_set:
        if node is last:
            continue
        for user in node.users:
            if user in region_set or not axes.carries_tokens(node):
                continue
            if user.op == "output" and _is_cache_layout(node, axes):
                if kv_outputs:
                    cache.add(node)
                    continue
                raise RewriteError(f"node {node.name} is a KV-cache output; {kv_outputs.reason}"
                                   if isinstance(kv_outputs, KVOutputs) else
                                   f"node {node.name} is a KV-cache output with the token axis; its removed "
                                   f"tokens cannot be restored")
            raise RewriteError(
                f"node {node.name} carries the token axis out of the reduced region (read by "
                f"{user.name}); its removed tokens cannot be restored")
    return cache


def _is_cache_layout(node: fx.Node, axes) -> bool:
    shape = shape_of(node)
    return shape is not None and len(shape) == 4 and axes.of(node) == frozenset({2})


def output_positions(graph: fx.Graph, nodes: set) -> frozenset:
    """Indices, among the flattened graph outputs, of the outputs that are ``nodes``."""
    if not nodes:
        return frozenset()
    out = next(n for n in reversed(graph.nodes) if n.op == "output")
    leaves = torch.utils._pytree.tree_leaves(out.args[0])
    return frozenset(i for i, leaf in enumerate(leaves) if leaf in nodes)


def _check_region_shapes(cut: TokenCut, before: dict, keep, n) -> None:
    """Every region node's token dims now hold M (k*M for merged dims), its other dims as before
    (shapes, ``keep`` and ``n`` as size keys)."""
    for node in cut.region:
        old, new = before[node], shape_keys(node)
        if old is None:
            continue
        if new is None or len(new) != len(old):
            raise RewriteError(f"node {node.name}: shape changed from {old} to {new}")
        expected = cut_shape(old, cut.token_dims[node], n, keep, cut.leading)
        for d, (a, b) in enumerate(zip(expected, new)):
            # a symbolic size before and an int after: the graph was propagated with concrete
            # inputs (an export's dynamic batch); the propagation itself checked that it fits
            if b != a and is_symbolic(a) == is_symbolic(b):
                raise RewriteError(f"node {node.name}: dim {d} is {b} after the rewrite, expected "
                                   f"{a} (shape before {old})")



class TensorRecorder(torch.nn.Module):
    """Keeps a copy of the tensor it is called on, once per forward (see :func:`record_each_run`)."""

    _is_impure = True  # fx dead-code elimination keeps its calls (their effect is the record)

    def __init__(self):
        super().__init__()
        self.records: list = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, FakeTensor) and x.device.type != "meta":  # not the driver's shape check
            self.records.append(x.detach().clone())
        return x


def record_each_run(gm: fx.GraphModule, node: fx.Node, name: str) -> list:
    """Record the value of ``node`` at every run of ``gm``; returns the list the records go to.

    The graph must run eagerly (``tokred.explain``, or ``inner="eager"``) for the record to happen:
    a compiled graph traces the recorder away.
    """
    recorder = TensorRecorder()
    gm.add_submodule(name, recorder)
    with gm.graph.inserting_after(node):
        gm.graph.call_module(name, (node,))
    gm.recompile()
    return recorder.records
