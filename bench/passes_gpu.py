"""The rewrite passes end to end on CUDA: the graph calls tokred's Triton ops (not the references).

    python bench/passes_gpu.py

For each case a random-weight model is compiled by tokred (inductor) on CUDA; its output is
compared with the same rewrite run on CPU (where the graph inlines the plain-torch references), and
the dense and rewritten models are timed side by side (CUDA events, median). Writes
bench/results/passes_gpu.md. Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results" / "passes_gpu.md"


def vit(batch: int):
    import timm
    import torch

    model = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    return model, (torch.randn(batch, 3, 224, 224),), {}


def llama(seq: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=8192, max_position_embeddings=16384)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 8192, (1, seq), generator=torch.Generator().manual_seed(0))
    return model, (), {"input_ids": ids, "use_cache": False}


CASES = {  # key: (description, model builder, tokred options)
    "prune_vit": ("vit_base b32, prune keep 0.5 at 3 (cls)", lambda: vit(32), {"prune": {"keep": 0.5, "at": [3]}}),
    "merge_vit": ("vit_base b32, merge r=16", lambda: vit(32), {"merge": {"r": 16}}),
    "prune_llama": ("llama 8L N=2048, prune keep 0.5 at 2 (query)", lambda: llama(2048),
                    {"prune": {"keep": 0.5, "at": [2]}}),
    "sink_window": ("llama 8L N=8192, sink_window 4+1024", lambda: llama(8192),
                    {"sparse_attention": {"pattern": "sink_window", "sinks": 4, "window": 1024}}),
    "block_topk": ("llama 8L N=8192, block_topk 64/16", lambda: llama(8192),
                   {"sparse_attention": {"pattern": "block_topk", "block": 64, "topk": 16, "sinks": 1, "local": 1}}),
}


def logits(out):
    return out.logits if hasattr(out, "logits") else out


def run_case(name, build, options, dtype, repeats):
    import torch

    import tokred

    model, args, kwargs = build()
    torch._dynamo.reset()
    cpu_model = torch.compile(model, backend=tokred.backend(inner="eager", **options))
    with torch.no_grad():
        want = logits(cpu_model(*args, **kwargs)).float()
    model = model.cuda().to(dtype)
    gargs = tuple(a.cuda().to(dtype) if a.is_floating_point() else a.cuda() for a in args)
    gkwargs = {k: (v.cuda() if hasattr(v, "cuda") else v) for k, v in kwargs.items()}
    torch._dynamo.reset()
    backend = tokred.backend(inner="inductor", **options)
    rewritten = torch.compile(model, backend=backend)
    dense = torch.compile(model)
    with torch.no_grad():
        got = logits(rewritten(*gargs, **gkwargs)).float().cpu()
        logits(dense(*gargs, **gkwargs))
        times = {"dense": [], "tokred": []}
        for _ in range(repeats):
            for label, fn in (("dense", dense), ("tokred", rewritten)):
                torch.cuda.synchronize()
                start = time.perf_counter()
                fn(*gargs, **gkwargs)
                torch.cuda.synchronize()
                times[label].append(time.perf_counter() - start)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    report = backend.report
    rewritten_sites = sum(s.status == "rewritten" for s in report.attention_sites)
    diff = (got - want).abs().max().item()
    rel = diff / max(want.abs().max().item(), 1e-6)
    return {"name": name, "dense_ms": med["dense"] * 1e3, "tokred_ms": med["tokred"] * 1e3,
            "speedup": med["dense"] / med["tokred"], "sites": f"{rewritten_sites}/{len(report.attention_sites)}",
            "diff": f"{diff:.2e} (rel {rel:.1e})", "flops": report.flops_after / max(report.flops_before, 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    import os
    import torch

    if not torch.cuda.is_available():
        print("passes_gpu: no CUDA device; nothing to measure")
        return 0
    dtype = getattr(torch, args.dtype)
    rows = []
    for key in args.cases:
        name, build, options = CASES[key]
        try:
            rows.append(run_case(name, build, options, dtype, args.repeats))
        except Exception as exc:  # record, go on with the other cases
            message = " ".join(str(exc).split())  # one line for the table
            rows.append({"name": name, "error": f"{type(exc).__name__}: {message[:300]}"})
        print(rows[-1], flush=True)
    lines = ["# tokred passes end to end on CUDA (Triton ops in the graph)", "",
             f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}; Python {platform.python_version()}; "
             f"{args.dtype}; random weights; median of {args.repeats} alternating calls (ms); "
             f"TOKRED_KERNELS={os.environ.get('TOKRED_KERNELS', 'auto')} (which tokred ops the graph calls as "
             f"Triton kernels: see tokred/triton_ops/common.py).",
             "`diff`: max abs difference of the outputs against the same rewrite on CPU in fp32 (the graph "
             "there inlines the plain-torch references), so it includes the fp16 rounding.", "",
             "| case | sites rewritten | FLOPs ratio | dense ms | tokred ms | speedup | diff vs CPU reference |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | error: {r['error']} | | | | | |")
        else:
            lines.append(f"| {r['name']} | {r['sites']} | {r['flops']:.3f} | {r['dense_ms']:.2f} | "
                         f"{r['tokred_ms']:.2f} | {r['speedup']:.2f}x | {r['diff']} |")
    command = (f"TOKRED_KERNELS={os.environ.get('TOKRED_KERNELS', 'auto')} python bench/passes_gpu.py "
               f"--dtype {args.dtype} --repeats {args.repeats} --cases {' '.join(args.cases)}")
    lines += ["", f"Command: `{command}`", ""]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
