"""The report's FLOPs against counts made without tokred's formulas.

- Sparse attention: the pairs each query keeps, from plain masks built here (sparse_reference.py:
  sink_window, block_topk and mask rules reconstructed from their definitions), on the dense
  count's scale: kept pairs * Nq * Nk / causal pairs (tokred/triton_ops/sparse_cost.py says why),
  compared with ``report.flops_after`` minus the graph's non-attention FLOPs.
- Every pass: ``FlopCounterMode`` (torch's counter) run on the rewritten graph in eager, against
  ``report.flops_after``. FlopCounterMode has no formula for the CPU flash SDPA op, so the dense
  attention is counted for it here (``cpu_sdpa``).
- An option that changes nothing says so in the report's notes.

Models: the zoo's tiny depth-2 models (text: batch 2, 11 tokens; Llama: 12 heads of 8).
"""

from __future__ import annotations

import importlib

import pytest
import torch
from sparse_reference import block_topk_allowed, mask_fn_allowed, sink_window_allowed
from torch.utils.flop_counter import FlopCounterMode
from zoo import BATCH, DEPTH, GQA_HEAD_DIM, GQA_HEADS, SEQ_LEN, ZOO

import tokred
from tokred.rewriter.options import parse_options
from tokred.rewriter.report import FOUND, REWRITTEN, SKIPPED, Report, SiteRecord, note_unchanged, unchanged_reason
from tokred.triton_ops.sparse_attention import SparsePattern, sparse_attention

backend_module = importlib.import_module("tokred.backend")


def every_third(b, h, q_idx, kv_idx):
    return ((q_idx - kv_idx) % 3 == 0) | (kv_idx == 0)


SINK_WINDOW = {"pattern": "sink_window", "sinks": 2, "window": 4}
BLOCK_TOPK = {"pattern": "block_topk", "block": 2, "topk": 1, "sinks": 1, "local": 1}
MASK = {"pattern": "mask", "mask": every_third}


def causal_allowed(n: int) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool).tril()


def kept_pairs(spec: dict, batch: int, heads: int, n: int, dim: int) -> int:
    """(query, key) pairs the pattern keeps in one causal layer, summed over batch and heads."""
    if spec["pattern"] == "sink_window":
        return int(sink_window_allowed(n, n, spec["sinks"], spec["window"]).sum()) * batch * heads
    if spec["pattern"] == "mask":
        return int((mask_fn_allowed(spec["mask"], batch, heads, n, n) & causal_allowed(n)).sum())
    # block_topk in a causal prefill with local >= 1: every candidate block is full and wholly
    # visible, so the count does not depend on which blocks win (random q and k here)
    q, k = torch.randn(batch, heads, n, dim), torch.randn(batch, heads, n, dim)
    return int(block_topk_allowed(q, k, True, spec["block"], spec["topk"], spec["sinks"], spec["local"]).sum())


def selection_flops(spec: dict, batch: int, heads: int, n: int, dim: int) -> int:
    """block_topk's bound: two [NQB, D] @ [D, NKB] products per batch row and head."""
    if spec["pattern"] != "block_topk":
        return 0
    blocks = -(-n // spec["block"])
    return 2 * 2 * batch * heads * blocks * blocks * dim


def compiled_report(name: str, **options) -> Report:
    zm = ZOO[name]()
    be = tokred.backend(inner="eager", **options)
    with torch.no_grad():
        torch.compile(zm.model, backend=be)(*zm.args, **zm.kwargs)
    return be.report


# ----------------------------------------------------------------------------- sparse attention

@pytest.mark.parametrize("name,spec", [("hf_llama_sdpa", SINK_WINDOW), ("hf_llama_eager", BLOCK_TOPK),
                                       ("hf_llama_sdpa", MASK)], ids=["sink_window", "block_topk", "mask"])
def test_sparse_sites_cost_the_pairs_their_pattern_keeps(fresh_dynamo, name, spec):
    report = compiled_report(name, sparse_attention=spec)
    assert [s.status for s in report.attention_sites] == [REWRITTEN] * DEPTH
    b, h, n, d = BATCH, GQA_HEADS, SEQ_LEN, GQA_HEAD_DIM
    dense = 2 * b * h * n * n * 2 * d  # one layer: q @ k^T and p @ v over every pair
    non_attention = report.flops_before - DEPTH * dense
    causal = b * h * n * (n + 1) // 2
    kept = kept_pairs(spec, b, h, n, d)
    assert 0 < kept < causal  # the pattern does cut at this length
    per_layer = 2 * 2 * d * kept * n * n / (n * (n + 1) // 2) + selection_flops(spec, b, h, n, d)
    assert report.flops_after == pytest.approx(non_attention + DEPTH * per_layer, abs=DEPTH)


def test_identity_window_costs_the_dense_count_and_says_so(fresh_dynamo):
    report = compiled_report("hf_llama_sdpa", sparse_attention={"pattern": "sink_window", "sinks": 4,
                                                                "window": 2000})
    assert all(s.status == REWRITTEN for s in report.attention_sites)
    assert report.flops_after == report.flops_before
    assert f"sparse_attention: changed nothing: window 2000 >= the {SEQ_LEN} tokens: identity" in report.notes


@pytest.mark.parametrize("pattern", [
    SparsePattern("sink_window", sinks=3, window=20),
    SparsePattern("block_topk", block=16, topk=2, sinks=1, local=1),
    SparsePattern("block_topk", block=16, topk=2, sinks=1, local=1, causal=False),
    SparsePattern("mask", mask_fn=every_third),
], ids=["sink_window", "block_topk", "block_topk-bidirectional", "mask"])
def test_flop_counter_counts_the_op_by_its_kept_pairs(pattern):
    """The op alone under FlopCounterMode (150 tokens: partial blocks), GQA 4 heads on 2."""
    torch.manual_seed(0)
    b, h, n, d = 2, 4, 150, 8
    q, k, v = torch.randn(b, h, n, d), torch.randn(b, 2, n, d), torch.randn(b, 2, n, d)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        sparse_attention(q, k, v, pattern)
    counts = {str(op): f for op, f in counter.get_flop_counts()["Global"].items()}
    if pattern.kind == "sink_window":
        allowed = sink_window_allowed(n, n, pattern.sinks, pattern.window).expand(b, h, n, n)
    elif pattern.kind == "mask":
        allowed = mask_fn_allowed(every_third, b, h, n, n) & causal_allowed(n)
    else:
        allowed = block_topk_allowed(q, k.repeat_interleave(2, dim=1), pattern.causal, pattern.block,
                                     pattern.topk, pattern.sinks, pattern.local)
    scale = n * n / (n * (n + 1) // 2) if pattern.causal else 1.0
    assert counts["tokred.sparse_attention"] == round(2 * 2 * d * int(allowed.sum()) * scale)


# ----------------------------------------------------------------------------- every pass vs FlopCounterMode

def cpu_sdpa(q, k, v, *args, out_shape=None, **kwargs) -> int:
    """The CPU flash SDPA op's dense count (FlopCounterMode has no formula for it)."""
    return 2 * q[0] * q[1] * q[2] * k[2] * (q[3] + v[3])


def rewritten_graphs(name: str, **options) -> list:
    """[(rewritten graph, its example inputs, report)] of the zoo model, via the backend's rewrite."""
    zm = ZOO[name]()
    parsed = parse_options({**options, "inner": "eager"})
    graphs = []

    def capture(gm, example_inputs):
        gm, report = backend_module.rewrite(gm, example_inputs, parsed)
        graphs.append((gm, list(example_inputs), report))
        return gm.forward

    with torch.no_grad():
        torch.compile(zm.model, backend=capture)(*zm.args, **zm.kwargs)
    return graphs


@pytest.mark.parametrize("name,options", [
    ("hf_llama_sdpa", {"sparse_attention": SINK_WINDOW}),
    ("hf_llama_eager", {"sparse_attention": BLOCK_TOPK}),
    ("hf_vit_sdpa", {"merge": {"r": 4}}),
    ("hf_vit_sdpa", {"prune": {"keep": 0.5, "at": [0]}}),
    ("hf_llama_sdpa", {"prune": {"keep": 0.5, "at": [0], "score": "query"}}),
], ids=["sink_window", "block_topk", "merge", "prune-cls", "prune-query"])
def test_flops_after_equal_flop_counter_on_the_rewritten_graph(fresh_dynamo, name, options):
    (gm, example_inputs, report), = rewritten_graphs(name, **options)
    assert report.changed, str(report)
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa}
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        gm(*example_inputs)
    assert report.flops_after == counter.get_total_flops(), counter.get_flop_counts()["Global"]


# ----------------------------------------------------------------------------- options that change nothing

def test_no_attention_sites_says_sparse_attention_changed_nothing(fresh_dynamo):
    report = compiled_report("torch_mlp", sparse_attention=SINK_WINDOW)
    assert "sparse_attention: changed nothing: the graph has no attention sites" in report.notes
    assert "changed nothing" in str(report)


def test_every_site_skipped_says_why_nothing_changed(fresh_dynamo):
    report = compiled_report("hf_bert_sdpa", sparse_attention=SINK_WINDOW)
    assert all(s.status == SKIPPED for s in report.attention_sites)
    assert ("sparse_attention: changed nothing: every site skipped: sink_window needs causal attention "
            f"(this site is bidirectional) ({DEPTH} sites)") in report.notes


def test_layers_that_select_nothing_say_so(fresh_dynamo):
    report = compiled_report("hf_llama_sdpa", sparse_attention={**SINK_WINDOW, "layers": [7]})
    assert ("sparse_attention: changed nothing: layers [7] select none of the graph's attention layers "
            "[0, 1]") in report.notes
    assert report.flops_after == report.flops_before


def test_unchanged_reason_reads_the_sites_of_any_pass():
    def site(status, reason, passes):
        record = SiteRecord(module="m", layer=0, kind="sdpa", q_shape=(), kv_shape=(), heads=1, kv_heads=1,
                            head_dim=1, causal=True, has_mask=False)
        for name in passes:
            record.mark(status, reason, name)
        return record

    assert unchanged_reason(Report(), "merge") == "the graph has no attention sites"
    causal = "merge: causal attention: merging would mix later tokens into earlier ones"
    report = Report(attention_sites=[site(SKIPPED, causal, ["merge"]), site(SKIPPED, causal, ["merge"])])
    assert unchanged_reason(report, "merge") == ("every site skipped: causal attention: merging would mix "
                                                 "later tokens into earlier ones (2 sites)")
    assert unchanged_reason(report, "prune") == "none of the 2 attention sites was selected"
    window = "kv_cache: a sliding-window layer, left as it is"
    kept = Report(attention_sites=[site(FOUND, window, ["kv_cache"])])
    assert unchanged_reason(kept, "kv_cache") == "every site left as it was: a sliding-window layer, left as it is (1 site)"
    report.attention_sites.append(site(REWRITTEN, "merge r=2", ["merge"]))
    assert unchanged_reason(report, "merge") is None
    note_unchanged(report, "merge", "first")
    note_unchanged(report, "merge", "second")  # one note per option
    assert report.notes == ["merge: changed nothing: first"]
