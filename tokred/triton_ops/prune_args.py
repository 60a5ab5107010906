"""Argument checks of the pruning ops, shared by the references and custom ops (``prune.py``), the
Triton launchers (``prune_kernels.py``) and the fake implementations.

Dependencies go one way: ``prune_args`` <- ``prune_kernels`` <- ``prune`` (the dispatcher, which
registers the kernels for CUDA); ``prune_args`` <- ``prune``. Nothing here imports either of them.
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_score_args(name: str, q_rows: Tensor, k: Tensor, bias: Tensor | None) -> None:
    """Raise unless q_rows [B, H, R, D], k [B, Hkv, N, D] with H % Hkv == 0, bias None or [B|1, H|1, R, N]."""
    torch._check(q_rows.dim() == 4, lambda: f"{name}: expected q_rows [B, H, R, D], got {tuple(q_rows.shape)}")
    torch._check(k.dim() == 4, lambda: f"{name}: expected k [B, Hkv, N, D], got {tuple(k.shape)}")
    torch._check(q_rows.dtype.is_floating_point and k.dtype.is_floating_point,
                 lambda: f"{name}: expected float q_rows and k, got {q_rows.dtype}, {k.dtype}")
    torch._check(q_rows.shape[0] == k.shape[0],
                 lambda: f"{name}: batch mismatch, q_rows {tuple(q_rows.shape)} vs k {tuple(k.shape)}")
    torch._check(q_rows.shape[3] == k.shape[3],
                 lambda: f"{name}: head dim mismatch, q_rows {tuple(q_rows.shape)} vs k {tuple(k.shape)}")
    torch._check(q_rows.shape[1] % k.shape[1] == 0,
                 lambda: f"{name}: query heads {q_rows.shape[1]} not a multiple of kv heads {k.shape[1]}")
    if bias is not None:
        torch._check(bias.dim() == 4, lambda: f"{name}: expected bias [B|1, H|1, R, N], got {tuple(bias.shape)}")
        torch._check(bias.dtype.is_floating_point,
                     lambda: f"{name}: expected a float (additive) bias, got {bias.dtype}")
        want = (q_rows.shape[0], q_rows.shape[1], q_rows.shape[2], k.shape[2])
        for dim in range(4):
            torch._check(bias.shape[dim] == want[dim] or (dim < 2 and bias.shape[dim] == 1),
                         lambda: f"{name}: bias {tuple(bias.shape)} does not broadcast to [B, H, R, N] = {want}")


def check_candidates(name: str, candidates: Tensor, num_tokens, keep: int, num_candidates: int | None = None) -> None:
    """Raise unless candidates is a bool [N] and 0 <= keep <= num_candidates <= N (when given)."""
    torch._check(candidates.dim() == 1 and candidates.dtype == torch.bool,
                 lambda: f"{name}: expected candidates bool [N], got {candidates.dtype} {tuple(candidates.shape)}")
    torch._check(candidates.shape[0] == num_tokens,
                 lambda: f"{name}: candidates has {candidates.shape[0]} positions, the tokens {num_tokens}")
    if num_candidates is not None:
        torch._check(0 <= num_candidates, lambda: f"{name}: num_candidates {num_candidates} < 0")
        torch._check(num_candidates <= num_tokens,
                     lambda: f"{name}: num_candidates {num_candidates} > tokens {num_tokens}")
        torch._check(0 <= keep <= num_candidates,
                     lambda: f"{name}: keep {keep} outside [0, num_candidates = {num_candidates}]")
    else:
        torch._check(keep >= 0, lambda: f"{name}: keep {keep} < 0")


def check_num_candidates(name: str, candidates: Tensor, num_candidates: int) -> None:
    """Raise if ``num_candidates != candidates.sum()`` (eager paths only: it reads the tensor)."""
    counted = int(candidates.sum().item())
    if counted != num_candidates:
        raise ValueError(f"{name}: num_candidates = {num_candidates} but candidates marks {counted} positions")


def kept_count(num_tokens, num_candidates: int, keep: int):
    """M = N - num_candidates + keep: the tokens a cut keeps (symbolic N passes through)."""
    return num_tokens - num_candidates + keep


def check_prune_args(x, q_rows, k, bias, candidates, keep, num_candidates) -> None:
    """All of prune_tokens' checks: scores' arguments, x [B, N, *row] against k, the candidates."""
    check_score_args("prune_tokens", q_rows, k, bias)
    torch._check(x.dim() >= 2, lambda: f"prune_tokens: expected x [B, N, *row], got {tuple(x.shape)}")
    torch._check(x.shape[0] == k.shape[0], lambda: f"prune_tokens: batch mismatch, x {tuple(x.shape)} vs k {tuple(k.shape)}")
    torch._check(x.shape[1] == k.shape[2],
                 lambda: f"prune_tokens: x has {x.shape[1]} tokens, k {k.shape[2]} keys")
    check_candidates("prune_tokens", candidates, x.shape[1], keep, num_candidates)
