"""Triton kernels of the pruning ops (``tokred::prune_tokens``, ``select_kept``, ``k_center``).

The pipeline of ``prune_tokens`` (every stage a kernel, no [B, H, N, N] map anywhere):

1. ``_row_partial_stats_kernel``: per (b, block of BLOCK_N keys) and every (h, r), the block's
   softmax statistics: max logit and sum of exp(logit - max) (split along N as flash-decoding,
   so B = 1 with a long prompt still fills the GPU).
2. ``_row_scores_kernel``: per (b, block of keys) the blocks' statistics merged into the row's max
   ``m`` and sum ``l``, then the probabilities exp(logit - m) / l recomputed for every head and
   row and summed in a fixed order, so ``scores[b, n]`` needs no atomics and is deterministic;
   divided by H * R at the end. Few query rows (R <= 4 at D = 64) take a broadcast product
   instead of a tl.dot padded to 16 rows.
3. ``_rank_keep_kernel``: per (b, block of positions j) the rank of each candidate by pairwise
   counting: rank_j = #{candidates i: s_i > s_j, or s_i == s_j and i < j} (a stable descending
   sort without sorting). keep_j = not a candidate, or rank_j < k. O(N^2) compares, O(N) memory.
4. ``_compact_kernel``: per (b, block of j) the output slot of each kept position, the count of
   kept positions before it (earlier blocks counted in a loop, the block itself pairwise), and the
   store ``index[b, slot] = j``: the index comes out ascending by construction.
5. ``gather_tokens_triton`` (gather_tokens.py) copies the kept rows of x.

``select_kept`` is stages 3-4 on given scores; ``k_center`` is ``_k_center_kernel`` (one program per
batch row walking the k greedy steps) followed by stage 4.

Only Triton builtins are called inside kernels (tl.reduce with tokred.compat.triton_api's combine functions,
tl.full), as in tome_match.py: the interpreter cannot call the @jit helpers (tl.sum, tl.max,
tl.zeros) when TRITON_INTERPRET was switched on after triton was imported.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tokred.triton_ops import common, prune_args
from tokred.compat.triton_api import max_combine, min_combine, sum_combine
from tokred.triton_ops.common import HAS_TRITON, tl
from tokred.triton_ops.gather_tokens import gather_tokens_triton

# tl.dot needs every tile dim >= 16.
MIN_DOT_BLOCK = 16
# Warps per kernel. ptxas for sm_90 at the launch blocks (fp32/bf16): the score kernels and k-center
# need 160-250 registers at 4 warps (row-scores spills in bf16 there) and 64-128 at 8, no spills;
# the rank/compaction kernels fit 4 warps (<= 128 registers).
SCORE_NUM_WARPS = 8
K_CENTER_NUM_WARPS = 8
SELECT_NUM_WARPS = 4

if HAS_TRITON:

    @common.triton_kernel
    def _row_partial_stats_kernel(
        q_ptr, k_ptr, bias_ptr, max_ptr, sum_ptr,
        H, R, N, D, GROUP, scale,
        stride_qb, stride_qh, stride_qr, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_bb, stride_bh, stride_br, stride_bn,
        stride_pb, stride_ph, stride_pr, stride_pn,
        HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """Per (head, query row) the softmax statistics of one block of BLOCK_N keys: the block's
        max logit and sum of exp(logit - max), stored at [b, h, r, block].

        Grid: (cdiv(N, BLOCK_N), B): split along the keys (as flash-decoding does), so a single
        long sequence (B = 1, N = 4096) still fills the GPU. ``_row_scores_kernel`` merges the
        blocks' statistics. A block whose keys are all masked stores max -inf and sum 0.
        """
        pid_n = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        dims = tl.arange(0, BLOCK_D)
        d_mask = dims < D
        for h in range(H):
            k_tile = tl.load(k_ptr + b * stride_kb + (h // GROUP) * stride_kh + cols[:, None].to(tl.int64) * stride_kn
                             + dims[None, :] * stride_kd, mask=col_mask[:, None] & d_mask[None, :], other=0.0)
            k_tile = k_tile.to(tl.float32)
            for r0 in range(0, R, BLOCK_R):
                rows = r0 + tl.arange(0, BLOCK_R)
                row_mask = rows < R
                q = tl.load(q_ptr + b * stride_qb + h * stride_qh + rows[:, None] * stride_qr
                            + dims[None, :] * stride_qd, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
                q = q.to(tl.float32)
                if USE_DOT:  # fp32 IEEE dots (no TF32): near-equal scores must order as the reference's
                    logits = tl.dot(q, tl.trans(k_tile), input_precision="ieee") * scale
                else:  # few rows: a broadcast product, no padding of R to tl.dot's 16
                    logits = tl.reduce(q[:, None, :] * k_tile[None, :, :], 2, sum_combine) * scale
                if HAS_BIAS:
                    logits += tl.load(bias_ptr + b * stride_bb + h * stride_bh + rows[:, None] * stride_br
                                      + cols[None, :].to(tl.int64) * stride_bn,
                                      mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
                logits = tl.where(col_mask[None, :], logits, float("-inf"))
                block_max = tl.reduce(logits, 1, max_combine)
                # exp against 0 where the whole block is masked: no -inf - (-inf) = NaN.
                safe_max = tl.where(block_max == float("-inf"), 0.0, block_max)
                block_sum = tl.reduce(tl.exp(logits - safe_max[:, None]), 1, sum_combine)
                out = b * stride_pb + h * stride_ph + rows * stride_pr + pid_n * stride_pn
                tl.store(max_ptr + out, block_max, mask=row_mask)
                tl.store(sum_ptr + out, block_sum, mask=row_mask)

    @common.triton_kernel
    def _row_scores_kernel(
        q_ptr, k_ptr, bias_ptr, max_ptr, sum_ptr, scores_ptr,
        H, R, N, D, GROUP, NUM_BLOCKS, scale, inv_rows,
        stride_qb, stride_qh, stride_qr, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_bb, stride_bh, stride_br, stride_bn,
        stride_pb, stride_ph, stride_pr, stride_pn,
        stride_ob, stride_on,
        HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
    ):
        """scores[b, n] for BLOCK_N keys: the softmax probabilities of every (head, row), summed
        over heads and rows in a fixed order (deterministic, no atomics), times 1 / (H * R).

        Grid: (cdiv(N, BLOCK_N), B). Per (head, rows) the NUM_BLOCKS partial statistics are merged
        (online, BLOCK_P at a time) into the row's max m and sum l; the block's logits are
        recomputed and exp(logit - m) / l summed.
        """
        pid_n = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        dims = tl.arange(0, BLOCK_D)
        d_mask = dims < D
        parts = tl.arange(0, BLOCK_P)
        total = tl.full((BLOCK_N,), 0.0, tl.float32)
        for h in range(H):
            k_tile = tl.load(k_ptr + b * stride_kb + (h // GROUP) * stride_kh + cols[:, None].to(tl.int64) * stride_kn
                             + dims[None, :] * stride_kd, mask=col_mask[:, None] & d_mask[None, :], other=0.0)
            k_tile = k_tile.to(tl.float32)
            for r0 in range(0, R, BLOCK_R):
                rows = r0 + tl.arange(0, BLOCK_R)
                row_mask = rows < R
                stats = b * stride_pb + h * stride_ph + rows[:, None] * stride_pr
                row_max = tl.full((BLOCK_R,), float("-inf"), tl.float32)
                row_sum = tl.full((BLOCK_R,), 0.0, tl.float32)
                for p0 in range(0, NUM_BLOCKS, BLOCK_P):
                    p = p0 + parts
                    p_mask = row_mask[:, None] & (p[None, :] < NUM_BLOCKS)
                    part_max = tl.load(max_ptr + stats + p[None, :] * stride_pn, mask=p_mask, other=float("-inf"))
                    part_sum = tl.load(sum_ptr + stats + p[None, :] * stride_pn, mask=p_mask, other=0.0)
                    new_max = tl.maximum(row_max, tl.reduce(part_max, 1, max_combine))
                    safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
                    row_sum = row_sum * tl.exp(row_max - safe_max) + tl.reduce(
                        part_sum * tl.exp(part_max - safe_max[:, None]), 1, sum_combine)
                    row_max = new_max
                q = tl.load(q_ptr + b * stride_qb + h * stride_qh + rows[:, None] * stride_qr
                            + dims[None, :] * stride_qd, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
                q = q.to(tl.float32)
                if USE_DOT:
                    logits = tl.dot(q, tl.trans(k_tile), input_precision="ieee") * scale
                else:
                    logits = tl.reduce(q[:, None, :] * k_tile[None, :, :], 2, sum_combine) * scale
                if HAS_BIAS:
                    logits += tl.load(bias_ptr + b * stride_bb + h * stride_bh + rows[:, None] * stride_br
                                      + cols[None, :].to(tl.int64) * stride_bn,
                                      mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
                # A fully masked row (max -inf, sum 0) gives NaN here, as torch.softmax does.
                probs = tl.exp(logits - row_max[:, None]) / row_sum[:, None]
                probs = tl.where(row_mask[:, None], probs, 0.0)
                total += tl.reduce(probs, 0, sum_combine)
        tl.store(scores_ptr + b * stride_ob + cols * stride_on, total * inv_rows, mask=col_mask)

    @common.triton_kernel
    def _rank_keep_kernel(
        scores_ptr, cand_ptr, keep_ptr,
        N, K,
        stride_sb, stride_sn, stride_kb,
        BLOCK_J: tl.constexpr, BLOCK_I: tl.constexpr,
    ):
        """keep[b, j] = 1 for non-candidates and for candidates of rank < K, else 0 (int8).

        Grid: (cdiv(N, BLOCK_J), B). rank_j counts the candidates i that come before j in a stable
        descending order of the scores: s_i > s_j, or s_i == s_j and i < j. Pairwise counting
        ([BLOCK_J, BLOCK_I] compares per step) gives the exact stable order without a sort.
        """
        pid_j = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        js = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
        j_mask = js < N
        s_j = tl.load(scores_ptr + b * stride_sb + js * stride_sn, mask=j_mask, other=0.0).to(tl.float32)
        s_j = tl.where(s_j != s_j, float("-inf"), s_j)  # noqa: PLR0124  (NaN test) NaN ranks as -inf
        cand_j = tl.load(cand_ptr + js, mask=j_mask, other=0) != 0
        rank = tl.full((BLOCK_J,), 0, tl.int32)
        for i0 in range(0, N, BLOCK_I):
            i_s = i0 + tl.arange(0, BLOCK_I)
            i_mask = i_s < N
            s_i = tl.load(scores_ptr + b * stride_sb + i_s * stride_sn, mask=i_mask, other=0.0).to(tl.float32)
            s_i = tl.where(s_i != s_i, float("-inf"), s_i)  # noqa: PLR0124
            cand_i = (tl.load(cand_ptr + i_s, mask=i_mask, other=0) != 0) & i_mask
            before = (s_i[None, :] > s_j[:, None]) | ((s_i[None, :] == s_j[:, None]) & (i_s[None, :] < js[:, None]))
            before = before & cand_i[None, :]
            rank += tl.reduce(before.to(tl.int32), 1, sum_combine)
        keep = (~cand_j) | (rank < K)
        tl.store(keep_ptr + b * stride_kb + js, keep.to(tl.int8), mask=j_mask)

    @common.triton_kernel
    def _compact_kernel(
        keep_ptr, index_ptr,
        N, M,
        stride_kb, stride_ib, stride_im,
        BLOCK_J: tl.constexpr, BLOCK_I: tl.constexpr,
    ):
        """index[b, slot_j] = j for every kept j, slot_j = #kept positions before j (ascending).

        Grid: (cdiv(N, BLOCK_J), B). Kept positions before the block are counted block by block;
        within the block, pairwise (i < j). Slots >= M (a keep mask with more than M ones, which
        a wrong num_candidates would give) are not stored.
        """
        pid_j = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        j0 = pid_j * BLOCK_J
        js = j0 + tl.arange(0, BLOCK_J)
        j_mask = js < N
        keep_row = keep_ptr + b * stride_kb
        keep_j = tl.load(keep_row + js, mask=j_mask, other=0).to(tl.int32)
        before = tl.full((BLOCK_J,), 0, tl.int32)
        for i0 in range(0, j0, BLOCK_I):
            i_s = i0 + tl.arange(0, BLOCK_I)
            keep_i = tl.load(keep_row + i_s, mask=i_s < j0, other=0).to(tl.int32)
            before += tl.reduce(keep_i, 0, sum_combine)
        local = tl.arange(0, BLOCK_J)
        earlier = (local[None, :] < local[:, None]) & (keep_j[None, :] != 0)
        slot = before + tl.reduce(earlier.to(tl.int32), 1, sum_combine)
        store = (keep_j != 0) & j_mask & (slot < M)
        tl.store(index_ptr + b * stride_ib + slot.to(tl.int64) * stride_im, js.to(tl.int64), mask=store)

    @common.triton_kernel
    def _k_center_kernel(
        x_ptr, cand_ptr, keep_ptr, norm_ptr, dist_ptr, mean_ptr,
        N, C, K,
        stride_xb, stride_xn, stride_xc,
        stride_kb, stride_nb, stride_db, stride_mb,
        BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        """Greedy k-center of one batch row (grid: (B,)): keep[b] = non-candidates + K picks.

        Scratch rows (fp32): norm[b, N] (row norms, clamped at 1e-12), dist[b, N] (distance of each
        token to the current picks), mean[b, C] (mean of the candidate rows). Each phase reads
        back what the previous one stored, from other threads of the program: a barrier separates
        them. Cosine distance 1 - (x_j . x_s) / (|x_j| |x_s|) in fp32; argmax ties go to the lowest
        position (the smallest index among the maxima, across blocks too).
        """
        b = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + b * stride_xb
        keep_row = keep_ptr + b * stride_kb
        norm_row = norm_ptr + b * stride_nb
        dist_row = dist_ptr + b * stride_db
        mean_row = mean_ptr + b * stride_mb
        channels = tl.arange(0, BLOCK_C)

        # Phase 1: norms of every row, keep = non-candidates, candidate count.
        count = tl.full((BLOCK_N,), 0.0, tl.float32)
        for n0 in range(0, N, BLOCK_N):
            tokens = n0 + tl.arange(0, BLOCK_N)
            n_mask = tokens < N
            sumsq = tl.full((BLOCK_N,), 0.0, tl.float32)
            for c0 in range(0, C, BLOCK_C):
                c = c0 + channels
                tile = tl.load(x_row + tokens[:, None].to(tl.int64) * stride_xn + c[None, :] * stride_xc,
                               mask=n_mask[:, None] & (c[None, :] < C), other=0.0).to(tl.float32)
                sumsq += tl.reduce(tile * tile, 1, sum_combine)
            tl.store(norm_row + tokens, tl.maximum(tl.sqrt_rn(sumsq), 1e-12), mask=n_mask)
            cand = (tl.load(cand_ptr + tokens, mask=n_mask, other=0) != 0) & n_mask
            tl.store(keep_row + tokens, (~cand).to(tl.int8), mask=n_mask)
            count += cand.to(tl.float32)
        num_cand = tl.maximum(tl.reduce(count, 0, sum_combine), 1.0)

        # Phase 2: the mean of the candidate rows (one C chunk at a time) and its norm.
        mean_sumsq = tl.full((BLOCK_C,), 0.0, tl.float32)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + channels
            c_mask = c < C
            acc = tl.full((BLOCK_C,), 0.0, tl.float32)
            for n0 in range(0, N, BLOCK_N):
                tokens = n0 + tl.arange(0, BLOCK_N)
                n_mask = tokens < N
                cand = (tl.load(cand_ptr + tokens, mask=n_mask, other=0) != 0) & n_mask
                tile = tl.load(x_row + tokens[:, None].to(tl.int64) * stride_xn + c[None, :] * stride_xc,
                               mask=cand[:, None] & c_mask[None, :], other=0.0).to(tl.float32)
                acc += tl.reduce(tile, 0, sum_combine)
            mean = acc / num_cand
            tl.store(mean_row + c, mean, mask=c_mask)
            mean_sumsq += mean * mean
        mean_norm = tl.maximum(tl.sqrt_rn(tl.reduce(mean_sumsq, 0, sum_combine)), 1e-12)
        tl.debug_barrier()

        # Phase 3: distance of every token to the mean.
        for n0 in range(0, N, BLOCK_N):
            tokens = n0 + tl.arange(0, BLOCK_N)
            n_mask = tokens < N
            dots = tl.full((BLOCK_N,), 0.0, tl.float32)
            for c0 in range(0, C, BLOCK_C):
                c = c0 + channels
                c_mask = c < C
                tile = tl.load(x_row + tokens[:, None].to(tl.int64) * stride_xn + c[None, :] * stride_xc,
                               mask=n_mask[:, None] & c_mask[None, :], other=0.0).to(tl.float32)
                center = tl.load(mean_row + c, mask=c_mask, other=0.0)
                dots += tl.reduce(tile * center[None, :], 1, sum_combine)
            norms = tl.load(norm_row + tokens, mask=n_mask, other=1.0)
            tl.store(dist_row + tokens, 1.0 - dots / norms / mean_norm, mask=n_mask)
        tl.debug_barrier()

        # Phase 4: K greedy steps: pick the open token farthest from the picks, then update.
        for step in range(K):
            best = tl.full((BLOCK_N,), float("-inf"), tl.float32)
            best_pos = tl.full((BLOCK_N,), 2147483647, tl.int32)
            for n0 in range(0, N, BLOCK_N):
                tokens = n0 + tl.arange(0, BLOCK_N)
                n_mask = tokens < N
                is_open = (tl.load(keep_row + tokens, mask=n_mask, other=1) == 0) & n_mask
                dist = tl.load(dist_row + tokens, mask=n_mask, other=0.0)
                # NaN (non-finite rows): never preferred.
                dist = tl.where(dist != dist, float("-inf"), dist)  # noqa: PLR0124
                # Lane-wise running max; a later block wins a lane only when strictly greater, and
                # a lane's first open token always enters (so even -inf distances yield a pick).
                better = is_open & ((dist > best) | (best_pos == 2147483647))
                best_pos = tl.where(better, tokens, best_pos)
                best = tl.where(better, dist, best)
            top = tl.reduce(best, 0, max_combine)
            # An open token always exists (K <= #candidates); lanes without one keep max int.
            chosen = tl.reduce(tl.where((best == top) & (best_pos < N), best_pos, 2147483647), 0,
                               min_combine)
            chosen = tl.minimum(chosen, N - 1)  # never store out of bounds, whatever the input
            tl.debug_barrier()
            tl.store(keep_row + chosen, tl.full((), 1, tl.int8))
            chosen_norm = tl.load(norm_row + chosen)
            for n0 in range(0, N, BLOCK_N):
                tokens = n0 + tl.arange(0, BLOCK_N)
                n_mask = tokens < N
                dots = tl.full((BLOCK_N,), 0.0, tl.float32)
                for c0 in range(0, C, BLOCK_C):
                    c = c0 + channels
                    c_mask = c < C
                    tile = tl.load(x_row + tokens[:, None].to(tl.int64) * stride_xn + c[None, :] * stride_xc,
                                   mask=n_mask[:, None] & c_mask[None, :], other=0.0).to(tl.float32)
                    center = tl.load(x_row + chosen.to(tl.int64) * stride_xn + c * stride_xc,
                                     mask=c_mask, other=0.0).to(tl.float32)
                    dots += tl.reduce(tile * center[None, :], 1, sum_combine)
                norms = tl.load(norm_row + tokens, mask=n_mask, other=1.0)
                to_chosen = 1.0 - dots / norms / chosen_norm
                if step > 0:  # after the first pick: distance to the nearest pick
                    to_chosen = tl.minimum(to_chosen, tl.load(dist_row + tokens, mask=n_mask, other=0.0))
                tl.store(dist_row + tokens, to_chosen, mask=n_mask)
            tl.debug_barrier()


# ------------------------------------------------------------------------------------------------
# Launchers (CUDA, or any device under TRITON_INTERPRET=1)
# ------------------------------------------------------------------------------------------------


# Largest [BLOCK_R, BLOCK_N, BLOCK_D] broadcast product the few-rows path holds in registers
# (16 fp32 per thread at 8 warps); beyond it the rows are padded to 16 and go through tl.dot.
MAX_BROADCAST_ELEMENTS = 4096
MAX_KEY_TILE_ELEMENTS = 4096


def score_block_sizes(num_rows: int, num_tokens: int, head_dim: int) -> tuple[int, int, int, bool]:
    """(BLOCK_R, BLOCK_N, BLOCK_D, USE_DOT) for R query rows, N keys, head dim D (whole, <= 256).

    Few rows (the class row, the last query row): BLOCK_R = next power of two of R, no tl.dot, and
    BLOCK_N shrinks so the broadcast product stays within MAX_BROADCAST_ELEMENTS (at least 16
    keys). More rows: BLOCK_R >= 16 (tl.dot's minimum), 64 keys per block.
    """
    block_d = max(MIN_DOT_BLOCK, common.next_power_of_2(head_dim))
    block_r = common.next_power_of_2(num_rows)
    block_n = max(MIN_DOT_BLOCK, min(common.next_power_of_2(num_tokens), 64))
    if block_r * MIN_DOT_BLOCK * block_d <= MAX_BROADCAST_ELEMENTS:
        block_n = max(MIN_DOT_BLOCK, min(block_n, MAX_BROADCAST_ELEMENTS // (block_r * block_d)))
        return block_r, block_n, block_d, False
    # The [BLOCK_N, D] key tile stays in registers across the row blocks: at most 4096 elements
    # (ptxas for sm_90 spills at 64 keys x D = 128 with 16 rows).
    block_n = max(MIN_DOT_BLOCK, min(block_n, MAX_KEY_TILE_ELEMENTS // block_d))
    return max(MIN_DOT_BLOCK, min(block_r, 32)), block_n, block_d, True


def partial_block(num_blocks: int) -> int:
    """BLOCK_P: partial statistics merged per step (2 to 32)."""
    return max(2, min(common.next_power_of_2(num_blocks), 32))


def attention_row_scores_triton(q_rows: Tensor, k: Tensor, scale: float, bias: Tensor | None = None,
                                block_r: int | None = None, block_n: int | None = None,
                                use_dot: bool | None = None) -> Tensor:
    """scores [B, N] fp32 with the two score kernels (see ``attention_row_scores_reference``).

    ``block_r``/``block_n``/``use_dot`` override the choice of ``score_block_sizes`` (tests force
    both paths and several key blocks on small tensors; with tl.dot, block_r must be >= 16).
    """
    common.require_triton("attention_row_scores")
    prune_args.check_score_args("attention_row_scores", q_rows, k, bias)
    batch, heads, rows, head_dim = q_rows.shape
    kv_heads, num_tokens = k.shape[1], k.shape[2]
    if head_dim > 256:
        raise ValueError(f"attention_row_scores: head dim {head_dim} > 256 is not supported by the kernel")
    scores = torch.empty((batch, num_tokens), dtype=torch.float32, device=k.device)
    if scores.numel() == 0:
        return scores
    if rows == 0:
        return scores.fill_(float("nan"))  # the mean over no rows, as torch's mean gives
    default_r, default_n, block_d, default_dot = score_block_sizes(rows, num_tokens, head_dim)
    block_r, block_n = block_r or default_r, block_n or default_n
    use_dot = default_dot if use_dot is None else use_dot
    num_blocks = common.cdiv(num_tokens, block_n)
    block_max = torch.empty((batch, heads, rows, num_blocks), dtype=torch.float32, device=k.device)
    block_sum = torch.empty_like(block_max)
    if bias is None:
        bias_arg, bias_strides = block_max, (0, 0, 0, 0)  # never read (HAS_BIAS=False)
    else:
        bias_arg = bias.expand(batch, heads, rows, num_tokens)
        bias_strides = bias_arg.stride()
    shapes = (heads, rows, num_tokens, head_dim, heads // kv_heads)
    strides = (*q_rows.stride(), *k.stride(), *bias_strides, *block_max.stride())
    blocks = {"HAS_BIAS": bias is not None, "USE_DOT": use_dot, "BLOCK_R": block_r, "BLOCK_N": block_n,
              "BLOCK_D": block_d}
    grid = (num_blocks, batch)
    _row_partial_stats_kernel[grid](
        q_rows, k, bias_arg, block_max, block_sum, *shapes, float(scale), *strides,
        **blocks, num_warps=SCORE_NUM_WARPS,
    )
    _row_scores_kernel[grid](
        q_rows, k, bias_arg, block_max, block_sum, scores, *shapes, num_blocks, float(scale), 1.0 / (heads * rows),
        *strides, *scores.stride(),
        **blocks, BLOCK_P=partial_block(num_blocks), num_warps=SCORE_NUM_WARPS,
    )
    return scores


def selection_block_sizes(num_tokens: int) -> int:
    """BLOCK_J = BLOCK_I for the rank and compaction kernels: 64 x 64 compares per step."""
    return max(16, min(common.next_power_of_2(num_tokens), 64))


def _candidate_bytes(candidates: Tensor, device) -> Tensor:
    """candidates [N] bool as contiguous int8 on ``device`` (Triton loads bool pointers as int1)."""
    return candidates.to(device=device, dtype=torch.int8).contiguous()


def compact_index_triton(keep_mask: Tensor, num_kept: int, block: int | None = None) -> Tensor:
    """index [B, num_kept] int64: the positions where keep_mask [B, N] (int8, contiguous rows) is set."""
    batch, num_tokens = keep_mask.shape
    # Zeros, not empty: a keep mask with fewer than num_kept ones (a num_candidates that does not
    # match the candidates, unchecked on CUDA as that needs a sync) leaves valid positions behind.
    index = torch.zeros((batch, num_kept), dtype=torch.int64, device=keep_mask.device)
    if index.numel() == 0:
        return index
    block = block or selection_block_sizes(num_tokens)
    _compact_kernel[(common.cdiv(num_tokens, block), batch)](
        keep_mask, index, num_tokens, num_kept, keep_mask.stride(0), index.stride(0), index.stride(1),
        BLOCK_J=block, BLOCK_I=block, num_warps=SELECT_NUM_WARPS,
    )
    return index


def select_kept_triton(scores: Tensor, candidates: Tensor, keep: int, num_candidates: int,
                       block: int | None = None) -> Tensor:
    """index [B, M] int64 by pairwise rank counting and compaction (see ``select_kept_reference``)."""
    common.require_triton("select_kept")
    torch._check(scores.dim() == 2, lambda: f"select_kept: expected scores [B, N], got {tuple(scores.shape)}")
    prune_args.check_candidates("select_kept", candidates, scores.shape[1], keep, num_candidates)
    batch, num_tokens = scores.shape
    num_kept = prune_args.kept_count(num_tokens, num_candidates, keep)
    keep_mask = torch.empty((batch, num_tokens), dtype=torch.int8, device=scores.device)
    if keep_mask.numel() == 0:
        return torch.empty((batch, num_kept), dtype=torch.int64, device=scores.device)
    block = block or selection_block_sizes(num_tokens)
    _rank_keep_kernel[(common.cdiv(num_tokens, block), batch)](
        scores, _candidate_bytes(candidates, scores.device), keep_mask, num_tokens, keep,
        scores.stride(0), scores.stride(1), keep_mask.stride(0),
        BLOCK_J=block, BLOCK_I=block, num_warps=SELECT_NUM_WARPS,
    )
    return compact_index_triton(keep_mask, num_kept, block)


def prune_tokens_triton(x: Tensor, q_rows: Tensor, k: Tensor, scale: float, bias: Tensor | None,
                        candidates: Tensor, keep: int, num_candidates: int,
                        block_n: int | None = None, block_select: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(kept, index, scores): score kernels, rank + compaction kernels, gather kernel."""
    common.require_triton("prune_tokens")
    prune_args.check_prune_args(x, q_rows, k, bias, candidates, keep, num_candidates)
    scores = attention_row_scores_triton(q_rows, k, scale, bias, block_n=block_n)
    index = select_kept_triton(scores, candidates, keep, num_candidates, block=block_select)
    return gather_tokens_triton(x, index), index, scores


def k_center_block_sizes(num_tokens: int, width: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_C): tiles of up to 64 tokens x 64 channels (4096 fp32 in registers)."""
    return max(16, min(common.next_power_of_2(num_tokens), 64)), max(16, min(common.next_power_of_2(width), 64))


def k_center_triton(x: Tensor, candidates: Tensor, keep: int, num_candidates: int,
                    block_n: int | None = None, block_c: int | None = None) -> Tensor:
    """index [B, M] int64: greedy k-center kernel (one program per batch row) + compaction."""
    common.require_triton("k_center")
    torch._check(x.dim() >= 3, lambda: f"k_center: expected x [B, N, *row], got {tuple(x.shape)}")
    prune_args.check_candidates("k_center", candidates, x.shape[1], keep, num_candidates)
    rows = common.as_token_rows(x)
    batch, num_tokens, width = rows.shape
    num_kept = prune_args.kept_count(num_tokens, num_candidates, keep)
    keep_mask = torch.empty((batch, num_tokens), dtype=torch.int8, device=x.device)
    if keep_mask.numel() == 0:
        return torch.empty((batch, num_kept), dtype=torch.int64, device=x.device)
    default_n, default_c = k_center_block_sizes(num_tokens, width)
    block_n, block_c = block_n or default_n, block_c or default_c
    norms = torch.empty((batch, num_tokens), dtype=torch.float32, device=x.device)
    dist = torch.empty_like(norms)
    mean = torch.empty((batch, max(width, 1)), dtype=torch.float32, device=x.device)
    _k_center_kernel[(batch,)](
        rows, _candidate_bytes(candidates, x.device), keep_mask, norms, dist, mean,
        num_tokens, width, keep,
        rows.stride(0), rows.stride(1), rows.stride(2),
        keep_mask.stride(0), norms.stride(0), dist.stride(0), mean.stride(0),
        BLOCK_N=block_n, BLOCK_C=block_c, num_warps=K_CENTER_NUM_WARPS,
    )
    return compact_index_triton(keep_mask, num_kept)
