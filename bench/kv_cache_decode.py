"""KV-cache compression on a real decoder: perplexity of the true continuation, decode speed and KV
memory. SmolLM2-135M on Wikipedia text.

    python bench/kv_cache_decode.py [--length 2048] [--continuation 64] [--texts 4]
                                    [--methods snapkv-shared tova h2o knorm streaming]
                                    [--keep 0.75 0.5 0.25] [--decode-tokens 32] [--repeats 3] [--threads 2]

Each text is ``--length`` tokens of Wikipedia extracts (a different stretch per text) followed by
its true ``--continuation`` tokens. The context is the prefill of a forward compiled with
``tokred.backend(inner="eager", kv_cache={...})``, inside ``tokred.CompressedContext`` (the cut is
made before the continuation is seen: the question-agnostic setting); the continuation's
teacher-forced log-likelihood is read from the compressed cache one token at a time
(``CompressedContext.log_likelihood``), and the perplexity is exp of the mean negative
log-likelihood over all texts. ``KV MiB``: the keys and values all layers hold after the prefill.
Decode speed: greedy ``answer`` of ``--decode-tokens`` tokens from the first text's compressed
cache, timed alternating between the configurations (median of ``--repeats``), as the ratio to
dense measured side by side. Writes bench/results/kv_cache_decode.md and .png.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tokred  # noqa: E402
from bench.common import alternating_medians, load_average, write_results  # noqa: E402
from tokred.tools.offline import load_causal_lm, wiki_token_ids  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
METHODS = ["snapkv-shared", "tova", "h2o", "knorm", "streaming"]
VARIANTS = {"snapkv-shared": {"method": "snapkv", "heads": "shared"}}


def kv_bytes(context: tokred.CompressedContext) -> int:
    return sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
               for layer in context.cache.layers)


def run_config(model, texts: list, options, continuation: int) -> dict:
    """Perplexity and KV bytes of one configuration (None: dense) over ``texts`` [1, L + T] each;
    also the first text's CompressedContext, for the decode timing."""
    forward = model if options is None else torch.compile(
        model, backend=tokred.backend(inner="eager", kv_cache=options), dynamic=False)
    nll, count, first, memory = 0.0, 0, None, 0
    for ids in texts:
        context = tokred.CompressedContext(forward, ids[:, :-continuation])
        scores = context.log_likelihood(ids[:, -continuation:])
        nll -= float(scores.sum())
        count += scores.numel()
        memory = max(memory, kv_bytes(context))
        first = first or context
    return {"ppl": math.exp(nll / count), "kv_bytes": memory, "context": first}


def plot(rows: list, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    dense = next(r for r in rows if r["name"] == "dense")
    for method in dict.fromkeys(r["name"] for r in rows if r["name"] != "dense"):
        pts = sorted((r["kv_bytes"] / 2 ** 20, r["ppl"]) for r in rows if r["name"] == method)
        ax.plot(*zip(*pts), marker="o", label=method)
    ax.scatter([dense["kv_bytes"] / 2 ** 20], [dense["ppl"]], color="k", marker="*", s=120, label="dense", zorder=3)
    ax.set_xlabel("KV cache after the prefill (MiB)")
    ax.set_ylabel("perplexity of the true continuation")
    ax.set_title("SmolLM2-135M, Wikipedia: perplexity against KV memory")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--continuation", type=int, default=64)
    parser.add_argument("--texts", type=int, default=4)
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS + ["snapkv", "random"])
    parser.add_argument("--keep", nargs="+", type=float, default=[0.75, 0.5, 0.25])
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(RESULTS, "kv_cache_decode"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from tqdm import tqdm

    load = [load_average().split("load")[-1]]
    started = time.time()
    model, tokenizer = load_causal_lm("smollm2")
    texts = [wiki_token_ids(tokenizer, args.length + args.continuation, start=40 * i) for i in range(args.texts)]
    configs = [("dense", 1.0, None)] + [(m, k, {**VARIANTS.get(m, {"method": m}), "keep": k})
                                        for k in args.keep for m in args.methods]
    rows = []
    for name, keep, options in tqdm(configs, unit="config"):
        result = run_config(model, texts, options, args.continuation)
        rows.append({"name": name, "keep": keep, **result})
        tqdm.write(f"{name:14s} keep={keep}: ppl {result['ppl']:.3f}, KV {result['kv_bytes'] / 2 ** 20:.1f} MiB")
        torch._dynamo.reset()  # a bench script, not the library: each configuration compiles afresh
    # decode speed, side by side: dense and the keep=0.5 / 0.25 caches of the first method
    timed = [r for r in rows if r["name"] == "dense" or (r["name"] == args.methods[0] and r["keep"] in (0.5, 0.25))]
    empty = texts[0][:, :0]
    fns = {f"{r['name']} {r['keep']}": (lambda c=r["context"]: c.answer(empty, args.decode_tokens)) for r in timed}
    seconds = alternating_medians(fns, args.repeats)
    load.append(load_average().split("load")[-1])
    dense = rows[0]
    lines = ["# KV-cache compression: SmolLM2-135M perplexity, KV memory and decode speed\n",
             f"`python bench/kv_cache_decode.py {' '.join(sys.argv[1:])}` (torch {torch.__version__}, cpu, "
             f"{torch.get_num_threads()} threads, {(time.time() - started) / 60:.1f} min; load before: {load[0]}, "
             f"after: {load[1]})\n",
             f"{args.texts} Wikipedia texts of {args.length} context tokens; perplexity of their true next "
             f"{args.continuation} tokens, teacher-forced on the compressed cache (the cut made before the "
             f"continuation is seen). KV: the keys and values all layers hold after the prefill.\n",
             "| method | keep | perplexity | vs dense | KV MiB | KV vs dense |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['keep']} | {r['ppl']:.3f} | {r['ppl'] / dense['ppl']:.3f}x | "
                     f"{r['kv_bytes'] / 2 ** 20:.1f} | {r['kv_bytes'] / dense['kv_bytes']:.2f} |")
    lines += ["", f"Decode: {args.decode_tokens} greedy tokens from the first text's cache, eager steps, median of "
              f"{args.repeats} alternating runs:\n", "| cache | s | tokens/s | vs dense |", "|---|---|---|---|"]
    base = seconds["dense 1.0"]
    for name, s in seconds.items():
        lines.append(f"| {name} | {s:.2f} | {args.decode_tokens / s:.1f} | {base / s:.2f}x |")
    lines.append("")
    write_results("\n".join(lines), args.out + ".md")
    plot(rows, args.out + ".png")
    print(f"plot: {args.out}.png")


if __name__ == "__main__":
    main()
