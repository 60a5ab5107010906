"""Token merging quality on real models: accuracy against speedup, for several r, in one run.

    python bench/merge_quality.py [--texts 1200] [--r 4 8 12 16 20] [--digits-r 2 4 6 8]

1. MiniLM (all-MiniLM-L6-v2, real weights) on Wikipedia topic classification: a linear probe fitted
   on dense mean-pooled embeddings of a fixed training split, evaluated on test embeddings from the
   dense model and from each merged model.
2. A ViT trained from scratch on scikit-learn's 8x8 digits (upscaled to 32 px, patch 4, 65 tokens;
   trained once, cached in ~/.cache/tokred/): test accuracy of the merged model for each r.
Speed: images or texts per second, both sides compiled by inductor, measured alternately in the
same run. Writes bench/results/merge_quality.md and merge_quality.png (accuracy against speedup).
Target (issue 3): <= 1 point of accuracy lost at a 1.5x speedup.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tokred  # noqa: E402
from bench.common import save_figure, write_results  # noqa: E402
from tokred.tools.demo import embed, fit_probe, load_minilm, load_wiki_topics, time_per_batch, tokenize  # noqa: E402

CACHE = os.path.expanduser("~/.cache/tokred")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def digits_data():
    """scikit-learn digits as [n, 1, 32, 32] float images in [0, 1] and labels; fixed split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = torch.nn.functional.interpolate(x, size=32, mode="bilinear", align_corners=False)
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = order[:1400], order[1400:]
    return x[train], y[train], x[test], y[test]


def digits_vit():
    """A small timm ViT for 32x32 one-channel digits (patch 4 -> 64 patches + class token)."""
    import timm

    return timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=4, in_chans=1, num_classes=10, embed_dim=96, depth=4, num_heads=4,
        mlp_ratio=3.0)


def trained_digits_vit(x, y, epochs: int = 30):
    """Train once (about a minute on 2 cores) and cache the weights."""
    from tqdm import tqdm

    path = os.path.join(CACHE, "digits_vit.pt")
    model = digits_vit()
    if os.path.exists(path):
        model.load_state_dict(torch.load(path))
        return model.eval()
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=epochs * ((len(y) + 63) // 64))
    for _ in tqdm(range(epochs), desc="training the digits ViT"):
        perm = torch.randperm(len(y))
        for i in range(0, len(y), 64):
            idx = perm[i:i + 64]
            xb = x[idx] + 0.05 * torch.randn_like(x[idx])
            loss = torch.nn.functional.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    os.makedirs(CACHE, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()


def accuracy(model, x, y, batch: int = 100) -> float:
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + batch]).argmax(-1) for i in range(0, len(y) - len(y) % batch, batch)])
    return (pred == y[:len(pred)]).float().mean().item()


def minilm_rows(args) -> list:
    model, tokenizer = load_minilm()
    data = load_wiki_topics(args.texts)
    enc = tokenize(tokenizer, data.texts, args.length)
    n_train = 2 * len(data.texts) // 3
    bs = args.batch
    train = {k: v[:n_train] for k, v in enc.items()}
    test = {k: v[n_train:] for k, v in enc.items()}
    y_train = data.labels[:n_train][: (n_train // bs) * bs]
    y_test = data.labels[n_train:][: ((len(data.labels) - n_train) // bs) * bs]
    dense = torch.compile(model, backend="inductor")
    probe = fit_probe(embed(dense, train, bs, "MiniLM dense, train"), y_train)
    variants = {"dense": dense}
    flops = {"dense": 1.0}
    for schedule in args.schedules:
        for r in args.r:
            merge = {"r": r, "schedule": schedule}
            name = f"r={r}" + ("" if schedule == "constant" else f" {schedule}")
            report = tokred.explain(model, example_kwargs={k: v[:bs] for k, v in enc.items()}, merge=merge)
            flops[name] = report.flops_after / report.flops_before
            variants[name] = torch.compile(model, backend=tokred.backend(merge=merge))
    rows = []
    acc = {name: probe.score(embed(fn, test, bs, f"MiniLM {name}, test").numpy(), y_test)
           for name, fn in variants.items()}
    times = time_per_batch(variants, {k: v[:bs] for k, v in enc.items()}, repeats=args.repeats)
    for name in variants:
        rows.append(("MiniLM topics", name, acc[name], times["dense"] / times[name], flops[name]))
    return rows


def digits_rows(args) -> list:
    xtr, ytr, xte, yte = digits_data()
    model = trained_digits_vit(xtr, ytr)
    variants = {"dense": torch.compile(model, backend="inductor")}
    flops = {"dense": 1.0}
    for r in args.digits_r:
        report = tokred.explain(model, xte[:100], merge={"r": r})
        flops[f"r={r}"] = report.flops_after / report.flops_before
        variants[f"r={r}"] = torch.compile(model, backend=tokred.backend(merge={"r": r}))
    acc = {name: accuracy(fn, xte, yte) for name, fn in variants.items()}
    times = time_per_batch({k: (lambda f: (lambda **kw: f(kw["x"])))(v) for k, v in variants.items()},
                           {"x": xte[:300]}, repeats=args.repeats)
    return [("digits ViT", name, acc[name], times["dense"] / times[name], flops[name]) for name in variants]


def plot(rows: list, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    series = {}  # (task, schedule) -> rows; dense starts every series of its task
    for row in rows:
        schedule = row[1].split(" ", 1)[1] if " " in row[1] else "constant"
        series.setdefault((row[0], schedule), []).append(row)
    for (task, schedule), pts in series.items():
        if schedule != "constant":
            pts = [r for r in rows if r[0] == task and r[1] == "dense"] + pts
        pts = sorted(pts, key=lambda p: p[3])
        label = task if schedule == "constant" else f"{task}, {schedule}"
        ax.plot([p[3] for p in pts], [100 * p[2] for p in pts], "o-", label=label)
        for p in pts:
            ax.annotate(p[1], (p[3], 100 * p[2]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axvline(1.5, color="0.7", ls="--", lw=0.8)
    ax.set_xlabel("measured speedup over dense (both inductor, CPU)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("tokred token merging: accuracy against speed")
    save_figure(fig, ax, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts", type=int, default=1200)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--r", type=int, nargs="+", default=[4, 8, 12, 16, 20])
    parser.add_argument("--schedules", nargs="+", default=["constant"], choices=["constant", "decreasing"],
                        help="r schedules for MiniLM (each r with each schedule)")
    parser.add_argument("--digits-r", type=int, nargs="+", default=[2, 4, 6, 8])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = digits_rows(args) + minilm_rows(args)
    cmd = "python bench/merge_quality.py " + " ".join(sys.argv[1:])
    lines = ["# Token merging quality against speed (CPU)", "", f"`{cmd.strip()}` (torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads; speed measured side by side, both compiled by inductor; "
             f"MiniLM: {args.texts} extracts, 2/3 to fit the probe, 1/3 to test, {args.length} tokens)", "",
             "| task | variant | accuracy | speedup | FLOPs ratio | accuracy lost (points) |",
             "|---|---|---|---|---|---|"]
    dense_acc = {r[0]: r[2] for r in rows if r[1] == "dense"}
    for task, name, acc, speed, fl in rows:
        lines.append(f"| {task} | {name} | {acc:.3f} | {speed:.2f}x | {fl:.3f} | {100 * (dense_acc[task] - acc):+.1f} |")
    write_results("\n".join(lines) + "\n", os.path.join(RESULTS, "merge_quality.md"))
    plot(rows, os.path.join(RESULTS, "merge_quality.png"))


if __name__ == "__main__":
    main()
