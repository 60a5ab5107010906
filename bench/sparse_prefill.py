"""Sparse attention end to end: SmolLM2-135M prefill time, dense against tokred's patterns, one run.

    python bench/sparse_prefill.py                         # N = 4096 and 8192, 2 threads (~10 min)
    python bench/sparse_prefill.py --n 8192 --repeats 3

The model (real weights, ``tokred.tools.offline.load_causal_lm("smollm2")``, fp32, SDPA attention) runs
one forward over N tokens of the Wikipedia extracts, without a KV cache:

* dense: the model as loaded;
* sink_window / block_topk: ``torch.compile(model, backend=tokred.backend(inner="eager",
  sparse_attention=...))``: every attention site rewritten (the report is checked), the rest of
  the model run as Dynamo captured it, eagerly, so the difference is the attention alone.

Median seconds of alternating rounds after one warm-up call each (the tokred warm-up includes the
capture, analysis and rewrite). Writes bench/results/sparse_prefill.md and a .png.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tokred  # noqa: E402
from bench.common import alternating_medians, write_results  # noqa: E402
from tokred.tools.offline import load_causal_lm, wiki_token_ids  # noqa: E402
from tokred.rewriter.report import REWRITTEN  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
PATTERNS = {
    "sink_window 4+1024": {"pattern": "sink_window", "sinks": 4, "window": 1024},
    "block_topk 64, top 16": {"pattern": "block_topk", "block": 64, "topk": 16, "sinks": 1, "local": 1},
}


def sparse_model(model, spec: dict):
    """The model compiled by tokred with ``spec`` and the backend (whose reports say what changed)."""
    backend = tokred.backend(inner="eager", sparse_attention=spec)
    return torch.compile(model, backend=backend), backend


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[4096, 8192], help="prompt lengths (<= 8192)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(RESULTS, "sparse_prefill.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_causal_lm("smollm2")
    rows = []
    with torch.no_grad():
        for n in args.n:
            ids = wiki_token_ids(tokenizer, n)[:, :n]
            fns = {"dense": lambda ids=ids: model(input_ids=ids, use_cache=False)}
            notes = {}
            for name, spec in PATTERNS.items():
                torch._dynamo.reset()
                compiled, backend = sparse_model(model, spec)
                fns[name] = lambda ids=ids, compiled=compiled: compiled(input_ids=ids, use_cache=False)
                fns[name]()  # capture and rewrite here, so the report can be checked before timing
                sites = backend.reports[-1].attention_sites
                rewritten = sum(s.status == REWRITTEN for s in sites)
                if rewritten != len(sites):
                    raise RuntimeError(f"{name}: {rewritten} of {len(sites)} attention sites rewritten")
                notes[name] = f"{rewritten}/{len(sites)} sites rewritten; " + next(
                    (note.split("; ")[-1] for note in backend.reports[-1].notes if note.startswith("sparse_attention")), "")
            medians = alternating_medians(fns, args.repeats)
            for name, seconds in medians.items():
                rows.append({"n": n, "method": name, "s": seconds, "speedup": medians["dense"] / seconds,
                             "note": notes.get(name, "the model as loaded (SDPA)")})
                print(rows[-1], flush=True)
    report(args, rows)


def report(args, rows: list[dict]) -> None:
    command = f"python bench/sparse_prefill.py --n {' '.join(map(str, args.n))} --repeats {args.repeats}" + (
        f" --threads {args.threads}" if args.threads != 2 else "")
    lines = [
        "# Sparse attention end to end: SmolLM2-135M prefill, CPU",
        "",
        f"`{command}`",
        "",
        f"({platform.machine()}, {args.threads} threads, torch {torch.__version__}, fp32, batch 1, Wikipedia "
        f"extracts, one forward without a KV cache; median of {args.repeats} alternating rounds after a warm-up. "
        "tokred = `torch.compile(model, backend=tokred.backend(inner=\"eager\", sparse_attention=...))`: the "
        "attention sites rewritten, the rest of the model as captured, run eagerly.)",
        "",
        "| N | method | s per prefill | speedup vs dense | notes |",
        "|---|---|---:|---:|---|",
    ]
    lines += [f"| {r['n']} | {r['method']} | {r['s']:.2f} | {r['speedup']:.2f}x | {r['note']} |" for r in rows]
    write_results("\n".join(lines) + "\n", args.out)
    plot(rows, args.out.replace(".md", ".png"))


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["n"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        seconds = [next(r["s"] for r in rows if r["n"] == n and r["method"] == method) for n in lengths]
        ax.bar([j + i * width for j in range(len(lengths))], seconds, width, label=method)
    ax.set_xticks([j + width * (len(methods) - 1) / 2 for j in range(len(lengths))], [f"N={n}" for n in lengths])
    ax.set_ylabel("seconds per prefill")
    ax.set_title("SmolLM2-135M prefill on CPU: dense vs tokred sparse attention")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


if __name__ == "__main__":
    main()
