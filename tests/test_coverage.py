"""CI's sample of the coverage table (bench/coverage_sweep.py, committed as
bench/results/coverage_sweep.md): a few rows recomputed, each cell a rewrite or a reason in words,
and what tokred rewrites today still rewritten."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from test_sweep import FAILURE_WORDS

ROOT = Path(__file__).resolve().parents[1]

# (library, model): the passes that must rewrite it
SAMPLE = {
    ("timm", "vit_tiny_patch16_224"): {"merge", "prune"},
    ("transformers", "llama"): {"prune", "sparse", "kv_cache"},
    ("transformers", "phi"): {"prune", "sparse", "kv_cache"},  # parallel-residual blocks: prune cuts after them
    ("transformers", "gpt_neox"): {"prune", "sparse", "kv_cache"},  # q[..., r:] of N head dims: not tokens
    ("transformers", "mixtral"): {"prune", "sparse", "kv_cache"},  # MoE routing: topk, sort, k*N literals
    ("timm", "eva02_tiny_patch14_224"): {"merge", "prune"},  # rotary table of the patches: gathered after the prefix
    ("transformers", "bloom"): {"prune"},  # ALiBi through baddbmm over [B*H, N, D]; sparse: two masks
    ("transformers", "opt"): {"prune", "sparse", "kv_cache"},  # MLP on the flattened stream
    ("transformers", "deberta-v2"): {"merge"},  # bmm over heads, the key scaled by a constant tensor
}


@pytest.fixture(scope="module")
def coverage():
    sys.path.insert(0, str(ROOT))
    from bench import coverage_sweep

    return coverage_sweep


@pytest.mark.parametrize("library, name", list(SAMPLE))
def test_coverage_row(coverage, library, name, fresh_dynamo):
    pytest.importorskip("timm" if library == "timm" else "transformers")
    row = coverage.sweep_row(library, name)
    cells = dict(zip(coverage.PASSES, row[4:]))
    assert row[2] == row[3], f"{name}: {row[2]} sites found, {row[3]} attention modules"
    for key, text in cells.items():
        assert text, f"{name} {key}: empty cell"
        bad = [w for w in FAILURE_WORDS if w in text]
        assert not bad, f"{name} {key}: the reason shows internals ({bad}): {text}"
        assert text.startswith("rewritten") == (key in SAMPLE[(library, name)]), f"{name} {key}: {text}"
