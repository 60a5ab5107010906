"""The merge pass (tokred/passes/merge.py) against the plain-PyTorch ToMe reference (tome_reference.py).

Every test compiles a tiny zoo model with ``tokred.backend(inner="aot_eager", merge={...})`` and
compares its outputs with the reference run on the same weights (ARCHITECTURE.md invariants 2 and 3):
r=0 is the identity, r>0 equals the reference (global ToMe with and without proportional
attention, per-block lists and the decreasing schedule, tomesd's local mode; ToMe's own partition
by default, checked against ToMe's code transcribed, and the ``protect="set_aside"`` variant), protected tokens
(class, distillation, [CLS]) are never merged, padded tokens only merge with padded tokens, causal
decoders are passed through with a reason, and bad options are refused by name.

Compiled results are memoised per (model, options), so tests that look at the same compile from
different sides (values, report, pooler) pay for it once.
"""

from __future__ import annotations

import functools
import json
import re

import pytest
import torch

import tokred
from tome_reference import (MergeTracker, bipartite_merge, decreasing_schedule, merge_batch, reference_forward,
                            timm_head, timm_tome_patch_forward, timm_vit_features, tome_code_merge)
from tokred.passes.merge import tome_step
from zoo import ZOO, flatten_outputs, max_abs_diff, zoo_params

R = 4  # tokens merged per block
GLOBAL_MODELS = ["timm_vit_tiny_sdpa", "timm_vit_tiny_eager", "timm_deit_tiny_distilled_sdpa", "hf_vit_sdpa",
                 "hf_vit_eager", "hf_bert_sdpa", "hf_bert_eager"]
# The schedule variants, each on two models; together they cover every reference family.
SCHEDULE_CASES = [
    ("timm_deit_tiny_distilled_sdpa", "per_block"), ("hf_bert_sdpa", "per_block"),
    ("timm_vit_tiny_sdpa", "decreasing"), ("hf_vit_eager", "decreasing"),
]
SCHEDULES = {"per_block": {"r": [3, 5]}, "decreasing": {"r": R, "schedule": "decreasing"}}
BERT_MODELS = ["hf_bert_sdpa", "hf_bert_eager"]
TOL = 1e-4
IDENTITY_TOL = 1e-5


# ----------------------------------------------------------------------------- helpers

@functools.lru_cache(maxsize=None)
def _compiled_run(name: str, options_json: str, entry: str):
    torch._dynamo.reset()
    zm = ZOO[name]()
    be = tokred.backend(**json.loads(options_json))
    fn = zm.model if entry == "forward" else getattr(zm.model, entry)
    try:
        with torch.no_grad():
            out = torch.compile(fn, backend=be)(*zm.args, **zm.kwargs)
    finally:
        torch._dynamo.reset()
    return out, be.report


def compiled(name: str, merge: dict, inner: str = "aot_eager", entry: str = "forward"):
    """(output, report) of zoo model ``name`` compiled by tokred with ``merge`` options (memoised)."""
    options = json.dumps({"inner": inner, "merge": merge}, sort_keys=True)
    return _compiled_run(name, options, entry)


def output_scale(out) -> float:
    return max(t.abs().max().item() for t in flatten_outputs(out) if t.is_floating_point())


def assert_changed(merged, dense) -> None:
    """The merge changed the outputs by far more than the tolerance of the equality tests, so that
    equality with the reference is not vacuous."""
    assert max_abs_diff(merged, dense) > max(10 * TOL, 1e-3 * output_scale(dense))


def token_counts(n: int, r_done: list) -> list:
    """[(N before, N after)] per block, from the r each block applied."""
    counts = []
    for r in r_done:
        counts.append((n, n - r))
        n -= r
    return counts


def assert_report_rewritten(report, n: int, r_done: list) -> None:
    """Every block with r > 0 is 'rewritten' and says 'N -> N - r'; blocks with r = 0 are not."""
    sites = sorted(report.attention_sites, key=lambda s: s.layer)
    assert len(sites) == len(r_done), [s.module for s in sites]
    for site, r, (before, after) in zip(sites, r_done, token_counts(n, r_done)):
        if r > 0:
            assert site.status == "rewritten", (site.module, site.status, site.reason)
            assert re.search(rf"\b{before} -> {after}\b", site.reason), (site.module, site.reason)
            assert "merge" in site.passes
        else:
            assert site.status != "rewritten", (site.module, site.reason)
    assert 0 < report.flops_after < report.flops_before, (report.flops_before, report.flops_after)


# ----------------------------------------------------------------------------- the reference itself

# Hand-built sample, protect="set_aside": 1 protected token, A = positions 1, 3, 5, 7, B = 2, 4, 6.
# Metric rows (cosine similarities by inspection):
#   p0 (1,0,0): protected, although identical to B token 2
#   A1 (1,1,0): 0.707 with B2 and B4 (tie -> lowest B: B2), 0 with B6
#   A3 (0,1,0): 1 with B4          A5 (2,0,0): 1 with B2 (score tie with A3 -> A order: A3 first)
#   A7 (0,0,-1): 0 with B2 and B4 (tie -> B2), -1 with B6
# Sorted by best score: A3 (1), A5 (1), A1 (0.707), A7 (0).
HAND_METRIC = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 0], [0, 1, 0], [0, 1, 0], [2, 0, 0], [0, 0, 1],
                            [0, 0, -1]], dtype=torch.float32)
HAND_SIZE = torch.tensor([1, 1, 1, 1, 2, 3, 1, 1], dtype=torch.float32)
# r -> (new token order as positions before the merge, the groups of positions merged together)
HAND_CASES = {
    1: ([0, 1, 5, 7, 2, 4, 6], [[3, 4]]),
    2: ([0, 1, 7, 2, 4, 6], [[3, 4], [2, 5]]),
    3: ([0, 7, 2, 4, 6], [[3, 4], [1, 2, 5]]),
    10: ([0, 7, 2, 4, 6], [[3, 4], [1, 2, 5]]),  # capped at (8 - 1) // 2 = 3
}


# The same sample, protect="tome" (ToMe's partition): A = 0 (the class token, scores -inf), 2, 4, 6;
# B = 1, 3, 5, 7.
#   A2 (1,0,0): 1 with B5      A4 (0,1,0): 1 with B3 (score tie with A2 -> A order: A2 first)
#   A6 (0,0,1): 0 with B1, B3, B5 (tie -> B1), -1 with B7     A0: -inf, ranked last
# Sorted by best score: A2 (1), A4 (1), A6 (0), A0.
HAND_CASES_TOME = {
    1: ([0, 4, 6, 1, 3, 5, 7], [[2, 5]]),
    2: ([0, 6, 1, 3, 5, 7], [[2, 5], [3, 4]]),
    3: ([0, 1, 3, 5, 7], [[2, 5], [3, 4], [1, 6]]),
    10: ([0, 1, 3, 5, 7], [[2, 5], [3, 4], [1, 6]]),  # capped at (8 - 1) // 2 = 3
}


@pytest.mark.parametrize("protect, r", [(p, r) for p, cases in (("set_aside", HAND_CASES), ("tome", HAND_CASES_TOME))
                                        for r in sorted(cases)])
def test_reference_merge_rules(protect, r):
    """The reference's matching on a sample worked out by hand: alternate split, lowest-B ties,
    stable order, protected token, size-weighted means, new order [protected, kept A, B], cap."""
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(0))
    step = bipartite_merge(x, HAND_METRIC, HAND_SIZE, torch.zeros(8, dtype=torch.bool), r, 1, protect)
    order, groups = (HAND_CASES if protect == "set_aside" else HAND_CASES_TOME)[r]
    assert step.rep == order
    group_of = {p: g for g in groups for p in g}
    for m, token in enumerate(order):
        members = group_of.get(token, [token])
        assert sorted(p for p in range(8) if step.dest[p] == m) == sorted(members)
        weights = HAND_SIZE[members]
        want = (x[members] * weights[:, None]).sum(0) / weights.sum()
        torch.testing.assert_close(step.x[m], want, rtol=0, atol=1e-6)
        assert step.size[m].item() == weights.sum().item()


def test_reference_padding_rule():
    """A padded A token only matches padded B tokens, even when a real B token is identical."""
    metric = torch.tensor([[1, 0], [1, 0], [1, 0], [0, 1], [1, 0], [1, 0.1]], dtype=torch.float32)
    padded = torch.tensor([False, False, False, False, True, True])
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(1))
    # no protected token: A = 0, 2, 4; B = 1, 3, 5. Without padding A4 would match B1 (identical).
    plain = bipartite_merge(x, metric, torch.ones(6), torch.zeros(6, dtype=torch.bool), 3, protected=0)
    assert plain.dest[4] == plain.dest[1]
    step = bipartite_merge(x, metric, torch.ones(6), padded, 3, protected=0)
    assert step.dest[4] == step.dest[5] and step.dest[4] != step.dest[1]
    assert step.dest[0] == step.dest[1] and step.dest[2] == step.dest[1]


@pytest.mark.parametrize("class_token, distill_token", [(False, False), (True, False), (True, True)],
                         ids=["no_prefix", "class", "class_distill"])
def test_reference_loops_equal_tomes_code(class_token, distill_token):
    """The "tome" loops equal ToMe's batched code transcribed (-inf rows/columns, argsort, sorted
    kept A, scatter of size-weighted sums, distillation token moved back to position 1)."""
    gen = torch.Generator().manual_seed(3)
    protected = int(class_token) + int(distill_token)
    for n in (9, 10, 27):
        x, metric = torch.randn(3, n, 5, generator=gen).double(), torch.randn(3, n, 4, generator=gen).double()
        size = (1 + 3 * torch.rand(3, n, 1, generator=gen)).double()
        for r in (1, 3, (n - protected) // 2):
            want_x, want_size = tome_code_merge(x, metric, size, r, class_token, distill_token)
            got_x, got_size, _, _ = merge_batch(x, metric, size[..., 0], torch.zeros(3, n, dtype=torch.bool), r,
                                                protected, "tome")
            torch.testing.assert_close(got_x, want_x, rtol=0, atol=1e-12)
            torch.testing.assert_close(got_size, want_size[..., 0], rtol=0, atol=1e-12)


def test_partitions_agree_only_for_an_even_prefix():
    """"tome" and "set_aside" merge the same tokens when the protected count is even (the
    parity of every other token is the same both ways) and different ones when it is odd."""
    gen = torch.Generator().manual_seed(4)
    for protected in range(6):
        x, metric = torch.randn(2, 15, 5, generator=gen), torch.randn(2, 15, 4, generator=gen)
        args = (x, metric, torch.ones(2, 15), torch.zeros(2, 15, dtype=torch.bool), 4, protected)
        same = torch.equal(merge_batch(*args, "tome")[3], merge_batch(*args, "set_aside")[3])
        # no protected token: the same merges, but ToMe keeps its kept A tokens in score order
        assert same == (protected % 2 == 0 and protected > 0), protected


@pytest.mark.parametrize("protect", ["tome", "set_aside"])
@pytest.mark.parametrize("protected", [0, 1, 2, 3, 5])
def test_merge_step_equals_reference(protected, protect):
    """tokred's merge step (the graph function) equals the reference's loops for 0..5 protected
    tokens in both modes, with a padded suffix in one batch row: same tokens merged, same order."""
    gen = torch.Generator().manual_seed(5 + protected)
    for n in (13, 14):
        for r in (1, 3, (n - protected) // 2):
            x, metric = torch.randn(2, n, 5, generator=gen), torch.randn(2, n, 4, generator=gen)
            size = 1 + torch.rand(2, n, 1, generator=gen)
            padded = torch.zeros(2, n, dtype=torch.bool)
            padded[1, n - 4:] = True
            x_out, size_out, group, rep, dest = tome_step(x, metric, size, padded.long(), r, protected, protect)
            want_x, want_size, want_dest, want_rep = merge_batch(x, metric, size[..., 0], padded, r, protected,
                                                                 protect)
            assert torch.equal(rep, want_rep) and torch.equal(dest, want_dest), (n, r)
            torch.testing.assert_close(x_out, want_x)
            torch.testing.assert_close(size_out[..., 0], want_size)
            assert torch.equal(group.bool(), padded.gather(1, rep))


def test_tracker_composes_merges():
    """Two merges: each original position is found in the token that holds it, the key bias is
    log(size) (prop_attn) plus the padding mask of the kept tokens."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, 9, 4, generator=gen)
    padded = torch.tensor([[False] * 7 + [True] * 2])
    tracker = MergeTracker(1, 9, padded)
    for r in (3, 2):
        x = tracker.merge(x, torch.randn(x.shape, generator=gen), r, protected=1)
    assert tracker.r_done == [3, 2] and x.shape[1] == 4
    groups = tracker.groups(0)
    assert sorted(p for g in groups for p in g) == list(range(9)) and groups[0] == [0]
    assert [len(g) for g in groups] == tracker.size[0].int().tolist()
    bias = tracker.key_bias(True, torch.float32)[0, 0, 0]
    for k, g in enumerate(groups):
        assert bool(tracker.padded[0, k]) == bool(padded[0, g[0]])
        want = torch.finfo(torch.float32).min if tracker.padded[0, k] else torch.tensor(float(len(g))).log()
        assert bias[k].item() == pytest.approx(float(want), rel=1e-6)


def test_decreasing_schedule_keeps_the_total():
    assert decreasing_schedule(4, 2) == [8, 0]
    assert decreasing_schedule(4, 5) == [8, 6, 4, 2, 0]
    assert sum(decreasing_schedule(6, 3)) == 18


# ----------------------------------------------------------------------------- identity (invariant 2)

@pytest.mark.parametrize("name", zoo_params(GLOBAL_MODELS))
def test_zero_r_is_identity(name):
    zm = ZOO[name]()
    dense = zm()
    reference, tracker = reference_forward(zm, r=0)
    assert max_abs_diff(reference, dense) <= IDENTITY_TOL  # the reference itself reproduces the model
    assert tracker.r_done == [0] * len(tracker.r_done)
    out, report = compiled(name, {"r": 0})
    assert max_abs_diff(out, dense) <= IDENTITY_TOL
    assert report.attention_sites and not report.changed
    assert all(site.status != "rewritten" for site in report.attention_sites)


# ----------------------------------------------------------------------------- global ToMe (invariant 3)

@pytest.mark.parametrize("prop_attn", [True, False], ids=["prop_attn", "no_prop_attn"])
@pytest.mark.parametrize("name", zoo_params(GLOBAL_MODELS))
def test_merge_equals_reference(name, prop_attn):
    zm = ZOO[name]()
    reference, tracker = reference_forward(zm, r=R, prop_attn=prop_attn)
    assert_changed(reference, zm())
    if not prop_attn:  # proportional attention changes the result, so both settings are tested
        with_sizes, _ = reference_forward(zm, r=R, prop_attn=True)
        assert_changed(reference, with_sizes)
    # prop_attn is on by default: the default is what the other tests' compiles share
    out, report = compiled(name, {"r": R} if prop_attn else {"r": R, "prop_attn": False})
    assert max_abs_diff(out, reference) <= TOL
    assert_report_rewritten(report, zm.token_count, tracker.r_done)


@pytest.mark.parametrize("name", ["timm_vit_small_sdpa", "timm_deit_tiny_distilled_sdpa"])
def test_default_equals_tomes_timm_patch(name):
    """A drop-in for ToMe: on a timm ViT (depth 2, random weights) the default merge gives the
    logits of ToMe's timm patch (ToMe's algorithm block by block, proportional attention,
    size-weighted averages); ``protect="set_aside"`` gives its own reference and, with a single
    class token, other logits."""
    zm = ZOO[name]()
    with torch.no_grad():
        tome_logits = timm_tome_patch_forward(zm.model, zm.args[0], r=R)
    reference, _ = reference_forward(zm, r=R)
    assert_changed(tome_logits, zm())
    out, _ = compiled(name, {"r": R})
    torch.testing.assert_close(out, tome_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(reference, tome_logits, rtol=1e-5, atol=1e-5)

    set_aside, _ = reference_forward(zm, r=R, protect="set_aside")
    out_set_aside, _ = compiled(name, {"r": R, "protect": "set_aside"})
    assert max_abs_diff(out_set_aside, set_aside) <= TOL
    if zm.prefix_tokens % 2:  # an even prefix partitions the same way in both modes
        assert_changed(set_aside, tome_logits)


@pytest.mark.parametrize("name", ["timm_vit_reg4_sdpa", "hf_bert_sdpa"])
def test_set_aside_and_registers_equal_reference(name):
    """Both modes on a class token + 4 registers (ToMe's rule applied to every protected token)
    and on a padded BERT batch ([CLS] protected, padding merges only with padding)."""
    zm = ZOO[name]()
    for protect in ("tome", "set_aside"):
        reference, tracker = reference_forward(zm, r=R, protect=protect)
        for sample in range(zm.batch):
            groups = tracker.groups(sample)
            assert all(groups[p] == [p] for p in range(zm.prefix_tokens or 1))
        merge = {"r": R} if protect == "tome" else {"r": R, "protect": protect}
        out, report = compiled(name, merge)
        assert max_abs_diff(out, reference) <= TOL, protect
        assert_report_rewritten(report, zm.token_count, tracker.r_done)


@pytest.mark.parametrize("name, schedule", [pytest.param(n, s, id=f"{n}-{s}") for n, s in SCHEDULE_CASES])
def test_merge_schedules_equal_reference(name, schedule):
    merge = SCHEDULES[schedule]
    zm = ZOO[name]()
    rs = merge["r"] if isinstance(merge["r"], list) else decreasing_schedule(merge["r"], len(zm.attention_modules))
    reference, tracker = reference_forward(zm, r=rs)
    assert_changed(reference, zm())
    out, report = compiled(name, merge)
    assert max_abs_diff(out, reference) <= TOL
    assert_report_rewritten(report, zm.token_count, tracker.r_done)


# ----------------------------------------------------------------------------- protected tokens

def test_deit_class_and_distillation_tokens_equal_reference():
    """DeiT distilled: the class and distillation tokens are never merged and stay at positions 0, 1;
    their features and both heads equal the reference."""
    name = "timm_deit_tiny_distilled_sdpa"
    zm = ZOO[name]()
    with torch.no_grad():
        features, tracker = timm_vit_features(zm.model, zm.args[0], r=R)
        dense = zm.model.forward_features(zm.args[0])
    for sample in range(zm.batch):
        groups = tracker.groups(sample)
        assert groups[0] == [0] and groups[1] == [1]
    assert_changed(features[:, :2], dense[:, :2])
    out, report = compiled(name, {"r": R}, entry="forward_features")
    assert report.prefix_tokens == 2
    assert max_abs_diff(out, features) <= TOL
    with torch.no_grad():
        for head, position in ((zm.model.head, 0), (zm.model.head_dist, 1)):
            assert max_abs_diff(head(out[:, position]), head(features[:, position])) <= TOL
        assert max_abs_diff(timm_head(zm.model, out), timm_head(zm.model, features)) <= TOL


@pytest.mark.parametrize("name", zoo_params(BERT_MODELS))
def test_bert_cls_and_pooler_equal_reference(name):
    """BERT: [CLS] (read by the pooler) is never merged; the pooler output equals the reference."""
    zm = ZOO[name]()
    reference, tracker = reference_forward(zm, r=R)
    for sample in range(zm.batch):
        assert tracker.groups(sample)[0] == [0]
    out, _ = compiled(name, {"r": R})
    assert max_abs_diff(out.pooler_output, reference.pooler_output) <= TOL
    assert max_abs_diff(out.last_hidden_state[:, 0], reference.last_hidden_state[:, 0]) <= TOL
    assert_changed(reference.pooler_output, zm().pooler_output)


# ----------------------------------------------------------------------------- padding

@pytest.mark.parametrize("name, r", [
    pytest.param("hf_bert_sdpa", R, id="hf_bert_sdpa-r4"),
    pytest.param("hf_bert_eager", R, id="hf_bert_eager-r4"),
    pytest.param("hf_bert_sdpa", [3, 5], id="hf_bert_sdpa-r3_5"),
    pytest.param("hf_bert_eager", [5, 3], id="hf_bert_eager-r5_3"),
])
def test_bert_padding_never_merges_into_real_tokens(name, r):
    """With a padded batch, every merged token is all padding or all real tokens (and padded tokens
    do merge, with each other); tokred equals the reference."""
    zm = ZOO[name]()
    assert zm.has_mask
    reference, tracker = reference_forward(zm, r=r)
    padded = tracker.padded_original
    merged_padding = 0
    for sample in range(zm.batch):
        for group in tracker.groups(sample):
            status = {bool(padded[sample, p]) for p in group}
            assert len(status) == 1, f"sample {sample}: padded and real tokens merged: {group}"
            merged_padding += status == {True} and len(group) > 1
    assert merged_padding > 0, "no padded tokens were merged: the padding rule was not exercised"
    out, _ = compiled(name, {"r": r})
    assert max_abs_diff(out, reference) <= TOL


# ----------------------------------------------------------------------------- what is not merged

def test_causal_decoder_is_passed_through():
    name = "hf_llama_sdpa"
    zm = ZOO[name]()
    out, report = compiled(name, {"r": R})
    assert report.attention_sites
    for site in report.attention_sites:
        assert site.status == "skipped" and "causal" in site.reason, (site.module, site.status, site.reason)
    assert not report.changed
    assert max_abs_diff(out, zm()) <= IDENTITY_TOL


# ----------------------------------------------------------------------------- local mode (tomesd)

def test_local_mode_equals_reference():
    name = "timm_vit_tiny_sdpa"
    zm = ZOO[name]()
    dense = zm()
    reference_zero, _ = reference_forward(zm, r=0, mode="local")
    assert max_abs_diff(reference_zero, dense) <= IDENTITY_TOL
    out_zero, report_zero = compiled(name, {"r": 0, "mode": "local"})
    assert max_abs_diff(out_zero, dense) <= IDENTITY_TOL and not report_zero.changed

    reference, _ = reference_forward(zm, r=R, mode="local")
    assert_changed(reference, dense)
    global_reference, _ = reference_forward(zm, r=R)
    assert_changed(reference, global_reference)  # local and global are different methods
    out, report = compiled(name, {"r": R, "mode": "local"})
    assert max_abs_diff(out, reference) <= TOL
    n = zm.token_count
    for site in report.attention_sites:
        assert site.status == "rewritten", (site.module, site.reason)
        assert site.reason.count(f"{n}->{n - R}") == 2, site.reason  # the attention and the MLP branch


# ----------------------------------------------------------------------------- options

@pytest.mark.parametrize("merge, key", [
    ({"r": -1}, "merge.r"),
    ({"r": "4"}, "merge.r"),
    ({"r": True}, "merge.r"),
    ({"r": [2, "3"]}, "merge.r"),
    ({"r": [2, -3]}, "merge.r"),
    ({"r": 4, "mode": "diagonal"}, "merge.mode"),
    ({"r": 4, "protect": "cls"}, "merge.protect"),
    ({"r": 4, "schedule": "increasing"}, "merge.schedule"),
    ({"r": [2, 3], "schedule": "decreasing"}, "merge.schedule"),
    ({"r": 4, "prop_attn": 1}, "merge.prop_attn"),
    ({"r": 4, "ratio": 0.5}, "merge.ratio"),
    ("8", "merge"),
])
def test_bad_options_are_refused(merge, key):
    with pytest.raises(ValueError, match=re.escape(f"'{key}'")):
        tokred.backend(inner="aot_eager", merge=merge)


def test_per_block_list_of_the_wrong_length_is_refused():
    """The block count is known only at compile time: the error names the option there."""
    zm = ZOO["timm_vit_tiny_sdpa"]()
    torch._dynamo.reset()
    try:
        with pytest.raises(Exception, match=r"'merge\.r' lists 3 values but the model has 2 blocks"):
            with torch.no_grad():
                torch.compile(zm.model, backend=tokred.backend(inner="aot_eager", merge={"r": [1, 2, 3]}))(*zm.args)
    finally:
        torch._dynamo.reset()


# ----------------------------------------------------------------------------- inductor

def test_inductor_equals_aot_eager():
    name = "timm_vit_tiny_sdpa"
    out_aot, _ = compiled(name, {"r": R})
    out_inductor, report = compiled(name, {"r": R}, inner="inductor")
    assert report.changed
    assert max_abs_diff(out_inductor, out_aot) <= TOL
    reference, _ = reference_forward(ZOO[name](), r=R)
    assert max_abs_diff(out_inductor, reference) <= TOL


# ----------------------------------------------------------------------------- the whole zoo

@pytest.mark.parametrize("name", zoo_params(attention=True))
def test_merge_on_every_zoo_model(name, fresh_dynamo):
    """Every encoder/vision model merges in every block with the outputs' shapes kept; causal
    decoders pass through unchanged with a reason on every site."""
    zm = ZOO[name]()
    be = tokred.backend(inner="aot_eager", merge={"r": 2})
    with torch.no_grad():
        out = torch.compile(zm.model, backend=be)(*zm.args, **zm.kwargs)
    dense = zm()
    report = be.report
    assert len(report.attention_sites) == zm.n_attention
    if zm.causal:
        assert all(s.status == "skipped" and "causal" in s.reason for s in report.attention_sites)
        assert max_abs_diff(out, dense) <= TOL
    else:
        assert all(s.status == "rewritten" for s in report.attention_sites), str(report)
        assert report.flops_after < report.flops_before
        # same structure and shapes (max_abs_diff asserts them); merging changed the values (relative
        # to their scale: DINOv2's layer scale starts at 1e-5, so its outputs are tiny)
        scale = max(t.abs().max().item() for t in flatten_outputs(dense) if t.is_floating_point())
        assert max_abs_diff(out, dense) > 1e-3 * scale


def test_verify_off_gives_the_same_model(fresh_dynamo):
    """``verify=False`` skips the per-rewrite shape and output-contract checks, nothing else."""
    zm = ZOO["hf_bert_sdpa"]()
    outs = []
    for verify in (True, False):
        torch._dynamo.reset()
        be = tokred.backend(inner="aot_eager", verify=verify, merge={"r": 3})
        with torch.no_grad():
            outs.append(torch.compile(zm.model, backend=be)(*zm.args, **zm.kwargs))
        assert all(s.status == "rewritten" for s in be.report.attention_sites)
    assert max_abs_diff(outs[0], outs[1]) == 0.0
