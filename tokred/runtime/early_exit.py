"""The early-exit draft's graph: the target captured once, its head found, and the tail (final norm
and head) sliced out of the captured graph so that any layer's hidden state can be read out.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable, Optional

import networkx as nx
import torch
from torch import fx

from tokred.compat.torch_api import capture
from tokred.rewriter.analysis import GraphFacts, ProjectionSite, analyze
from tokred.rewriter.analysis.graph import (
    is_call, is_parameter_like, is_state, module_path, shape_of, to_networkx,
)


CAPTURE_TOKENS = 8  # tokens of the prefill call the model is captured with
IDENTITY_VIEWS = ("view", "reshape")


# ----------------------------------------------------------------------------- capture and analysis

def capture_graph(model: torch.nn.Module, input_ids: torch.Tensor) -> tuple[fx.GraphModule, list]:
    """The graph Dynamo captures for ``model(input_ids=input_ids, use_cache=False)`` and its inputs.

    Returns ``(gm, example_inputs)`` exactly as a torch.compile backend receives them: one real
    tensor per placeholder, the model's parameters and buffers among them (the same objects).
    """
    graphs: list = []

    def capturing_backend(gm: fx.GraphModule, example_inputs: list) -> Callable:
        graphs.append((gm, list(example_inputs)))
        return gm

    with torch.no_grad():
        capture(model, (), {"input_ids": input_ids, "use_cache": False}, backend=capturing_backend,
                fullgraph=True, dynamic=False)
    if len(graphs) != 1:
        raise ValueError(f"early exit draft: expected one captured graph, got {len(graphs)}")
    return graphs[0]


def find_head(facts: GraphFacts) -> ProjectionSite:
    """The projection to the vocabulary after the last block: role ``lm_head``, else ``head``."""
    for role in ("lm_head", "head"):
        heads = [p for p in facts.projections if p.role == role]
        if heads:
            order = {n: i for i, n in enumerate(facts.gm.graph.nodes)}
            return max(heads, key=lambda p: order[p.node])
    raise ValueError("early exit draft: the analysis found no LM head projection after the last block")


def _logits_output(gm: fx.GraphModule, head: fx.Node, nxg: nx.DiGraph) -> fx.Node:
    """The graph output that carries the logits: the head itself or what it feeds (soft-capping)."""
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    reach = nx.descendants(nxg, head) | {head}
    found: list = []
    fx.node.map_arg(output.args, lambda n: found.append(n) if n in reach else None)
    if len(found) != 1:
        raise ValueError(f"early exit draft: expected one graph output computed from the LM head, got {len(found)}")
    return found[0]


def _is_identity_view(node: fx.Node) -> bool:
    """A view/reshape whose output had its input's shape at capture (GPT-2's ``view(output_shape)``)."""
    if not is_call(node, *IDENTITY_VIEWS, torch.reshape) or not isinstance(node.args[0], fx.Node):
        return False
    return shape_of(node) is not None and shape_of(node) == shape_of(node.args[0])


def tail_graph(gm: fx.GraphModule, example_inputs: list, stream: fx.Node, logits: fx.Node,
               nxg: Optional[nx.DiGraph] = None) -> tuple[fx.GraphModule, list]:
    """Copy the nodes from ``stream`` (exclusive) to ``logits`` (inclusive) into a new graph.

    The new graph's inputs are ``hidden`` (standing for ``stream``, [B, q, C]) and then one
    placeholder per weight it reads; returns ``(tail, weights)`` with ``weights`` the matching
    tensors of ``example_inputs`` (the model's own parameters), so ``tail(hidden, *weights)`` is the
    captured computation applied to ``hidden``. Nodes computed from weights only (``1 + w.float()``)
    come along; anything else the tail reads (another activation, a shape) is a ValueError.
    """
    nxg = nxg if nxg is not None else to_networkx(gm.graph)
    core = (nx.descendants(nxg, stream) & nx.ancestors(nxg, logits)) | {logits}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    index = {n: i for i, n in enumerate(placeholders)}
    needed, weights_nodes, frontier = set(core), [], list(core)
    while frontier:
        node = frontier.pop()
        for inp in node.all_input_nodes:
            if inp is stream or inp in needed:
                continue
            if inp.op == "placeholder" and is_state(inp):
                needed.add(inp)
                weights_nodes.append(inp)
            elif inp.op == "call_function" or inp.op == "call_method":
                if not is_parameter_like(inp):
                    raise ValueError(f"early exit draft: the nodes after the last block read {inp.name}, "
                                     "which is neither the residual stream nor computed from weights")
                needed.add(inp)
                frontier.append(inp)
            else:
                raise ValueError(f"early exit draft: the nodes after the last block read {inp.name} ({inp.op})")
    graph = fx.Graph()
    env = {stream: graph.placeholder("hidden")}
    ordered_weights = [n for n in placeholders if n in weights_nodes]
    for node in ordered_weights:
        env[node] = graph.placeholder(node.name)
    for node in gm.graph.nodes:
        if node not in needed or node.op == "placeholder":
            continue
        if _is_identity_view(node):
            env[node] = env[node.args[0]]
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(env[logits])
    graph.eliminate_dead_code()
    tail = fx.GraphModule(torch.nn.Module(), graph)
    return tail, [example_inputs[index[n]] for n in ordered_weights]


@dataclass
class EarlyExitSlice:
    """Where the draft leaves the target and what it runs after.

    blocks:       the number of blocks the analysis found (n); the exit layer L is in [1, n).
    exit_modules: module path of each block (``Block.module``), the exit hook goes on [L-1].
    tail:         hidden [B, q, C] + weights -> logits [B, q, V]: the captured final norm and head.
    weights:      the target's parameters the tail reads (the same tensor objects).
    norm_modules: module paths of the nodes between the last block and the head (the final norm).
    head_module:  module path of the head projection.
    """

    blocks: int
    exit_modules: list
    tail: fx.GraphModule
    weights: list
    norm_modules: list
    head_module: str

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head of the target applied to ``hidden`` [B, q, C] -> logits [B, q, V]."""
        return self.tail(hidden, *self.weights)


def slice_early_exit(model: torch.nn.Module, capture_ids: Optional[torch.Tensor] = None) -> EarlyExitSlice:
    """Capture ``model``, analyse the graph, and return the blocks and the tail after the last block."""
    if capture_ids is None:
        vocab = model.get_input_embeddings().num_embeddings if hasattr(model, "get_input_embeddings") else 2
        device = next(model.parameters()).device
        capture_ids = torch.arange(CAPTURE_TOKENS, device=device).remainder(vocab)[None]
    gm, example_inputs = capture_graph(model, capture_ids)
    facts = analyze(gm)
    blocks = [b for b in facts.blocks if b.output is not None]
    if len(blocks) != len(facts.blocks) or not blocks:
        raise ValueError(f"early exit draft: the analysis found {len(facts.blocks)} blocks, "
                         f"{len(facts.blocks) - len(blocks)} without an output on the residual stream")
    head = find_head(facts)
    nxg = facts.nx_graph if facts.nx_graph is not None else to_networkx(gm.graph)
    logits = _logits_output(gm, head.node, nxg)
    tail, weights = tail_graph(gm, example_inputs, blocks[-1].output, logits, nxg)
    between = nx.descendants(nxg, blocks[-1].output) & nx.ancestors(nxg, head.node)
    norm_modules = sorted({module_path(n) for n in between if module_path(n) and not _is_identity_view(n)})
    return EarlyExitSlice(blocks=len(blocks), exit_modules=[b.module for b in blocks], tail=tail,
                          weights=weights, norm_modules=norm_modules, head_module=head.module)


_SLICES: "weakref.WeakKeyDictionary[torch.nn.Module, EarlyExitSlice]" = weakref.WeakKeyDictionary()


def cached_slice(model: torch.nn.Module) -> EarlyExitSlice:
    """:func:`slice_early_exit` once per model object (a capture takes seconds; drafts at several
    exit layers of one model share it). The slice holds the model's parameters, not copies, so
    weight updates are seen; a model whose structure changes needs a fresh ``slice_early_exit``."""
    if model not in _SLICES:
        _SLICES[model] = slice_early_exit(model)
    return _SLICES[model]
