"""Token pruning ops: attention-row scores, top-k selection of kept tokens, greedy k-center, fused prune.

Ops (under ``torch.ops.tokred``; batch = dim 0, token axis = dim 1):

    prune_tokens(x[B, N, *row], q_rows[B, H, R, D], k[B, Hkv, N, D], bias[B|1, H|1, R, N]?,
                 candidates[N] bool, scale: float, keep: int, num_candidates: int)
        -> (kept[B, M, *row], index[B, M] int64, scores[B, N] fp32)
    select_kept(scores[B, N], candidates[N] bool, keep: int, num_candidates: int) -> index[B, M] int64
    k_center(x[B, N, *row], candidates[N] bool, keep: int, num_candidates: int) -> index[B, M] int64

with ``M = N - num_candidates + keep``. ``candidates`` marks the prunable positions (the same for
every sample); ``num_candidates`` must equal ``candidates.sum()``: it is what makes ``M`` a static
size that ``register_fake`` can compute without reading tensor values (the eager paths check it).

Semantics (those of the prune pass, tokred/passes/prune.py):

- attention-row scores: ``s[b, j] = mean over h, r of softmax_j(q[b, h, r] . k[b, h // (H / Hkv), j]
  * scale + bias[b, h, r, j])``, float32. Only the R query rows are scored, never the N x N map.
- selection: among the candidates, the ``keep`` highest scores (ties: the lower position wins, as a
  stable descending sort); the index is every non-candidate plus the selected candidates, ascending.
- k-center (diversity): greedy k-center on cosine distance ``1 - cos`` over the candidates: first the
  candidate farthest from the mean of the candidates (the plain mean of their rows), then
  repeatedly the candidate with the largest distance to its nearest selected token (ties: lowest
  position), until ``keep`` are selected.

Plain-torch references (the CPU paths) are below; the Triton kernels live in ``prune_kernels.py``,
the argument checks both use in ``prune_args.py`` (imports go one way: prune -> prune_kernels -> prune_args).
NaN scores rank as -inf (lowest; among themselves by position). A query row whose keys are all
masked (-inf) gives NaN scores, as torch.softmax does. k-center needs finite rows (a NaN distance
is never preferred by the kernel, torch's argmax prefers it: the two may then differ).
"""

from __future__ import annotations

import torch
from torch import Tensor

from tokred.triton_ops import common
# The checks are shared with the Triton launchers (prune_kernels.py); re-exported here.
from tokred.triton_ops.prune_args import (  # noqa: F401
    check_candidates, check_num_candidates, check_prune_args, check_score_args, kept_count,
)

# Rows with a norm below this count as zero vectors in k-center: cosine 0 with everything.
NORM_EPS = 1e-12


# ------------------------------------------------------------------------------------------------
# References (plain torch): the CPU paths of the custom ops
# ------------------------------------------------------------------------------------------------


def attention_row_scores_reference(q_rows: Tensor, k: Tensor, scale: float, bias: Tensor | None = None) -> Tensor:
    """scores [B, N] fp32: the attention the R query rows pay each key, averaged over heads and rows.

    q_rows [B, H, R, D] (the class-token row, or the last rows of a decoder), k [B, Hkv, N, D]
    (GQA: head h reads kv head h // (H / Hkv)), bias None or additive [B|1, H|1, R, N] (-inf or
    finfo.min for masked keys; a bool mask must be converted by the caller). Computed in float32.
    Materialises only [B, H, R, N].
    """
    if not torch.compiler.is_compiling():
        check_score_args("attention_row_scores", q_rows, k, bias)
    heads, kv_heads = q_rows.shape[1], k.shape[1]
    keys = k.float()
    if kv_heads != heads:
        keys = keys.repeat_interleave(heads // kv_heads, dim=1)
    logits = torch.matmul(q_rows.float(), keys.transpose(-1, -2)) * scale  # [B, H, R, N]
    if bias is not None:
        logits = logits + bias.float()
    return logits.softmax(dim=-1).mean(dim=(1, 2))


def selected_mask_reference(scores: Tensor, candidates: Tensor, k: int) -> Tensor:
    """selected [B, N] bool: the k highest-scored candidates per row (ties: lower position first).

    Exact and O(N) memory: the k-th largest candidate score t comes from topk (its value does not
    depend on how topk orders ties); every candidate above t is selected, and of those equal to t
    the first ``k - #above`` by position (a cumulative count). Static shapes, no sort.
    """
    if k == 0:
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    scores = scores.float()
    scores = scores.masked_fill(scores.isnan(), float("-inf"))  # NaN ranks lowest, as -inf
    masked = scores.masked_fill(~candidates, float("-inf"))
    threshold = masked.topk(k, dim=-1).values[:, -1:]  # [B, 1]
    above = candidates & (masked > threshold)
    at = candidates & (masked == threshold)
    # Candidates equal to the threshold, numbered 1, 2, ... by position; the first `room` join.
    room = k - above.sum(dim=-1, keepdim=True)
    return above | (at & (at.long().cumsum(dim=-1) <= room))


def ascending_index_reference(keep_mask: Tensor, num_kept: int) -> Tensor:
    """index [B, num_kept] int64: the positions where ``keep_mask[B, N]`` is True, ascending.

    Every row must hold exactly ``num_kept`` True values. topk of the unique integer keys
    ``keep * N + (N - 1 - j)`` puts kept positions first, lowest position first (static shape).
    """
    num_tokens = keep_mask.shape[-1]
    positions = torch.arange(num_tokens, device=keep_mask.device)
    keys = keep_mask.long() * num_tokens + (num_tokens - 1 - positions)
    top = keys.topk(num_kept, dim=-1).values
    return (num_tokens - 1) - (top - num_tokens)


def select_kept_reference(scores: Tensor, candidates: Tensor, k: int) -> Tensor:
    """index [B, M] int64: non-candidates plus the k highest-scored candidates, ascending.

    scores [B, N] float, candidates [N] bool (prunable positions), 0 <= k <= #candidates;
    M = N - #candidates + k; ties between equal scores go to the lower position. Static shapes
    for a given (N, #candidates, k); traceable by aot_autograd/inductor and ONNX-exportable
    (topk, comparisons and cumsum only). Reads ``candidates`` to size M: call it with a constant.
    """
    if not torch.compiler.is_compiling():
        check_candidates("select_kept", candidates, scores.shape[-1], k)
        torch._check(scores.dim() == 2, lambda: f"select_kept: expected scores [B, N], got {tuple(scores.shape)}")
    num_candidates = int(candidates.sum())
    candidates = candidates.to(scores.device)
    keep_mask = ~candidates | selected_mask_reference(scores, candidates, k)
    return ascending_index_reference(keep_mask, kept_count(scores.shape[-1], num_candidates, k))


def prune_tokens_reference(x: Tensor, q_rows: Tensor, k: Tensor, scale: float, bias: Tensor | None,
                           candidates: Tensor, keep: int) -> tuple[Tensor, Tensor, Tensor]:
    """(kept [B, M, *row], index [B, M] int64, scores [B, N] fp32) for x [B, N, *row].

    scores = attention_row_scores(q_rows, k, scale, bias), index = select_kept(scores, candidates,
    keep), kept = x gathered at index along the token axis.
    """
    scores = attention_row_scores_reference(q_rows, k, scale, bias)
    index = select_kept_reference(scores, candidates, keep)
    kept = torch.gather(x, 1, common.expand_token_index(index, x))
    return kept, index, scores


def k_center_selected_reference(x: Tensor, candidates: Tensor, k: int) -> Tensor:
    """selected [B, N] bool: the k candidates greedy k-center picks (cosine distance, fp32)."""
    batch, num_tokens = x.shape[0], x.shape[1]
    selected = torch.zeros((batch, num_tokens), dtype=torch.bool, device=x.device)
    if k == 0:
        return selected
    rows = common.as_token_rows(x).float()
    unit = rows / rows.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
    cand = candidates.to(x.device)[None, :].expand(batch, num_tokens)
    count = cand.sum(dim=-1, keepdim=True).clamp_min(1).to(rows.dtype)  # [B, 1]
    mean = (rows * cand[..., None]).sum(dim=1) / count  # [B, C]
    mean_unit = mean / mean.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
    distance = 1 - (unit * mean_unit[:, None, :]).sum(dim=-1)  # [B, N]: to the mean first
    positions = torch.arange(num_tokens, device=x.device)
    for step in range(k):  # k is static: the loop unrolls under tracing
        open_distance = distance.masked_fill(~cand | selected, float("-inf"))
        chosen = open_distance.argmax(dim=-1, keepdim=True)  # first max on ties: lowest position
        selected = selected | (positions[None, :] == chosen)
        chosen_unit = torch.gather(unit, 1, chosen[..., None].expand(batch, 1, unit.shape[-1]))  # [B, 1, C]
        to_chosen = 1 - (unit * chosen_unit).sum(dim=-1)
        # After the first pick, distance = distance to the nearest selected token.
        distance = to_chosen if step == 0 else torch.minimum(distance, to_chosen)
    return selected


def k_center_reference(x: Tensor, candidates: Tensor, k: int) -> Tensor:
    """index [B, M] int64 (like select_kept): non-candidates plus the k tokens greedy k-center picks.

    x [B, N, *row]; distances are cosine distances 1 - cos in fp32 (zero rows: cos 0). The first
    pick is the candidate farthest from the mean of the candidates' rows; each next pick the
    candidate farthest from its nearest pick; ties go to the lowest position.
    """
    if not torch.compiler.is_compiling():
        check_candidates("k_center", candidates, x.shape[1], k)
    num_candidates = int(candidates.sum())
    selected = k_center_selected_reference(x, candidates, k)
    keep_mask = ~candidates.to(x.device) | selected
    return ascending_index_reference(keep_mask, kept_count(x.shape[1], num_candidates, k))


# ------------------------------------------------------------------------------------------------
# Custom ops: the reference on CPU (and any non-CUDA device), Triton on CUDA (prune_kernels.py)
# ------------------------------------------------------------------------------------------------


@torch.library.custom_op("tokred::select_kept", mutates_args=())
def select_kept(scores: Tensor, candidates: Tensor, keep: int, num_candidates: int) -> Tensor:
    """index [B, N - num_candidates + keep] int64: non-candidates + the keep best candidates, ascending."""
    check_candidates("select_kept", candidates, scores.shape[-1], keep, num_candidates)
    check_num_candidates("select_kept", candidates, num_candidates)
    return select_kept_reference(scores, candidates, keep)


@select_kept.register_fake
def _select_kept_fake(scores: Tensor, candidates: Tensor, keep: int, num_candidates: int) -> Tensor:
    torch._check(scores.dim() == 2, lambda: f"select_kept: expected scores [B, N], got {tuple(scores.shape)}")
    check_candidates("select_kept", candidates, scores.shape[1], keep, num_candidates)
    return scores.new_empty((scores.shape[0], kept_count(scores.shape[1], num_candidates, keep)), dtype=torch.int64)


@torch.library.custom_op("tokred::k_center", mutates_args=())
def k_center(x: Tensor, candidates: Tensor, keep: int, num_candidates: int) -> Tensor:
    """index [B, N - num_candidates + keep] int64: non-candidates + the keep greedy k-center picks, ascending."""
    check_candidates("k_center", candidates, x.shape[1], keep, num_candidates)
    check_num_candidates("k_center", candidates, num_candidates)
    return k_center_reference(x, candidates, keep)


@k_center.register_fake
def _k_center_fake(x: Tensor, candidates: Tensor, keep: int, num_candidates: int) -> Tensor:
    torch._check(x.dim() >= 3, lambda: f"k_center: expected x [B, N, *row], got {tuple(x.shape)}")
    check_candidates("k_center", candidates, x.shape[1], keep, num_candidates)
    return x.new_empty((x.shape[0], kept_count(x.shape[1], num_candidates, keep)), dtype=torch.int64)


@torch.library.custom_op("tokred::prune_tokens", mutates_args=())
def prune_tokens(x: Tensor, q_rows: Tensor, k: Tensor, scale: float, bias: Tensor | None, candidates: Tensor,
                 keep: int, num_candidates: int) -> tuple[Tensor, Tensor, Tensor]:
    """(kept [B, M, *row], index [B, M] int64, scores [B, N] fp32), M = N - num_candidates + keep.

    Fused attention-row scoring (q_rows [B, H, R, D] against k [B, Hkv, N, D], bias [B|1, H|1, R, N]),
    top-``keep`` selection among the candidates and gather of x [B, N, *row].
    """
    check_prune_args(x, q_rows, k, bias, candidates, keep, num_candidates)
    check_num_candidates("prune_tokens", candidates, num_candidates)
    kept, index, scores = prune_tokens_reference(x, q_rows, k, scale, bias, candidates, keep)
    return kept.contiguous(), index, scores


@prune_tokens.register_fake
def _prune_tokens_fake(x, q_rows, k, scale, bias, candidates, keep, num_candidates):
    check_prune_args(x, q_rows, k, bias, candidates, keep, num_candidates)
    batch, num_tokens = x.shape[0], x.shape[1]
    num_kept = kept_count(num_tokens, num_candidates, keep)
    return (x.new_empty((batch, num_kept, *x.shape[2:])),
            x.new_empty((batch, num_kept), dtype=torch.int64),
            x.new_empty((batch, num_tokens), dtype=torch.float32))


if common.HAS_TRITON:
    # The dispatcher imports the kernels, never the other way round (checks: prune_args.py).
    from tokred.triton_ops import prune_kernels

    @select_kept.register_kernel("cuda")
    def _select_kept_cuda(scores, candidates, keep, num_candidates):
        return prune_kernels.select_kept_triton(scores, candidates, keep, num_candidates)

    @k_center.register_kernel("cuda")
    def _k_center_cuda(x, candidates, keep, num_candidates):
        return prune_kernels.k_center_triton(x, candidates, keep, num_candidates)

    @prune_tokens.register_kernel("cuda")
    def _prune_tokens_cuda(x, q_rows, k, scale, bias, candidates, keep, num_candidates):
        return prune_kernels.prune_tokens_triton(x, q_rows, k, scale, bias, candidates, keep, num_candidates)


def _index_only_setup_context(ctx, inputs, output) -> None:
    ctx.mark_non_differentiable(output)


def _no_grad_backward(ctx, grad_index):
    return None, None, None, None


# Selections are not differentiable (the index is an integer tensor).
select_kept.register_autograd(_no_grad_backward, setup_context=_index_only_setup_context)
k_center.register_autograd(_no_grad_backward, setup_context=_index_only_setup_context)


def _prune_tokens_setup_context(ctx, inputs, output) -> None:
    x = inputs[0]
    _, index, scores = output
    ctx.mark_non_differentiable(index, scores)
    ctx.save_for_backward(index)
    ctx.x_shape = x.shape


def _prune_tokens_backward(ctx, grad_kept, grad_index, grad_scores):
    """Gradient flows to x only (kept rows back to their positions; pruned rows get 0). The scores
    only choose the index, so no gradient reaches q_rows, k or bias (as in hard pruning)."""
    (index,) = ctx.saved_tensors
    grad_x = grad_kept.new_zeros(ctx.x_shape)
    grad_x.scatter_(1, common.expand_token_index(index, grad_x), grad_kept)  # indices are unique
    return grad_x, None, None, None, None, None, None, None


prune_tokens.register_autograd(_prune_tokens_backward, setup_context=_prune_tokens_setup_context)


# ------------------------------------------------------------------------------------------------
# ONNX lowerings (standard opset-18 ops; python ints keep/num_candidates arrive as constants)
# ------------------------------------------------------------------------------------------------


def _onnx_helpers():
    import onnx
    from onnxscript import opset18 as op

    def ints(*values):
        return op.Constant(value_ints=list(values))

    def int64(value):
        return op.Constant(value=onnx.helper.make_tensor("value", onnx.TensorProto.INT64, [], [value]))

    return onnx, op, ints, int64


def _onnx_ascending_index(op, ints, int64, keep_mask, num_kept):
    """ONNX ``ascending_index_reference``: TopK of the unique keys keep * N + (N - 1 - j)."""
    import onnx

    num_tokens = op.Gather(op.Shape(keep_mask), int64(-1))  # scalar N
    positions = op.Range(int64(0), num_tokens, int64(1))
    last = op.Sub(num_tokens, int64(1))
    keys = op.Add(op.Mul(op.Cast(keep_mask, to=onnx.TensorProto.INT64), num_tokens), op.Sub(last, positions))
    top, _ = op.TopK(keys, op.Reshape(num_kept, ints(1)), axis=-1, largest=1, sorted=1)
    return op.Sub(last, op.Sub(top, num_tokens))


def _onnx_num_kept(op, int64, num_tokens, keep, num_candidates):
    return op.Add(op.Sub(num_tokens, int64(num_candidates)), int64(keep))


def _onnx_select_kept(op, ints, int64, scores, candidates, keep, num_candidates):
    """ONNX ``select_kept_reference``: TopK threshold, Greater/Equal, CumSum for ties by position."""
    import onnx

    scores = op.Cast(scores, to=onnx.TensorProto.FLOAT)
    scores = op.Where(op.IsNaN(scores), op.Constant(value_float=float("-inf")), scores)
    num_tokens = op.Gather(op.Shape(scores), int64(-1))
    num_kept = _onnx_num_kept(op, int64, num_tokens, keep, num_candidates)
    candidates = op.Unsqueeze(candidates, ints(0))  # [1, N]
    if keep == 0:
        return _onnx_ascending_index(op, ints, int64, op.Expand(op.Not(candidates), op.Shape(scores)), num_kept)
    masked = op.Where(candidates, scores, op.Constant(value_float=float("-inf")))
    values, _ = op.TopK(masked, ints(keep), axis=-1, largest=1, sorted=1)
    threshold = op.Slice(values, ints(keep - 1), ints(keep), ints(1))  # [B, 1]
    above = op.And(candidates, op.Greater(masked, threshold))
    at = op.And(candidates, op.Equal(masked, threshold))
    room = op.Sub(int64(keep), op.ReduceSum(op.Cast(above, to=onnx.TensorProto.INT64), ints(-1), keepdims=1))
    tie_rank = op.CumSum(op.Cast(at, to=onnx.TensorProto.INT64), int64(-1))
    selected = op.Or(above, op.And(at, op.LessOrEqual(tie_rank, room)))
    return _onnx_ascending_index(op, ints, int64, op.Or(op.Not(candidates), selected), num_kept)


def select_kept_onnx_lowering():
    """ONNX translation of ``tokred::select_kept``."""
    _, op, ints, int64 = _onnx_helpers()

    def tokred_select_kept(scores, candidates, keep: int, num_candidates: int):
        return _onnx_select_kept(op, ints, int64, scores, candidates, keep, num_candidates)

    return tokred_select_kept


def _onnx_attention_row_scores(op, ints, int64, q_rows, k, scale, bias):
    """ONNX ``attention_row_scores_reference``: q grouped per kv head ([B, Hkv, G*R, D] @ k^T),
    back to [B, H, R, N], + bias, Softmax, ReduceMean over heads and rows."""
    import onnx

    q_rows = op.Cast(q_rows, to=onnx.TensorProto.FLOAT)
    k = op.Cast(k, to=onnx.TensorProto.FLOAT)
    q_shape = op.Shape(q_rows)  # [B, H, R, D]
    batch, kv_heads = op.Shape(k, start=0, end=1), op.Shape(k, start=1, end=2)
    head_dim = op.Shape(q_rows, start=3, end=4)
    # Head h = kv head * G + g, so q reshaped to [B, Hkv, G*R, D] lines each group up with its kv head.
    grouped = op.Reshape(q_rows, op.Concat(batch, kv_heads, ints(-1), head_dim, axis=0))
    logits = op.MatMul(grouped, op.Transpose(k, perm=[0, 1, 3, 2]))  # [B, Hkv, G*R, N]
    n_keys = op.Shape(k, start=2, end=3)
    logits = op.Reshape(logits, op.Concat(op.Slice(q_shape, ints(0), ints(3), ints(0)), n_keys, axis=0))
    logits = op.Mul(logits, op.Constant(value_float=float(scale)))
    if bias is not None:
        logits = op.Add(logits, op.Cast(bias, to=onnx.TensorProto.FLOAT))
    probs = op.Softmax(logits, axis=-1)
    return op.ReduceMean(probs, ints(1, 2), keepdims=0)  # [B, N]


def prune_tokens_onnx_lowering():
    """ONNX translation of ``tokred::prune_tokens``: scores, selection, GatherElements."""
    _, op, ints, int64 = _onnx_helpers()

    def tokred_prune_tokens(x, q_rows, k, scale: float, bias, candidates, keep: int, num_candidates: int):
        scores = _onnx_attention_row_scores(op, ints, int64, q_rows, k, scale, bias)
        index = _onnx_select_kept(op, ints, int64, scores, candidates, keep, num_candidates)
        kept = op.GatherElements(x, common.onnx_expand_token_index(op, index, x), axis=1)
        return kept, index, scores

    return tokred_prune_tokens


def k_center_onnx_lowering():
    """ONNX translation of ``tokred::k_center``: the k greedy steps unrolled (k is static)."""
    onnx, op, ints, int64 = _onnx_helpers()

    def unit_rows(rows):
        norm = op.ReduceL2(rows, ints(-1), keepdims=1)
        return op.Div(rows, op.Max(norm, op.Constant(value_float=NORM_EPS)))

    def cosine_distance(unit, other_unit):  # unit [B, N, C], other_unit [B, 1, C] -> [B, N]
        return op.Sub(op.Constant(value_float=1.0), op.ReduceSum(op.Mul(unit, other_unit), ints(-1), keepdims=0))

    def tokred_k_center(x, candidates, keep: int, num_candidates: int):
        rows = op.Cast(op.Reshape(x, ints(0, 0, -1)), to=onnx.TensorProto.FLOAT)  # [B, N, C]
        num_tokens = op.Shape(rows, start=1, end=2)
        num_kept = _onnx_num_kept(op, int64, op.Squeeze(num_tokens, ints(0)), keep, num_candidates)
        batch_tokens = op.Shape(rows, start=0, end=2)
        cand = op.Expand(op.Unsqueeze(candidates, ints(0)), batch_tokens)  # [B, N]
        if keep == 0:
            return _onnx_ascending_index(op, ints, int64, op.Not(cand), num_kept)
        unit = unit_rows(rows)
        cand_float = op.Cast(cand, to=onnx.TensorProto.FLOAT)
        count = op.Max(op.ReduceSum(cand_float, ints(1), keepdims=1), op.Constant(value_float=1.0))  # [B, 1]
        mean = op.Div(op.ReduceSum(op.Mul(rows, op.Unsqueeze(cand_float, ints(2))), ints(1), keepdims=1),
                      op.Unsqueeze(count, ints(2)))  # [B, 1, C]
        distance = cosine_distance(unit, unit_rows(mean))
        positions = op.Unsqueeze(op.Range(int64(0), op.Squeeze(num_tokens, ints(0)), int64(1)), ints(0))  # [1, N]
        selected = op.Equal(positions, int64(-1))  # all False, [1, N]
        unit_width = op.Shape(unit, start=2, end=3)
        for step in range(keep):
            closed = op.Or(op.Not(cand), selected)
            open_distance = op.Where(closed, op.Constant(value_float=float("-inf")), distance)
            chosen = op.ArgMax(open_distance, axis=-1, keepdims=1, select_last_index=0)  # [B, 1]
            selected = op.Or(selected, op.Equal(positions, chosen))
            gather_index = op.Expand(op.Unsqueeze(chosen, ints(2)),
                                     op.Concat(op.Shape(chosen), unit_width, axis=0))  # [B, 1, C]
            to_chosen = cosine_distance(unit, op.GatherElements(unit, gather_index, axis=1))
            distance = to_chosen if step == 0 else op.Min(distance, to_chosen)
        return _onnx_ascending_index(op, ints, int64, op.Or(op.Not(cand), selected), num_kept)

    return tokred_k_center


def onnx_lowerings() -> dict:
    """{torch.ops.tokred.<op>.default: lowering} for the three pruning ops."""
    return {
        torch.ops.tokred.prune_tokens.default: prune_tokens_onnx_lowering(),
        torch.ops.tokred.select_kept.default: select_kept_onnx_lowering(),
        torch.ops.tokred.k_center.default: k_center_onnx_lowering(),
    }
