"""Token merging speed on CPU: tokred merge vs dense, both compiled by inductor, in one run.

    python bench/merge_speed.py [--model vit_base_patch16_224] [--batch 16] [--r 4 8 13 16]

For each r: throughput ratio over dense (median of alternating timed runs), the FLOPs ratio from
tokred's report, and efficiency = speedup / (dense FLOPs / merged FLOPs). Writes
bench/results/merge_speed.md. Targets (issue 3): >= 1.9x at r=16, efficiency >= 0.9.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tokred  # noqa: E402
from tokred.tools.demo import time_per_batch  # noqa: E402


def main() -> None:
    import timm
    from tqdm import tqdm

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--r", type=int, nargs="+", default=[4, 8, 13, 16])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "merge_speed.md"))
    args = parser.parse_args()

    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval()
    x = torch.randn(args.batch, 3, 224, 224)
    variants = {"dense": torch.compile(model, backend="inductor")}
    flops = {}
    for r in args.r:
        torch._dynamo.reset()
        report = tokred.explain(model, x[:1], merge={"r": r})
        flops[r] = report.flops_after / report.flops_before
        variants[f"r={r}"] = torch.compile(model, backend=tokred.backend(merge={"r": r}))
    with torch.no_grad():
        for name, fn in tqdm(variants.items(), desc="compile + warm-up"):
            fn(x)
    # alternating rounds: every round times every variant once; medians
    median = time_per_batch({name: (lambda f: lambda **kw: f(kw["x"]))(fn) for name, fn in variants.items()},
                            {"x": x}, repeats=args.repeats)

    lines = [f"# Token merging speed, {args.model}, batch {args.batch}, CPU",
             "",
             f"`python bench/merge_speed.py --model {args.model} --batch {args.batch} --r {' '.join(map(str, args.r))}"
             f" --repeats {args.repeats}`"
             f" ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
             f"{torch.__version__}, both sides compiled by inductor, median of {args.repeats} alternating rounds)",
             "",
             "| variant | s/batch | img/s | speedup | FLOPs ratio | efficiency |",
             "|---|---|---|---|---|---|"]
    for name, t in median.items():
        speed = median["dense"] / t
        ratio = 1.0 if name == "dense" else flops[int(name[2:])]
        lines.append(f"| {name} | {t:.3f} | {args.batch / t:.1f} | {speed:.2f}x | {ratio:.3f} | "
                     f"{speed * ratio:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
