"""Self-speculative early-exit draft: the target's first L blocks, then its final norm and LM head.

    draft = EarlyExitDraft(model, exit_layer=8)
    out = tokred.generate(model, ids, 64, draft=draft)          # or draft="early_exit", exit_layer=8
    logits = draft.logits(ids, draft.new_cache())               # [B, q, V]: the draft's own logits

How the draft is found (never from attribute names like ``model.model.layers``): the model's
forward is captured once by Dynamo (a capturing backend, as :mod:`tokred.export` does; a prefill
call ``input_ids [1, 8]`` without a cache) and analysed by :func:`tokred.rewriter.analysis.analyze`:

- the blocks (``facts.blocks``, in graph order) give the exit point: the module of block L-1
  (``Block.module``, read from the nodes' ``nn_module_stack``). The draft runs the model's own
  forward (embeddings, Gemma's embedding scale, rotary tables, masks: whatever the model does before
  its blocks) and stops it when that module returns, keeping its output, the residual stream after
  L blocks ([B, q, C]). Blocks L.. are never run.
- the head is the projection with role ``lm_head`` after the last block (``head`` where the
  analysis could not tie it to the token embedding table, as in GPT-2, whose token ids are reshaped
  before the lookup). The *tail* of the captured graph, every node between the last block's output
  and the logits (the final norm chain, including Gemma's ``1 + weight`` and any logit soft-capping,
  then the head), is copied into a small fx graph whose input is the residual stream: the draft
  applies exactly the computation the target applies after its last block, to block L's output.
  Views that were the identity at capture (GPT-2's ``view(output_shape)``) are dropped, so the tail
  serves any [B, q]. The tail's weights are the target's own parameter tensors, bound by identity
  from the captured call's inputs: nothing is copied.

KV cache: the draft keeps its *own* cache (the Drafter interface does not hand it the target's),
one ``transformers.DynamicCache`` per batch row, filled only in layers < L (later layers never run).
Row b's cache holds the K/V of the committed tokens the draft has seen; each ``propose`` keeps the
first ``min(reused[b], cached)`` entries, feeds the rest of the committed tokens in one forward,
drafts k tokens (k forwards of L blocks in all), then crops its k - 1 draft entries back off, so
the cache again ends at the committed tokens. Sliding-window layers record their past so that the
crop is exact. Since layers < L of the draft and the target are the same modules, these entries
equal the target's.

Sharing the target's cache (LayerSkip-style self-speculation) is not done; what it needs:
(1) a drafter protocol that gets the target's ``BatchedDecoder`` (its cache, right-aligned rows,
per-row counts) instead of a ``DraftState``, and runs k + 1 single-token steps of layers < L into
that cache (the last committed token and the k drafts: the k-th draft's entries are the "missing"
ones), keeping h_L of each, with per-row hole bookkeeping between those steps; (2) a verification
forward that starts at block L on those h_L: through the model's own forward (masks, rotary tables)
with blocks < L (``Block.module`` of the analysis) temporarily replaced by a function that returns
the saved h_L and re-appends the draft's K/V to its cache layer, because transformers reads the
past length from layer 0 of the cache (``get_seq_length``), so layers < L must not be longer than
the others when the forward starts: the draft's k + 1 entries are cropped off and stashed before
it; (3) ``keep`` as today (every layer cropped by the same count). Measured on SmolLM2 / CPU, it
would lift the early-exit ceiling (every draft accepted) only modestly: see
bench/results/speculative_profile.md; with SmolLM2's acceptance (~0.1 at L = 16) it stays below 1x.

The forward stop: a forward hook on block L-1's module, registered only for the duration of a
draft call, raises an internal exception carrying the block's output; transformers' wrappers clean
up in ``finally`` blocks, so the model is unchanged for the target's own calls.
"""

from __future__ import annotations

import abc
import contextlib
import weakref
from dataclasses import dataclass
from typing import Callable, Optional

import networkx as nx
import torch
from torch import fx

from tokred.rewriter.analysis import GraphFacts, ProjectionSite, analyze
from tokred.rewriter.analysis.graph import (
    is_call, is_parameter_like, is_state, module_path, shape_of, to_networkx,
)


# ---- the Drafter interface (stable: other drafts implement it) ---------------------------------


@dataclass(frozen=True)
class DraftState:
    """What a drafter sees when asked for proposals. B = batch, S >= max(lengths), V = vocabulary.

    tokens:      [B, S] int64: each sequence's committed tokens (its prompt without padding, then
                 what was generated), left-aligned: row b is ``tokens[b, :lengths[b]]``; the rest
                 of the row is filler (do not read it).
    lengths:     [B] int64: committed tokens per sequence (>= 1).
    reused:      [B] int64: how many leading tokens of each row are unchanged from what this
                 drafter saw before: the previous call's context plus those of its drafts that
                 were accepted (0 on the first call of a ``generate``). A drafter with its own KV
                 cache keeps its first ``reused[b]`` entries of row b (if it had that many) and
                 feeds the rest of ``tokens[b, :lengths[b]]``. Always ``reused <= lengths``.
    active:      [B] bool: sequences still generating; proposals for the others are ignored.
    do_sample:   sampling (True) or greedy (False) decoding.
    temperature: > 0; applied (with top_p) to the draft's distribution q before rejection sampling:
                 use :func:`warp_probs` on the draft's logits.
    top_p:       in (0, 1].
    generator:   the torch.Generator to draw samples from (None: torch's default), so that a
                 seeded ``generate`` is reproducible.
    """

    tokens: torch.Tensor
    lengths: torch.Tensor
    reused: torch.Tensor
    active: torch.Tensor
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    generator: torch.Generator | None = None


@dataclass
class Draft:
    """Proposals for the target to verify. B = batch, k = the k asked for, V = vocabulary.

    tokens:  [B, k] int64 proposed tokens; row b's proposals are ``tokens[b, :counts[b]]``, the
             rest of the row is filler (any valid token id).
    counts:  [B] int64 in [0, k]: how many proposals each row has (a prompt lookup without a match
             has 0); None means k for every row.
    probs:   [B, k, V] float: the (warped, see :func:`warp_probs`) distribution q each proposal was
             drawn from, for rejection sampling; None for a deterministic draft (q is one-hot at
             the proposed token). Only read when sampling; greedy decoding ignores it. V must be
             the target's logits width.
    """

    tokens: torch.Tensor
    counts: torch.Tensor | None = None
    probs: torch.Tensor | None = None


class Drafter(abc.ABC):
    """Proposes draft tokens for the target to verify. One Drafter serves one ``generate`` call at a
    time; ``reset`` is called at the start of each.

    Greedy drafts (``state.do_sample`` False) should propose the draft's argmax (first index on
    ties) and may leave ``Draft.probs`` None. Sampling drafts draw each proposal from their warped
    distribution q with ``state.generator`` and return q in ``Draft.probs``. Whatever a drafter
    proposes, the output stays exact: a bad draft only costs speed.
    """

    def reset(self) -> None:
        """Forget all per-generation state (KV caches, counters). Default: nothing to forget."""

    @abc.abstractmethod
    def propose(self, state: DraftState, k: int) -> Draft:
        """Up to ``k`` (>= 1) proposals per sequence, continuing ``state.tokens[b, :state.lengths[b]]``."""



def warp_probs(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0) -> torch.Tensor:
    """[..., V] logits -> [..., V] float32 probabilities of ``softmax(logits / temperature)``
    restricted to the nucleus: the most probable tokens whose mass first reaches ``top_p`` (the
    token that crosses the threshold is kept), renormalized."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return kept / kept.sum(dim=-1, keepdim=True)



__all__ = ["EarlyExitDraft", "EarlyExitSlice", "slice_early_exit", "cached_slice", "capture_graph", "tail_graph"]

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

    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, backend=capturing_backend, fullgraph=True, dynamic=False)
        with torch.no_grad():
            compiled(input_ids=input_ids, use_cache=False)
    finally:
        torch._dynamo.reset()
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


# ----------------------------------------------------------------------------- running the draft

class _ExitReached(Exception):
    """Raised by the exit hook to stop the model's forward after block L; carries its output."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__("early exit")
        self.hidden = hidden


def _exit_hook(module, args, output):
    hidden = output if isinstance(output, torch.Tensor) else output[0]
    raise _ExitReached(hidden)


@contextlib.contextmanager
def _exit_after(module: torch.nn.Module):
    handle = module.register_forward_hook(_exit_hook)
    try:
        yield
    finally:
        handle.remove()


def _crop_layers(cache, tokens: int) -> None:
    """Remove the last ``tokens`` entries from every filled layer of ``cache`` (layers < L)."""
    if tokens <= 0:
        return
    for layer in cache.layers:
        if getattr(layer, "is_initialized", False) and layer.get_seq_length() >= tokens:
            layer.crop(-tokens)


class EarlyExitDraft(Drafter):
    """A :class:`tokred.generate.Drafter`: the target's first ``exit_layer`` blocks, final norm and
    LM head, found by graph analysis (see the module docstring). Shares the target's weights.

    exit_layer: L, 1 <= L < n (n = blocks found); the draft's logits at a position are
                ``head(norm(h_L))`` with h_L the residual stream after L blocks.
    """

    def __init__(self, model: torch.nn.Module, exit_layer: int, slice_: Optional[EarlyExitSlice] = None):
        if isinstance(exit_layer, bool) or not isinstance(exit_layer, int):
            raise ValueError(f"tokred option 'exit_layer' must be an int, got {exit_layer!r}")
        model = getattr(model, "_orig_mod", model)  # a torch.compile wrapper: draft on the eager module
        self.model = model
        self.slice = slice_ if slice_ is not None else cached_slice(model)
        n = self.slice.blocks
        if not 1 <= exit_layer < n:
            raise ValueError(f"tokred option 'exit_layer' must be in [1, {n - 1}] for a model of {n} blocks, "
                             f"got {exit_layer}")
        self.exit_layer = exit_layer
        self.exit_module = model.get_submodule(self.slice.exit_modules[exit_layer - 1])
        self.forwards = 0  # draft forwards run (each: L blocks + head)
        self.reset()

    # -- the sliced model
    def new_cache(self):
        """An empty draft-side KV cache (sliding-window layers record their past, so crops are exact)."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for layer in cache.layers:
            if hasattr(layer, "activate_past_recording"):
                layer.activate_past_recording()
        return cache

    def hidden(self, input_ids: torch.Tensor, cache=None) -> torch.Tensor:
        """[B, q] token ids (continuing ``cache``) -> the residual stream after L blocks [B, q, C]."""
        with _exit_after(self.exit_module), torch.no_grad():
            try:
                self.model(input_ids=input_ids, past_key_values=cache, use_cache=cache is not None)
            except _ExitReached as reached:
                return reached.hidden
        raise RuntimeError(f"early exit draft: block {self.exit_layer - 1} "
                           f"({self.slice.exit_modules[self.exit_layer - 1]}) was not run by the forward")

    def logits(self, input_ids: torch.Tensor, cache=None) -> torch.Tensor:
        """[B, q] token ids -> the draft's logits [B, q, V] (``cache`` is extended in layers < L)."""
        self.forwards += 1
        with torch.no_grad():
            return self.slice.head(self.hidden(input_ids, cache))

    def last_logits(self, input_ids: torch.Tensor, cache=None) -> torch.Tensor:
        """The draft's logits at the last position only, [B, 1, V] (the head runs on one token)."""
        self.forwards += 1
        with torch.no_grad():
            return self.slice.head(self.hidden(input_ids, cache)[:, -1:])

    # -- the Drafter interface
    def reset(self) -> None:
        self._caches: dict = {}   # row -> DynamicCache holding that row's committed tokens
        self._cached: dict = {}   # row -> committed tokens in that cache

    def propose(self, state: DraftState, k: int) -> Draft:
        """Up to ``k`` proposals per active row (greedy: argmax; sampling: drawn from warped q)."""
        batch = state.tokens.shape[0]
        tokens = torch.zeros(batch, k, dtype=torch.long, device=state.tokens.device)
        counts = torch.zeros(batch, dtype=torch.long, device=state.tokens.device)
        probs = None
        for b in range(batch):
            if not bool(state.active[b]):
                continue
            row_tokens, row_probs = self._propose_row(state, b, k)
            tokens[b] = row_tokens
            counts[b] = k
            if row_probs is not None:
                if probs is None:
                    probs = torch.zeros(batch, k, row_probs.shape[-1], dtype=row_probs.dtype,
                                        device=row_probs.device)
                probs[b] = row_probs
        return Draft(tokens=tokens, counts=counts, probs=probs)

    def _propose_row(self, state, b: int, k: int) -> tuple:
        """k draft tokens [k] for row b (and their q [k, V] when sampling); the row's cache ends
        at its committed tokens again afterwards."""
        length = int(state.lengths[b])
        context = state.tokens[b, :length]
        cache = self._caches.get(b)
        if cache is None:
            cache, cached = self.new_cache(), 0
        else:
            cached = self._cached[b]
            keep = min(int(state.reused[b]), cached, length - 1)  # feed at least one token
            _crop_layers(cache, cached - keep)
            cached = keep
        feed = context[cached:][None]
        proposals, dists = [], []
        for step in range(k):
            last = self.last_logits(feed, cache)[:, -1].float()  # [1, V]
            token, q = self._pick(last, state)
            proposals.append(token)
            if q is not None:
                dists.append(q)
            feed = token.view(1, 1)
        _crop_layers(cache, k - 1)  # the draft tokens' entries (the last proposal was never fed)
        self._caches[b], self._cached[b] = cache, length
        tokens = torch.stack(proposals).view(k)
        return tokens, (torch.cat(dists) if dists else None)

    @staticmethod
    def _pick(logits: torch.Tensor, state) -> tuple:
        """Greedy: the argmax (first index on ties). Sampling: a draw from the warped q, and q."""
        if not state.do_sample:
            return logits.argmax(-1).view(()), None
        q = warp_probs(logits, state.temperature, state.top_p)  # [1, V]
        token = torch.multinomial(q, 1, generator=state.generator).view(())
        return token, q
