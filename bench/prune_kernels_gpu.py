"""Token pruning kernels on CUDA: the Triton ops against their torch references (eager and inductor).

    python bench/prune_kernels_gpu.py [--dtype float16] [--no-inductor]

Cases (each a real model's shape; fp16 inputs by default):

- ``vit-b cls``: ViT-B/16 at 224: B in {16, 64}, H = 12, R = 1 (the class row), N = 197, D = 64,
  C = 768; every token but the class token prunable, keep 98 (half).
- ``smollm2 query``: SmolLM2-135M prefill: B = 1, H = 9, Hkv = 3 (GQA), R = 1 (the last row),
  N = 4096, D = 64, C = 576; every token but the last prunable, keep 2048.
- ``select``: ``select_kept`` alone on the scores of each case above.
- ``k-center``: ViT-B tokens, B = 16, N = 197, C = 768, keep 98 (inductor skipped: the reference
  unrolls its 98 greedy steps, which takes inductor minutes to compile).

For each it times ``triton`` (the ``torch.ops.tokred`` custom op on CUDA, Python dispatch included),
``inductor`` (the plain-torch reference under ``torch.compile``) and ``eager`` (the reference) with
``triton.testing.do_bench`` medians, after checking the Triton outputs against the reference.
Writes bench/results/prune_kernels_gpu.md. Without a CUDA GPU it says so and exits 0. A failing
case is reported in the table (and the exit code is 1) instead of stopping the others.
"""

from __future__ import annotations

import argparse
import functools
import platform
import sys
import time
import traceback
from pathlib import Path

# Run from a source checkout without installing: the repo root holds the tokred package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import write_results  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "prune_kernels_gpu.md"

# name: (B, H, Hkv, R, N, D, C, first prunable, last prunable + 1, keep)
PRUNE_CASES = {
    "vit-b cls B16": (16, 12, 12, 1, 197, 64, 768, 1, 197, 98),
    "vit-b cls B64": (64, 12, 12, 1, 197, 64, 768, 1, 197, 98),
    "smollm2 query B1 N4096": (1, 9, 3, 1, 4096, 64, 576, 0, 4095, 2048),
}
K_CENTER_CASE = (16, 197, 768, 98)  # B, N, C, keep; candidates: all but token 0


def make_prune_inputs(case, dtype, seed=0):
    """(x, q_rows, k, scale, candidates, keep, num_candidates) on CUDA."""
    import torch

    batch, heads, kv_heads, rows, tokens, dim, width, start, end, keep = case
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, width, generator=generator).to("cuda", dtype)
    q_rows = torch.randn(batch, heads, rows, dim, generator=generator).to("cuda", dtype)
    k = torch.randn(batch, kv_heads, tokens, dim, generator=generator).to("cuda", dtype)
    candidates = torch.zeros(tokens, dtype=torch.bool)
    candidates[start:end] = True
    return x, q_rows, k, dim ** -0.5, candidates.cuda(), keep, end - start


def static_prune_reference(num_candidates: int, keep: int, scale: float):
    """The prune reference with M fixed in Python (no read of the candidate count), for torch.compile."""
    import torch

    from tokred.triton_ops import prune

    def prune_reference(x, q_rows, k, candidates):
        scores = prune.attention_row_scores_reference(q_rows, k, scale)
        keep_mask = ~candidates | prune.selected_mask_reference(scores, candidates, keep)
        index = prune.ascending_index_reference(keep_mask, x.shape[1] - num_candidates + keep)
        return torch.gather(x, 1, index[..., None].expand(-1, -1, x.shape[2])), index, scores

    return prune_reference


def static_select_reference(num_candidates: int, keep: int):
    from tokred.triton_ops import prune

    def select_reference(scores, candidates):
        keep_mask = ~candidates | prune.selected_mask_reference(scores, candidates, keep)
        return prune.ascending_index_reference(keep_mask, scores.shape[1] - num_candidates + keep)

    return select_reference


def run_prune_op(x, q_rows, k, candidates, *, scale, keep, num_candidates):
    import torch

    return torch.ops.tokred.prune_tokens(x, q_rows, k, scale, None, candidates, keep, num_candidates)


def run_select_op(scores, candidates, *, keep, num_candidates):
    import torch

    return torch.ops.tokred.select_kept(scores, candidates, keep, num_candidates)


def check_prune_outputs(got, want, *, x, candidates, keep) -> str:
    """Scores within fp32 rounding; the index exact on the op's own scores and (near-ties aside)
    equal to the reference's; kept = x at the index."""
    import torch

    from tokred.triton_ops import prune

    kept, index, scores = got
    torch.testing.assert_close(scores, want[2], atol=1e-5, rtol=1e-4)
    assert torch.equal(index, prune.select_kept_reference(scores, candidates, keep))
    assert torch.equal(kept, torch.gather(x, 1, index[..., None].expand(-1, -1, x.shape[2])))
    agree = index_agreement(index, want[1])
    assert agree > 0.99, f"index agreement {agree:.4f}"
    return f"scores max diff {(scores - want[2]).abs().max().item():.1e}, index agree {agree:.2%}"


def check_index_equal(got, want) -> str:
    import torch

    assert torch.equal(got, want)
    return "index equal"


def index_agreement(got, want) -> float:
    """Mean over rows of the fraction of kept positions both indices keep (a float32 near-tie may
    keep another token; one different pick then costs 1/M, not a shifted row)."""
    import torch

    return torch.stack([torch.isin(g, w).float().mean() for g, w in zip(got, want)]).mean().item()


def bench(fn, args) -> float:
    import triton.testing

    return triton.testing.do_bench(lambda: fn(*args), warmup=10, rep=50, return_mode="median")


def measure_case(name, kind, triton_fn, reference_fn, args, check, use_inductor) -> dict:
    """One table row: times of triton / inductor / eager and the check's summary."""
    import torch

    row = {"case": name, "op": kind}
    try:
        want = reference_fn(*args)
        row["check"] = check(triton_fn(*args), want)
        row["triton"] = bench(triton_fn, args)
        row["eager"] = bench(reference_fn, args)
        if use_inductor:
            started = time.perf_counter()
            compiled = torch.compile(reference_fn, dynamic=False)
            check(compiled(*args), want)
            row["compile_s"] = time.perf_counter() - started
            row["inductor"] = bench(compiled, args)
    except Exception as error:  # noqa: BLE001  (report the case and go on with the others)
        traceback.print_exc()
        row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
    print(row, flush=True)
    return row


def measure(dtype_name: str, use_inductor: bool) -> list:
    import torch

    import tokred.triton_ops  # noqa: F401  (registers the ops)
    from tokred.triton_ops import prune

    dtype = getattr(torch, dtype_name)
    rows = []
    for name, case in PRUNE_CASES.items():
        x, q_rows, k, scale, candidates, keep, num = make_prune_inputs(case, dtype)

        triton_prune = functools.partial(run_prune_op, scale=scale, keep=keep, num_candidates=num)
        check_prune = functools.partial(check_prune_outputs, x=x, candidates=candidates, keep=keep)
        rows.append(measure_case(name, "prune_tokens", triton_prune, static_prune_reference(num, keep, scale),
                                 (x, q_rows, k, candidates), check_prune, use_inductor))

        scores = prune.attention_row_scores_reference(q_rows, k, scale)
        triton_select = functools.partial(run_select_op, keep=keep, num_candidates=num)
        rows.append(measure_case(name, "select_kept", triton_select, static_select_reference(num, keep),
                                 (scores, candidates), check_index_equal, use_inductor))

    batch, tokens, width, keep = K_CENTER_CASE
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, tokens, width, generator=generator).to("cuda", dtype)
    candidates = torch.ones(tokens, dtype=torch.bool, device="cuda")
    candidates[0] = False

    def triton_k_center(x, candidates):
        return torch.ops.tokred.k_center(x, candidates, keep, tokens - 1)

    def reference_k_center(x, candidates):
        return prune.k_center_reference(x, candidates, keep)

    def check_k_center(got, want):
        agree = index_agreement(got, want)
        assert agree > 0.95, f"index agreement {agree:.4f}"
        return f"index agree {agree:.2%}"

    rows.append(measure_case(f"vit-b tokens B{batch}", "k_center", triton_k_center, reference_k_center,
                             (x, candidates), check_k_center, use_inductor=False))
    return rows


def render(rows: list, dtype_name: str, command: str) -> str:
    import torch
    import triton

    def ms(row, key):
        return f"{row[key]:.4f}" if key in row else "-"

    lines = [
        "# Token pruning kernels: Triton vs the torch reference",
        "",
        f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}, triton {triton.__version__}, "
        f"Python {platform.python_version()}; inputs {dtype_name}, scores fp32.",
        "Times: `triton.testing.do_bench` medians (ms). `triton`: the `torch.ops.tokred` op on CUDA",
        "(Python dispatch included); `inductor`: the plain-torch reference under `torch.compile`;",
        "`eager`: the reference uncompiled. Cases: see the module docstring of bench/prune_kernels_gpu.py.",
        "",
        "| case | op | eager (ms) | inductor (ms) | triton (ms) | triton vs inductor | triton vs eager | check |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        versus_inductor = f"{row['inductor'] / row['triton']:.2f}x" if "inductor" in row and "triton" in row else "-"
        versus_eager = f"{row['eager'] / row['triton']:.2f}x" if "eager" in row and "triton" in row else "-"
        check = row.get("error", row.get("check", "-")).replace("|", "/")
        lines.append(f"| {row['case']} | {row['op']} | {ms(row, 'eager')} | {ms(row, 'inductor')} | "
                     f"{ms(row, 'triton')} | {versus_inductor} | {versus_eager} | {check} |")
    lines += ["", f"Command: `{command}`", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--no-inductor", action="store_true", help="skip the compiled references")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    import torch

    from tokred.triton_ops.common import HAS_TRITON

    if not (torch.cuda.is_available() and HAS_TRITON):
        print("bench/prune_kernels_gpu.py needs a CUDA GPU and triton; none here, nothing measured.")
        return 0
    rows = measure(args.dtype, use_inductor=not args.no_inductor)
    command = f"python bench/prune_kernels_gpu.py --dtype {args.dtype}" + (" --no-inductor" if args.no_inductor else "")
    text = render(rows, args.dtype, command)
    write_results(text, args.out)
    return 1 if any("error" in row for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
