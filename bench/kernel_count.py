"""Kernel launches per layer that each pass adds, counted in inductor's generated code (CPU).

    python bench/kernel_count.py

The test zoo's tiny models (tests/zoo.py: a timm ViT-Ti layout and a transformers Llama with GQA,
2 blocks each), compiled by inductor through tokred with and without each pass; the launches of
one call are read from inductor's wrapper code (kernels it generated, library kernels and ATen
fallbacks; ``tokred.compat.torch_api.kernel_launches``). "Added per layer" is (launches with the
pass - dense launches) / rewritten layers. Writes bench/results/kernel_count.md and .json; the
test tests/test_kernel_count.py compiles the first cases again and fails when a count grows.
On CUDA the same count reads Triton launches (issue target: at most two per merge or prune step).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the zoo's tiny models

from bench.common import write_results  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "kernel_count.md"
# (zoo model, case name, tokred options); each model's dense case first
CASES = [
    ("timm_vit_tiny_sdpa", "dense", {}),
    ("timm_vit_tiny_sdpa", "merge r=2", {"merge": {"r": 2}}),
    ("timm_vit_tiny_sdpa", "prune cls keep 0.5 at 0", {"prune": {"keep": 0.5, "at": [0]}}),
    ("hf_llama_sdpa", "dense", {}),
    ("hf_llama_sdpa", "prune query keep 0.5 at 0", {"prune": {"keep": 0.5, "at": [0]}}),
    ("hf_llama_sdpa", "sparse sink_window 2+4", {"sparse_attention": {"pattern": "sink_window", "sinks": 2,
                                                                    "window": 4}}),
]


def count(model_name: str, options: dict) -> dict:
    """Launches of one compiled call of the zoo model through tokred with ``options``."""
    import torch

    import tokred
    from tokred.compat.torch_api import kernel_launches, run_and_get_inductor_code
    from zoo import ZOO

    torch._dynamo.reset()  # a benchmark process of its own: each case compiles afresh
    zm = ZOO[model_name]()
    backend = tokred.backend(**options)
    with torch.no_grad():
        _, codes = run_and_get_inductor_code(torch.compile(zm.model, backend=backend), *zm.args, **zm.kwargs)
    launches = [kernel_launches(code) for code in codes]
    rewritten = sum(1 for site in backend.report.attention_sites if site.status == "rewritten")
    return {"generated": sum(c["generated"] for c in launches), "extern": sum(c["extern"] for c in launches),
            "graphs": len(codes), "rewritten_layers": rewritten}


def measure(cases=CASES, progress: bool = True) -> list:
    """One row per case: its launches and, for a pass, the launches it adds per rewritten layer."""
    from tqdm import tqdm

    rows, dense = [], {}
    for model_name, case, options in tqdm(cases, desc="compiling", disable=not progress):
        row = {"model": model_name, "case": case, **count(model_name, options)}
        row["launches"] = row["generated"] + row["extern"]
        if not options:
            dense[model_name] = row["launches"]
        elif row["rewritten_layers"]:
            row["added_per_layer"] = (row["launches"] - dense[model_name]) / row["rewritten_layers"]
        rows.append(row)
    return rows


def render(rows: list) -> str:
    import torch

    lines = ["# Kernel launches per layer added by each pass (inductor, CPU)", "",
             f"torch {torch.__version__}; the test zoo's tiny models (2 blocks); one compiled call.", "",
             "| model | case | generated kernels | extern / ATen | launches | rewritten layers | added per layer |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        added = f"{r['added_per_layer']:.1f}" if "added_per_layer" in r else ""
        lines.append(f"| {r['model']} | {r['case']} | {r['generated']} | {r['extern']} | {r['launches']} | "
                     f"{r['rewritten_layers']} | {added} |")
    lines += ["", "Command: `python bench/kernel_count.py`", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    rows = measure()
    write_results(render(rows), args.out)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
