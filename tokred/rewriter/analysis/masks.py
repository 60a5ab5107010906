"""The masks an attention site reads, and whether one may hold padding.

A site's masks are recorded as (kind, node) pairs (:attr:`AttentionSite.masks`: SDPA's attn_mask,
an added mask, a masked_fill's or a where's); passes read them as one SDPA-convention bias through
:func:`tokred.rewriter.surgery.mask_node`.
"""

from __future__ import annotations

import torch
from torch import fx

from tokred.compat import torch_api
from tokred.rewriter.analysis.graph import arg, is_call, walk
from tokred.rewriter.analysis.sites import AttentionSite, find_manual_site


def site_masks(site: AttentionSite) -> tuple:
    """The masks ``site`` reads now (after earlier rewrites replaced its inputs), as (kind, node)
    pairs (see :attr:`AttentionSite.masks`); () when it reads none."""
    if site.kind == "sdpa":
        mask = arg(site.node, 3, "attn_mask")
        return (("sdpa", mask),) if isinstance(mask, fx.Node) else ()
    found = find_manual_site(site.softmax)
    return found.masks if found is not None else ()


def reads_padding(mask: fx.Node) -> bool:
    """Whether ``mask`` may hold padding: it is computed from a user input other than positions.
    A causal, sliding-window or prefix-LM mask built from aranges, shapes and position ids (inputs
    that also feed the rotary embedding's cos/sin) holds none."""
    return any(cur.op == "placeholder" and not torch_api.is_module_state(cur) and not _feeds_rotary(cur)
               for cur in walk(mask))


def _feeds_rotary(node: fx.Node, max_nodes: int = 256) -> bool:
    """Whether ``node`` (a positions input) reaches a cos or sin: a rotary embedding's table."""
    return any(is_call(cur, torch.cos, torch.sin, "cos", "sin") for cur in walk(node, lambda n: n.users, max_nodes))
