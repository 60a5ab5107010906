"""tokred::prune_tokens / select_kept / k_center: references, Triton kernels (interpreter), custom ops, ONNX.

The oracles below share no code with the references or the kernels: attention scores by loops over
batch, head and query row with a dense float64 softmax; selection by Python's stable ``sorted`` on
(-score, position); greedy k-center by loops in float64. Kernel results are compared with the
oracles directly. Where a float32 near-tie could legitimately resolve either way, the checks are
margin-aware (the oracle's choice is required only where it is clear by more than the tolerance).

Interpreter: TRITON_INTERPRET=1 is set per test (monkeypatch), as in test_kernels_tome.py.
"""

from __future__ import annotations

import math

import pytest
import torch

import tokred.triton_ops as triton_ops
from tokred.triton_ops import common
from tokred.triton_ops import prune_kernels as kernels
from tokred.triton_ops.prune import (
    attention_row_scores_reference,
    k_center_reference,
    prune_tokens_reference,
    select_kept_reference,
)

prune_op = torch.ops.tokred.prune_tokens
select_op = torch.ops.tokred.select_kept
k_center_op = torch.ops.tokred.k_center
NEG_INF = float("-inf")


# ----------------------------------------------------------------------------------------------
# Oracles
# ----------------------------------------------------------------------------------------------


def oracle_scores(q_rows, k, scale, bias=None) -> torch.Tensor:
    """scores [B, N] float64 by loops over (b, h, r): one dense softmax per query row."""
    batch, heads, rows, _ = q_rows.shape
    kv_heads, num_tokens = k.shape[1], k.shape[2]
    scores = torch.zeros(batch, num_tokens, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            kv = h * kv_heads // heads  # the kv head this query head shares
            for r in range(rows):
                logits = []
                for j in range(num_tokens):
                    logit = float(torch.dot(q_rows[b, h, r].double(), k[b, kv, j].double())) * scale
                    if bias is not None:
                        logit += float(bias[b % bias.shape[0], h % bias.shape[1], r, j])
                    logits.append(logit)
                peak = max(logits)
                weights = [math.exp(v - peak) for v in logits]
                total = sum(weights)
                for j in range(num_tokens):
                    scores[b, j] += weights[j] / total
    return scores / (heads * rows)


def oracle_select(scores, candidates, k):
    """(index [B, M] int64, margin [B]): stable descending sort of the candidates, k best + the rest.

    ``margin`` is the score gap between the k-th and (k+1)-th candidate in that order (inf when
    there is no such pair): with a float32 gap below a kernel's rounding, either may be kept.
    """
    cand = [j for j in range(scores.shape[1]) if candidates[j]]
    rest = [j for j in range(scores.shape[1]) if not candidates[j]]
    scores = torch.where(scores.isnan(), NEG_INF, scores.double())  # the ops rank NaN as -inf
    rows, margins = [], []
    for b in range(scores.shape[0]):
        order = sorted(cand, key=lambda j: (-float(scores[b, j]), j))
        rows.append(sorted(rest + order[:k]))
        gap = float(scores[b, order[k - 1]]) - float(scores[b, order[k]]) if 0 < k < len(order) else math.inf
        margins.append(gap)
    return torch.tensor(rows, dtype=torch.int64).reshape(scores.shape[0], -1), torch.tensor(margins)


def oracle_k_center_check(x, candidates, k, got_index, atol):
    """Replay greedy k-center in float64 against a kernel's kept set ``got_index [B, M]``.

    Each step, the pick must be an open candidate whose distance to the picks is within ``atol``
    of the largest one; among such tokens present in ``got_index`` the lowest position is taken
    (with exact ties the lowest position is the rule). Finally the kept set must be exactly the
    non-candidates plus the picks. Returns how many steps had a single clear choice.
    """
    batch, num_tokens = x.shape[0], x.shape[1]
    clear_steps = 0
    for b in range(batch):
        got = set(got_index[b].tolist())
        rows = [x[b, j].double().flatten() for j in range(num_tokens)]

        def cosine_distance(u, v):
            nu, nv = max(float(u.norm()), 1e-12), max(float(v.norm()), 1e-12)
            return 1.0 - float(torch.dot(u, v)) / (nu * nv)

        cand = [j for j in range(num_tokens) if candidates[j]]
        mean = sum(rows[j] for j in cand) / max(len(cand), 1) if cand else rows[0] * 0
        distance = {j: cosine_distance(rows[j], mean) for j in cand}
        picks = []
        for step in range(k):
            open_ = [j for j in cand if j not in picks]
            top = max(distance[j] for j in open_)
            near_top = [j for j in open_ if distance[j] >= top - atol]
            clear_steps += len(near_top) == 1
            allowed = [j for j in near_top if j in got]
            assert allowed, f"batch {b} step {step}: none of {near_top} (distance {top:.6f}) kept; kept {sorted(got)}"
            chosen = min(allowed)
            picks.append(chosen)
            for j in cand:
                d = cosine_distance(rows[j], rows[chosen])
                distance[j] = d if step == 0 else min(distance[j], d)
        want = sorted([j for j in range(num_tokens) if not candidates[j]] + picks)
        assert got_index[b].tolist() == want, f"batch {b}: kept {got_index[b].tolist()}, replay {want}"
    return clear_steps


def _greedy_float64(rows, candidates, k):
    """index [M] of greedy k-center on one sample rows [N, *row], float64, lowest position on exact ties."""
    rows = rows.double().flatten(1)
    unit = [r / max(float(r.norm()), 1e-12) for r in rows]
    cand = [j for j in range(rows.shape[0]) if candidates[j]]
    mean = sum(rows[j] for j in cand) / max(len(cand), 1)
    mean_unit = mean / max(float(mean.norm()), 1e-12)
    distance = {j: 1 - float(torch.dot(unit[j], mean_unit)) for j in cand}
    picks = []
    for step in range(k):
        chosen = max((j for j in cand if j not in picks), key=lambda j: (distance[j], -j))
        picks.append(chosen)
        for j in cand:
            d = 1 - float(torch.dot(unit[j], unit[chosen]))
            distance[j] = d if step == 0 else min(distance[j], d)
    return torch.tensor(sorted([j for j in range(rows.shape[0]) if not candidates[j]] + picks))


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------

# (B, H, Hkv, R, N, D, bias kind): R = 1 (class row) and R = 3 (query rows), GQA and MHA, N odd and
# spanning several 16-blocks, bias none / -inf columns per batch row (broadcast over heads) /
# finfo.min causal-like per head.
SCORE_CASES = [
    (2, 4, 2, 1, 9, 16, "none"),
    (2, 4, 2, 3, 37, 16, "neg-inf"),
    (2, 4, 4, 1, 23, 16, "finfo-min"),
    (1, 4, 1, 2, 40, 8, "neg-inf"),
]
SCORE_IDS = [f"B{b}-H{h}-Hkv{kv}-R{r}-N{n}-D{d}-{kind}" for b, h, kv, r, n, d, kind in SCORE_CASES]


def make_bias(batch, heads, rows, tokens, kind, generator):
    if kind == "none":
        return None
    if kind == "neg-inf":  # [B, 1, R, N]: padding-like masked key columns, different per sample
        bias = torch.zeros(batch, 1, rows, tokens)
        for b in range(batch):
            start = int(torch.randint(tokens // 2, tokens, (1,), generator=generator))
            bias[b, :, :, start:] = NEG_INF
        bias[:, :, :, 1] = NEG_INF
        return bias
    # [1, H, R, N]: per-head finfo.min on a random third of the keys, plus small additive values.
    bias = 0.5 * torch.randn(1, heads, rows, tokens, generator=generator)
    masked = torch.rand(1, heads, rows, tokens, generator=generator) < 0.3
    masked[..., 0] = False  # every row keeps a key
    return bias.masked_fill(masked, torch.finfo(torch.float32).min)


def make_score_inputs(case, dtype, seed=0):
    batch, heads, kv_heads, rows, tokens, dim, kind = case
    generator = torch.Generator().manual_seed(seed)
    q_rows = torch.randn(batch, heads, rows, dim, generator=generator).to(dtype)
    k = torch.randn(batch, kv_heads, tokens, dim, generator=generator).to(dtype)
    return q_rows, k, dim ** -0.5, make_bias(batch, heads, rows, tokens, kind, generator)


def make_candidates(tokens, kind):
    """candidates [N] bool: "cls" all but position 0; "range" a middle range; "all" every position."""
    candidates = torch.ones(tokens, dtype=torch.bool)
    if kind == "cls":
        candidates[0] = False
    elif kind == "range":
        candidates[: tokens // 4] = False
        candidates[tokens - 3:] = False
    return candidates


def keep_counts(num_candidates):
    """k = 0, one, about half, all but one, all (identity on the candidates)."""
    return sorted({0, 1, num_candidates // 2, max(num_candidates - 1, 0), num_candidates})


# ----------------------------------------------------------------------------------------------
# References == oracles
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", SCORE_CASES, ids=SCORE_IDS)
def test_scores_reference_matches_oracle(case, dtype):
    q_rows, k, scale, bias = make_score_inputs(case, dtype)
    got = attention_row_scores_reference(q_rows, k, scale, bias)
    assert got.dtype == torch.float32 and got.shape == (q_rows.shape[0], k.shape[2])
    torch.testing.assert_close(got.double(), oracle_scores(q_rows, k, scale, bias), atol=1e-6, rtol=1e-5)
    if bias is not None:  # keys masked for every head and row of a sample get exactly 0
        fully_masked = (bias.expand(q_rows.shape[0], q_rows.shape[1], q_rows.shape[2], -1) < -1e30).all(2).all(1)
        assert torch.all(got[fully_masked] == 0)


def make_select_scores(kind, tokens, generator):
    """scores [2, N]: "random" distinct; "ties" three values (ties everywhere, the position decides);
    "fp16" five fp16 values; "nan" ties plus NaN and -inf entries (NaN ranks as -inf)."""
    if kind == "random":
        return torch.rand(2, tokens, generator=generator)
    if kind == "fp16":
        return torch.randint(0, 5, (2, tokens), generator=generator).half() / 4
    scores = torch.randint(0, 3, (2, tokens), generator=generator).float()
    if kind == "nan":
        special = torch.rand(2, tokens, generator=generator)
        scores[special < 0.15] = float("nan")
        scores[special > 0.85] = NEG_INF
    return scores


@pytest.mark.parametrize("kind", ["cls", "range", "all"])
@pytest.mark.parametrize("scores_kind", ["random", "ties", "nan"])
def test_select_reference_matches_stable_sort(kind, scores_kind):
    generator = torch.Generator().manual_seed(1)
    tokens = 29
    candidates = make_candidates(tokens, kind)
    scores = make_select_scores(scores_kind, tokens, generator)
    num_candidates = int(candidates.sum())
    for keep in keep_counts(num_candidates):
        want, _ = oracle_select(scores, candidates, keep)
        assert torch.equal(select_kept_reference(scores, candidates, keep), want)
        assert torch.equal(select_op(scores, candidates, keep, num_candidates), want)
    identity = torch.arange(tokens).expand(2, tokens)
    assert torch.equal(select_kept_reference(scores, candidates, num_candidates), identity)


def test_select_reference_large_n_with_ties_matches_stable_sort():
    """N above 4096 (where a pairwise [N, N] formulation would be too big): still exact on ties."""
    generator = torch.Generator().manual_seed(2)
    tokens = 5001
    scores = torch.randint(0, 50, (1, tokens), generator=generator).float()
    candidates = make_candidates(tokens, "range")
    keep = 1234
    order = sorted((j for j in range(tokens) if candidates[j]), key=lambda j: (-float(scores[0, j]), j))
    want = sorted([j for j in range(tokens) if not candidates[j]] + order[:keep])
    assert select_kept_reference(scores, candidates, keep)[0].tolist() == want


@pytest.mark.parametrize("kind", ["cls", "range"])
def test_k_center_reference_matches_oracle(kind):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 21, 2, 16, generator=generator)  # a [B, N, *row] with two row dims
    candidates = make_candidates(21, kind)
    for keep in keep_counts(int(candidates.sum())):
        got = k_center_reference(x, candidates, keep)
        oracle_k_center_check(x, candidates, keep, got, atol=1e-6)
        assert torch.equal(got, torch.stack([_greedy_float64(x[b], candidates, keep) for b in range(2)]))


def make_tie_rows(tokens=37, width=8):
    """x [2, N, C] built from axis vectors (exact cosines 0 and 1): duplicated directions, zero rows
    (distance exactly 1 to everything), positions spread over several 16-blocks."""
    x = torch.zeros(2, tokens, width)
    for j in range(tokens):
        x[0, j, j % 3] = 1.0 + (j % 2)  # three directions, two magnitudes: cosines are exact
        x[1, j, (j * 5) % 4] = 2.0
    x[0, 20] = 0.0
    x[1, 33] = 0.0
    x[1, 2] = 0.0
    return x


def test_k_center_reference_ties_pick_lowest_position():
    x = make_tie_rows()
    candidates = make_candidates(x.shape[1], "cls")
    for keep in (1, 2, 3, 5, 9, 36):
        want = torch.stack([_greedy_float64(x[b], candidates, keep) for b in range(2)])
        assert torch.equal(k_center_reference(x, candidates, keep), want)


def test_prune_reference_gathers_the_selected_rows():
    q_rows, k, scale, bias = make_score_inputs(SCORE_CASES[1], torch.float32)
    x = torch.randn(2, k.shape[2], 32, generator=torch.Generator().manual_seed(4))
    candidates = make_candidates(k.shape[2], "cls")
    kept, index, scores = prune_tokens_reference(x, q_rows, k, scale, bias, candidates, 11)
    want_scores = oracle_scores(q_rows, k, scale, bias)
    torch.testing.assert_close(scores.double(), want_scores, atol=1e-6, rtol=1e-5)
    want_index, margin = oracle_select(want_scores, candidates, 11)
    assert torch.all(margin > 1e-5)
    assert torch.equal(index, want_index)
    assert torch.equal(kept, torch.stack([x[b, want_index[b]] for b in range(2)]))


# ----------------------------------------------------------------------------------------------
# Triton kernels under the interpreter == oracles
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def triton_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert common.interpreter_enabled()


# Launch choices: as the launcher picks them; tl.dot with 16-row blocks; the broadcast product of the
# few-rows path; both with 16-key blocks (several blocks along N, partial statistics merged).
SCORE_BLOCKS = {"auto": {}, "dot16": {"block_r": 16, "block_n": 16, "use_dot": True},
                "broadcast16": {"block_n": 16, "use_dot": False}}


@pytest.mark.parametrize("blocks", SCORE_BLOCKS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", SCORE_CASES, ids=SCORE_IDS)
def test_triton_scores_match_oracle(triton_interpreter, case, dtype, blocks):
    q_rows, k, scale, bias = make_score_inputs(case, dtype)
    got = kernels.attention_row_scores_triton(q_rows, k, scale, bias, **SCORE_BLOCKS[blocks])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), oracle_scores(q_rows, k, scale, bias), atol=1e-6, rtol=1e-5)


def test_triton_scores_read_strided_inputs(triton_interpreter):
    """The class row sliced out of a full q [B, H, N, D], k transposed in memory, bias a view."""
    q, k, scale, bias = make_score_inputs((2, 4, 2, 37, 37, 16, "neg-inf"), torch.float32)
    q_rows = q[:, :, :1]
    k_strided = k.transpose(2, 3).contiguous().transpose(2, 3)
    bias_rows = bias[:, :, :1]
    assert not (q_rows.is_contiguous() or k_strided.is_contiguous() or bias_rows.is_contiguous())
    got = kernels.attention_row_scores_triton(q_rows, k_strided, scale, bias_rows, block_n=16)
    torch.testing.assert_close(got.double(), oracle_scores(q_rows, k, scale, bias_rows), atol=1e-6, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # the interpreter's numpy on -inf - -inf
def test_triton_scores_fully_masked_row_is_nan_like_softmax(triton_interpreter):
    q_rows, k, scale, _ = make_score_inputs(SCORE_CASES[0], torch.float32)
    bias = torch.zeros(2, 1, 1, k.shape[2])
    bias[1] = NEG_INF  # sample 1: every key masked
    got = kernels.attention_row_scores_triton(q_rows, k, scale, bias)
    want = attention_row_scores_reference(q_rows, k, scale, bias)
    assert torch.isnan(want[1]).all() and torch.isnan(got[1]).all()
    torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("blocks", [None, 16], ids=["auto-blocks", "blocks16"])
@pytest.mark.parametrize("kind", ["cls", "range", "all"])
@pytest.mark.parametrize("scores_kind", ["random", "ties", "fp16", "nan"])
def test_triton_select_matches_stable_sort(triton_interpreter, kind, scores_kind, blocks):
    generator = torch.Generator().manual_seed(5)
    tokens = 39
    candidates = make_candidates(tokens, kind)
    scores = make_select_scores(scores_kind, tokens, generator)
    num_candidates = int(candidates.sum())
    for keep in keep_counts(num_candidates):
        got = kernels.select_kept_triton(scores, candidates, keep, num_candidates, block=blocks)
        want, _ = oracle_select(scores, candidates, keep)
        assert torch.equal(got, want), f"keep={keep}"
    got = kernels.select_kept_triton(scores, candidates, num_candidates, num_candidates, block=blocks)
    assert torch.equal(got, torch.arange(tokens).expand(2, tokens))


# (candidates, dtype, blocks): each candidate kind, dtype and block choice once (the kernel walks
# k steps in the interpreter, so the grid is not crossed).
K_CENTER_CASES = [("cls", torch.float32, None), ("cls", torch.float16, 16), ("range", torch.float32, 16)]


@pytest.mark.parametrize("kind, dtype, blocks", K_CENTER_CASES, ids=["cls-fp32-auto", "cls-fp16-blocks16",
                                                                     "range-fp32-blocks16"])
def test_triton_k_center_matches_oracle(triton_interpreter, kind, dtype, blocks):
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(2, 27, 20, generator=generator).to(dtype)  # C = 20: two 16-chunks with blocks16
    candidates = make_candidates(27, kind)
    num_candidates = int(candidates.sum())
    clear = 0
    for keep in (0, 1, num_candidates // 2, num_candidates):
        got = kernels.k_center_triton(x, candidates, keep, num_candidates, block_n=blocks, block_c=blocks)
        clear += oracle_k_center_check(x, candidates, keep, got, atol=1e-5)
    assert clear > 0


@pytest.mark.parametrize("blocks", [None, 16], ids=["auto-blocks", "blocks16"])
def test_triton_k_center_ties_pick_lowest_position(triton_interpreter, blocks):
    x = make_tie_rows()
    candidates = make_candidates(x.shape[1], "cls")
    for keep in (1, 2, 5, 9):
        want = torch.stack([_greedy_float64(x[b], candidates, keep) for b in range(2)])
        got = kernels.k_center_triton(x, candidates, keep, 36, block_n=blocks, block_c=blocks)
        assert torch.equal(got, want), f"keep={keep}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", SCORE_CASES[1:3], ids=SCORE_IDS[1:3])
def test_triton_prune_tokens_matches_oracle(triton_interpreter, case, dtype):
    q_rows, k, scale, bias = make_score_inputs(case, dtype, seed=7)
    tokens = k.shape[2]
    x = torch.randn(q_rows.shape[0], tokens, 4, 8, generator=torch.Generator().manual_seed(8)).to(dtype)
    candidates = make_candidates(tokens, "range")
    num_candidates = int(candidates.sum())
    want_scores = oracle_scores(q_rows, k, scale, bias)
    for keep in (0, num_candidates // 3, num_candidates):
        kept, index, scores = kernels.prune_tokens_triton(x, q_rows, k, scale, bias, candidates, keep,
                                                          num_candidates, block_n=16, block_select=16)
        torch.testing.assert_close(scores.double(), want_scores, atol=1e-6, rtol=1e-5)
        # The selection is exact on the kernel's own scores; on the oracle's where the gap is clear.
        assert torch.equal(index, oracle_select(scores, candidates, keep)[0])
        want_index, margin = oracle_select(want_scores, candidates, keep)
        clear = margin > 1e-5
        assert torch.equal(index[clear], want_index[clear])
        assert kept.dtype == x.dtype and torch.equal(kept, torch.stack([x[b, index[b]] for b in range(x.shape[0])]))


@pytest.mark.skipif(not (torch.cuda.is_available() and common.HAS_TRITON), reason="needs CUDA and triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_custom_ops_on_cuda_match_oracle(dtype):
    q_rows, k, scale, bias = make_score_inputs(SCORE_CASES[1], dtype)
    tokens = k.shape[2]
    x = torch.randn(q_rows.shape[0], tokens, 32).to(dtype)
    candidates = make_candidates(tokens, "cls")
    num = int(candidates.sum())
    kept, index, scores = prune_op(x.cuda(), q_rows.cuda(), k.cuda(), scale, bias.cuda(), candidates.cuda(), 9, num)
    torch.testing.assert_close(scores.cpu().double(), oracle_scores(q_rows, k, scale, bias), atol=1e-6, rtol=1e-5)
    assert torch.equal(index.cpu(), oracle_select(scores.cpu(), candidates, 9)[0])
    assert torch.equal(kept.cpu(), torch.stack([x[b, index[b].cpu()] for b in range(x.shape[0])]))
    select = select_op(scores, candidates.cuda(), 9, num)
    assert torch.equal(select.cpu(), index.cpu())
    rows = torch.randn(2, tokens, 24).to(dtype)
    got = k_center_op(rows.cuda(), candidates.cuda(), 7, num)
    oracle_k_center_check(rows, candidates, 7, got.cpu(), atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Triton compiler (no GPU needed): the kernels compile for sm_90 at real shapes without spills
# ----------------------------------------------------------------------------------------------


def kernel_configs():
    """{name: (kernel, pointer types, constexprs, num_warps)} at real launch blocks: the class row of
    ViT-B (R = 1, D = 64, broadcast path) and 16 query rows at D = 128 (tl.dot path)."""
    def score_constexprs(rows, tokens, dim):
        block_r, block_n, block_d, use_dot = kernels.score_block_sizes(rows, tokens, dim)
        return {"HAS_BIAS": True, "USE_DOT": use_dot, "BLOCK_R": block_r, "BLOCK_N": block_n, "BLOCK_D": block_d}

    score_pointers = {"q_ptr": "*{x}", "k_ptr": "*{x}", "bias_ptr": "*fp32", "max_ptr": "*fp32", "sum_ptr": "*fp32"}
    select_block = kernels.selection_block_sizes(4096)
    kc_n, kc_c = kernels.k_center_block_sizes(197, 768)
    return {
        "row-stats-cls": (kernels._row_partial_stats_kernel, score_pointers, score_constexprs(1, 197, 64),
                          kernels.SCORE_NUM_WARPS),
        "row-stats-rows16": (kernels._row_partial_stats_kernel, score_pointers, score_constexprs(16, 4096, 128),
                             kernels.SCORE_NUM_WARPS),
        "row-scores-cls": (kernels._row_scores_kernel, {**score_pointers, "scores_ptr": "*fp32"},
                           {**score_constexprs(1, 197, 64), "BLOCK_P": kernels.partial_block(4)}, kernels.SCORE_NUM_WARPS),
        "row-scores-rows16": (kernels._row_scores_kernel, {**score_pointers, "scores_ptr": "*fp32"},
                              {**score_constexprs(16, 4096, 128), "BLOCK_P": kernels.partial_block(128)}, kernels.SCORE_NUM_WARPS),
        "rank-keep": (kernels._rank_keep_kernel, {"scores_ptr": "*fp32", "cand_ptr": "*i8", "keep_ptr": "*i8"},
                      {"BLOCK_J": select_block, "BLOCK_I": select_block}, kernels.SELECT_NUM_WARPS),
        "compact": (kernels._compact_kernel, {"keep_ptr": "*i8", "index_ptr": "*i64"},
                    {"BLOCK_J": select_block, "BLOCK_I": select_block}, kernels.SELECT_NUM_WARPS),
        "k-center": (kernels._k_center_kernel,
                     {"x_ptr": "*{x}", "cand_ptr": "*i8", "keep_ptr": "*i8", "norm_ptr": "*fp32",
                      "dist_ptr": "*fp32", "mean_ptr": "*fp32"},
                     {"BLOCK_N": kc_n, "BLOCK_C": kc_c}, kernels.K_CENTER_NUM_WARPS),
    }


FLOAT_ARGS = {"scale", "inv_rows"}
COMPILE_CASES = [(name, x_type) for name in ("row-stats-cls", "row-stats-rows16", "row-scores-cls",
                                             "row-scores-rows16", "k-center") for x_type in ("fp32", "bf16")]
COMPILE_CASES += [("rank-keep", "fp32"), ("compact", "fp32")]


@pytest.mark.parametrize("kernel_name, x_type", COMPILE_CASES, ids=["-".join(c) for c in COMPILE_CASES])
def test_triton_kernels_compile_for_cuda_without_spills(monkeypatch, kernel_name, x_type):
    """The Triton compiler (not only the interpreter) accepts each kernel with its launch blocks,
    bf16 included (which the interpreter cannot run), and ptxas reports no register spills."""
    pytest.importorskip("triton")
    from test_kernels_tome import compile_for_sm90, ptxas_spill_report

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    kernel, pointers, constexprs, num_warps = kernel_configs()[kernel_name]
    compiled = compile_for_sm90(kernel, pointers, constexprs, num_warps, x_type, FLOAT_ARGS)
    assert len(compiled.asm["cubin"]) > 0
    report = ptxas_spill_report(compiled.asm["ptx"])
    assert "0 bytes spill stores" in report, report


# ----------------------------------------------------------------------------------------------
# Custom-op contract: argument checks, opcheck, autograd, torch.compile
# ----------------------------------------------------------------------------------------------


def make_prune_args(batch=2, seed=0, keep=5):
    """prune_tokens arguments: N = 13 tokens, class token protected, GQA 4/2, R = 2 rows, bias."""
    q_rows, k, scale, bias = make_score_inputs((batch, 4, 2, 2, 13, 16, "neg-inf"), torch.float32, seed=seed)
    x = torch.randn(batch, 13, 6, generator=torch.Generator().manual_seed(seed + 100))
    candidates = make_candidates(13, "cls")
    return x, q_rows, k, scale, bias, candidates, keep, int(candidates.sum())


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda a, s: select_op(s, a[5], 3, 11), ValueError, "num_candidates = 11"),
        (lambda a, s: k_center_op(a[0], a[5], 13, 12), RuntimeError, "keep 13 outside"),
        (lambda a, s: select_op(s, a[5].long(), 3, 12), RuntimeError, "candidates bool"),
        (lambda a, s: select_op(s[:, :-1], a[5], 3, 12), RuntimeError, "candidates has 13 positions"),
        (lambda a, s: prune_op(a[0], a[1], a[2][:, :, :-1], a[3], None, *a[5:]), RuntimeError, "12 keys"),
        (lambda a, s: prune_op(a[0], a[1][:, :3], *a[2:]), RuntimeError, "not a multiple"),
        (lambda a, s: prune_op(*a[:4], a[4][..., :-1], *a[5:]), RuntimeError, "bias"),
    ],
    ids=["num-candidates", "keep-too-large", "candidates-dtype", "scores-width", "tokens", "gqa", "bias-shape"],
)
def test_bad_arguments_raise(call, error, message):
    args = make_prune_args()
    scores = torch.rand(2, 13)
    with pytest.raises(error, match=message):
        call(args, scores)


def opcheck_samples():
    x, q_rows, k, scale, bias, candidates, keep, num = make_prune_args()
    scores = torch.rand(2, 13, generator=torch.Generator().manual_seed(9))
    return [
        (prune_op, (x, q_rows, k, scale, bias, candidates, keep, num)),
        (prune_op, (x.half().requires_grad_(), q_rows.half(), k.half(), scale, None, candidates, 0, num)),
        (prune_op, (x.requires_grad_(), q_rows, k, scale, bias, candidates, num, num)),
        (select_op, (scores, candidates, 4, num)),
        (select_op, (scores.requires_grad_(), candidates, num, num)),
        (k_center_op, (x.detach(), candidates, 4, num)),
        (k_center_op, (x.detach(), candidates, 0, num)),
    ]


@pytest.mark.parametrize("op, args", opcheck_samples(), ids=lambda v: getattr(v, "__name__", ""))
def test_opcheck(op, args):
    torch.library.opcheck(op, args)


def test_prune_backward_reaches_kept_rows_only():
    x, q_rows, k, scale, bias, candidates, keep, num = make_prune_args()
    x = x.requires_grad_()
    kept, index, scores = prune_op(x, q_rows.requires_grad_(), k, scale, bias, candidates, keep, num)
    assert not index.requires_grad and not scores.requires_grad
    grad_kept = torch.randn(kept.shape, generator=torch.Generator().manual_seed(10))
    (grad_x,) = torch.autograd.grad(kept, x, grad_kept, allow_unused=True)
    want = torch.zeros_like(x)
    for b in range(x.shape[0]):
        for m, j in enumerate(index[b].tolist()):
            want[b, j] = grad_kept[b, m]
    assert torch.equal(grad_x, want)


def three_ops(x, q_rows, k, bias, scores, candidates):
    """Every pruning op once, no arithmetic around them (inductor then emits no C++ kernel)."""
    kept, index, row_scores = prune_op(x, q_rows, k, 0.25, bias, candidates, 5, 12)
    return kept, index, row_scores, select_op(scores, candidates, 4, 12), k_center_op(x, candidates, 3, 12)


def three_inputs(batch, seed):
    x, q_rows, k, _, bias, candidates, _, _ = make_prune_args(batch, seed)
    scores = torch.randint(0, 3, (batch, 13), generator=torch.Generator().manual_seed(seed)).float()
    scores[:, 4] = float("nan")  # ranks as -inf
    return x, q_rows, k, bias, scores, candidates


def three_references(x, q_rows, k, bias, scores, candidates):
    return (*prune_tokens_reference(x, q_rows, k, 0.25, bias, candidates, 5),
            select_kept_reference(scores, candidates, 4), k_center_reference(x, candidates, 3))


def test_custom_ops_under_inductor_compile_match_reference(fresh_dynamo):
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(three_ops, backend=counter, fullgraph=True, dynamic=True)
    for batch in (3, 5):  # one compile with a symbolic batch serves both
        inputs = three_inputs(batch, seed=batch)
        got, want = compiled(*inputs), three_references(*inputs)
        for g, w in zip(got, want):
            assert g.shape == w.shape and g.dtype == w.dtype and torch.equal(g, w)
    assert counter.frame_count == 1
    targets = {node.target for node in counter.graphs[0].graph.nodes}
    assert {prune_op, select_op, k_center_op} <= targets


def test_references_trace_under_aot_autograd(fresh_dynamo):
    """The references compile in one graph (the pass may insert them instead of the ops); the
    candidate mask is a constant there, as a pass bakes it in."""
    candidates = make_candidates(13, "cls")
    inputs = three_inputs(2, seed=11)[:5]

    def references(x, q_rows, k, bias, scores):
        return three_references(x, q_rows, k, bias, scores, candidates)

    compiled = torch.compile(references, backend="aot_eager", fullgraph=True)
    for got, want in zip(compiled(*inputs), references(*inputs)):
        assert torch.equal(got, want)


# ----------------------------------------------------------------------------------------------
# ONNX
# ----------------------------------------------------------------------------------------------


class ThreeOps(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("candidates", make_candidates(13, "cls"))

    def forward(self, x, q_rows, k, bias, scores):
        return three_ops(x, q_rows, k, bias, scores, self.candidates)


@pytest.mark.filterwarnings("ignore:# The axis name. batch will not be used")
def test_onnx_export_runs_in_onnxruntime_with_dynamic_batch():
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    batch = torch.export.Dim("batch", min=1, max=64)
    names = ("x", "q_rows", "k", "bias", "scores")
    program = torch.onnx.export(
        ThreeOps().eval(), three_inputs(2, seed=0)[:5], dynamo=True,
        custom_translation_table=triton_ops.onnx_translation_table(),
        dynamic_shapes={name: {0: batch} for name in names}, verbose=False,
    )
    nodes = program.model_proto.graph.node
    assert {"TopK", "CumSum", "Softmax", "ArgMax", "GatherElements"} <= {n.op_type for n in nodes}
    assert all(node.domain in ("", "ai.onnx") for node in nodes)
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    input_names = [i.name for i in session.get_inputs()]
    for run_batch in (2, 3):  # 3 != the export batch: the batch axis really is dynamic
        inputs = three_inputs(run_batch, seed=run_batch)
        got = session.run(None, dict(zip(input_names, (t.numpy() for t in inputs[:5]))))
        want = three_references(*inputs)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            g = torch.from_numpy(g)
            assert g.shape == w.shape and g.dtype == w.dtype
            if w.dtype == torch.int64:
                assert torch.equal(g, w)
            else:
                torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)
