"""Token pruning of a real decoder's prompt: SmolLM2-135M agreement, perplexity and prefill speed.

    python bench/prune_llm.py [--prompts 2] [--length 512] [--keep 0.25 0.5 0.75] [--at 1 2 4]
                              [--scores query transition random] [--device cpu|cuda]
                              [--inner eager|inductor] [--perturb 0.02] [--perturb-seeds 2]

SmolLM2-135M (LlamaForCausalLM, 30 layers, real weights, fp32) reads Wikipedia prompts of
``--length`` tokens; the prompt prefill is pruned by tokred (prune={"keep", "at", "score",
"protect_last"}) and the pruned KV cache (N tokens up to the cut, M after it) is then used for:

- next-token agreement: the greedy token after the prompt, pruned vs dense;
- teacher-forced agreement over the next ``--agree`` positions: the true continuation is fed
  through the pruned cache, and the argmax at each position is compared with the dense model's;
- perplexity of the true continuation (``--continuation`` tokens) read through the pruned cache;
- prefill time (time to first token), dense vs pruned, measured alternately in the same run;
- ranking stability ("Less Is More, Until It Breaks"): the kept sets of each scorer for the prompt
  and for the prompt with ``--perturb`` of its tokens replaced by random tokens; Jaccard overlap.

The continuation is fed in one chunk through the model's own decoder layers with an explicit mask
(each new token reads every cached token and the new tokens before it, at positions N, N+1, ...),
which is what step-by-step decoding on the pruned cache computes. The kept positions are read
back from the pruned cache itself: the keys of the layer after the cut are those of the kept tokens,
equal to the dense keys at their original positions, so each is matched to its position.
Writes bench/results/prune_llm.md and prune_llm.png.
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
from tokred.demo import time_per_batch  # noqa: E402
from tokred.offline import load_causal_lm, wiki_token_ids  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SCORES = ["query", "transition", "diversity", "random"]
TARGET = {"keep": 0.5, "at": 2}  # the target: half the prompt pruned after layer 2


# ----------------------------------------------------------------------------- data

def prompts(tokenizer, n_prompts: int, length: int, continuation: int, device) -> tuple:
    """(prompt ids [P, length], continuation ids [P, continuation]) from different extracts."""
    rows = [wiki_token_ids(tokenizer, length + continuation, start=40 * i) for i in range(n_prompts)]
    ids = torch.cat(rows).to(device)
    return ids[:, :length], ids[:, length:]


def perturbed(ids: torch.Tensor, fraction: float, protect_last: int, vocab: int, seed: int) -> torch.Tensor:
    """ids [P, N] with ``fraction`` of the positions before the last ``protect_last`` replaced by
    random tokens (the same positions in every prompt)."""
    g = torch.Generator().manual_seed(seed)
    n = ids.shape[1] - protect_last
    count = max(1, round(fraction * n))
    where = torch.randperm(n, generator=g)[:count]
    out = ids.clone()
    out[:, where] = torch.randint(0, vocab, (ids.shape[0], count), generator=g).to(ids.device)
    return out


# ----------------------------------------------------------------------------- model runs

def continue_through_cache(model, tokens: torch.Tensor, cache, start: int) -> torch.Tensor:
    """Logits [P, T, V] of ``tokens`` [P, T] at positions start.. read through ``cache`` (a
    transformers DynamicCache whose layers may hold different token counts): each new token reads
    every cached token and the new tokens up to itself. Appends to the cache."""
    inner = model.model
    x = inner.embed_tokens(tokens)
    p, t = tokens.shape
    position = torch.arange(start, start + t, device=tokens.device).expand(p, t)
    cos, sin = inner.rotary_emb(x, position_ids=position)
    causal = torch.ones(t, t, dtype=torch.bool, device=tokens.device).tril()
    for index, layer in enumerate(inner.layers):
        past = cache.layers[index].keys.shape[2]
        allowed = torch.cat([torch.ones(t, past, dtype=torch.bool, device=tokens.device), causal], dim=1)
        bias = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill(
            ~allowed, torch.finfo(x.dtype).min)
        x = layer(x, attention_mask=bias[None, None], position_ids=position, past_key_values=cache, use_cache=True,
                  position_embeddings=(cos, sin))
    return model.lm_head(inner.norm(x))


def prefill(fn, ids: torch.Tensor):
    """(last-position logits [P, V], cache) of a prefill."""
    with torch.no_grad():
        out = fn(input_ids=ids, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1].float(), out.past_key_values


def evaluate(model, fn, ids: torch.Tensor, cont: torch.Tensor, n_agree: int) -> dict:
    """Prefill with ``fn``, then the continuation through its cache.

    -> {"next": [P] greedy next token, "pred": [P, n_agree] argmax predictions of continuation
    tokens 0..n_agree-1 (teacher-forced), "nll": [P] mean negative log-likelihood of the
    continuation, "cache": the prefill cache (before the continuation was appended; cloned keys)}.
    """
    last, cache = prefill(fn, ids)
    keys = [layer.keys.clone() for layer in cache.layers]
    with torch.no_grad():
        logits = continue_through_cache(model, cont[:, :-1], cache, ids.shape[1]).float()
    preds = torch.cat([last[:, None], logits], dim=1)  # [P, T, V]: prediction of continuation token t
    nll = torch.nn.functional.cross_entropy(preds.transpose(1, 2), cont, reduction="none").mean(1)
    return {"next": last.argmax(-1), "pred": preds[:, :n_agree].argmax(-1), "nll": nll, "keys": keys}


def kept_positions(dense_keys: torch.Tensor, pruned_keys: torch.Tensor) -> list:
    """Original positions of the tokens a pruned layer cached: each pruned key row [P, Hkv, M, D]
    matched to the nearest dense key row [P, Hkv, N, D] of the same layer. -> P sets."""
    p = dense_keys.shape[0]
    dense = dense_keys.transpose(1, 2).reshape(p, dense_keys.shape[2], -1).float()
    pruned = pruned_keys.transpose(1, 2).reshape(p, pruned_keys.shape[2], -1).float()
    dist = torch.cdist(pruned, dense)  # [P, M, N]
    best = dist.min(-1)
    scale = dense.norm(dim=-1).mean()
    assert (best.values < 1e-3 * scale).all(), f"a pruned key matches no dense key ({best.values.max():.3g})"
    return [set(row.tolist()) for row in best.indices]


def jaccard(a: set, b: set) -> float:
    return len(a & b) / max(1, len(a | b))


def compile_pruned(model, prune: dict, inner: str):
    torch._dynamo.reset()
    backend = tokred.backend(inner=inner, prune=prune)
    return torch.compile(model, backend=backend), backend


def compile_dense(model, inner: str):
    """The dense model for timing: eager, or compiled by ``inner`` next to the pruned compile
    (no reset: dynamo keeps one entry per backend)."""
    if inner == "eager":
        return model
    return torch.compile(model, backend="inductor" if inner == "inductor" else inner)


# ----------------------------------------------------------------------------- the bench

def grid(args) -> list:
    """(score, at, keep) variants: every score at the target; the keep and at sweeps for
    ``--sweep-scores`` (the whole keep x at grid for every score with --full-grid)."""
    if args.full_grid:
        return [(s, a, k) for s in args.scores for a in args.at for k in args.keep]
    out = [(s, TARGET["at"], TARGET["keep"]) for s in args.scores]
    for s in args.sweep_scores:
        out += [(s, TARGET["at"], k) for k in args.keep if k != TARGET["keep"]]
        out += [(s, a, TARGET["keep"]) for a in args.at if a != TARGET["at"]]
    return out


def stability(model, fn, args, ids, layer: int, dense_keys: list) -> tuple:
    """(mean, min) Jaccard of the kept sets of ``fn`` (a pruned model cutting after ``layer - 1``),
    prompt vs its perturbed copies; ``dense_keys``: the dense keys of ``layer`` for each copy."""
    variants = [ids] + [perturbed(ids, args.perturb, args.protect_last, model.config.vocab_size, seed)
                        for seed in range(args.perturb_seeds)]
    kept = [kept_positions(dk, prefill(fn, v)[1].layers[layer].keys) for dk, v in zip(dense_keys, variants)]
    scores = [jaccard(a, b) for other in kept[1:] for a, b in zip(kept[0], other)]
    return sum(scores) / len(scores), min(scores)


def run(model, args, ids, cont, dense: dict) -> tuple:
    """Every variant: compiled once, then its quality; at the target cut also its ranking
    stability and its prefill time next to the dense model's.

    -> (rows (score, at, keep, next agree, tf agree, ppl, FLOPs ratio), stability rows (score,
    mean, min), timing rows (score, keep, dense s, pruned s)).
    """
    from tqdm import tqdm

    layer = TARGET["at"] + 1  # the first layer that caches only the kept tokens
    variants = [ids] + [perturbed(ids, args.perturb, args.protect_last, model.config.vocab_size, seed)
                        for seed in range(args.perturb_seeds)]
    dense_keys = [] if "stability" in args.skip else [prefill(model, v)[1].layers[layer].keys.clone() for v in variants]
    rows, stable, times = [], [], []
    control = [("control: " + args.scores[0], TARGET["at"], 1.0)]  # keep everything: must equal dense
    for score, at, keep in tqdm(control + grid(args), desc="pruned variants"):
        name = score.split(": ")[-1]
        prune = {"keep": keep, "at": at, "score": name, "protect_last": args.protect_last}
        fn, backend = compile_pruned(model, prune, args.inner)
        res = evaluate(model, fn, ids, cont, args.agree)
        report = backend.report
        if not report.changed:
            raise SystemExit(f"prune {prune} rewrote nothing: " + "; ".join(
                s.reason or s.status for s in report.attention_sites))
        rows.append((score, at, keep, (res["next"] == dense["next"]).float().mean().item(),
                     (res["pred"] == dense["pred"]).float().mean().item(), math.exp(res["nll"].mean().item()),
                     report.flops_after / report.flops_before))
        if at != TARGET["at"] or keep != TARGET["keep"] or score.startswith("control"):
            continue
        if "stability" not in args.skip:
            stable.append((score, *stability(model, fn, args, ids, layer, dense_keys)))
        if "timing" not in args.skip and score in args.time_scores:
            dense_fn = compile_dense(model, args.inner)
            batch = {"input_ids": ids, "use_cache": True, "logits_to_keep": 1}
            t = time_per_batch({"dense": dense_fn, "pruned": fn}, batch, repeats=args.repeats)
            times.append((score, keep, t["dense"], t["pruned"]))
    return rows, stable, times


def plot(rows: list, args, path: str) -> None:
    """Teacher-forced agreement against the fraction of the prompt pruned: one series per (score,
    cut layer), the marker shape tells the layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    markers = dict(zip(sorted(args.at), "osD^v"))
    for score in args.scores:
        for at in sorted(args.at):
            pts = sorted((1 - r[2], r[4]) for r in rows if r[0] == score and r[1] == at)
            if pts:
                ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker=markers.get(at, "o"),
                        label=f"{score}, after layer {at}", ls="--" if score == "random" else "-")
    ax.axhline(95, color="0.7", ls=":", lw=0.8)
    ax.set_xlabel("fraction of the prompt pruned")
    ax.set_ylabel(f"top-1 agreement, {args.agree} teacher-forced positions (%)")
    ax.set_title(f"tokred prune on SmolLM2-135M, {args.prompts} x {args.length}-token prompts", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--length", type=int, default=256, help="prompt tokens (the issue's target: 2048)")
    parser.add_argument("--continuation", type=int, default=64, help="true continuation tokens for perplexity")
    parser.add_argument("--agree", type=int, default=16, help="teacher-forced positions compared for agreement")
    parser.add_argument("--keep", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    parser.add_argument("--at", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--scores", nargs="+", default=["query", "transition", "random"], choices=SCORES)
    parser.add_argument("--protect-last", type=int, default=16)
    parser.add_argument("--perturb", type=float, default=0.02, help="fraction of prompt tokens replaced")
    parser.add_argument("--perturb-seeds", type=int, default=2)
    parser.add_argument("--sweep-scores", nargs="*", default=["query"], choices=SCORES,
                        help="scores also run over --keep and --at around the target")
    parser.add_argument("--time-scores", nargs="*", default=["query"], choices=SCORES,
                        help="scores whose prefill is timed against the dense model at the target")
    parser.add_argument("--full-grid", action="store_true", help="every score at every keep and at")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--inner", default="eager", choices=["eager", "aot_eager", "inductor"],
                        help="tokred's inner compiler (and the dense model's compiler unless eager)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip", nargs="*", default=[], choices=["stability", "timing"])
    args = parser.parse_args()
    torch.manual_seed(0)
    start = time.time()
    model, tokenizer = load_causal_lm("smollm2")
    model = model.to(args.device)
    ids, cont = prompts(tokenizer, args.prompts, args.length, args.continuation, args.device)
    dense = evaluate(model, model, ids, cont, args.agree)
    dense_ppl = math.exp(dense["nll"].mean().item())
    rows, stable, times = run(model, args, ids, cont, dense)
    minutes = (time.time() - start) / 60

    cmd = "python bench/prune_llm.py " + " ".join(sys.argv[1:])
    lines = ["# Token pruning of a decoder's prompt: SmolLM2-135M", "",
             f"`{cmd.strip()}` (torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads, "
             f"tokred inner compiler {args.inner}; {minutes:.1f} min on a shared, heavily loaded 2-core machine: "
             "timings are noisy)", "",
             f"{args.prompts} Wikipedia prompts of {args.length} tokens (batched), protect_last={args.protect_last}. "
             f"Dense perplexity of the next {args.continuation} true tokens: **{dense_ppl:.2f}**. "
             f"`next`: greedy next token equal to the dense model's (over {args.prompts} prompts); "
             f"`tf-agree`: top-1 equal to dense over {args.agree} teacher-forced positions through the pruned "
             f"cache; `ppl`: perplexity of the {args.continuation} true continuation tokens through the pruned "
             "cache; FLOPs ratio from the tokred report (prefill graph). The control row keeps every token "
             "(keep=1.0) and must reproduce the dense numbers. With "
             f"{args.prompts} x {args.agree} teacher-forced positions, one position is "
             f"{100 / (args.prompts * args.agree):.1f} points of tf-agree.", ""]
    if rows:
        lines += ["| score | at | keep | next | tf-agree | ppl | FLOPs ratio |", "|---|---|---|---|---|---|---|"]
        for score, at, keep, nxt, agree, ppl, fl in rows:
            lines.append(f"| {score} | {at} | {keep} | {100 * nxt:.0f}% | {100 * agree:.1f}% | {ppl:.2f} | {fl:.3f} |")
        target = [r for r in rows if r[1] == TARGET["at"] and r[2] == TARGET["keep"]]
        if target:
            lines += ["", f"Target (keep={TARGET['keep']}, at={TARGET['at']}: >= 95% agreement): " + ", ".join(
                f"{r[0]} {100 * r[4]:.1f}% ({'met' if r[4] >= 0.95 else 'NOT met'})" for r in target)]
    if times:
        lines += ["", f"Prefill time (time to first token), at={TARGET['at']}, dense and pruned called alternately, "
                  f"median of {args.repeats}; dense: " + ("the plain eager model" if args.inner == "eager" else
                  f"compiled by {args.inner}") + f"; pruned: tokred with inner compiler {args.inner}:", "",
                  "| score | keep | dense s | pruned s | speedup |", "|---|---|---|---|---|"]
        for score, keep, td, tp in times:
            lines.append(f"| {score} | {keep} | {td:.2f} | {tp:.2f} | {td / tp:.2f}x |")
    if stable:
        lines += ["", f"Ranking stability at keep={TARGET['keep']}, at={TARGET['at']}: Jaccard overlap of the kept "
                  f"sets (read back from the pruned cache), prompt vs {args.perturb_seeds} perturbed copies with "
                  f"{100 * args.perturb:.0f}% of the tokens replaced by random tokens:", "",
                  "| score | mean Jaccard | min Jaccard |", "|---|---|---|"]
        for score, mean, low in stable:
            lines.append(f"| {score} | {mean:.3f} | {low:.3f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "prune_llm.md"), "w") as f:
        f.write(text)
    if rows:
        plot(rows, args, os.path.join(RESULTS, "prune_llm.png"))


if __name__ == "__main__":
    main()
