"""Token reduction at varying text lengths: one dynamic graph against one compile per length.

    python bench/dynamic_lengths.py [--texts 1200] [--lengths 64 96 128] [--batch 32] [--r 8] [--keep 0.5]

MiniLM (all-MiniLM-L6-v2, real weights) on Wikipedia topic classification. The test batches come
padded to different lengths (cycling through ``--lengths``), as a serving queue sends them. Each
variant (dense, merge r, prune keep) is compiled by inductor twice: with ``dynamic=True`` (one
graph for every length: the token count is symbolic) and with ``dynamic=False`` (a graph per
length). Accuracy: a linear probe fitted on each variant's own embeddings of the training split
(padded to the longest length), scored on that variant's test embeddings. Speed: seconds per
pass over all test batches, the variants measured alternately in one run, relative to dense
compiled per length. Writes bench/results/dynamic_lengths.md and dynamic_lengths.png (accuracy
against speedup).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tokred  # noqa: E402
from bench.common import alternating_medians, load_average, save_figure, write_results  # noqa: E402
from tokred.tools.demo import fit_probe, load_minilm, load_wiki_topics, mean_pool, tokenize  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def test_batches(tokenizer, texts: list, lengths: list, batch: int) -> list:
    """Batches of ``batch`` texts, batch i padded (or truncated) to lengths[i % len(lengths)]."""
    out = []
    for i, start in enumerate(range(0, len(texts) - len(texts) % batch, batch)):
        out.append(tokenize(tokenizer, texts[start:start + batch], lengths[i % len(lengths)]))
    return out


def embeddings(fn, batches: list) -> torch.Tensor:
    """Mean-pooled embeddings [n, C] of every batch (real tokens only)."""
    with torch.no_grad():
        return torch.cat([mean_pool(fn(**b).last_hidden_state, b["attention_mask"]) for b in batches])


def plot(rows: list, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for dynamic, marker in ((False, "o"), (True, "x")):
        pts = [r for r in rows if r["dynamic"] == dynamic]
        ax.scatter([r["speedup"] for r in pts], [100 * r["accuracy"] for r in pts], marker=marker, s=50,
                   label="dynamic=True (one graph)" if dynamic else "dynamic=False (a graph per length)")
        for r in pts:
            ax.annotate(r["variant"], (r["speedup"], 100 * r["accuracy"]), fontsize=7, xytext=(4, 4 if dynamic else -9),
                        textcoords="offset points")
    ax.set_xlabel("measured speedup over dense, a graph per length (inductor, CPU)")
    ax.set_ylabel("topic accuracy (%)")
    ax.set_title("MiniLM at varying batch lengths: dynamic against static compiles")
    save_figure(fig, ax, path, legend_size=8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts", type=int, default=1200)
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 96, 128])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--r", type=int, nargs="+", default=[8])
    parser.add_argument("--keep", type=float, nargs="+", default=[0.5])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from tqdm import tqdm

    # the bench compiles one forward about 20 times (variants x lengths): Dynamo's default limit of
    # compiles per function would send the later ones to eager
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.accumulated_recompile_limit = 1024
    model, tokenizer = load_minilm()
    data = load_wiki_topics(args.texts)
    n_train = 2 * len(data.texts) // 3
    train = tokenize(tokenizer, data.texts[:n_train], max(args.lengths))
    batches = test_batches(tokenizer, data.texts[n_train:], args.lengths, args.batch)
    y_train = data.labels[:n_train]
    y_test = data.labels[n_train:][:len(batches) * args.batch]
    train_batches = [{k: v[i:i + args.batch] for k, v in train.items()} for i in range(0, n_train, args.batch)]

    options = {"dense": {}, **{f"merge r={r}": {"merge": {"r": r}} for r in args.r},
               **{f"prune keep={k}": {"prune": {"keep": k, "at": [1]}} for k in args.keep}}
    fns, backends, emb, probes = {}, {}, {}, {}
    for name, opts in tqdm(options.items(), desc="compile and embed"):
        for dynamic in (False, True):
            backend = tokred.backend(**opts) if opts else "inductor"
            fn = torch.compile(model, backend=backend, dynamic=dynamic)
            fns[(name, dynamic)], backends[(name, dynamic)] = fn, backend
            emb[(name, dynamic)] = embeddings(fn, batches)  # also compiles every length
            # each variant's own probe: a pruned token comes back with its early-exit state, which
            # a probe fitted on dense states has never seen
            probes[(name, dynamic)] = fit_probe(embeddings(fn, train_batches), y_train)
    load = load_average()

    def one_pass(fn):
        def run():
            with torch.no_grad():
                for b in batches:
                    fn(**b)
        return run

    times = alternating_medians({key: one_pass(fn) for key, fn in fns.items()}, args.repeats)
    base = times[("dense", False)]
    rows = []
    for (name, dynamic), fn in fns.items():
        backend = backends[(name, dynamic)]
        reports = backend.reports if not isinstance(backend, str) else []
        accuracy = probes[(name, dynamic)].score(emb[(name, dynamic)].numpy(), y_test)
        rows.append({"variant": name, "dynamic": dynamic, "accuracy": accuracy,
                     "speedup": base / times[(name, dynamic)], "graphs": len(reports) if reports else None,
                     "changed": all(r.changed for r in reports) if reports else None,
                     "diff": (emb[(name, dynamic)] - emb[(name, False)]).abs().max().item()})
    cmd = "python bench/dynamic_lengths.py " + " ".join(sys.argv[1:])
    lines = ["# Token reduction at varying batch lengths: dynamic=True against a compile per length (CPU)", "",
             f"`{cmd.strip()}` (torch {torch.__version__}, {torch.get_num_threads()} threads; before timing: "
             f"{load}; MiniLM on {args.texts} Wikipedia extracts, 2/3 fit each variant's probe, the rest in "
             f"batches of {args.batch} padded to {', '.join(map(str, args.lengths))} tokens in turn; speed: one "
             f"pass over the test batches, variants alternating, median of {args.repeats})", "",
             "| variant | compile | graphs | every graph reduced | accuracy | speedup | max abs diff of the "
             "embeddings vs dynamic=False |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        graphs = "-" if r["graphs"] is None else str(r["graphs"])
        changed = "-" if r["changed"] is None else ("yes" if r["changed"] else "no")
        lines.append(f"| {r['variant']} | {'dynamic=True' if r['dynamic'] else 'dynamic=False'} | {graphs} | "
                     f"{changed} | {r['accuracy']:.3f} | {r['speedup']:.2f}x | {r['diff']:.1e} |")
    write_results("\n".join(lines) + "\n", os.path.join(RESULTS, "dynamic_lengths.md"))
    plot(rows, os.path.join(RESULTS, "dynamic_lengths.png"))


if __name__ == "__main__":
    main()
