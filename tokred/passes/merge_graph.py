"""ToMe's functions that the merge pass inserts into graphs (tokred/passes/merge.py documents the
method): the matching groups of a padded batch, the bipartite merge at a fixed or symbolic token
count, the proportional-attention bias and the unmerge map. Plain torch (traced by inductor,
exported by torch.onnx); on CUDA the matching and merge run as the ``tokred::tome_match`` /
``tokred::tome_merge`` Triton kernels.
"""

from __future__ import annotations

from typing import Optional

import torch

import tokred.triton_ops  # noqa: F401  (registers tokred::tome_match / tokred::tome_merge)
from tokred.triton_ops.common import graph_calls_kernel
from tokred.triton_ops.tome_match import tome_match_reference
from tokred.triton_ops.tome_merge import tome_merge_reference
from tokred.rewriter import tokens


def merge_groups(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Matching groups [B, N] int64: 0 for real tokens, 1 for padding; tokens of different groups
    never match.

    ``mask`` is the attention mask as the block's attention reads it ([B, 1|H, N|1, N], boolean
    "may attend" or additive); a key nobody may attend to is padding.
    """
    return tokens.padding_keys(mask, x.shape[0], x.shape[1]).to(device=x.device, dtype=torch.int64)


def protected_split(prefix: int, protect: str) -> tuple[int, bool]:
    """How ``prefix`` leading protected tokens are protected: (set aside, class_row).

    ``set aside``: tokens taken out before the A/B split; ``class_row``: the first remaining token
    stays in A with its scores at -inf (ToMe's class token). ``"set_aside"`` takes all of them out.
    ``"tome"`` takes out an even number, 2 * (prefix // 2): that is exact, not an approximation of
    ToMe's -inf rule, because an even count leaves the parity of every later position unchanged and
    the tokens taken out are exactly ToMe's -inf rows and columns (A and B tokens in turn), put back
    first in their order as ToMe's output order puts them. An odd last one is ToMe's class token.
    """
    if protect == "set_aside":
        return prefix, False
    return 2 * (prefix // 2), prefix % 2 == 1


def merged_count(n, r: int, prefix: int) -> tuple:
    """(r, M): r capped at half of the ``n - prefix`` unprotected tokens, and the M = n - r left.

    At a symbolic n the comparison is a guard, as a static compile's would be, and M is spelled
    so that it holds n once: N - r where r fits (N - r, N - 2r, ... stay linear however many blocks
    merge), (n + prefix + 1) // 2 where the cap applies. A spelling with n twice (n - min(r, ...))
    doubles at every block, and the shape solver never finished MiniLM's sixth. So a dynamic graph
    serves every length with the same number of capped blocks: one graph for all long calls.
    """
    if isinstance(n, int):
        r = min(r, max(0, (n - prefix) // 2))
        return r, n - r
    if n - prefix >= 2 * r:
        return r, n - r
    return (n - prefix) // 2, (n + prefix + 1) // 2  # n >= prefix: the prefix tokens are among the n


def tome_step(x: torch.Tensor, metric: torch.Tensor, size: Optional[torch.Tensor],
              group: torch.Tensor, r: int, prefix: int, protect: str = "tome"):
    """One bipartite soft matching merge of ``r`` tokens; the first ``prefix`` tokens are protected.

    x [B, N, C], metric [B, N, D], size [B, N, 1] (None: all ones), group [B, N].
    Returns (x [B, M, C], size [B, M, 1], group [B, M], rep [B, M], dest [B, N]) with M = N - r:
    ``rep`` is, for each new token, the original position it stands for (its B token, or itself),
    ``dest`` maps each original position to its new token (the unmerge map). The protected tokens
    stay at positions 0..prefix-1 in both ``protect`` modes (see the module docstring).
    """
    b, n, _ = x.shape
    if size is None:
        size = torch.ones(b, n, 1, dtype=torch.float32, device=x.device)
    r, m = merged_count(n, r, prefix)
    aside, class_row = protected_split(prefix, protect)
    # ToMe leaves the kept A tokens in score order unless it has a class token (then it sorts them)
    kept_order = "score" if protect == "tome" and prefix == 0 else "index"
    if aside == 0:
        return _counted(n, m, *_bipartite_merge(x, metric, size, group, r, class_row, kept_order))
    head = torch.arange(aside, device=x.device).unsqueeze(0).expand(b, aside)
    xr, sr, gr, rep, dest = _bipartite_merge(x[:, aside:], metric[:, aside:], size[:, aside:],
                                             group[:, aside:], r, class_row, kept_order)
    return _counted(n, m, torch.cat([x[:, :aside], xr], dim=1), torch.cat([size[:, :aside], sr], dim=1),
                    torch.cat([group[:, :aside], gr], dim=1), torch.cat([head, rep + aside], dim=1),
                    torch.cat([head, dest + aside], dim=1))


def _counted(n, m, x, size, group, rep, dest):
    """tome_step's outputs with their token dims spelled M (x, size, group, rep) and N (dest).

    A symbolic N only: the merge's own sizes come out as (N + 1) // 2 - r + N // 2, which the
    shape solver does not reduce to N - r, and the next block's merge would nest two copies of
    it, doubling the expression at every block.
    A view keeps the old expression (it proves the two equal and keeps the input's); as_strided
    takes the size it is given, and is free (the same memory, the same strides).
    """
    if isinstance(n, int):
        return x, size, group, rep, dest

    def spelled(t, count):
        return torch.as_strided(t, (t.shape[0], count, *t.shape[2:]), t.stride())

    return spelled(x, m), spelled(size, m), spelled(group, m), spelled(rep, m), spelled(dest, n)


def _bipartite_merge(x, metric, size, group, r: int, class_row: bool = False, kept_order: str = "index"):
    """tome_step's merge over all of x: A = even, B = odd positions.

    ``class_row``: token 0 (an A token) is ToMe's class token: group -1 gives its row of scores
    -inf, and it ranks after every other A token, so it is never merged, even where other rows are
    -inf too (a padding token with no padded partner). ``kept_order``: "index" or "score" (best
    score first) for the kept A tokens.
    """
    b, n, _ = x.shape
    na, nb = (n + 1) // 2, n // 2
    # CUDA: the fused Triton kernels; elsewhere the references, inlined for inductor to fuse
    match = torch.ops.tokred.tome_match if graph_calls_kernel(x, "tome_match") else tome_match_reference
    merge = torch.ops.tokred.tome_merge if graph_calls_kernel(x, "tome_merge") else tome_merge_reference
    match_group = torch.cat([torch.full_like(group[:, :1], -1), group[:, 1:]], dim=1) if class_row else group
    node_max, node_idx = match(metric, match_group)
    src_idx, unm_idx = split_best(node_max, r, last=int(class_row), kept_order=kept_order)
    dst_idx = node_idx.gather(1, src_idx)
    x_out, size_out = merge(x, size, unm_idx, src_idx, dst_idx)
    nu = na - r
    b_rows = torch.arange(nb, device=x.device).unsqueeze(0).expand(b, nb)
    rep = torch.cat([2 * unm_idx, 2 * b_rows + 1], dim=1)
    a_slot = torch.zeros(b, na, dtype=torch.int64, device=x.device)
    a_slot = a_slot.scatter(1, unm_idx, torch.arange(nu, device=x.device).unsqueeze(0).expand(b, nu))
    a_slot = a_slot.scatter(1, src_idx, nu + dst_idx)
    dest = interleave(a_slot, nu + b_rows)
    return x_out, size_out, group.gather(1, rep), rep, dest


def stable_rank_desc(v: torch.Tensor, last: int = 0) -> torch.Tensor:
    """Rank of each entry of v [B, M] in a stable descending sort (ties: lower index first); the
    first ``last`` entries rank after all the others, whatever their values.

    Counted with pairwise comparisons instead of sorting: torch.onnx has no stable sort, and topk
    breaks ties arbitrarily; M is half a sequence, so M^2 comparisons are cheap next to attention.
    """
    m = v.shape[1]
    vi, vj = v.unsqueeze(2), v.unsqueeze(1)  # [B, i, 1], [B, 1, j]
    j_before_i = torch.ones(m, m, dtype=torch.bool, device=v.device).tril(-1)
    ahead = (vj > vi) | ((vj == vi) & j_before_i)
    if last:
        held = torch.arange(m, device=v.device) < last
        held_i, held_j = held[:, None], held[None, :]
        # one held back and one not: j is ahead exactly when i is the one held back (logical ops,
        # not torch.where: onnxruntime has no boolean Where)
        same = held_i == held_j
        ahead = (same & ahead) | (~same & held_i)
    return ahead.sum(dim=2)


def split_best(node_max: torch.Tensor, r: int, last: int = 0, kept_order: str = "index"):
    """The ``r`` A tokens with the best match, best first, and the others.

    node_max [B, Na] -> (src_idx [B, r], unm_idx [B, Na - r]), as a stable descending sort would;
    the first ``last`` A tokens rank last (never merged while r <= Na - last). ``kept_order``:
    the others in index order ("index") or in rank order ("score", ToMe without a class token).
    """
    b, na = node_max.shape
    rank = stable_rank_desc(node_max, last)
    arange = torch.arange(na, device=node_max.device).unsqueeze(0).expand(b, na)
    order = torch.zeros_like(rank).scatter(1, rank, arange)  # order[k]: the index of rank k
    if kept_order == "score":
        return order[:, :r], order[:, r:]
    kept = rank >= r
    # compact the kept indices in index order; the merged ones go to a spare last column
    slot = torch.where(kept, kept.cumsum(dim=1) - 1, torch.full_like(rank, na - r))
    unm_idx = torch.zeros(b, na - r + 1, dtype=torch.int64, device=node_max.device).scatter(1, slot, arange)
    return order[:, :r], unm_idx[:, : na - r]


def interleave(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [B, ceil(N/2)], b [B, N//2] -> [B, N] with a at even and b at odd positions."""
    bsz, na, nb = a.shape[0], a.shape[1], b.shape[1]
    if not isinstance(na, int):
        # a symbolic N: gathers by position, no piece that is empty for one parity (its cat would
        # guard on N's parity: a graph for odd N, one for even)
        position = torch.arange(na + nb, device=a.device)
        half, odd = position // 2, (position % 2 == 1).unsqueeze(0)
        from_a = a.gather(1, half.unsqueeze(0).expand(bsz, -1))  # p // 2 < na at every p
        from_b = b.gather(1, half.clamp(max=nb - 1).unsqueeze(0).expand(bsz, -1))
        return torch.where(odd, from_b, from_a)
    pairs = torch.stack([a[:, :nb], b], dim=-1).reshape(bsz, 2 * nb)
    return torch.cat([pairs, a[:, nb:]], dim=1) if na > nb else pairs


def head_mean(k: torch.Tensor) -> torch.Tensor:
    """Keys [B, H, N, D] averaged over heads -> [B, N, D] (ToMe's matching metric)."""
    return k.mean(dim=1)


def size_bias(size: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Proportional attention: log(size) [B, M, 1] as an additive key bias [B, 1, 1, M]."""
    return size.log()[:, None, None, :, 0].to(dtype)


def add_key_bias(mask: Optional[torch.Tensor], bias: torch.Tensor) -> torch.Tensor:
    """Combine an SDPA attn_mask (None, boolean or additive) with an additive key bias."""
    if mask is None:
        return bias
    if mask.dtype == torch.bool:
        return torch.where(mask, bias, torch.full_like(bias, float("-inf")))
    return mask + bias


def getitem(t, i):
    return t[i]


def compose_dest(total: Optional[torch.Tensor], dest: torch.Tensor) -> torch.Tensor:
    """Where each original token is after one more merge: total [B, N0] (None: identity), dest [B, N]."""
    return dest if total is None else dest.gather(1, total)
