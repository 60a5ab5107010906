"""Property-based fuzzing of tokred's graph analysis and token-count surgery.

Hypothesis draws small transformers written in many styles (tests/fuzz_models.py: fused or separate
q/k/v, GQA with three repeat_kv forms, SDPA or manual softmax attention, padding masks, causal
masks, prefix tokens, rotary, pre/post-norm, LayerNorm or a hand-written RMSNorm, ...). For each:

1. ``tokred.explain`` finds exactly ``depth`` attention sites, each found or skipped with a reason;
   every block is found, and the prefix token count equals the generated one (every prefix form the
   generator writes, one [1, P, C] parameter or a class token plus register tokens, is found);
2. the test-only keep-subset rewrite (tests/test_token_count.py) after block 0 either refuses with a
   RewriteError that names a graph node, leaving the graph unchanged, or equals its hook reference
   to 1e-5; keeping every token reproduces the original output to 1e-5 (invariant 2). A refusal
   passes one spec, but across a draw the rewrite must be made for a stated share of the specs
   with two or more blocks (QUICK_MIN_SHARE, LONG_MIN_SHARE), so refusing everything fails;
3. ``torch.compile(model, backend=tokred.backend(inner="aot_eager"))`` equals eager to 1e-5.

The CI share is small: pinned specs (one per real-world style) and minimal specs of forms the
fuzzer found refused (fixed in 244ce5b), whose rewrite must not be refused, and 8 drawn specs of
two or three blocks, at least 80% of which must be rewritten.
``pytest --long`` draws 100 more (3-4 minutes on an idle machine); ``TOKRED_FUZZ_EXAMPLES=300`` draws more still.
"""

from __future__ import annotations

import os
import re
from dataclasses import replace
from typing import Optional

import pytest
import torch
from hypothesis import HealthCheck, given, settings

import tokred
from fuzz_models import ModelSpec, build, example_inputs, model_specs
from test_token_count import KeepSubsetBackend, kept_positions, reference_keep_subset
from tokred.backend import inner_compile
from tokred.rewriter import analysis
from tokred.rewriter.report import FOUND, SKIPPED
from tokred.rewriter.surgery import RewriteError
from zoo import flatten_outputs, max_abs_diff

TOL = 1e-5


def fuzz_settings(max_examples: int):
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


class RecordingKeepSubset:
    """:class:`KeepSubsetBackend` that records what the analysis found and a RewriteError (then
    compiles the graph as it was left) instead of failing the compile."""

    def __init__(self, keep: tuple):
        self.rewrite = KeepSubsetBackend(keep)
        self.blocks, self.errors, self.node_names = [], [], set()

    def __call__(self, gm, example_inputs):
        self.node_names |= {node.name for node in gm.graph.nodes}
        self.blocks.append(len(analysis.analyze(gm).blocks))
        try:
            return self.rewrite(gm, example_inputs)
        except RewriteError as exc:
            self.errors.append(str(exc))
            return inner_compile(gm, example_inputs, "aot_eager")


def names_a_node(message: str, node_names: set) -> bool:
    return any(re.search(rf"\b{re.escape(name)}\b", message) for name in node_names)


def run_eager(model, inputs):
    with torch.no_grad():
        return model(*inputs)


def run_compiled(model, inputs, backend):
    torch._dynamo.reset()  # every spec is a new model of one class: no stale guards, no recompile limit
    try:
        with torch.no_grad():
            return torch.compile(model, backend=backend, dynamic=False)(*inputs)
    finally:
        torch._dynamo.reset()


# ----------------------------------------------------------------------------- the properties

def check_explain(spec: ModelSpec, model, inputs) -> None:
    report = tokred.explain(model, *inputs)
    sites = report.attention_sites
    assert len(sites) == spec.expected_sites, f"{len(sites)} attention sites, expected {spec.expected_sites}\n{report}"
    for site in sites:
        assert site.status in (FOUND, SKIPPED), site
        if site.status == SKIPPED:
            assert site.reason.strip(), f"site {site.module} skipped without a reason"
    assert [s.module for s in sites] == [f"blocks.{i}.attn" for i in range(spec.depth)], report
    assert report.blocks == spec.depth, report
    assert report.token_count == spec.token_count, report
    assert report.prefix_tokens == spec.prefix, report


def check_keep_subset(spec: ModelSpec, model, inputs, require_rewrite: bool = False) -> str:
    """After block 0 keep ``kept_positions``; the rest exit early and are restored after the last block.

    A refusal (RewriteError naming a node, graph left unchanged) passes unless ``require_rewrite``.
    Returns "" if the rewrite was made, else the refusal.
    """
    n = spec.token_count
    keep = kept_positions(n, spec.prefix)
    eager = run_eager(model, inputs)
    be = RecordingKeepSubset(keep)
    out = run_compiled(model, inputs, be)
    assert be.blocks == [spec.depth], f"blocks found per captured graph: {be.blocks}"
    assert not (require_rewrite and be.errors), f"rewrite refused: {be.errors}"
    if be.errors:
        assert len(be.errors) == 1 and not be.rewrite.cuts, be.errors
        assert names_a_node(be.errors[0], be.node_names), f"RewriteError names no graph node: {be.errors[0]}"
        # a refused rewrite leaves the graph as it was
        assert max_abs_diff(out, eager) <= TOL
        return be.errors[0]
    assert len(be.rewrite.cuts) == 1 and be.rewrite.cuts[0].restored is not None
    with torch.no_grad():
        reference = reference_keep_subset(model, list(model.blocks), keep, n, lambda: model(*inputs))
    assert max_abs_diff(out, reference) <= TOL
    # the rewrite changed the model (dropped tokens are no longer attended to), so the test can fail
    scale = max(t.abs().max().item() for t in flatten_outputs(reference))
    assert max_abs_diff(reference, eager) > 1e-4 * scale
    return ""


def check_keep_all(spec: ModelSpec, model, inputs, require_rewrite: bool = False) -> None:
    """Keeping every token in order is the identity (invariant 2)."""
    be = RecordingKeepSubset(tuple(range(spec.token_count)))
    out = run_compiled(model, inputs, be)
    assert be.blocks == [spec.depth]
    assert not (require_rewrite and be.errors), f"rewrite refused: {be.errors}"
    if be.errors:
        assert names_a_node(be.errors[0], be.node_names), f"RewriteError names no graph node: {be.errors[0]}"
    else:
        assert len(be.rewrite.cuts) == 1
    assert max_abs_diff(out, run_eager(model, inputs)) <= TOL


def check_tokred_compile(spec: ModelSpec, model, inputs) -> None:
    be = tokred.backend(inner="aot_eager")
    out = run_compiled(model, inputs, be)
    assert len(be.reports) == 1, f"{len(be.reports)} captured graphs"
    assert max_abs_diff(out, run_eager(model, inputs)) <= TOL


def check_spec(spec: ModelSpec, require_rewrite: bool = False) -> Optional[str]:
    """Every property, on the model and inputs that ``spec`` describes. Returns None for a model
    with one block (no cut to make), "" where the keep-subset rewrite was made, else its refusal."""
    model, inputs = build(spec), example_inputs(spec)
    refused = None
    try:
        check_explain(spec, model, inputs)
        if spec.depth >= 2:
            refused = check_keep_subset(spec, model, inputs, require_rewrite)
            check_keep_all(spec, model, inputs, require_rewrite)
        check_tokred_compile(spec, model, inputs)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nspec: ModelSpec({spec.short()})") from None
    return refused


def check_rewritten_share(max_examples: int, minimum: float, min_depth: int = 1) -> None:
    """Draw ``max_examples`` specs, check each (:func:`check_spec`) and require that the keep-subset
    rewrite was made in at least ``minimum`` of those with two or more blocks: a refusal passes one
    spec, but the analysis and the surgery must handle most of what the generator writes."""
    outcomes = {}

    @fuzz_settings(max_examples)
    @given(spec=model_specs(min_depth=min_depth))
    def draw(spec):
        outcomes[spec] = check_spec(spec)

    draw()
    cut = {spec: refused for spec, refused in outcomes.items() if refused is not None}
    assert cut, f"none of the {len(outcomes)} drawn specs has two blocks"
    share = sum(not refused for refused in cut.values()) / len(cut)
    refusals = "\n".join(f"  ModelSpec({spec.short()}): {refused}" for spec, refused in cut.items() if refused)
    assert share >= minimum, (f"the keep-subset rewrite was made in {share:.0%} of {len(cut)} drawn specs with "
                              f"two or more blocks (at least {minimum:.0%} required); refused:\n{refusals}")


# ----------------------------------------------------------------------------- pinned specs

# Real-world styles the rewrite must handle (not refuse): one per family, so that CI covers each
# form whatever hypothesis draws.
VIT = ModelSpec(  # timm ViT: class token, fused qkv unbind, SDPA, pre-norm LayerNorm, features input
    width=24, heads=3, kv_heads=3, depth=2, tokens=9, prefix=1, prefix_pieces=1, inputs="features",
    pos_embed=True, qkv="fused_unbind", head_layout="reshape_permute", repeat_kv="expand",
    attention="sdpa", scale="default", dropout=False, mask="none", causal="none", causal_in_model=False,
    rotary=False, norm="layer", post_norm=False, final_norm=True, mlp="gelu", head="first")
LLAMA = replace(  # HF Llama eager: GQA (expand repeat_kv), rotary, causal + padding mask, RMSNorm
    VIT, width=32, heads=4, kv_heads=2, depth=3, tokens=13, prefix=0, inputs="ids", pos_embed=False,
    qkv="separate", head_layout="view_transpose", attention="manual", scale="mul_scores",
    dropout=True, mask="additive_full", causal="masked_fill", causal_in_model=True, rotary=True,
    norm="rms", final_norm=True, mlp="swiglu", head="none")
BERT = replace(  # HF BERT eager: post-norm LayerNorm, scores / sqrt(D), additive [B, 1, 1, N] mask
    VIT, width=32, heads=4, kv_heads=4, depth=2, tokens=11, prefix=0, inputs="ids", pos_embed=True,
    qkv="separate", head_layout="view_transpose", attention="manual", scale="div_scores", dropout=True,
    mask="additive", post_norm=True, final_norm=False, head="mean")
REGISTERS = replace(  # class + 3 register tokens, GQA (repeat_interleave), fused split, boolean causal mask
    VIT, width=36, heads=6, kv_heads=2, depth=2, tokens=10, prefix=4, prefix_pieces=2, qkv="fused_split",
    head_layout="unflatten", repeat_kv="repeat_interleave", attention="manual", scale="pre_q",
    mask="bool", causal="tril", causal_in_model=True, rotary=True, norm="rms")
GQA_SDPA = replace(  # SDPA decoder: enable_gqa, is_causal, one fused head axis split after the transpose
    VIT, width=24, heads=6, kv_heads=2, depth=2, tokens=13, prefix=0, inputs="ids", pos_embed=False,
    qkv="fused_heads", repeat_kv="enable_gqa", scale="explicit", causal="is_causal", rotary=True,
    norm="rms", mlp="swiglu", head="tokens")
PINNED = {"vit": VIT, "llama": LLAMA, "bert": BERT, "registers": REGISTERS, "gqa_sdpa": GQA_SDPA}


@pytest.mark.parametrize("name", list(PINNED))
def test_pinned_spec(name):
    check_spec(PINNED[name], require_rewrite=True)


# ----------------------------------------------------------------------------- regressions

# The smallest model: 2 blocks, 2 heads of 4, 7 tokens, SDPA, pre-norm LayerNorm. Each spec below
# changes one thing; the fuzzer found its keep-subset rewrite refused before 244ce5b (the cause, in
# the comment), so here it must be rewritten and equal the reference.
MINIMAL = ModelSpec(
    width=8, heads=2, kv_heads=2, depth=2, tokens=7, prefix=0, prefix_pieces=1, inputs="features",
    pos_embed=False, qkv="separate", head_layout="view_transpose", repeat_kv="expand", attention="sdpa",
    scale="default", dropout=False, mask="none", causal="none", causal_in_model=False, rotary=False,
    norm="layer", post_norm=False, final_norm=False, mlp="gelu", head="none")
REGRESSIONS = {
    # SDPA's attn_mask had no token dims: analysis seeded q/k/v and the manual chain's scores only.
    # [B, 1, 1, N] = cat(ones(B, P), padding [B, N - P]): no input has size N, cat marks no new dim
    "sdpa_padding_mask_with_prefix": replace(MINIMAL, tokens=6, prefix=1, mask="additive"),
    # [B, 1, N, N] = padding[:, None, None, :].expand(B, 1, N, N): the dim expand creates was missed
    "sdpa_expanded_padding_mask": replace(MINIMAL, mask="additive_full"),
    "sdpa_expanded_bool_mask": replace(MINIMAL, mask="bool"),
    # [1, 1, N, N] = ones(N, N).tril()[None, None]: the creation rule never marks dim 0
    "sdpa_causal_mask_from_model": replace(MINIMAL, causal="tril", causal_in_model=True),
    # each block's own ones(N, N).tril() / arange comparison has no input from the residual stream:
    # it is a side input [N, N] with the token axis at dim 0, which the surgery refused to gather
    "sdpa_causal_mask_built_in_block": replace(MINIMAL, causal="tril"),
    "sdpa_arange_causal_built_in_block": replace(MINIMAL, causal="arange"),
    "manual_causal_mask_built_in_block": replace(MINIMAL, causal="tril", attention="manual", scale="mul_scores"),
    # a hand-written RMSNorm after the residual add was not taken for the block's post-norm (only
    # F.layer_norm/F.rms_norm were): Block.output None, refused with a message naming no node
    "post_norm_handwritten_rmsnorm": replace(MINIMAL, post_norm=True, norm="rms"),
}


@pytest.mark.parametrize("name", list(REGRESSIONS))
def test_regression_spec(name):
    spec = REGRESSIONS[name]
    model, inputs = build(spec), example_inputs(spec)
    try:
        check_keep_subset(spec, model, inputs, require_rewrite=True)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nspec: ModelSpec({spec.short()})") from None


# ----------------------------------------------------------------------------- drawn specs

# The share of drawn specs with two or more blocks whose keep-subset rewrite must be made, not
# refused. Measured (derandomized draws, so the same specs every run): quick 8 of 8, long 55 of 55
# (the other 45 of its 100 have one block). The thresholds leave room for one refusal in the quick
# draw and five in the long one.
QUICK_MIN_SHARE = 0.8
LONG_MIN_SHARE = 0.9


def test_fuzz_quick():
    """8 drawn specs with two or three blocks (derandomized: the same 8 every run); the rewrite must
    be made in at least 80% of them (measured: 8 of 8)."""
    check_rewritten_share(8, QUICK_MIN_SHARE, min_depth=2)


@pytest.mark.long
def test_fuzz_long():
    """100 drawn specs (``TOKRED_FUZZ_EXAMPLES``); the rewrite must be made in at least 90% of those
    with two or more blocks (measured: 55 of 55)."""
    check_rewritten_share(int(os.environ.get("TOKRED_FUZZ_EXAMPLES", "100")), LONG_MIN_SHARE)
