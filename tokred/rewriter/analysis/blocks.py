"""Blocks on the residual stream, projection roles and prefix tokens."""

from __future__ import annotations

import operator
from collections import Counter
from typing import Optional

import networkx as nx
import torch
from torch import fx

from tokred.rewriter.analysis.graph import (
    ADD_FUNCS, common_module_path, is_call, is_parameter_like,
    module_path, shape_keys, shape_of, walk,
)
from tokred.rewriter.analysis.sites import (
    LAYOUT_FUNCS, LAYOUT_METHODS, AttentionSite, Block, is_projection_node, projection_input, skip_layout,
)
from tokred.rewriter.analysis.token_axis import TokenAxes


def is_add(node) -> bool:
    return is_call(node, *ADD_FUNCS, "add")


def find_out_projection(site: AttentionSite, max_steps: int = 12) -> Optional[fx.Node]:
    """The projection that reads the attention output, through layout ops."""
    cur = site.node
    for _ in range(max_steps):
        # size()/dim() calls read the shape, not the data
        users = [u for u in cur.users if not is_call(u, "size", "dim", "numel")]
        if len(users) != 1:
            # SDPA wrappers may return a tuple (output, weights): follow element 0
            items = [u for u in users if u.target is operator.getitem and u.args[1] == 0]
            if len(items) != 1:
                return None
            cur = items[0]
            continue
        cur = users[0]
        if is_projection_node(cur):
            return cur
        if not (is_call(cur, *LAYOUT_METHODS, *LAYOUT_FUNCS) or cur.target is operator.getitem):
            return None
    return None


def find_residual_add(start: fx.Node, residual_candidates: set, max_nodes: int = 64) -> Optional[fx.Node]:
    """The first add downstream of ``start`` whose other operand is one of ``residual_candidates``.

    ``start`` is the branch output (e.g. the out projection); the walk passes through dropout,
    layer scale and post-branch norms (Gemma's post_attention_layernorm) on its way to the add.
    """
    frontier, seen = [start], set()
    while frontier and len(seen) < max_nodes:
        cur = frontier.pop(0)
        if cur in seen:
            continue
        seen.add(cur)
        for user in cur.users:
            if is_add(user):
                operands = [a for a in user.args[:2] if isinstance(a, fx.Node)]
                others = [a for a in operands if a is not cur]
                if len(operands) == 2 and others and others[0] in residual_candidates and \
                        shape_keys(user) == shape_keys(others[0]):
                    return user
            frontier.append(user)
    return None


def post_dominators(graph: fx.Graph, nxg: nx.DiGraph) -> dict:
    """Immediate post-dominator of every node that reaches the output (networkx, reversed graph)."""
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    return nx.immediate_dominators(nxg.reverse(copy=False), output)


def norm_chain(add: fx.Node, ipdom: dict, max_steps: int = 8) -> list:
    """``add`` and the nodes every path from it passes through while it stays a [B, N, C] stream
    computed without projections: a post-norm (LayerNorm call, or a hand-written RMSNorm whose
    internal branches rejoin) shows up here as the nodes after the add."""
    chain, cur = [add], add
    for _ in range(max_steps):
        nxt = ipdom.get(cur)
        if nxt is None or nxt is cur or nxt.op != "call_function" and nxt.op != "call_method" or \
                is_projection_node(nxt) or shape_keys(nxt) != shape_keys(add):
            break
        chain.append(nxt)
        cur = nxt
    return chain


def find_blocks(sites: list, nxg: nx.DiGraph, ipdom: dict) -> list:
    """One Block per self-attention site that sits on a residual stream."""
    blocks = []
    for site in sites:
        site.out_proj = find_out_projection(site)
        if site.out_proj is None:
            site.skip_reason = "no output projection found after the attention core"
            continue
        q_entry = projection_input(site.q_proj) if site.q_proj is not None else site.q
        candidates = nx.ancestors(nxg, q_entry) | {q_entry}
        attn_add = find_residual_add(site.out_proj, candidates)
        if attn_add is None:
            site.skip_reason = "no residual add found after the attention output projection"
            continue
        site.residual_add = attn_add
        residual = next(a for a in attn_add.args[:2] if isinstance(a, fx.Node) and a in candidates)
        parallel = _parallel_block(site, residual, attn_add, nxg, ipdom)
        if parallel is not None:
            blocks.append(parallel)
            continue
        # the stream the MLP reads: the add itself (pre-norm) or the end of the norm after it
        chain = norm_chain(attn_add, ipdom)
        steps, mlp_add = next(((i, add) for i, cand in enumerate(chain) if (add := _find_mlp_add(cand))),
                              (0, None))
        unflattened = None  # the MLP on the stream flattened to [B*N, C] (OPT): the view back
        if mlp_add is None:
            steps, (mlp_add, unflattened) = next(
                ((i, found) for i, cand in enumerate(chain) if (found := _find_flat_mlp_add(cand))), (0, (None, None)))
        mid, post_norm = chain[steps], steps > 0
        # post-norm: the same norm follows the MLP add (as many post-dominator steps); decided from the
        # attention side, since a pre-norm model's last MLP add is also followed by a (final) norm
        output = None
        if mlp_add is not None:
            out_chain = norm_chain(unflattened if unflattened is not None else mlp_add, ipdom)
            output = out_chain[steps] if steps < len(out_chain) else None
        module = site.module.rsplit(".", 1)[0] if "." in site.module else site.module
        if mlp_add is not None:
            module = common_module_path([site.module, module_path(mlp_add)]) or module
        blocks.append(Block(index=len(blocks), attention=site, input=residual, attn_add=attn_add, mid=mid,
                            mlp_add=mlp_add, output=output, module=module, post_norm=post_norm))
    return _chain(blocks)


SHARED_ADD = ("several attention branches are added to the stream in one add (parallel attention "
              "branches): not supported yet")


def _chain(blocks: list) -> list:
    """The blocks as a chain along the stream, numbered in order.

    Attention sites whose branches join the stream in the same add (timm's ParallelThingsBlock:
    ``x + attn_0(x) + attn_1(x)``) make no block: their sites are skipped with the reason. A
    block whose MLP add was found at or after the next block's attention core took a later block's
    add (nothing closes its MLP before the next block reads the stream): its MLP add and output are
    dropped, so no pass cuts there.
    """
    shared = Counter(block.attn_add for block in blocks)
    for block in blocks:
        if shared[block.attn_add] > 1:
            block.attention.skip_reason = SHARED_ADD
    blocks = [block for block in blocks if shared[block.attn_add] == 1]
    if not blocks:
        return blocks
    order = {n: i for i, n in enumerate(blocks[0].attn_add.graph.nodes)}
    for block, following in zip(blocks, blocks[1:]):
        for node in (block.mlp_add, block.output):
            if node is not None and order[node] >= order[following.attention.node]:
                block.mlp_add = block.output = None
                break
    for i, block in enumerate(blocks):
        block.index = i
    return blocks


def _parallel_block(site: AttentionSite, residual: fx.Node, attn_add: fx.Node, nxg: nx.DiGraph,
                    ipdom: dict) -> Optional[Block]:
    """The block of ``site`` if it is a parallel-residual one, else None.

    Two forms: the MLP output joins the attention output before the residual add (GPT-J, Phi,
    Falcon, GPT-NeoX: ``(attn + mlp) + x``), or it is added after the attention residual add but
    computed from the block input, not from that add (``(x + attn) + mlp(ln(x))``).
    """
    # (attn + mlp) + x: an add between the out projection and the residual add whose other operand
    # is a branch with a projection of its own
    between = (nx.descendants(nxg, site.out_proj) & nx.ancestors(nxg, attn_add)) | {site.out_proj}
    mlp_add = output = None
    order = {n: i for i, n in enumerate(attn_add.graph.nodes)}
    for node in sorted(between, key=order.__getitem__):
        if node is not site.out_proj and is_add(node):
            others = [a for a in node.args[:2] if isinstance(a, fx.Node) and a not in between]
            if others and _branch_has_projection(others[0], residual, 96) and residual in nx.ancestors(nxg, others[0]):
                mlp_add, output = node, attn_add
                break
    if mlp_add is None:
        # (x + attn) + mlp(ln(x)): the next add's MLP branch reads the block input, not x + attn
        for user in attn_add.users:
            if not is_add(user):
                continue
            other = next((a for a in user.args[:2] if isinstance(a, fx.Node) and a is not attn_add), None)
            if other is not None and _branch_has_projection(other, residual, 96) and \
                    attn_add not in nx.ancestors(nxg, other) and residual in nx.ancestors(nxg, other):
                mlp_add, output = user, user
                break
    if mlp_add is None:
        return None
    module = common_module_path([site.module, module_path(mlp_add)]) or (
        site.module.rsplit(".", 1)[0] if "." in site.module else site.module)
    return Block(index=0, attention=site, input=residual, attn_add=attn_add, mid=None, mlp_add=mlp_add,
                 output=output, module=module, parallel=True)


def _find_mlp_add(mid: fx.Node, max_nodes: int = 96) -> Optional[fx.Node]:
    """The add that closes the MLP branch: add(mid, f(mid)) with a projection inside f."""
    for user in mid.users:
        if is_add(user):
            other = next((a for a in user.args[:2] if isinstance(a, fx.Node) and a is not mid), None)
            if other is not None and _branch_has_projection(other, mid, max_nodes):
                return user
    return None


def _find_flat_mlp_add(mid: fx.Node) -> Optional[tuple]:
    """(the MLP add, its view back to [B, N, C]) where the MLP runs on ``mid`` flattened to
    [B*N, C] and the stream is viewed back after its residual add (OPT's decoder layer); else None."""
    stream = shape_keys(mid)
    for flat in mid.users:
        shape = shape_keys(flat)
        if not (is_call(flat, "reshape", "view", torch.reshape, "flatten") and shape and stream and len(shape) == 2
                and len(stream) == 3 and shape[-1] == stream[-1]):
            continue
        add = _find_mlp_add(flat)
        back = list(add.users) if add is not None else []
        if len(back) == 1 and is_call(back[0], "reshape", "view", torch.reshape) and shape_keys(back[0]) == stream:
            return add, back[0]
    return None


def _branch_has_projection(node: fx.Node, root: fx.Node, max_nodes: int) -> bool:
    frontier, seen = [node], set()
    while frontier and len(seen) < max_nodes:
        cur = frontier.pop()
        if cur in seen or cur is root:
            continue
        seen.add(cur)
        if is_projection_node(cur):
            return True
        frontier.extend(cur.all_input_nodes)
    return False


def assign_roles(projections: list, sites: list, blocks: list, graph: fx.Graph) -> None:
    """Fill ``ProjectionSite.role`` from the attention sites and blocks."""
    by_node = {p.node: p for p in projections}
    for site in sites:
        q, k, v = site.q_proj, site.k_proj, site.v_proj
        if q is not None and q is k and k is v:
            _set_role(by_node, q, "qkv")
        else:
            if k is not None and k is v:
                _set_role(by_node, k, "kv")
            else:
                _set_role(by_node, k, "k")
                _set_role(by_node, v, "v")
            _set_role(by_node, q, "q")
        _set_role(by_node, site.out_proj, "out")
    for block in blocks:
        if block.mlp_add is None:
            continue
        if block.parallel:  # the MLP branch: the operand of its add that is not the attention side
            root = block.input
            branch = [a for a in block.mlp_add.args[:2] if isinstance(a, fx.Node)
                      and a is not block.attn_add and not _reaches_node(a, block.attention.out_proj)]
        else:
            root = block.mid
            branch = [a for a in block.mlp_add.args[:2] if isinstance(a, fx.Node) and a is not block.mid]
        inside = _between(root, branch[0]) if branch else []
        projs = [n for n in inside if n in by_node]
        for i, node in enumerate(projs):
            _set_role(by_node, node, "mlp_out" if i == len(projs) - 1 else "mlp_in")
    # the head after the last block: lm_head where it projects to the rows of the embedding table
    # that reads the user's token ids (not position or token-type tables); the ids may be reshaped
    # first (GPT-2 views input_ids to [-1, N])
    vocab = {shape_of(n.args[1])[0] for n in graph.nodes
             if is_call(n, torch.nn.functional.embedding) and shape_of(n.args[1])
             and isinstance(n.args[0], fx.Node) and getattr(skip_layout(n.args[0]), "op", None) == "placeholder"}
    last = blocks[-1].output if blocks and blocks[-1].output is not None else None
    order = {n: i for i, n in enumerate(graph.nodes)}
    for p in projections:
        if p.role == "other" and last is not None and order[p.node] > order[last]:
            p.role = "lm_head" if p.out_features in vocab else "head"


def _reaches_node(node: fx.Node, target: fx.Node, max_nodes: int = 256) -> bool:
    """``target`` is ``node`` or one of its ancestors (within ``max_nodes``)."""
    return any(cur is target for cur in walk(node, max_nodes=max_nodes))


def _set_role(by_node: dict, node, role: str) -> None:
    if node is not None and node in by_node:
        by_node[node].role = role


def _between(root: fx.Node, leaf: fx.Node, max_nodes: int = 256) -> list:
    """Nodes on paths from ``root`` to ``leaf`` (exclusive of root), in graph order."""
    up, frontier = set(), [leaf]
    while frontier and len(up) < max_nodes:
        cur = frontier.pop()
        if cur in up or cur is root:
            continue
        up.add(cur)
        frontier.extend(cur.all_input_nodes)
    order = {n: i for i, n in enumerate(root.graph.nodes)}
    return sorted(up, key=lambda n: order[n])


def find_prefix_tokens(graph: fx.Graph, axes: TokenAxes, first_input: Optional[fx.Node],
                       nxg: nx.DiGraph) -> int:
    """Class/distillation/register tokens: parameter-derived pieces cat'ed in front of the tokens.

    Only ``cat`` nodes upstream of the first block along a token dim count; the prefix is the number
    of parameter-derived tokens before the first data-derived piece.
    """
    if first_input is None:
        return 0
    upstream = nx.ancestors(nxg, first_input) | {first_input}
    best = 0
    for node in graph.nodes:
        if node not in upstream or not is_call(node, torch.cat, "cat", torch.concat):
            continue
        shape = shape_of(node)
        if shape is None:
            continue
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        dim = dim + len(shape) if dim < 0 else dim
        if dim not in axes.of(node):
            continue
        prefix = 0
        for piece in node.args[0]:
            if not isinstance(piece, fx.Node) or not is_parameter_like(piece):
                break
            prefix += shape_of(piece)[dim]
        best = max(best, prefix)
    return best


def find_readout_positions(graph: fx.Graph, axes: TokenAxes, after: Optional[fx.Node]) -> list:
    """Token positions read by an integer index after the blocks (BERT's pooler ``x[:, 0]``).

    Such a token is the model's summary of the sequence; token-reducing passes protect it.
    """
    if after is None:
        return []
    order = {n: i for i, n in enumerate(graph.nodes)}
    positions = set()
    for node in graph.nodes:
        if node.target is not operator.getitem or order[node] <= order[after]:
            continue
        src, idx = node.args[0], node.args[1]
        if not isinstance(src, fx.Node) or shape_of(src) is None:
            continue
        items = idx if isinstance(idx, tuple) else (idx,)
        for d, item in enumerate(items):
            if item is Ellipsis:
                break
            if isinstance(item, int) and not isinstance(item, bool) and d in axes.of(src):
                positions.add(item)
    return sorted(positions)
