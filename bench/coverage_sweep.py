"""Coverage of the sweep's models: for each tiny timm / transformers model, the attention sites
tokred finds against the attention modules the model holds, and for each pass whether it rewrote
the model or why not, in the report's words.

    python bench/coverage_sweep.py                 # CI's sample (tests/test_sweep.py), ~10 min
    python bench/coverage_sweep.py --all           # every model of the sweep (hours on 2 cores)
    python bench/coverage_sweep.py --models llama,vit_tiny_patch16_224

Writes bench/results/coverage_sweep.md (or --out). The models are tests/test_sweep.py's (same
builders, same inputs); each pass runs on its own compile, ``inner="eager"`` (kv_cache with
``use_cache=True`` where the forward takes it). "attention modules"
counts the outermost modules whose class name says Attention/Attn: what the model's authors call
attention, an independent count to hold the sites found against (a model may hold attention
modules its forward does not run, or attention written in a module not named so).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import tokred  # noqa: E402
from bench.common import write_results  # noqa: E402

PASSES = {
    "merge": {"merge": {"r": 2}},
    "prune": {"prune": {"keep": 0.5, "at": [0]}},
    "sparse": {"sparse_attention": {"pattern": "sink_window", "sinks": 1, "window": 4}},
    "kv_cache": {"kv_cache": {"method": "tova", "keep": 0.5}},
}
ATTENTION_CLASS = re.compile(r"Attention|Attn")


def attention_modules(model: torch.nn.Module) -> int:
    """Outermost modules whose class name says attention (a module inside one is not counted)."""
    named = [name for name, m in model.named_modules() if ATTENTION_CLASS.search(type(m).__name__)]
    return sum(1 for name in named if not any(name.startswith(other + ".") for other in named))


def pass_outcome(report, name: str) -> str:
    """"rewritten k/n" or the first reason the report gives for the pass."""
    sites = report.attention_sites
    done = sum(1 for s in sites if any(p == name_of(name) and st == "rewritten" for p, st, _ in s.history))
    if done:
        return f"rewritten {done}/{len(sites)}"
    for note in report.notes:
        if note.startswith(f"{name_of(name)}: changed nothing:") or note.startswith(f"{name_of(name)}: not applied"):
            return note.split(":", 2)[2].strip() if "changed nothing" in note else note.split(": ", 1)[1]
    reasons = [r for s in sites for p, st, r in s.history if st == "skipped" and r]
    return reasons[0] if reasons else "not rewritten"


def name_of(key: str) -> str:
    return next(iter(PASSES[key]))


def cell(text: str, limit: int = 110) -> str:
    text = " ".join(text.replace("|", "/").split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def sweep_row(library: str, name: str) -> list:
    import test_sweep as sweep

    built = sweep.build_timm(name) if library == "timm" else sweep.build_hf(name)
    if built.skip:
        return [library, name, "not built tiny", "-"] + [""] * len(PASSES)
    expected = attention_modules(built.model)
    cells = []
    found = None
    takes_cache = "use_cache" in inspect.signature(built.model.forward).parameters
    for key, options in PASSES.items():
        backend = tokred.backend(inner="eager", **options)
        run = built
        if key == "kv_cache" and takes_cache:  # the pass cuts the cache a prefill returns
            run = dataclasses.replace(built, kwargs={**built.kwargs, "use_cache": True})
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sweep.run(built.model, run, backend)
        except Exception as exc:  # noqa: BLE001  (recorded, not hidden)
            cells.append(cell(f"compile failed: {type(exc).__name__}: {exc}"))
            continue
        report = backend.report
        found = len(report.attention_sites) if found is None else found
        cells.append(cell(pass_outcome(report, key)))
    return [library, name, str(found if found is not None else "-"), str(expected)] + cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--all", action="store_true", help="every model of the sweep, not CI's sample")
    parser.add_argument("--models", help="comma-separated timm names / transformers model types")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "coverage_sweep.md"))
    args = parser.parse_args()
    import test_sweep as sweep

    if args.models:
        hf = set(sweep.hf_model_types())
        jobs = [("transformers" if m in hf else "timm", m) for m in args.models.split(",")]
    elif args.all:
        jobs = [("timm", n) for n in sweep.timm_names()] + [("transformers", t) for t in sweep.hf_model_types()]
    else:
        jobs = [("timm", n) for n in sweep.TIMM_SAMPLE] + [("transformers", t) for t in sweep.HF_SAMPLE]
    start = time.time()
    rows = [sweep_row(library, name) for library, name in tqdm(jobs, desc="models")]
    header = ["library", "model", "sites found", "attention modules", *PASSES]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    options = "; ".join(f"{k}: `{v[name_of(k)]}`" for k, v in PASSES.items())
    text = (f"# Coverage of the sweep's models\n\n"
            f"`python bench/coverage_sweep.py{' --all' if args.all else ''}` on {time.strftime('%Y-%m-%d')}, "
            f"torch {torch.__version__}, {len(rows)} models, {time.time() - start:.0f} s. Each pass on its own "
            f"compile ({options}); a cell says `rewritten k/n` (sites) or the report's first reason.\n\n"
            + "\n".join(lines) + "\n")
    write_results(text, args.out)


if __name__ == "__main__":
    main()
