"""KV-cache compression on a real decoder: SmolLM2-135M passkey retrieval in Wikipedia haystacks.

    python bench/kv_cache_retrieval.py [--prompts 24] [--length 1536] [--batch 4]
                                       [--methods snapkv tova h2o knorm streaming random]
                                       [--keep 0.5 0.25] [--settings question context] [--threads 2]

Each prompt is a haystack of real Wikipedia extracts (``tokred.tools.offline.wiki_token_ids``, a
different stretch per prompt) with a five-digit passkey sentence inserted at a sentence boundary
at depth i / (P - 1) of the haystack (prompt i of P), an instruction before it and the question
"What is the secret passkey? Answer: The secret passkey is" after it; every prompt is exactly
``--length`` tokens. A prompt counts as retrieved when the 8 greedy tokens after it contain the key.

Two settings:

- ``question`` (question-aware): the whole prompt, question included, is the prefill that tokred
  compiles with ``kv_cache={"method", "keep"}``; the greedy tokens decode on the compressed cache.
- ``context`` (question-agnostic, kvpress's pipeline): only the instruction and the haystack are
  the compressed prefill; the question is then fed token by token on the compressed cache (at
  positions N, N+1, ...), then the answer is decoded. One compressed context could serve many
  questions this way; its scores never saw the question.

The prefill runs through ``torch.compile(model, backend=tokred.backend(inner="eager", kv_cache=...))``
(the pass's graph as it is; the inner compiler does not change which entries are kept beyond float
noise), inside ``tokred.CompressedContext``, whose answers decode on the eager model (on the compiled
one for adaptive heads, whose decode graphs mask the padding). ``kept`` is measured on that cache:
the real entries all layers hold after the prefill over the dense count; ``stored``: the slots
they take (padding included). The control row (snapkv, keep=1.0, question setting) must equal
dense. ``snapkv-shared``: SnapKV's scores averaged over each layer's KV heads, one choice per layer
(``heads="shared"``); ``-adaptive``: AdaKV's budgets (``heads="adaptive"``, a layer's budget shared
across its heads by score, stored at 2x the per-head budget). Writes
bench/results/kv_cache_retrieval.md and .png.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tokred  # noqa: E402
from bench.common import load_average, write_results  # noqa: E402
from tokred.tools.offline import load_causal_lm, wiki_token_ids  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
METHODS = ["snapkv", "tova", "h2o", "knorm", "streaming", "random"]
# configurations beyond a method's defaults: name -> extra kv_cache options
VARIANTS = {"snapkv-shared": {"method": "snapkv", "heads": "shared"},
            "snapkv-adaptive": {"method": "snapkv", "heads": "adaptive"},
            "h2o-adaptive": {"method": "h2o", "heads": "adaptive"}}
INSTRUCTION = ("There is a secret passkey hidden inside a lot of irrelevant text. Find it and memorize it. "
               "I will quiz you about the passkey.\n\n")
NEEDLE = " The secret passkey is {key}. Remember it. {key} is the secret passkey. "
QUESTION = "\n\nWhat is the secret passkey? Answer: The secret passkey is"
ANSWER_TOKENS = 8
# the measurement of kvpress (SmolLM2-135M, 6 prompts of ~1.5k tokens, needle at 10/50/90%),
# question inside the compressed prefill: retrieved / 6. Not re-run here (kvpress needs its own venv).
KVPRESS_QUESTION = {("tova", 0.5): 6, ("snapkv", 0.5): 4, ("streaming", 0.5): 2, ("knorm", 0.5): 1,
                    ("tova", 0.25): 2, ("snapkv", 0.25): 2, ("streaming", 0.25): 2, ("knorm", 0.25): 0}


# ----------------------------------------------------------------------------- prompts

def _tokens(tokenizer, text: str) -> list:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def sentence_ends(tokenizer, ids: list) -> list:
    """Positions j of ``ids`` after which a sentence or paragraph ends (the token ends in '.' or '\\n')."""
    return [j for j, t in enumerate(ids) if tokenizer.decode([t]).rstrip(" ").endswith((".", "\n"))]


def build_prompt(tokenizer, length: int, index: int, count: int, seed: int) -> dict:
    """One passkey prompt of exactly ``length`` tokens: {"context", "question" (id lists), "key", "depth"}."""
    key = str(torch.randint(10000, 100000, (1,), generator=torch.Generator().manual_seed(seed + index)).item())
    head, needle, question = _tokens(tokenizer, INSTRUCTION), _tokens(tokenizer, NEEDLE.format(key=key)), \
        _tokens(tokenizer, QUESTION)
    hay_len = length - len(head) - len(needle) - len(question)
    hay = wiki_token_ids(tokenizer, hay_len, start=40 * index)[0].tolist()
    depth = index / max(1, count - 1)
    ends = sentence_ends(tokenizer, hay) or [hay_len - 1]
    cut = min(ends, key=lambda j: abs(j + 1 - depth * hay_len)) + 1
    context = head + hay[:cut] + needle + hay[cut:]
    return {"context": context, "question": question, "key": key, "depth": cut / hay_len}


# ----------------------------------------------------------------------------- runs

def run_config(model, tokenizer, prompts: list, options, setting: str, batch: int, bar) -> dict:
    """Retrieval of one configuration (``options`` None: dense) over ``prompts``: {"hits", "kept"}."""
    if options is None:
        forward = model
    else:
        forward = torch.compile(model, backend=tokred.backend(inner="eager", kv_cache=options), dynamic=False)
    hits, kept, stored, dense = [], 0, 0, 0
    for i in range(0, len(prompts), batch):
        group = prompts[i:i + batch]
        context = torch.tensor([p["context"] for p in group])
        question = torch.tensor([p["question"] for p in group])
        if setting == "question":  # the question inside the compressed prefill
            compressed = tokred.CompressedContext(forward, torch.cat([context, question], 1))
        else:                      # the context alone compressed, the question read from its cache
            compressed = tokred.CompressedContext(forward, context)
        answer = compressed.answer(question[:, :0] if setting == "question" else question, ANSWER_TOKENS)
        for layer in compressed.cache.layers:  # [B, Hkv, M, D]: real entries are the nonzero keys
            heads = layer.keys.shape[0] * layer.keys.shape[1]
            kept += int((layer.keys != 0).any(-1).sum()) / heads
            stored += layer.keys.shape[2]
        dense += compressed.length * len(compressed.cache_entries)
        for p, ids in zip(group, answer.tolist()):
            hits.append(p["key"] in tokenizer.decode(ids))
        bar.update(len(group))
    torch._dynamo.reset()  # a bench script, not the library: each configuration compiles afresh
    return {"hits": sum(hits), "per_prompt": hits, "kept": kept / dense, "stored": stored / dense}


# ----------------------------------------------------------------------------- output

def plot(results: dict, args, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.settings), figsize=(5.5 * len(args.settings), 4), squeeze=False)
    for ax, setting in zip(axes[0], args.settings):
        for method in args.methods:
            xs = [k for k in args.keep if (setting, method, k) in results]
            ax.plot(xs, [results[setting, method, k]["hits"] for k in xs], marker="o", label=method)
        ax.axhline(results[setting, "dense", 1.0]["hits"], color="k", linestyle="--", label="dense")
        if setting == "question":
            for method in ("tova", "snapkv", "streaming", "knorm"):
                pts = [(k, v * args.prompts / 6) for (m, k), v in KVPRESS_QUESTION.items() if m == method]
                ax.scatter(*zip(*pts), marker="x", color="gray")
            ax.scatter([], [], marker="x", color="gray", label="kvpress (issue, scaled)")
        ax.set_xlabel("keep (fraction of the prompt's KV entries)")
        ax.set_ylabel(f"passkeys retrieved of {args.prompts}")
        ax.set_title(f"SmolLM2-135M, {args.length} tokens, {setting}-aware" if setting == "question"
                     else f"SmolLM2-135M, {args.length} tokens, context only")
        ax.set_ylim(-0.5, args.prompts + 0.5)
        ax.invert_xaxis()
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(results: dict, args, seconds: float, load: tuple) -> str:
    p = args.prompts
    lines = ["# KV-cache compression: SmolLM2-135M passkey retrieval\n",
             f"`python bench/kv_cache_retrieval.py {' '.join(sys.argv[1:])}` (torch {torch.__version__}, "
             f"cpu, {torch.get_num_threads()} threads, {seconds / 60:.1f} min; load before: {load[0]}, after: "
             f"{load[1]})\n",
             f"{p} prompts of {args.length} tokens (Wikipedia haystack, a five-digit passkey at depths 0 to 1, "
             f"question last); retrieved: the key in the {ANSWER_TOKENS} greedy tokens. `kept`: KV entries all "
             f"layers hold after the prefill / dense; `stored`: the slots they take, padding included (adaptive "
             f"heads). `question`: the question is inside the compressed prefill; "
             f"`context`: the context alone is compressed, the question fed afterwards on the compressed cache.\n"]
    header = "| method | keep | " + " | ".join(f"{s}: retrieved" for s in args.settings) + " | kept | stored |"
    lines += [header, "|" + "---|" * (4 + len(args.settings))]
    rows = [("dense", 1.0), ("control: snapkv", 1.0)] + [(m, k) for k in args.keep for m in args.methods]
    for method, keep in rows:
        name = "snapkv" if method.startswith("control") else method
        cells, size = [], None
        for s in args.settings:
            r = results.get((s, name if method != "dense" else "dense", keep))
            cells.append(f"{r['hits']}/{p}" if r else "")
            size = size or r
        cells += [f"{size['kept']:.3f}", f"{size['stored']:.3f}"] if size else ["", ""]
        lines.append(f"| {method} | {keep} | " + " | ".join(cells) + " |")
    lines.append("")
    if "question" in args.settings:
        lines.append("kvpress, as measured in the issue (question-aware, 6 prompts of ~1.5k tokens, not re-run "
                     "here): " + ", ".join(f"{m} {k}: {v}/6" for (m, k), v in KVPRESS_QUESTION.items()) + ".\n")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--length", type=int, default=1536)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--methods", nargs="+", default=METHODS[:1] + list(VARIANTS) + METHODS[1:],
                        choices=METHODS + list(VARIANTS))
    parser.add_argument("--keep", nargs="+", type=float, default=[0.5, 0.25])
    parser.add_argument("--settings", nargs="+", default=["question", "context"], choices=["question", "context"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(RESULTS, "kv_cache_retrieval"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from tqdm import tqdm

    load = [load_average().split("load")[-1]]
    started = time.time()
    model, tokenizer = load_causal_lm("smollm2")
    prompts = [build_prompt(tokenizer, args.length, i, args.prompts, args.seed) for i in range(args.prompts)]
    configs = [("dense", 1.0, None), ("snapkv", 1.0, {"method": "snapkv", "keep": 1.0})]
    configs += [(m, k, {**VARIANTS.get(m, {"method": m}), "keep": k}) for k in args.keep for m in args.methods]
    results = {}
    with tqdm(total=len(configs) * len(args.settings) * len(prompts), unit="prompt") as bar:
        for setting in args.settings:
            for method, keep, options in configs:
                if setting == "context" and method == "snapkv" and keep == 1.0:
                    bar.update(len(prompts))  # the control runs once, in the question setting
                    continue
                bar.set_description(f"{setting} {method} {keep}")
                results[setting, method, keep] = run_config(model, tokenizer, prompts, options, setting,
                                                            args.batch, bar)
                r = results[setting, method, keep]
                tqdm.write(f"{setting:8s} {method:15s} keep={keep}: {r['hits']}/{len(prompts)}, kept {r['kept']:.3f}, "
                           f"stored {r['stored']:.3f}")
    load.append(load_average().split("load")[-1])
    write_results(table(results, args, time.time() - started, tuple(load)), args.out + ".md")
    plot(results, args, args.out + ".png")
    print(f"plot: {args.out}.png")


if __name__ == "__main__":
    main()
