"""ToMe kernels on CUDA: the Triton ops against their torch reference compiled with inductor.

    python bench/tome_kernels.py [--batches 16 32 64] [--dtype float16] [--r 16]

ViT-B-like shapes: N = 197 tokens (class token protected), metric D = 64 (keys averaged over
heads), features C = 768, r = 16 tokens merged. For each batch size and op it times

- ``triton``: ``torch.ops.tokred.<op>`` on CUDA tensors (the custom op dispatching to the Triton
  launch, so the op's Python overhead is included, as a compiled graph would pay it);
- ``inductor``: the op's plain-torch reference under ``torch.compile(fullgraph=True)``;
- ``eager``: the same reference uncompiled, for scale;

with ``triton.testing.do_bench`` (median of ~100 ms of repeats, L2 flushed between runs), after
checking that the Triton outputs equal the reference's. Writes bench/results/tome_kernels_gpu.md.
Without a CUDA GPU (or without Triton) it says so and exits 0: nothing here is meaningful on CPU.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

# Run from a source checkout without installing: the repo root holds the tokred package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import write_results  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "tome_kernels_gpu.md"
TOKENS, METRIC_DIM, WIDTH = 197, 64, 768


def make_inputs(batch: int, r: int, dtype, device: str, seed: int = 0) -> dict:
    """Inputs of both ops for one batch size, indices chosen as ToMe chooses them.

    The merge indices come from the reference matching (argsort of node_max, descending), so the
    destinations repeat as they do in a real model.
    """
    import torch

    from tokred.triton_ops.tome_match import tome_match_reference

    generator = torch.Generator(device="cpu").manual_seed(seed)
    metric = torch.randn(batch, TOKENS, METRIC_DIM, generator=generator).to(device=device, dtype=dtype)
    group = torch.zeros(batch, TOKENS, dtype=torch.int64, device=device)
    group[:, 0] = -1  # class token: never merged
    x = torch.randn(batch, TOKENS, WIDTH, generator=generator).to(device=device, dtype=dtype)
    size = (1 + 3 * torch.rand(batch, TOKENS, 1, generator=generator)).to(device)
    node_max, node_idx = tome_match_reference(metric, group)
    edge_idx = node_max.argsort(dim=-1, descending=True, stable=True)
    src_idx = edge_idx[:, :r].contiguous()
    unm_idx = edge_idx[:, r:].sort(dim=-1).values.contiguous()
    dst_idx = node_idx.gather(1, src_idx)
    return {"match": (metric, group), "merge": (x, size, unm_idx, src_idx, dst_idx)}


def check_outputs(op_name: str, got: tuple, want: tuple) -> str:
    """Raise if the Triton outputs differ from the reference beyond rounding; a one-line summary."""
    import torch

    if op_name == "match":
        (got_max, got_idx), (want_max, want_idx) = got, want
        finite = torch.isfinite(want_max)
        torch.testing.assert_close(got_max[finite], want_max[finite], atol=1e-5, rtol=0)
        assert torch.equal(torch.isinf(got_max), ~finite)
        same_idx = (got_idx == want_idx).float().mean().item()
        # A float32 near-tie may resolve differently; it must not be common.
        assert same_idx > 0.999, f"tome_match: only {same_idx:.4%} of indices agree"
        # No "|" in the summary: it goes into a Markdown table cell.
        return (f"node_max max abs diff {(got_max[finite] - want_max[finite]).abs().max().item():.1e}, "
                f"node_idx agree {same_idx:.2%}")
    (got_x, got_size), (want_x, want_size) = got, want
    tolerance = 1e-5 if got_x.dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got_x.float(), want_x.float(), atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(got_size, want_size, atol=1e-5, rtol=1e-6)
    return f"x_out max abs diff {(got_x.float() - want_x.float()).abs().max().item():.1e}"


def bytes_moved(op_name: str, inputs: tuple) -> int:
    """Bytes an ideal kernel reads and writes (each input row once, each output row once)."""
    if op_name == "match":
        metric, group = inputs
        batch, tokens, _ = metric.shape
        return (metric.numel() * metric.element_size() + group.numel() * 8
                + batch * ((tokens + 1) // 2) * (4 + 8))
    x, size, unm_idx, src_idx, dst_idx = inputs
    batch, tokens, width = x.shape
    out_tokens = unm_idx.shape[1] + tokens // 2
    indices = (unm_idx.numel() + src_idx.numel() + dst_idx.numel()) * 8
    return (x.numel() * x.element_size() + size.numel() * 4 + indices
            + batch * out_tokens * (width * x.element_size() + 4))


def measure(batches: list, r: int, dtype_name: str) -> list:
    """One row per (batch, op): median times in ms of eager, inductor and triton, and the check."""
    import torch
    import triton.testing

    import tokred.triton_ops  # noqa: F401  (registers the ops)
    from tokred.triton_ops.tome_match import tome_match_reference
    from tokred.triton_ops.tome_merge import tome_merge_reference

    dtype = getattr(torch, dtype_name)
    references = {"match": tome_match_reference, "merge": tome_merge_reference}
    ops = {"match": torch.ops.tokred.tome_match, "merge": torch.ops.tokred.tome_merge}
    compiled = {name: torch.compile(fn, fullgraph=True, dynamic=False) for name, fn in references.items()}
    rows = []
    for batch in batches:
        inputs = make_inputs(batch, r, dtype, "cuda", seed=batch)
        for name in ("match", "merge"):
            args = inputs[name]
            want = references[name](*args)
            summary = check_outputs(name, ops[name](*args), want)
            check_outputs(name, compiled[name](*args), want)  # also compiles it before timing
            times = {
                label: triton.testing.do_bench(lambda fn=fn: fn(*args), warmup=25, rep=100, return_mode="median")
                for label, fn in (("eager", references[name]), ("inductor", compiled[name]), ("triton", ops[name]))
            }
            rows.append({"batch": batch, "op": name, **times, "bytes": bytes_moved(name, args), "check": summary})
            print(f"B={batch:3d} {name:5s} eager {times['eager']:.4f} ms, inductor {times['inductor']:.4f} ms, "
                  f"triton {times['triton']:.4f} ms ({summary})", flush=True)
    return rows


def render(rows: list, r: int, dtype_name: str, command: str) -> str:
    import torch
    import triton

    lines = [
        "# ToMe kernels: Triton vs the torch reference under inductor",
        "",
        f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}, triton {triton.__version__}, "
        f"Python {platform.python_version()}.",
        f"Shapes (ViT-B-like): N = {TOKENS} tokens (class token protected), metric D = {METRIC_DIM}, "
        f"C = {WIDTH}, r = {r}, {dtype_name}; sizes fp32 in [1, 4).",
        "Times: `triton.testing.do_bench` medians (ms), L2 flushed between runs. `triton` is the",
        "`torch.ops.tokred` custom op on CUDA (Python dispatch included); `inductor` the op's torch",
        "reference under `torch.compile(fullgraph=True)`; `eager` the same reference uncompiled.",
        "GB/s: bytes an ideal kernel moves (inputs read once, outputs written once) / triton time.",
        "",
        "| B | op | eager (ms) | inductor (ms) | triton (ms) | triton vs inductor | triton GB/s | check |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        speedup = row["inductor"] / row["triton"]
        bandwidth = row["bytes"] / (row["triton"] * 1e-3) / 1e9
        lines.append(f"| {row['batch']} | tome_{row['op']} | {row['eager']:.4f} | {row['inductor']:.4f} | "
                     f"{row['triton']:.4f} | {speedup:.2f}x | {bandwidth:.0f} | {row['check']} |")
    lines += ["", f"Command: `{command}`", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--r", type=int, default=16, help="tokens merged per step")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    import torch

    from tokred.triton_ops.common import HAS_TRITON

    if not (torch.cuda.is_available() and HAS_TRITON):
        print("bench/tome_kernels.py needs a CUDA GPU and triton; none here, nothing measured.")
        return 0
    rows = measure(args.batches, args.r, args.dtype)
    command = (f"python bench/tome_kernels.py --batches {' '.join(map(str, args.batches))} "
               f"--r {args.r} --dtype {args.dtype}")
    text = render(rows, args.r, args.dtype, command)
    write_results(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
