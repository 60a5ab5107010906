"""Facts about a captured graph, computed once and read by every pass (see ARCHITECTURE.md).

    facts = analyze(gm)
    facts.attention_sites   AttentionSite per attention core (SDPA or softmax chain)
    facts.projections       ProjectionSite per linear-like node, with its role
    facts.blocks            Block per transformer block on the residual stream
    facts.token_axes        TokenAxes: which dims of which node run over tokens
    facts.token_count       N, the tokens the blocks see; facts.prefix_tokens: class/distill/register
    facts.shape_literals    (node, position, value): literals in shape arguments equal to a token count
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import networkx as nx
from torch import fx

from tokred.rewriter.analysis.blocks import (
    assign_roles, find_blocks, find_prefix_tokens, find_readout_positions, post_dominators,
)
from tokred.rewriter.analysis.graph import shape_keys, shape_of, size_key, to_networkx
from tokred.rewriter.analysis.literals import find_shape_literals
from tokred.rewriter.analysis.roles import attention_role
from tokred.rewriter.analysis.sites import (
    AttentionSite, Block, ProjectionSite, find_attention_sites, find_projections, positional_operands,
)
from tokred.rewriter.analysis.token_axis import TokenAxes, infer_token_axes
from tokred.rewriter.report import SKIPPED, Report, SiteRecord

__all__ = ["analyze", "GraphFacts", "AttentionSite", "Block", "ProjectionSite", "TokenAxes"]


@dataclass
class GraphFacts:
    gm: fx.GraphModule
    attention_sites: list
    projections: list
    blocks: list
    token_axes: TokenAxes
    token_count: Optional[int]
    prefix_tokens: int
    shape_literals: list
    readout_positions: list = field(default_factory=list)
    nx_graph: nx.DiGraph = field(repr=False, default=None)

    @property
    def protected_tokens(self) -> int:
        """Leading tokens no pass may merge or prune: class/distill/register tokens and the positions
        the model reads out by index after its blocks (BERT's pooler reads [CLS] at 0)."""
        readout = [p for p in self.readout_positions if 0 <= p < 8]
        return max([self.prefix_tokens] + [p + 1 for p in readout])

    def stack_of(self, block: Block) -> list:
        """The blocks of ``block``'s stack (its residual stream), in order."""
        return [b for b in self.blocks if b.stack == block.stack]

    def blocks_after(self, block: Block) -> list:
        """The blocks after ``block`` on its residual stream (they see a cut made after it)."""
        return [b for b in self.stack_of(block) if b.index > block.index]

    def block_of(self, site: AttentionSite) -> Optional[Block]:
        return next((b for b in self.blocks if b.attention is site), None)

    def to_report(self) -> Report:
        report = Report(blocks=len(self.blocks), token_count=self.token_count,
                        prefix_tokens=self.prefix_tokens, readout_positions=list(self.readout_positions))
        for p in self.projections:
            report.projections[p.role] = report.projections.get(p.role, 0) + 1
        for site in self.attention_sites:
            record = SiteRecord(
                module=site.module or "?", layer=site.layer, kind=site.kind,
                q_shape=shape_of(site.q), kv_shape=shape_of(site.k), heads=site.heads,
                kv_heads=site.kv_heads, head_dim=site.head_dim, causal=site.causal,
                has_mask=site.mask is not None, role=site.role,
            )
            if site.skip_reason:
                record.mark(SKIPPED, site.skip_reason)
            site.record = record
            report.attention_sites.append(record)
        return report


def analyze(gm: fx.GraphModule) -> GraphFacts:
    """Find sites, blocks, the token axis and shape literals of a Dynamo-captured graph."""
    graph = gm.graph
    positional_operands(graph)  # the same calls; operands given by keyword read like positional ones
    nxg = to_networkx(graph)
    sites = find_attention_sites(graph)
    for i, site in enumerate(sites):
        site.layer = i
    # token counts as size keys: ints, or in a dynamic graph sympy expressions (``s27``), so that a
    # symbolic count is analysed like a static one without evaluating it
    lengths = {id(s): (size_key(s.q_len), size_key(s.kv_len)) for s in sites}
    known = [s for s in sites if None not in lengths[id(s)]]
    counts = Counter(lengths[id(s)][0] for s in known if lengths[id(s)][0] == lengths[id(s)][1])
    token_counts = set(counts)
    seeds = {}
    for site in known:
        for node, dims in _site_seeds(site).items():
            seeds[node] = seeds.get(node, frozenset()) | dims
    axes = infer_token_axes(graph, token_counts, seeds)
    projections = find_projections(graph)
    self_attention = [s for s in known if lengths[id(s)][0] == lengths[id(s)][1] and not s.skip_reason]
    blocks = find_blocks(self_attention, nxg, post_dominators(graph, nxg))
    assign_stacks(blocks, nxg)
    for site in sites:
        site.role = attention_role(site)
    for site in known:
        if lengths[id(site)][0] != lengths[id(site)][1] and not site.skip_reason:
            queries = "1 query" if site.q_len == 1 else f"{site.q_len} queries"
            site.skip_reason = f"{site.role} ({queries}, {site.kv_len} keys)"
    assign_roles(projections, sites, blocks, graph)
    prefix = find_prefix_tokens(graph, axes, blocks[0].input if blocks else None, nxg)
    token_count = counts.most_common(1)[0][0] if counts else None
    literals = find_shape_literals(graph, axes, token_counts)
    readout = find_readout_positions(graph, axes, blocks[-1].output if blocks else None)
    return GraphFacts(gm=gm, attention_sites=sites, projections=projections, blocks=blocks,
                      token_axes=axes, token_count=token_count, prefix_tokens=prefix,
                      shape_literals=literals, readout_positions=readout, nx_graph=nxg)


def assign_stacks(blocks: list, nxg: nx.DiGraph) -> None:
    """Number the stacks of ``blocks``: a block continues the previous one's stack when its input
    is computed from that block's output with the same shape [B, N, C]."""
    stack = 0
    for prev, block in zip(blocks, blocks[1:]):
        same = prev.output is not None and shape_keys(prev.output) == shape_keys(block.input) and (
            prev.output is block.input or nx.has_path(nxg, prev.output, block.input))
        stack += 0 if same else 1
        block.stack = stack


def _site_seeds(site: AttentionSite) -> dict:
    seeds = {}
    for node in (site.q, site.k, site.v):
        shape = shape_of(node)
        if shape is not None and len(shape) >= 2:
            seeds[node] = seeds.get(node, frozenset()) | {len(shape) - 2}
    if site.scores is not None:
        nd = len(shape_of(site.scores))
        seeds[site.scores] = frozenset({nd - 2, nd - 1})
    # the mask broadcasts against the scores [.., Nq, Nk]: its last dims are the key and query axes
    mask_shape = shape_of(site.mask)
    if mask_shape is not None and len(mask_shape) >= 1:
        dims = set()
        if mask_shape[-1] == site.kv_len and site.kv_len != 1:
            dims.add(len(mask_shape) - 1)
        if len(mask_shape) >= 2 and mask_shape[-2] == site.q_len and site.q_len != 1:
            dims.add(len(mask_shape) - 2)
        if dims:
            seeds[site.mask] = frozenset(dims)
    return seeds
