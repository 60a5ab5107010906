"""Which tokens prune may cut when ``prunable_ids`` names them (prune's analysis side).

Two sources, found by what they are in the captured graph:

- ``ids``: the token-ids input [B, N] (an integer graph input that feeds an embedding lookup):
  the positions holding one of the ids.
- ``scatter``: a language model's graph that receives embeddings, not ids. A VLM's forward breaks
  the graph between the image-token check and the language model (transformers' Llava, Qwen2-VL,
  PaliGemma): that graph's stream is built by ``inputs_embeds.masked_scatter(mask, features)``, and
  ``mask`` [B, N, 1|C], a graph input, marks the image-token positions the model computed from
  ``input_ids == image_token_id``. Those positions are the prunable ones; the ids themselves are
  not in this graph, so the report says where the positions came from.

Each row must hold the same number of candidates (the kept count is static); the count is read
from the example input, and a batch that differs stops with an error at run time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx

from tokred.compat import torch_api
from tokred.passes.prune_graph import candidate_positions
from tokred.rewriter.analysis.graph import is_call, shape_of, walk
from tokred.rewriter.analysis.sites import skip_layout
from tokred.rewriter.surgery import RewriteError

OPTION = "option 'prune.prunable_ids'"


@dataclass(frozen=True)
class Candidates:
    """kind: "ids" (``node`` is the token ids [B, N]) or "scatter" (``node`` is the mask [B, N, ...]
    the model scatters image features through); count: candidates per row inside the prunable
    interval; what: the candidates in words, for the report ("{count} {what}")."""

    kind: str
    node: fx.Node
    count: int
    what: str


def find_candidates(gm: fx.GraphModule, ids: tuple, start: int, end: int, n: int, example_inputs,
                    stream: fx.Node) -> Candidates:
    """The prunable_ids candidates of a graph whose residual stream ``stream`` holds ``n`` tokens,
    inside [start, end); RewriteError (in words) when the graph has neither source."""
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    found = token_ids_input(gm, n)
    if found is not None:
        rows = _rows(_example(found, placeholders, example_inputs), ids, start, end)
        return Candidates("ids", found, rows, "prunable_ids tokens per row")
    scatter = scattered_positions(gm, n, stream)
    if scatter is not None:
        mask, source = scatter
        rows = _rows(_example(mask, placeholders, example_inputs), None, start, end)
        return Candidates("scatter", mask, rows, f"image-token positions per row: where the model scatters "
                                                 f"{source.name} into the embeddings (the ids are not in this graph)")
    raise RewriteError(f"{OPTION} needs the token ids as a graph input [B, {n}] (feeding the embedding), or "
                       f"embeddings with positions scattered in from another input (a VLM's image features); "
                       f"this graph has neither")


def token_ids_input(gm: fx.GraphModule, n: int) -> Optional[fx.Node]:
    """The user's integer input [B, n] that an embedding lookup reads (not a module's buffer such as
    a vision tower's position ids)."""
    for lookup in gm.graph.nodes:
        if not (is_call(lookup, F.embedding) and isinstance(lookup.args[0], fx.Node)):
            continue
        source = skip_layout(lookup.args[0])
        shape = shape_of(source)
        if getattr(source, "op", None) == "placeholder" and not torch_api.is_module_state(source) \
                and shape is not None and len(shape) == 2 and shape[1] == n:
            return source
    return None


def scattered_positions(gm: fx.GraphModule, n: int, stream: fx.Node) -> Optional[tuple]:
    """(the mask input [B, n, ...], the features' node) of an ``x.masked_scatter(mask, features)``
    that builds ``stream`` [B, n, C] from another input; None if there is none."""
    ancestors = set(walk(stream))
    for node in gm.graph.nodes:
        if not (is_call(node, "masked_scatter", torch.Tensor.masked_scatter) and node in ancestors):
            continue
        shape, mask = shape_of(node), skip_layout(node.args[1])
        if shape is None or len(shape) != 3 or shape[1] != n or getattr(mask, "op", None) != "placeholder":
            continue
        mask_shape = shape_of(mask)
        if mask_shape is not None and len(mask_shape) >= 2 and mask_shape[1] == n:
            return mask, node.args[2]
    return None


def _example(node: fx.Node, placeholders: list, example_inputs) -> torch.Tensor:
    i = placeholders.index(node)
    example = example_inputs[i] if example_inputs is not None and i < len(example_inputs) else None
    if example is None or torch_api.is_fake(example):
        raise RewriteError(f"{OPTION} reads how many such tokens a row holds from the example input, and none "
                           f"with values was given")
    return example


def _rows(example: torch.Tensor, ids: Optional[tuple], start: int, end: int) -> int:
    """Candidates per row of the example (the same in every row, else RewriteError)."""
    rows = candidate_positions(example, ids, start, end).sum(dim=1)
    if rows.numel() == 0 or (rows != rows[0]).any():
        raise RewriteError(f"{OPTION}: the rows of the example input hold different numbers of those tokens "
                           f"({rows.tolist()}); every row must hold the same number")
    return int(rows[0])
