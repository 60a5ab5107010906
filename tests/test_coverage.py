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
    ("transformers", "mixtral"): {"sparse", "kv_cache"},  # prune: MoE routing literals, a reason
    ("timm", "eva02_tiny_patch14_224"): set(),  # rotary table of the patch tokens only: a reason
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
