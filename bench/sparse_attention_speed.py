"""Sparse attention speed on CPU: tokred vs dense causal SDPA vs flex_attention, one layer, one run.

    python bench/sparse_attention_speed.py [--n 2048 4096 8192] [--heads 9 --kv-heads 3 --dim 64]
    python bench/sparse_attention_speed.py --n 2048 4096 8192 16384     # adds 16k (slow)

For each length N and pattern (sink_window: sinks 4, window 1024; block_topk: block 64, topk 16,
1 sink and 1 local block), the median of alternating timed rounds of

* dense: F.scaled_dot_product_attention(is_causal=True, enable_gqa=True), the baseline;
* tokred: ``torch.compile(lambda q, k, v: sparse_attention(q, k, v, pattern))``, end to end
  (layout, block_topk's Quest selection, then on CPU the custom op, which runs tokred's C++ kernel
  sparse_cpu.cpp: per query block one gemm against its kept keys, an exact row softmax, one gemm
  for the output): the path a rewritten graph takes;
* tokred op: the same call in eager mode, i.e. the custom op ``tokred::sparse_attention`` alone;
* torch paths: the op without the C++ kernel (what runs where it cannot be built): sink_window's
  prefill as overlapping key windows under one band mask, the sinks merged by log-sum-exp;
  block_topk's prefill as each query block's gathered blocks in one masked flash call;
* flex: ``torch.compile(flex_attention)`` given the same blocks as a BlockMask built beforehand
  (outside the timing; full and partial blocks split as create_block_mask would).

density = blocks computed / blocks of dense causal attention (64 x 64 blocks); "x bound" =
tokred time / (density x dense time), target <= 1.3; "x flex" = tokred time / flex time, target
<= 1.0. Also checks that tokred and flex agree. Writes bench/results/sparse_attention_speed.md
and a .png plot.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from functools import partial

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import alternating_medians  # noqa: E402
from tokred.triton_ops import sparse_cpu
from tokred.triton_ops.sparse_attention import (
    SparsePattern,
    block_layout,
    element_rule,
    kept_blocks,
    pattern_layout,
    sparse_attention,
)

BLOCK = 64


def patterns(window: int, topk: int) -> dict[str, SparsePattern]:
    return {
        "sink_window": SparsePattern("sink_window", sinks=4, window=window, block=BLOCK),
        "block_topk": SparsePattern("block_topk", block=BLOCK, topk=topk, sinks=1, local=1),
    }


def density(pattern: SparsePattern, q: torch.Tensor, k: torch.Tensor) -> float:
    """Blocks tokred computes / blocks of dense causal attention (N a multiple of BLOCK, no cache)."""
    count, _, _ = pattern_layout(pattern, q, k, 0)
    num_blocks = count.shape[-1]
    causal_blocks = num_blocks * (num_blocks + 1) // 2 * q.shape[0] * q.shape[1]
    return count.sum().item() / causal_blocks


def flex_block_mask(pattern: SparsePattern, q: torch.Tensor, k: torch.Tensor):
    """A flex BlockMask with tokred's kept blocks: partial blocks need the mask_mod, full ones don't."""
    from torch.nn.attention.flex_attention import BlockMask

    num_tokens = q.shape[2]
    rule = element_rule(pattern)
    kept = kept_blocks(pattern, q, k, 0, rule).expand(q.shape[0], q.shape[1], -1, -1)
    # Which kept blocks the rule leaves whole: evaluate it on every (row, key) of a block pair
    # class. For these rules (causal, causal sink_window) with q_offset 0 a block (m, n) is full
    # iff the rule holds at its four corners (the allowed set is convex along rows and keys).
    m = torch.arange(kept.shape[2])[:, None]
    n = torch.arange(kept.shape[3])[None, :]
    corners = torch.ones_like(kept[0, 0])
    from tokred.triton_ops.sparse_rule import eval_rule_torch

    zero = torch.zeros((), dtype=torch.long)
    for dq in (0, BLOCK - 1):
        for dk in (0, BLOCK - 1):
            corners &= eval_rule_torch(rule, zero, zero, m * BLOCK + dq, n * BLOCK + dk)
    full = kept & corners
    partial = kept & ~full
    partial_count, partial_index = block_layout(partial, kept.shape[-1])
    full_count, full_index = block_layout(full, kept.shape[-1])

    from tokred.triton_ops.sparse_rule import torch_rule_fn

    rule_fn = torch_rule_fn(rule)

    # The rule only: compiled flex visits just the listed blocks (inductor's CPU flex lowering has no
    # kernel for a mask_mod reading block_topk's selection tensor).
    def mask_mod(b, h, q_idx, kv_idx):
        return rule_fn(b, h, q_idx, kv_idx)

    return BlockMask.from_kv_blocks(partial_count, partial_index, full_count, full_index, BLOCK_SIZE=BLOCK,
                                    mask_mod=mask_mod, seq_lengths=(num_tokens, num_tokens))


def without_kernel(q, k, v, pattern):
    """The op without tokred's C++ kernel, as on a machine where it cannot be built."""
    with sparse_cpu.disabled():
        return sparse_attention(q, k, v, pattern)


def main() -> None:
    from torch.nn.attention.flex_attention import flex_attention

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--topk", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-flex", action="store_true", help="skip flex_attention (its compile is slow)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                      "sparse_attention_speed.md"))
    args = parser.parse_args()
    if any(n % BLOCK for n in args.n):
        raise ValueError(f"--n values must be multiples of {BLOCK}")

    torch.manual_seed(0)
    flex = torch.compile(flex_attention, dynamic=False)
    rows = []
    with torch.no_grad():
        for n in args.n:
            q = torch.randn(1, args.heads, n, args.dim)
            k = torch.randn(1, args.kv_heads, n, args.dim)
            v = torch.randn(1, args.kv_heads, n, args.dim)
            fns = {"dense": partial(F.scaled_dot_product_attention, q, k, v, is_causal=True, enable_gqa=True)}
            info = {}
            for name, pattern in patterns(args.window, args.topk).items():
                compiled = torch.compile(partial(sparse_attention, pattern=pattern), dynamic=False)
                start = time.perf_counter()
                compiled_out = compiled(q, k, v)
                info[name] = {"density": density(pattern, q, k), "compile_s": time.perf_counter() - start}
                op_out = sparse_attention(q, k, v, pattern)
                info[name]["max_diff_compiled_vs_op"] = (compiled_out - op_out).abs().max().item()
                fns[name] = partial(compiled, q, k, v)
                fns[f"{name}/op"] = partial(sparse_attention, q, k, v, pattern)
                fns[f"{name}/torch"] = partial(without_kernel, q, k, v, pattern)
                info[name]["max_diff_op_vs_torch_paths"] = (without_kernel(q, k, v, pattern) - op_out).abs().max().item()
                if not args.no_flex:
                    mask = flex_block_mask(pattern, q, k)
                    start = time.perf_counter()
                    flex_out = flex(q, k, v, block_mask=mask, enable_gqa=True)
                    info[name]["flex_compile_s"] = time.perf_counter() - start
                    info[name]["max_diff_vs_flex"] = (flex_out - op_out).abs().max().item()
                    fns[f"{name}/flex"] = partial(flex, q, k, v, block_mask=mask, enable_gqa=True)
            medians = alternating_medians(fns, args.repeats)
            for name in info:
                row = {"n": n, "pattern": name, "dense_s": medians["dense"], "tokred_s": medians[name],
                       "op_s": medians[f"{name}/op"], "torch_s": medians[f"{name}/torch"], **info[name]}
                row["speedup"] = row["dense_s"] / row["tokred_s"]
                row["x_bound"] = row["tokred_s"] / (row["density"] * row["dense_s"])
                if f"{name}/flex" in medians:
                    row["flex_s"] = medians[f"{name}/flex"]
                    row["x_flex"] = row["tokred_s"] / row["flex_s"]
                rows.append(row)
                print(row, flush=True)
    write_results(args, rows)


def write_results(args, rows: list[dict]) -> None:
    command = (f"python bench/sparse_attention_speed.py --n {' '.join(map(str, args.n))} --heads {args.heads} "
               f"--kv-heads {args.kv_heads} --dim {args.dim} --window {args.window} --topk {args.topk} "
               f"--repeats {args.repeats}" + (" --no-flex" if args.no_flex else ""))
    lines = [
        "# Sparse attention speed, one layer, CPU",
        "",
        f"`{command}`",
        "",
        f"({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"fp32, batch 1, {args.heads} heads / {args.kv_heads} kv heads, head_dim {args.dim}; median of "
        f"{args.repeats} alternating rounds; sink_window: sinks 4, window {args.window}; block_topk: block 64, "
        f"topk {args.topk}, 1 sink + 1 local block. tokred = torch.compile of sparse_attention, timed end to end "
        "(layout and selection included); on CPU it runs the custom op, i.e. tokred's C++ kernel "
        f"(sparse_cpu.cpp, {sparse_cpu.kernel_status()[1]}, {torch.backends.cpu.get_cpu_capability()}). "
        "tokred op = the same custom op called eagerly. torch paths = the op without the C++ kernel (eager): "
        "sink_window's prefill as overlapping key windows under one band mask with the sinks merged by "
        "log-sum-exp, block_topk's prefill as each query block's gathered key blocks in one masked flash call. "
        "flex = compiled flex_attention given the same blocks as a prebuilt BlockMask (outside the timing).)",
        "",
        "| N | pattern | density | dense SDPA s | tokred s | speedup | x density bound (<= 1.3) | flex s "
        "| x flex (<= 1.0) | max diff op vs flex | tokred op (eager) s | op x bound | torch paths s "
        "| torch paths x bound | max diff op vs torch paths |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        flex = (f"{r['flex_s']:.3f} | {r['x_flex']:.2f} | {r['max_diff_vs_flex']:.1e}" if "flex_s" in r
                else "- | - | -")
        lines.append(f"| {r['n']} | {r['pattern']} | {r['density']:.3f} | {r['dense_s']:.3f} | {r['tokred_s']:.3f} | "
                     f"{r['speedup']:.2f}x | {r['x_bound']:.2f} | {flex} | {r['op_s']:.3f} | "
                     f"{r['op_s'] / (r['density'] * r['dense_s']):.2f} | {r['torch_s']:.3f} | "
                     f"{r['torch_s'] / (r['density'] * r['dense_s']):.2f} | {r['max_diff_op_vs_torch_paths']:.1e} |")

    def verdict(key: str, limit: float) -> str:
        misses = [f"{r['pattern']} {r['n']}" for r in rows if r.get(key, 0) > limit]
        if not misses:
            return "met on every row"
        return f"NOT met on {len(misses)} of {len(rows)} rows ({', '.join(misses)})"

    lines += ["", f"Targets: x density bound <= 1.3: {verdict('x_bound', 1.3)}; "
              f"x flex <= 1.0: {verdict('x_flex', 1.0)}"
              + (" (flex not run)" if args.no_flex else "") + "."]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(rows, args.out.replace(".md", ".png"))
    print("\n".join(lines))


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, name in zip(axes, ("sink_window", "block_topk")):
        sel = [r for r in rows if r["pattern"] == name]
        ns = [r["n"] for r in sel]
        ax.plot(ns, [r["dense_s"] for r in sel], "o-", label="dense causal SDPA")
        ax.plot(ns, [r["tokred_s"] for r in sel], "o-", label="tokred sparse (compiled)")
        ax.plot(ns, [r["op_s"] for r in sel], "o:", label="tokred op (eager)")
        ax.plot(ns, [r["torch_s"] for r in sel], "x:", label="op without the C++ kernel")
        ax.plot(ns, [r["density"] * r["dense_s"] for r in sel], "--", label="density bound")
        if all("flex_s" in r for r in sel):
            ax.plot(ns, [r["flex_s"] for r in sel], "o-", label="flex_attention")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("N")
        ax.set_ylabel("seconds per layer")
        ax.set_title(name)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
