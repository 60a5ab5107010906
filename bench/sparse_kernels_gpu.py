"""Sparse attention kernels on CUDA: tokred's generated Triton kernel vs flex_attention vs dense SDPA.

    python bench/sparse_kernels_gpu.py                       # N = 2k 4k 8k 16k, fp16, ~1-3 minutes
    python bench/sparse_kernels_gpu.py --n 4096 --dtype bf16 --no-flex

One attention layer, batch 1, 9 query heads / 3 kv heads, head_dim 64 (flags change them), the
patterns of bench/sparse_attention_speed.py (sink_window: sinks 4, window 1024; block_topk: block
64, topk 16, 1 sink + 1 local block). Per N and pattern, CUDA-event medians of alternating rounds:

* dense: F.scaled_dot_product_attention(is_causal=True) (flash), K/V heads repeated for GQA;
* tokred: ``sparse_attention(q, k, v, pattern)`` end to end (layout + selection + Triton kernel);
* tokred kernel: ``torch.ops.tokred.sparse_attention`` on a precomputed layout (the kernel alone);
* flex: ``torch.compile(flex_attention)`` with the same blocks as a prebuilt BlockMask.

density = blocks computed / blocks of dense causal attention. "x bound" = tokred kernel time /
(density x dense time) (target <= 1.3); "x flex" = tokred kernel / flex (target <= 1.0). Outputs
are checked: tokred vs flex (every N) and vs the dense masked reference (N <= 4096). Needs no
network; a failing flex compile is recorded in the table instead of stopping the run. Writes
bench/results/sparse_kernels_gpu.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from functools import partial

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tokred.triton_ops  # noqa: F401  (registers the ops)
from tokred.triton_ops.sparse_attention import (
    SparsePattern,
    block_layout,
    element_rule,
    full_blocks,
    kept_blocks,
    max_kept_blocks,
    sparse_attention,
    sparse_attention_reference,
)
from tokred.triton_ops.sparse_rule import rule_fn

BLOCK = 64
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def patterns(window: int, topk: int) -> dict[str, SparsePattern]:
    return {
        "sink_window": SparsePattern("sink_window", sinks=4, window=window, block=BLOCK),
        "block_topk": SparsePattern("block_topk", block=BLOCK, topk=topk, sinks=1, local=1),
    }


def layout(pattern, q, k):
    """(kept [B', H', NQB, NKB], kv_count, kv_index, rule) as the entry point computes them (q_offset 0)."""
    rule = element_rule(pattern)
    kept = kept_blocks(pattern, q, k, 0, rule)
    count, index = block_layout(kept, max_kept_blocks(pattern, q.shape[2], k.shape[2]))
    return kept, count.expand(q.shape[0], q.shape[1], -1), index.expand(q.shape[0], q.shape[1], -1, -1), rule


def flex_block_mask(pattern, q, kept, rule):
    from torch.nn.attention.flex_attention import BlockMask

    n = q.shape[2]
    full = kept & full_blocks(pattern, n, n, 0, q.device)
    partial_count, partial_index = block_layout(kept & ~full, kept.shape[-1])
    full_count, full_index = block_layout(full, kept.shape[-1])
    fn = rule_fn(rule)

    # The rule only, as in bench/sparse_attention_speed.py: compiled flex visits just the listed blocks.
    def mask_mod(b, h, q_idx, kv_idx):
        return fn(b, h, q_idx, kv_idx) if fn is not None else kv_idx >= 0

    return BlockMask.from_kv_blocks(partial_count, partial_index, full_count, full_index, BLOCK_SIZE=BLOCK,
                                    mask_mod=mask_mod, seq_lengths=(n, n))


def cuda_medians(fns: dict, repeats: int) -> dict[str, float]:
    """Median milliseconds per call (CUDA events), calls alternating between functions."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    torch.cuda.synchronize()
    for _ in range(repeats):
        for name, fn in fns.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times[name].append(start.elapsed_time(end))
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--topk", type=int, default=16)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--no-flex", action="store_true")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "sparse_kernels_gpu.md"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/sparse_kernels_gpu.py needs a CUDA device")
    dtype, device = DTYPES[args.dtype], "cuda"
    torch.manual_seed(0)
    flex = None
    if not args.no_flex:
        try:
            from torch.nn.attention.flex_attention import flex_attention

            flex = torch.compile(flex_attention, dynamic=False)
        except Exception as error:  # noqa: BLE001 (old torch without flex: run the rest)
            print(f"flex_attention unavailable: {error}")
    group = args.heads // args.kv_heads
    rows = []
    started = time.perf_counter()
    with torch.no_grad():
        for n in args.n:
            q = torch.randn(1, args.heads, n, args.dim, device=device, dtype=dtype)
            k = torch.randn(1, args.kv_heads, n, args.dim, device=device, dtype=dtype)
            v = torch.randn(1, args.kv_heads, n, args.dim, device=device, dtype=dtype)
            k_rep, v_rep = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
            fns = {"dense": partial(F.scaled_dot_product_attention, q, k_rep, v_rep, is_causal=True)}
            info = {}
            for name, pattern in patterns(args.window, args.topk).items():
                kept, count, index, rule = layout(pattern, q, k)
                scale = args.dim ** -0.5
                op_args = (q, k, v, count, index, None, scale, 0, BLOCK, BLOCK, rule)
                row = {"n": n, "pattern": name,
                       "density": count.sum().item() / (count.shape[-1] * (count.shape[-1] + 1) // 2 * args.heads)}
                out = torch.ops.tokred.sparse_attention(*op_args)
                if n <= 4096:
                    reference = sparse_attention_reference(q.float(), k.float(), v.float(), pattern)
                    row["max_diff_ref"] = (out.float() - reference).abs().max().item()
                fns[name] = partial(sparse_attention, q, k, v, pattern)
                fns[f"{name}/kernel"] = partial(torch.ops.tokred.sparse_attention, *op_args)
                if flex is not None:
                    try:
                        mask = flex_block_mask(pattern, q, kept, rule)
                        flex_out = flex(q, k, v, block_mask=mask, scale=scale, enable_gqa=True)
                        row["max_diff_flex"] = (out.float() - flex_out.float()).abs().max().item()
                        fns[f"{name}/flex"] = partial(flex, q, k, v, block_mask=mask, scale=scale, enable_gqa=True)
                    except Exception as error:  # noqa: BLE001 (the table records why flex failed)
                        row["flex_error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
                        traceback.print_exc()
                info[name] = row
            medians = cuda_medians(fns, args.repeats)
            for name, row in info.items():
                row.update(dense_ms=medians["dense"], tokred_ms=medians[name], kernel_ms=medians[f"{name}/kernel"])
                row["x_bound"] = row["kernel_ms"] / (row["density"] * row["dense_ms"])
                if f"{name}/flex" in medians:
                    row["flex_ms"] = medians[f"{name}/flex"]
                    row["x_flex"] = row["kernel_ms"] / row["flex_ms"]
                rows.append(row)
                print(row, flush=True)
    write_results(args, rows, time.perf_counter() - started)


def write_results(args, rows, seconds) -> None:
    command = (f"python bench/sparse_kernels_gpu.py --n {' '.join(map(str, args.n))} --heads {args.heads} "
               f"--kv-heads {args.kv_heads} --dim {args.dim} --window {args.window} --topk {args.topk} "
               f"--dtype {args.dtype} --repeats {args.repeats}" + (" --no-flex" if args.no_flex else ""))
    lines = [
        "# Sparse attention kernels, one layer, CUDA",
        "",
        f"`{command}`",
        "",
        f"({torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
        f"{__import__('triton').__version__}, {args.dtype}, batch 1, {args.heads} heads / {args.kv_heads} kv heads, "
        f"head_dim {args.dim}; CUDA-event medians of {args.repeats} alternating rounds; run took {seconds:.0f} s. "
        "tokred = sparse_attention end to end (layout, selection, kernel); kernel = the custom op on a "
        "precomputed layout; flex = compiled flex_attention with the same blocks.)",
        "",
        "| N | pattern | density | dense SDPA ms | tokred ms | kernel ms | kernel x bound (<= 1.3) | flex ms "
        "| kernel x flex (<= 1.0) | speedup vs dense | max diff vs flex | max diff vs ref |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        flex = f"{r['flex_ms']:.3f} | {r['x_flex']:.2f}" if "flex_ms" in r else f"{r.get('flex_error', '-')} | -"
        lines.append(
            f"| {r['n']} | {r['pattern']} | {r['density']:.3f} | {r['dense_ms']:.3f} | {r['tokred_ms']:.3f} | "
            f"{r['kernel_ms']:.3f} | {r['x_bound']:.2f} | {flex} | {r['dense_ms'] / r['kernel_ms']:.2f}x | "
            f"{r.get('max_diff_flex', float('nan')):.1e} | {r.get('max_diff_ref', float('nan')):.1e} |")
    met_bound = all(r["x_bound"] <= 1.3 for r in rows)
    met_flex = all(r.get("x_flex", 0) <= 1.0 for r in rows)
    lines += ["", f"Targets: kernel x density bound <= 1.3: {'met' if met_bound else 'NOT met'} on every row; "
              f"kernel x flex <= 1.0: {'met' if met_flex else 'NOT met'} on every row."]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
