"""Token pruning quality on a real encoder: MiniLM topic accuracy against keep ratio and cut layer.

    python bench/prune_quality.py [--train 200] [--test 100] [--length 48] [--keep 0.25 0.5 0.75]
                                  [--at 1 2 3] [--scores cls query transition diversity random]
                                  [--full-grid] [--refit] [--device cpu|cuda]

MiniLM (all-MiniLM-L6-v2, real weights, 6 layers, a BertModel) on Wikipedia topic classification,
the task of bench/merge_quality.py: a logistic-regression probe is fitted on dense mean-pooled
embeddings of a training split, then evaluated on the test split embedded by the dense model and
by each pruned model (tokred prune pass: prune={"keep", "at", "score"}).

Pooling is the mean over all N restored tokens with the attention mask, as in the merge bench: a
pruned token exits early, so it still contributes its value after the cut block (not nothing), and
the pooled embedding moves less than a "kept tokens only" pooling would. Every pruned model is
compiled with tokred's inner compiler "eager" (the pass rewrites the graph; no inductor compile per
variant); the FLOPs ratio is the report's flops_after / flops_before. No timings are taken here
(see bench/prune_llm.py for side-by-side prefill timings).
Writes bench/results/prune_quality.md and prune_quality.png (accuracy against keep, one panel per cut).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tokred  # noqa: E402
from tokred.tools.demo import embed, fit_probe, load_minilm, load_wiki_topics, tokenize  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SCORES = ["cls", "query", "transition", "diversity", "random"]
FREQUENT_TYPES = 30  # "function words": the most frequent token types of the test text


def embeddings(model, enc: dict, batch: int, desc: str) -> torch.Tensor:
    """[n, C] mean-pooled embeddings (on the CPU) of the rows of ``enc``."""
    return embed(model, enc, batch, desc).float().cpu()


def split(enc: dict, labels: list, n_train: int, n_test: int, batch: int) -> tuple:
    """(train enc, train labels, test enc, test labels), each trimmed to whole batches."""
    n_train -= n_train % batch
    n_test -= n_test % batch
    train = {k: v[:n_train] for k, v in enc.items()}
    test = {k: v[n_train:n_train + n_test] for k, v in enc.items()}
    return train, labels[:n_train], test, labels[n_train:n_train + n_test]


def variants(args) -> list:
    """(score, at, keep): for each score, the keep sweep at the middle cut and the cut sweep at
    the middle keep (--full-grid: every keep at every cut)."""
    if args.full_grid:
        return [(s, a, k) for s in args.scores for a in args.at for k in args.keep]
    mid_at, mid_keep = args.at[len(args.at) // 2], args.keep[len(args.keep) // 2]
    out = []
    for s in args.scores:
        out += [(s, mid_at, k) for k in args.keep] + [(s, a, mid_keep) for a in args.at if a != mid_at]
    return out


def pruned_model(model, prune: dict):
    """(compiled model, backend): tokred's prune pass, inner compiler eager."""
    backend = tokred.backend(inner="eager", prune=prune)
    return torch.compile(model, backend=backend), backend


def kept_embeddings(model, backend, enc: dict, batch: int, desc: str, kept_masks: list = None) -> torch.Tensor:
    """[n, C] embeddings pooled over the tokens that went through every block: the mean of the
    last hidden states of the real tokens the pruning kept (``trace_source`` says which, per run).
    ``kept_masks``, when given, receives each batch's kept mask [b, N] (0/1)."""

    def kept(part: dict) -> torch.Tensor:  # [b, N]: real tokens whose exit is -1 (kept to the end)
        exits = backend.reports[-1].sources[-1].to(part["attention_mask"].device)
        mask = part["attention_mask"] * (exits == -1)
        if kept_masks is not None:
            kept_masks.append(mask.cpu())
        return mask

    return embed(model, enc, batch, desc, pooled_tokens=kept).float().cpu()


def text_tokens(tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[n, N] bool: real tokens that are not special ([CLS], [SEP]: the pass keeps them whatever the score)."""
    special = torch.tensor(tokenizer.all_special_ids, dtype=input_ids.dtype)
    return attention_mask.bool() & ~torch.isin(input_ids, special)


def frequent_share(real: torch.Tensor, input_ids: torch.Tensor, kept: torch.Tensor, types: int) -> tuple:
    """What a scorer keeps: the share of kept tokens that are among the ``types`` most frequent token
    types of the text (function words and punctuation), next to their share of all text tokens.
    real ([n, N] bool, :func:`text_tokens`), input_ids, kept [n, N] (kept 0/1) -> (kept share, all share)."""
    ids = input_ids[real]
    counts = torch.bincount(ids)
    frequent = torch.zeros_like(counts, dtype=torch.bool)
    frequent[counts.topk(min(types, int((counts > 0).sum()))).indices] = True
    kept_ids = input_ids[real & kept.bool()]
    return frequent[kept_ids].float().mean().item(), frequent[ids].float().mean().item()


def top_kept(tokenizer, real: torch.Tensor, input_ids: torch.Tensor, kept: torch.Tensor, count: int) -> list:
    """The ``count`` token types a scorer keeps most often relative to how often they occur
    (kept share / occurrence share, among types seen at least 20 times) -> [(token, ratio)]."""
    seen = torch.bincount(input_ids[real], minlength=tokenizer.vocab_size).float()
    kept_n = torch.bincount(input_ids[real & kept.bool()], minlength=tokenizer.vocab_size).float()
    ratio = torch.where(seen >= 20, (kept_n / kept_n.sum()) / (seen / seen.sum()), torch.zeros_like(seen))
    top = ratio.topk(count)
    return [(tokenizer.convert_ids_to_tokens(int(i)), v.item()) for v, i in zip(top.values, top.indices)]


def run(args) -> tuple:
    """(rows, dense accuracy, number of classes, kept rows): rows are (score, at, keep, accuracy,
    FLOPs ratio); kept rows (score, kept frequent share, all frequent share, top kept tokens) at the
    middle cut and keep (``--pool kept`` only)."""
    from tqdm import tqdm

    model, tokenizer = load_minilm()
    model = model.to(args.device)
    data = load_wiki_topics(args.train + args.test)
    enc = {k: v.to(args.device) for k, v in tokenize(tokenizer, data.texts, args.length).items()}
    train, y_train, test, y_test = split(enc, data.labels, args.train, args.test, args.batch)
    probe = fit_probe(embeddings(model, train, args.batch, "MiniLM dense, train"), y_train)
    dense_acc = probe.score(embeddings(model, test, args.batch, "MiniLM dense, test").numpy(), y_test)
    rows, kept_rows = [], []
    mid = (args.at[len(args.at) // 2], args.keep[len(args.keep) // 2])
    grid = variants(args)
    for score, at, keep in tqdm(grid, desc="pruned variants"):
        torch._dynamo.reset()
        kept_pool = args.pool == "kept"
        fn, backend = pruned_model(model, {"keep": keep, "at": at, "score": score, "trace_source": kept_pool})
        masks = []
        pool = (lambda e, d, m=None: kept_embeddings(fn, backend, e, args.batch, d, m)) if kept_pool else \
            (lambda e, d, m=None: embeddings(fn, e, args.batch, d))
        emb = pool(test, f"{score} at={at} keep={keep}", masks)
        if masks and (at, keep) == mid:
            kept = torch.cat(masks)
            ids = test["input_ids"].cpu()
            real = text_tokens(tokenizer, ids, test["attention_mask"].cpu())
            kept_rows.append((score, *frequent_share(real, ids, kept, FREQUENT_TYPES),
                              top_kept(tokenizer, real, ids, kept, 6)))
        scorer = probe
        if args.refit:  # a probe fitted on this variant's own training embeddings
            scorer = fit_probe(pool(train, f"{score} at={at} keep={keep}, train"), y_train)
        report = backend.report
        if not report.changed:
            raise SystemExit(f"prune {score} at={at} keep={keep} rewrote nothing: "
                             + "; ".join(s.reason or s.status for s in report.attention_sites))
        rows.append((score, at, keep, scorer.score(emb.numpy(), y_test), report.flops_after / report.flops_before))
    return rows, dense_acc, len(data.classes), kept_rows


def table(rows: list, dense_acc: float, args) -> list:
    """Markdown lines: one row per (score, at), one column per keep; accuracy and points lost."""
    keeps = args.keep
    lines = ["| score | at (block) | " + " | ".join(f"keep={k}" for k in keeps) + " |",
             "|---|---|" + "---|" * len(keeps)]
    acc = {(s, a, k): (v, f) for s, a, k, v, f in rows}
    for score in args.scores:
        for at in args.at:
            cells = []
            for keep in keeps:
                if (score, at, keep) not in acc:
                    cells.append("-")
                    continue
                v, f = acc[(score, at, keep)]
                cells.append(f"{100 * v:.1f} ({100 * (v - dense_acc):+.1f}; FLOPs {f:.2f})")
            lines.append(f"| {score} | {at} | " + " | ".join(cells) + " |")
    return lines


def kept_table(kept_rows: list, args) -> list:
    """Markdown lines: what each scorer keeps at the middle cut and keep."""
    at, keep = args.at[len(args.at) // 2], args.keep[len(args.keep) // 2]
    lines = [f"## What each scorer keeps (at={at}, keep={keep})", "",
             f"Share of the kept tokens that are among the {FREQUENT_TYPES} most frequent token types of the "
             "test text (function words and punctuation; [CLS] and [SEP] excluded: they are kept whatever the score), next to their share "
             "of all real tokens; and the token types each scorer keeps most often relative to how often they "
             "occur (x: kept share / occurrence share, types seen at least 20 times). A scorer that keeps "
             "mostly frequent types drops the content words a mean-pooled topic embedding needs.", "",
             "| score | frequent types among kept | among all tokens | most over-kept types |", "|---|---|---|---|"]
    for score, kept_share, all_share, top in kept_rows:
        lines.append(f"| {score} | {100 * kept_share:.0f}% | {100 * all_share:.0f}% | "
                     + ", ".join(f"`{t}` {r:.1f}x" for t, r in top) + " |")
    return lines


def plot(rows: list, dense_acc: float, args, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.at), figsize=(3.6 * len(args.at), 3.6), sharey=True, squeeze=False)
    for ax, at in zip(axes[0], args.at):
        for score in args.scores:
            pts = sorted((k, v) for s, a, k, v, _ in rows if s == score and a == at)
            ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=score,
                    ls="--" if score == "random" else "-")
        ax.axhline(100 * dense_acc, color="0.4", lw=0.8, label="dense")
        ax.set_title(f"cut after block {at}")
        ax.set_xlabel("keep (fraction of prunable tokens)")
    axes[0][0].set_ylabel("topic accuracy (%)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("tokred prune on MiniLM-L6\n(pruned tokens exit early, mean pooling over all tokens)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=200, help="extracts to fit the probe on")
    parser.add_argument("--test", type=int, default=100, help="extracts to evaluate on")
    parser.add_argument("--length", type=int, default=48, help="tokens per extract (padded/truncated)")
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--keep", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    parser.add_argument("--at", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--scores", nargs="+", default=SCORES, choices=SCORES)
    parser.add_argument("--full-grid", action="store_true", help="every keep at every cut (default: the keep "
                        "sweep at the middle cut and the cut sweep at the middle keep)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--pool", choices=["kept", "all"], default="kept",
                        help="kept: mean over the tokens that went through every block (what a pruned encoder "
                             "serves); all: mean over all N restored tokens, pruned ones at their early-exit value")
    parser.add_argument("--out", default=None, help="results name under bench/results/ (default: "
                        "prune_quality, with _refit for --refit and _allpool for --pool all)")
    parser.add_argument("--refit", action="store_true",
                        help="fit each variant's probe on its own pruned training embeddings (twice the work): "
                             "measures what the pruned embedding still holds, not the shift from dense")
    args = parser.parse_args()
    torch.manual_seed(0)
    start = time.time()
    rows, dense_acc, classes, kept_rows = run(args)
    minutes = (time.time() - start) / 60
    cmd = "python bench/prune_quality.py " + " ".join(sys.argv[1:])
    lines = ["# Token pruning quality: MiniLM topic accuracy against keep and cut layer", "",
             f"`{cmd.strip()}` (torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads, "
             f"{minutes:.1f} min on a shared, heavily loaded machine)", "",
             f"MiniLM-L6 (6 blocks), {classes} Wikipedia topics, probe fitted on {args.train} "
             f"{'pruned (per variant, --refit)' if args.refit else 'dense'} embeddings, "
             f"{args.test} test extracts of {args.length} tokens. Dense accuracy: **{100 * dense_acc:.1f}%**. "
             "Cells: accuracy % (points vs dense; FLOPs ratio from the tokred report). `at` is the block after "
             "whose output the cut is made; keep is the fraction of prunable tokens kept ([CLS] is protected). "
             + ("The embedding is the mean over the real tokens that went through every block (the kept ones, "
                "read from trace_source); pruned tokens do not contribute. " if args.pool == "kept" else
                "Pruned tokens exit early and the embedding is the masked mean over all N restored tokens, so "
                "pruned tokens still contribute their value after the cut block. ")
             + "The 'query' scorer reads the "
             "attention of the last position ([SEP] or padding). With this few test extracts one "
             f"extract is {100 / max(1, args.test - args.test % args.batch):.1f} points: differences of a "
             "point or two are noise.", ""]
    if not args.refit and args.pool == "all":
        lines += ["With the probe fitted on dense embeddings, the early-exit values shift the pooled "
                  "embedding: a pruned token's state after block `at` is on another scale than a final "
                  "state, so the probe reads the shifted embedding as another class. Run with --refit "
                  "(a probe fitted per variant) to measure what the pruned embedding still holds.", ""]
    lines += table(rows, dense_acc, args)
    if kept_rows:
        lines += [""] + kept_table(kept_rows, args)
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(RESULTS, exist_ok=True)
    out = args.out or ("prune_quality" + ("_refit" if args.refit else "") + ("_allpool" if args.pool == "all" else ""))
    with open(os.path.join(RESULTS, out + ".md"), "w") as f:
        f.write(text)
    plot(rows, dense_acc, args, os.path.join(RESULTS, out + ".png"))


if __name__ == "__main__":
    main()
