"""Plain functions that the surgery inserts into graphs to move tokens around.

They are ordinary torch code (traced by inductor, exported by torch.onnx). On CUDA the [B, N, C]
residual stream goes through the ``tokred::gather_tokens`` / ``tokred::scatter_tokens`` Triton
kernels; elsewhere through their plain-torch references, inlined so that inductor fuses them with
their neighbours (a custom op is opaque to inductor: on CPU that costs more than it saves).
"""

from __future__ import annotations

from fractions import Fraction

import torch

from tokred.triton_ops.common import graph_calls_kernel
from tokred.triton_ops.gather_tokens import gather_tokens_reference
from tokred.triton_ops.scatter_tokens import scatter_tokens_reference


def gather_token_dim(x: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """Take tokens ``index`` [B, M] along ``dim`` of ``x`` [B or 1, ..., N, ...] -> [B, ..., M, ...].

    Used for side inputs of the reduced region: masks ([B, 1, N, N], once per token dim), rotary
    tables ([B, N, D]), position ids ([B, N]). A broadcast batch dim of 1 is expanded to B.
    """
    batch = index.shape[0]
    if x.shape[0] != batch:
        x = x.expand(batch, *x.shape[1:])
    view = [batch] + [1] * (x.dim() - 1)
    view[dim] = index.shape[1]
    expand = list(x.shape)
    expand[dim] = index.shape[1]
    return torch.gather(x, dim, index.reshape(view).expand(expand))


def tail_index(index: torch.Tensor, leading: int) -> torch.Tensor:
    """The kept tokens after a kept prefix of ``leading``, as positions among the tokens after
    that prefix: index [B, M] -> [B, M - leading] (``index[:, leading:] - leading``)."""
    return index[:, leading:] - leading


def gather_stream(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Kept tokens of the residual stream: x [B, N, C], index [B, M] -> [B, M, C]."""
    if graph_calls_kernel(x, "gather_tokens"):
        return torch.ops.tokred.gather_tokens(x, index)
    return gather_tokens_reference(x, index)


def attention_bias(kinds: tuple, *masks: torch.Tensor) -> torch.Tensor:
    """The masks a written-out attention applies to its logits as one additive float32 bias in
    SDPA's convention, rank 4 as broadcasting reads it ([N, N] -> [1, 1, N, N]): 0 where a pair may
    attend, -inf where it may not, plus any bias added to the logits.

    kinds[i] says how ``masks[i]`` is applied: "sdpa" (a boolean "may attend" or an additive mask),
    "add" (added to the logits), "fill" (``logits.masked_fill(m, -inf)``: True = blocked) or
    "keep" (``torch.where(m, logits, -inf)``: True = kept)."""
    bias = None
    for kind, m in zip(kinds, masks):
        if kind in ("fill", "keep") or (kind == "sdpa" and m.dtype == torch.bool):
            allowed = ~m if kind == "fill" else m.bool()
            term = torch.zeros(allowed.shape, dtype=torch.float32, device=m.device).masked_fill(~allowed, float("-inf"))
        else:
            term = m.float()
        bias = term if bias is None else bias + term
    return _rank4(bias)


def _rank4(mask: torch.Tensor) -> torch.Tensor:
    """A mask of rank < 4 as broadcasting reads it against [B, H, Nq, Nk]: [N, N] -> [1, 1, N, N]."""
    return mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))


def scatter_stream(base: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """Restore the token axis: ``base`` [B, N, C] with rows ``index`` [B, M] replaced by src [B, M, C]."""
    if graph_calls_kernel(base, "scatter_tokens"):
        return torch.ops.tokred.scatter_tokens(base, index, src)
    return scatter_tokens_reference(base, index, src)


def fixed_token_index(x: torch.Tensor, keep: tuple) -> torch.Tensor:
    """The same kept token positions for every sample: x [B, N, ...] -> index [B, len(keep)] int64."""
    index = torch.tensor(keep, dtype=torch.int64, device=x.device)
    return index.unsqueeze(0).expand(x.shape[0], len(keep))


def padding_keys(mask, batch: int, n: int) -> torch.Tensor:
    """Keys no query may attend to (padding) [B, N] bool, from an attention mask as the attention
    reads it ([B|1, 1|H, N|1, N], boolean "may attend" or additive); None: no padding."""
    if mask is None:
        return torch.zeros(batch, n, dtype=torch.bool)
    m = _rank4(mask)
    m = m.expand(batch, *m.shape[1:]) if m.shape[0] != batch else m
    m = m[:, 0]
    allowed = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2
    return ~allowed.any(dim=-2)


def kept_count(keep, n):
    """The tokens (or cache entries) ``keep`` leaves of ``n``: a fraction rounds half up (at least 1
    where n > 0), a count is capped at n. ``n`` may be a symbolic size (a graph compiled for every
    token count): the count is then one integer expression, evaluated at each call, with no guard
    on ``n``; it is the same integer a static compile at that n computes."""
    if isinstance(keep, float):
        ratio = Fraction(keep).limit_denominator(1 << 20)
        half_up = (2 * n * ratio.numerator + ratio.denominator) // (2 * ratio.denominator)
        return torch.sym_min(n, torch.sym_max(1, half_up))
    return torch.sym_min(keep, n)
