"""Compile time of tokred (analysis only, and with token merging) against plain inductor, cold.

    python bench/compile_time.py [--model vit_small_patch16_224] [--repeats 2] [--merge 8]

Each measurement runs in its own subprocess with empty inductor/Triton cache directories, so every
compile is cold and nothing is shared between measurements. The backends alternate (A B B A ...)
(A B C C B A ...) so that drift in machine load hits all alike. A measurement is the time of the first call of the
compiled model (capture + tokred's analysis + inductor), minus the time of a second, already
compiled call, both as wall time and as CPU time. The CPU time (this process plus the compiler
processes it waits for; inductor runs with one compile thread so that all of its work is counted)
is what a loaded, shared machine disturbs least. Writes bench/results/compile_time.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Run from a source checkout without installing: the repo root holds the tokred package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import write_results  # noqa: E402

BACKENDS = ("inductor", "tokred")  # with --merge R, also "tokred-merge": merge={"r": R}
TARGET_RATIO = 1.3
RESULTS = Path(__file__).resolve().parent / "results" / "compile_time.md"


def measure(backend: str, model_name: str, batch: int, merge: int = 0) -> dict:
    """One cold compile in this process: build the model, compile, call twice; times in seconds."""
    import timm
    import torch

    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False).eval()
    image = torch.randn(batch, 3, 224, 224)
    result = {"backend": backend}
    if backend.startswith("tokred"):
        import importlib

        import tokred

        # The module, not the tokred.backend() factory that the package exports under that name.
        tokred_backend = importlib.import_module("tokred.backend")

        compiler = tokred.backend(**({"merge": {"r": merge}} if backend == "tokred-merge" else {}))
        # Time tokred's own share (analysis + passes) by wrapping the function the backend calls.
        rewrite, spent = tokred_backend.rewrite, []

        def timed_rewrite(*args, **kwargs):
            start = time.perf_counter()
            try:
                return rewrite(*args, **kwargs)
            finally:
                spent.append(time.perf_counter() - start)

        tokred_backend.rewrite = timed_rewrite
    else:
        compiler = "inductor"
    compiled = torch.compile(model, backend=compiler)
    with torch.no_grad():
        first_wall, first_cpu = _timed(lambda: compiled(image))
        second_wall, second_cpu = _timed(lambda: compiled(image))
    result["compile_s"] = first_wall - second_wall
    result["compile_cpu_s"] = first_cpu - second_cpu
    if backend.startswith("tokred"):
        report = compiler.report
        result["analysis_s"] = sum(spent)
        result["attention_sites"] = len(report.attention_sites)
        result["rewritten_sites"] = sum(1 for site in report.attention_sites if site.status == "rewritten")
    return result


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished, waited-for children (the C++ compiler)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of ``fn()``."""
    wall, cpu = time.perf_counter(), _cpu_seconds()
    fn()
    return time.perf_counter() - wall, _cpu_seconds() - cpu


def run_worker(backend: str, model_name: str, batch: int, merge: int = 0) -> dict:
    """``measure`` in a fresh subprocess with empty compiler caches."""
    with tempfile.TemporaryDirectory(prefix="tokred-bench-") as cache:
        env = dict(os.environ,
                   TORCHINDUCTOR_CACHE_DIR=os.path.join(cache, "inductor"),
                   TRITON_CACHE_DIR=os.path.join(cache, "triton"),
                   TORCHINDUCTOR_COMPILE_THREADS="1")
        cmd = [sys.executable, __file__, "--worker", backend, "--model", model_name, "--batch", str(batch),
               "--merge", str(merge)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{backend} measurement failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def schedule(backends: tuple, repeats: int) -> list[str]:
    """ABBA order: inductor, tokred, tokred, inductor, inductor, tokred, ... (ABCCBA with three)."""
    order = []
    for i in range(repeats):
        order += list(backends if i % 2 == 0 else reversed(backends))
    return order


def summarize(runs: list[dict], key: str) -> tuple[dict, dict]:
    """Median of ``key`` per backend, and each tokred backend's median over inductor's."""
    backends = list(dict.fromkeys(r["backend"] for r in runs))
    medians = {b: statistics.median(r[key] for r in runs if r["backend"] == b) for b in backends}
    return medians, {b: medians[b] / medians["inductor"] for b in backends if b != "inductor"}


def render(runs: list[dict], model_name: str, batch: int, load: tuple, merge: int = 0) -> str:
    import torch

    what = f"analysis only, and merge r={merge}" if merge else "analysis only"
    lines = [
        f"# Compile time: tokred ({what}) vs inductor",
        "",
        "`tokred`: `tokred.backend()` (no options: analysis only)"
        + (f"; `tokred-merge`: `tokred.backend(merge={{'r': {merge}}})`." if merge else "."),
        f"Model: timm `{model_name}` (pretrained=False), batch {batch}, 224x224, fp32, CPU, `torch.no_grad()`.",
        f"torch {torch.__version__}, Python {platform.python_version()}, {os.cpu_count()} CPUs; "
        f"load average before/after: {load[0]:.2f} / {load[1]:.2f}.",
        "Each row is a cold compile in a fresh subprocess with empty inductor and Triton caches,",
        "inductor with one compile thread; CPU time counts the compiler processes too.",
        "",
        "| # | backend | compile wall (s) | compile CPU (s) | tokred analysis + passes wall (s) | attention sites found | rewritten |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(runs, 1):
        analysis = f"{r['analysis_s']:.2f}" if "analysis_s" in r else ""
        lines.append(f"| {i} | {r['backend']} | {r['compile_s']:.2f} | {r['compile_cpu_s']:.2f} | "
                     f"{analysis} | {r.get('attention_sites', '')} | {r.get('rewritten_sites', '')} |")
    lines.append("")
    for key, what in (("compile_s", "wall"), ("compile_cpu_s", "CPU")):
        medians, ratios = summarize(runs, key)
        figures = ", ".join(f"{b} {m:.2f} s" for b, m in medians.items())
        verdicts = "; ".join(f"{b} **{ratio:.2f}x** ({'within' if ratio <= TARGET_RATIO else 'over'} the "
                             f"{TARGET_RATIO}x target)" for b, ratio in ratios.items())
        lines.append(f"Median compile {what} time: {figures}; over inductor: {verdicts}.")
        lines.append("")
    backends = len(set(r["backend"] for r in runs))
    lines += [
        f"Command: `python bench/compile_time.py --model {model_name} --batch {batch} "
        f"--repeats {len(runs) // backends}" + (f" --merge {merge}`" if merge else "`"),
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch16_224", help="timm model name")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="measurements per backend")
    parser.add_argument("--merge", type=int, default=0, metavar="R",
                        help="also measure tokred with merge={'r': R} (0: not)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", choices=(*BACKENDS, "tokred-merge"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.merge < 0:
        parser.error("--merge must be 0 or more")

    if args.worker:
        print(json.dumps(measure(args.worker, args.model, args.batch, args.merge)))
        return 0

    backends = BACKENDS + (("tokred-merge",) if args.merge else ())
    load_before = os.getloadavg()[0]
    runs = []
    for backend in schedule(backends, args.repeats):
        run = run_worker(backend, args.model, args.batch, args.merge)
        runs.append(run)
        extra = (f", tokred {run['analysis_s']:.2f} s, {run['attention_sites']} sites, {run['rewritten_sites']} "
                 f"rewritten" if "analysis_s" in run else "")
        print(f"{backend:12s} {run['compile_s']:7.2f} s wall, {run['compile_cpu_s']:7.2f} s CPU{extra}", flush=True)
    text = render(runs, args.model, args.batch, (load_before, os.getloadavg()[0]), args.merge)
    write_results(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
