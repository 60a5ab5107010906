"""Token pruning of a real decoder's prompt: SmolLM2-135M agreement, perplexity, TTFT and decode speed.

    python bench/prune_llm.py [--prompts 8] [--length 2048] [--chunk 4] [--keep 0.25 0.5 0.75] [--at 1 2 4]
                              [--scores query transition random] [--inner eager|aot_eager|inductor]
                              [--time-inner inductor] [--new-tokens 32] [--repeats 3]
                              [--perturb 0.02] [--perturb-seeds 2] [--stability-prompts 4] [--threads 2]
                              [--query-rows 64] [--accumulate 1] [--pool 11] [--protect-last 16]

SmolLM2-135M (LlamaForCausalLM, 30 layers, real weights, fp32) reads Wikipedia prompts of
``--length`` tokens (extracts joined, ``tokred.tools.offline.wiki_token_ids``); the prompt prefill is
pruned by tokred (prune={"keep", "at", "score", "protect_last", "query", "accumulate", "pool"}) and
the pruned KV cache (N tokens up to the cut, M after it) is then used for:

- next-token agreement (the issue's metric): the greedy token after the prompt, pruned vs dense;
- teacher-forced agreement over the next ``--agree`` positions (stricter): the true continuation
  is fed through the pruned cache, and the argmax at each position is compared with the dense one;
- perplexity of the true continuation (``--continuation`` tokens) read through the pruned cache;
- time to first token and decode tokens/s: ``model.generate`` (greedy, ``--new-tokens``) of
  transformers on the dense model and on the pruned model, both compiled by ``--time-inner``
  (dense: torch.compile with that backend; pruned: tokred with that inner compiler), called
  alternately, median of ``--repeats``; the pruned model decodes on its pruned cache;
- ranking stability ("Less Is More, Until It Breaks"): the kept sets of each scorer for the prompt
  and for the prompt with ``--perturb`` of its tokens replaced by random tokens; Jaccard overlap.

The quality runs use ``--inner`` (eager by default: the pass's graph run as it is, no compile time;
the inner compiler does not change which tokens are kept beyond float noise), in batches of
``--chunk`` prompts. The continuation is fed in one chunk through the model's own decoder layers
with an explicit mask (each new token reads every cached token and the new tokens before it, at
positions N, N+1, ...), which is what step-by-step decoding on the pruned cache computes. The kept
positions are read back from the pruned cache itself: the keys of the layer after the cut are
those of the kept tokens, equal to the dense keys at their original positions, so each is matched
to its position. Writes bench/results/prune_llm.md and prune_llm.png.
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
from bench.common import load_average  # noqa: E402
from tokred.tools.offline import load_causal_lm, wiki_token_ids  # noqa: E402

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


def chunks(t: torch.Tensor, size: int) -> list:
    """t [P, ...] split along dim 0 into pieces of ``size`` rows (the last may be shorter)."""
    return list(torch.split(t, size, dim=0))


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


def evaluate_chunk(model, fn, ids: torch.Tensor, cont: torch.Tensor, n_agree: int) -> dict:
    """Prefill ids [p, N] with ``fn``, then the continuation cont [p, T] through its cache.

    -> {"next": [p] greedy next token, "pred": [p, n_agree] argmax predictions of continuation
    tokens 0..n_agree-1 (teacher-forced), "nll": [p] mean negative log-likelihood of the
    continuation}.
    """
    last, cache = prefill(fn, ids)
    with torch.no_grad():
        logits = continue_through_cache(model, cont[:, :-1], cache, ids.shape[1]).float()
    preds = torch.cat([last[:, None], logits], dim=1)  # [p, T, V]: prediction of continuation token t
    nll = torch.nn.functional.cross_entropy(preds.transpose(1, 2), cont, reduction="none").mean(1)
    return {"next": last.argmax(-1), "pred": preds[:, :n_agree].argmax(-1), "nll": nll}


def evaluate(model, fn, ids: torch.Tensor, cont: torch.Tensor, n_agree: int, chunk: int) -> dict:
    """:func:`evaluate_chunk` over batches of ``chunk`` prompts, results joined along dim 0 ([P, ...])."""
    parts = [evaluate_chunk(model, fn, i, c, n_agree) for i, c in zip(chunks(ids, chunk), chunks(cont, chunk))]
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


def kept_positions(dense_keys: torch.Tensor, pruned_keys: torch.Tensor) -> list:
    """Original positions of the tokens a pruned layer cached: each pruned key row [P, Hkv, M, D]
    matched to the nearest dense key row [P, Hkv, N, D] of the same layer. -> P sets."""
    p = dense_keys.shape[0]
    dense = dense_keys.transpose(1, 2).reshape(p, dense_keys.shape[2], -1).float()
    pruned = pruned_keys.transpose(1, 2).reshape(p, pruned_keys.shape[2], -1).float()
    dist = torch.cdist(pruned, dense)  # [P, M, N]
    two = dist.topk(2, dim=-1, largest=False)  # the nearest and the runner-up dense key
    best, runner_up = two.values[..., 0], two.values[..., 1]
    # float noise of a 2k prefill (batched, eager vs the pass's graph) moves keys by ~1e-3 of their
    # norm; another token's key is O(norm) away: a match must be near and unambiguous
    scale = dense.norm(dim=-1).mean()
    assert (best < 1e-2 * scale).all() and (best < 0.1 * runner_up).all(), \
        f"a pruned key matches no dense key unambiguously (nearest {best.max():.3g}, key norm {scale:.3g})"
    return [set(row.tolist()) for row in two.indices[..., 0]]


def layer_keys(fn, ids: torch.Tensor, layer: int, chunk: int) -> torch.Tensor:
    """The cached keys [P, Hkv, N_layer, D] of ``layer`` after a prefill of ids [P, N] by ``fn``."""
    return torch.cat([prefill(fn, part)[1].layers[layer].keys.clone() for part in chunks(ids, chunk)])


def jaccard(a: set, b: set) -> float:
    return len(a & b) / max(1, len(a | b))


def compile_pruned(model, prune: dict, inner: str):
    torch._dynamo.reset()
    backend = tokred.backend(inner=inner, prune=prune)
    return torch.compile(model, backend=backend), backend


# ----------------------------------------------------------------------------- generation timing

class TokenClock:
    """A transformers streamer that notes the time each generated token reaches the host.

    ``generate`` first puts the prompt, then each new token (batch 1); ``times`` holds the
    perf_counter of each new token."""

    def __init__(self):
        self.times: list = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if self._prompt_seen:
            self.times.append(time.perf_counter())
        self._prompt_seen = True

    def end(self) -> None:
        pass


def timed_generate(model, forward, ids: torch.Tensor, new_tokens: int) -> dict:
    """Greedy ``model.generate`` of exactly ``new_tokens`` tokens after ids [1, N], with the model's
    forward replaced by ``forward`` (a torch.compile wrapper of it).

    -> {"tokens": [new_tokens] generated ids, "ttft": s from the call to the first token,
    "decode": tokens/s of tokens 2..new_tokens (decode steps on the prefill's cache),
    "total": new_tokens / s of the whole call, "cached": tokens in the first and last layer's cache}.
    """
    clock = TokenClock()
    model.forward = forward
    try:
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, streamer=clock,
                                 pad_token_id=model.config.eos_token_id, return_dict_in_generate=True)
        end = time.perf_counter()
    finally:
        del model.forward
    times = clock.times
    layers = out.past_key_values.layers
    return {"tokens": out.sequences[0, ids.shape[1]:], "ttft": times[0] - start,
            "decode": (len(times) - 1) / (times[-1] - times[0]), "total": len(times) / (end - start),
            "cached": (layers[0].keys.shape[2], layers[-1].keys.shape[2])}


def dense_entry(model):
    """A function calling ``model.forward``, for torch.compile of the dense model. Dense and pruned
    models are compiled through two different Python functions: dynamo's automatic dynamic shapes
    are remembered per function, and the decode steps of one (a token count that changes) must not
    make the other's prefill compile with a symbolic token count (tokred prunes static counts only)."""
    forward = model.forward
    return lambda *args, **kwargs: forward(*args, **kwargs)


def pruned_entry(model):
    """As :func:`dense_entry`, a second function for the pruned model (its prefill and decode steps)."""
    forward = model.forward
    return lambda *args, **kwargs: forward(*args, **kwargs)


def generation_timing(model, ids: torch.Tensor, prune: dict, args) -> dict:
    """Dense vs pruned ``model.generate`` on one prompt ids [1, N], both compiled by
    ``args.time_inner`` and called alternately (one warm-up call each compiles the prefill and
    the decode graphs). -> {"dense"|"pruned": {"ttft", "decode", "total": medians, "tokens",
    "cached"}, "report": the pruned prefill's tokred report, "compile_s": warm-up s per model}."""
    torch._dynamo.reset()
    backend = tokred.backend(inner=args.time_inner, prune=prune)
    forwards = {"dense": torch.compile(dense_entry(model), backend=args.time_inner),
                "pruned": torch.compile(pruned_entry(model), backend=backend)}
    runs = {name: [] for name in forwards}
    compile_s = {}
    for name, forward in forwards.items():  # warm-up: prefill + decode graphs compiled
        start = time.perf_counter()
        timed_generate(model, forward, ids, args.new_tokens)
        compile_s[name] = time.perf_counter() - start
    for _ in range(args.repeats):
        for name, forward in forwards.items():
            runs[name].append(timed_generate(model, forward, ids, args.new_tokens))
    prefill_report = backend.reports[0]  # the first graph tokred compiled: the prefill
    if len(backend.reports) > 4:  # the prefill, the first step, one step with a symbolic cache length
        raise SystemExit(f"tokred compiled {len(backend.reports)} graphs for {args.repeats + 1} generate calls: "
                         "the decode steps recompiled")
    if not prefill_report.changed:
        raise SystemExit("the pruned prefill inside generate was not rewritten: " + "; ".join(
            s.reason or s.status for s in prefill_report.attention_sites[:3]))
    n = ids.shape[1] + args.new_tokens - 1  # cached after generate: the prompt and all but the last token
    for name, rs in runs.items():  # every timed call ran the graph it should: full cache / pruned cache
        for r in rs:
            first, last = r["cached"]
            if first != n or (last < n) != (name == "pruned"):
                raise SystemExit(f"{name} generate cached {first} tokens in layer 0 and {last} in the last layer "
                                 f"(expected {n}, and fewer in the last layer only when pruned)")
    median = lambda values: sorted(values)[len(values) // 2]  # noqa: E731
    out = {name: {key: median([r[key] for r in rs]) for key in ("ttft", "decode", "total")}
           | {"tokens": rs[0]["tokens"], "cached": rs[0]["cached"]} for name, rs in runs.items()}
    return out | {"report": prefill_report, "compile_s": compile_s, "graphs": len(backend.reports)}


# ----------------------------------------------------------------------------- the bench

def grid(args) -> list:
    """(score, at, keep) variants: every score at the target; the keep and at sweeps for
    ``--sweep-scores`` (the whole keep x at grid for every score with --full-grid)."""
    if args.full_grid:
        return [(s, a, k) for s in args.scores for a in args.at for k in args.keep]
    out = [(s, TARGET["at"], TARGET["keep"]) for s in args.scores]
    if args.pool > 1:  # what the pooling brings: the same scorer without it
        out += [(f"{s}, pool 1", TARGET["at"], TARGET["keep"]) for s in args.sweep_scores]
    for s in args.sweep_scores:
        out += [(s, TARGET["at"], k) for k in args.keep if k != TARGET["keep"]]
        out += [(s, a, TARGET["keep"]) for a in args.at if a != TARGET["at"]]
    return out


def stability(fn, args, variants: list, layer: int, dense_keys: list) -> tuple:
    """(mean, min) Jaccard of the kept sets of ``fn`` (a pruned model cutting after ``layer - 1``),
    prompt vs its perturbed copies (``variants``: the prompt ids first); ``dense_keys``: the dense
    keys of ``layer`` for each variant."""
    kept = [kept_positions(dk, layer_keys(fn, v, layer, args.chunk)) for dk, v in zip(dense_keys, variants)]
    scores = [jaccard(a, b) for other in kept[1:] for a, b in zip(kept[0], other)]
    return sum(scores) / len(scores), min(scores)


def run(model, args, ids, cont, dense: dict) -> tuple:
    """Every variant: compiled once, then its quality; at the target cut also its ranking
    stability (on the first ``--stability-prompts`` prompts).

    -> (rows (score, at, keep, next agree, tf agree, ppl, FLOPs ratio), stability rows (score,
    mean, min)).
    """
    from tqdm import tqdm

    layer = TARGET["at"] + 1  # the first layer that caches only the kept tokens
    base = ids[:args.stability_prompts]
    variants = [base] + [perturbed(base, args.perturb, args.protect_last, model.config.vocab_size, seed)
                         for seed in range(args.perturb_seeds)]
    dense_keys = [] if "stability" in args.skip else [layer_keys(model, v, layer, args.chunk) for v in variants]
    rows, stable = [], []
    control = [("control: " + args.scores[0], TARGET["at"], 1.0)]  # keep everything: must equal dense
    for score, at, keep in tqdm(control + grid(args), desc="pruned variants"):
        name = score.split(": ")[-1]
        fn, backend = compile_pruned(model, prune_options(args, name, keep, at), args.inner)
        res = evaluate(model, fn, ids, cont, args.agree, args.chunk)
        report = backend.report
        if not report.changed:
            raise SystemExit(f"prune {prune_options(args, name, keep, at)} rewrote nothing: " + "; ".join(
                s.reason or s.status for s in report.attention_sites))
        rows.append((score, at, keep, (res["next"] == dense["next"]).float().mean().item(),
                     (res["pred"] == dense["pred"]).float().mean().item(), math.exp(res["nll"].mean().item()),
                     report.flops_after / report.flops_before))
        if at == TARGET["at"] and keep == TARGET["keep"] and not score.startswith("control") \
                and "stability" not in args.skip:
            stable.append((score, *stability(fn, args, variants, layer, dense_keys)))
    torch._dynamo.reset()
    return rows, stable


def prune_options(args, score: str, keep: float, at: int) -> dict:
    """The tokred prune options of one variant; ``score`` is a scorer, or "<scorer>, pool P" for
    another pooling window than ``--pool``."""
    score, _, pool = score.partition(", pool ")
    pool = int(pool) if pool else args.pool
    opts = {"keep": keep, "at": at, "score": score, "protect_last": args.protect_last}
    if score in ("query", "transition") and pool > 1:
        opts["pool"] = pool
    if score == "query" and args.query_rows > 1:
        opts["query"] = args.query_rows
    if score in ("query", "transition") and args.accumulate > 1 and at + 1 >= args.accumulate:
        opts["accumulate"] = args.accumulate
    return opts


def plot(rows: list, args, path: str) -> None:
    """Teacher-forced agreement and continuation perplexity against the fraction of the prompt
    pruned: one series per (score, cut layer), the marker shape tells the layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    markers = dict(zip(sorted(args.at), "osD^v"))
    for score in args.scores:
        for at in sorted(args.at):
            pts = sorted((1 - r[2], r[4], r[5]) for r in rows if r[0] == score and r[1] == at)
            if pts:
                style = dict(marker=markers.get(at, "o"), label=f"{score}, after layer {at}",
                             ls="--" if score == "random" else "-")
                left.plot([p[0] for p in pts], [100 * p[1] for p in pts], **style)
                right.plot([p[0] for p in pts], [p[2] for p in pts], **style)
    control = [r for r in rows if r[0].startswith("control")]
    left.axhline(95, color="0.7", ls=":", lw=0.8)
    if control:
        right.axhline(control[0][5], color="0.5", ls=":", lw=0.8, label="dense")
    left.set_xlabel("fraction of the prompt pruned")
    left.set_ylabel(f"top-1 = dense, {args.agree} teacher-forced positions (%)")
    right.set_xlabel("fraction of the prompt pruned")
    right.set_ylabel(f"perplexity of the {args.continuation} true next tokens")
    fig.suptitle(f"tokred prune on SmolLM2-135M, {args.prompts} Wikipedia prompts x {args.length} tokens", fontsize=10)
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def timing_lines(timing: dict, args, prune: dict) -> list:
    """The md lines of the generation timing."""
    dense, pruned = timing["dense"], timing["pruned"]
    same = (dense["tokens"] == pruned["tokens"]).long()
    prefix = int(same.cumprod(0).sum())
    compiler = ("inductor" if args.time_inner == "inductor" else args.time_inner)
    lines = ["", f"Generation on prompt 0 ({args.length} tokens, batch 1): transformers `model.generate` (greedy, "
             f"{args.new_tokens} new tokens) with the model's forward compiled by torch.compile: dense with backend "
             f"{compiler}; pruned: by tokred (prune={prune}, inner compiler {args.time_inner}): the prefill "
             "pruned, the decode steps (one query token, nothing to prune) on the pruned cache passed through "
             f"({timing['graphs']} graphs compiled by tokred in all: the prefill, the first step, one step with a "
             f"symbolic cache length). The two called alternately, median of {args.repeats} after one warm-up "
             f"call each (warm-up incl. compile: dense {timing['compile_s']['dense']:.0f} s, pruned "
             f"{timing['compile_s']['pruned']:.0f} s). TTFT: from the call to the first token; decode: tokens 2.."
             f"{args.new_tokens} per second; end-to-end: {args.new_tokens} tokens / whole call.", "",
             "| model | TTFT s | decode tok/s | end-to-end tok/s |", "|---|---|---|---|"]
    for name, t in (("dense", dense), ("pruned", pruned)):
        lines.append(f"| {name} | {t['ttft']:.2f} | {t['decode']:.1f} | {t['total']:.2f} |")
    lines += ["", f"**TTFT speedup (dense / pruned): {dense['ttft'] / pruned['ttft']:.2f}x** (target >= 1.4x: "
              f"{'met' if dense['ttft'] / pruned['ttft'] >= 1.4 else 'NOT met'}); decode tokens/s pruned / dense: "
              f"{pruned['decode'] / dense['decode']:.2f}x. FLOPs ratio of the pruned prefill graph (tokred report): "
              f"{timing['report'].flops_after / timing['report'].flops_before:.3f}. Generated tokens equal to "
              f"dense's: {int(same.sum())} of {args.new_tokens} (identical prefix: {prefix}). Cache after generate, "
              f"first / last layer: dense {dense['cached'][0]} / {dense['cached'][1]} tokens, pruned "
              f"{pruned['cached'][0]} / {pruned['cached'][1]}."]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--length", type=int, default=2048, help="prompt tokens (the issue's target: 2048)")
    parser.add_argument("--chunk", type=int, default=4, help="prompts per batch in the quality runs")
    parser.add_argument("--continuation", type=int, default=64, help="true continuation tokens for perplexity")
    parser.add_argument("--agree", type=int, default=16, help="teacher-forced positions compared for agreement")
    parser.add_argument("--keep", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    parser.add_argument("--at", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--scores", nargs="+", default=["query", "transition", "random"], choices=SCORES)
    parser.add_argument("--protect-last", type=int, default=16)
    parser.add_argument("--query-rows", type=int, default=64,
                        help="score 'query': the attention of the last this many prompt tokens (1: the last token, FastV)")
    parser.add_argument("--accumulate", type=int, default=1,
                        help="scores 'query' and 'transition': combine the scores of this many blocks ending at the cut")
    parser.add_argument("--pool", type=int, default=11,
                        help="scores 'query' and 'transition': average each score over this many neighbouring "
                             "positions (SnapKV's clustering; 1: none); the target also runs without it")
    parser.add_argument("--perturb", type=float, default=0.02, help="fraction of prompt tokens replaced")
    parser.add_argument("--perturb-seeds", type=int, default=2)
    parser.add_argument("--stability-prompts", type=int, default=4, help="prompts in the ranking-stability test")
    parser.add_argument("--sweep-scores", nargs="*", default=["query"], choices=SCORES,
                        help="scores also run over --keep and --at around the target")
    parser.add_argument("--time-score", default="query", choices=SCORES,
                        help="the score of the pruned model timed against the dense model at the target")
    parser.add_argument("--full-grid", action="store_true", help="every score at every keep and at")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated in the timing")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--inner", default="eager", choices=["eager", "aot_eager", "inductor"],
                        help="tokred's inner compiler in the quality runs")
    parser.add_argument("--time-inner", default="inductor", choices=["eager", "aot_eager", "inductor"],
                        help="the compiler of both models in the timing (tokred's inner compiler for the pruned one)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip", nargs="*", default=[], choices=["stability", "timing", "quality"])
    args = parser.parse_args()
    for name in ("prompts", "length", "chunk", "new_tokens", "repeats", "stability_prompts"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.new_tokens < 2:
        parser.error("--new-tokens must be >= 2 (decode tokens/s needs a second token)")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_before = load_average()
    start = time.time()
    model, tokenizer = load_causal_lm("smollm2")
    model = model.to(args.device)
    ids, cont = prompts(tokenizer, args.prompts, args.length, args.continuation, args.device)
    rows, stable, timing = [], [], None
    dense_ppl = None
    time_prune = prune_options(args, args.time_score, TARGET["keep"], TARGET["at"])
    if "timing" not in args.skip:  # first: the longest compile, and the figure most sensitive to load
        timing = generation_timing(model, ids[:1], time_prune, args)
    if "quality" not in args.skip:
        dense = evaluate(model, model, ids, cont, args.agree, args.chunk)
        dense_ppl = math.exp(dense["nll"].mean().item())
        rows, stable = run(model, args, ids, cont, dense)
    minutes = (time.time() - start) / 60
    load_after = load_average()

    cmd = "python bench/prune_llm.py " + " ".join(sys.argv[1:])
    lines = ["# Token pruning of a decoder's prompt: SmolLM2-135M", "",
             f"`{cmd.strip()}` (torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads, "
             f"quality runs with tokred inner compiler {args.inner}"
             + (f", timing with {args.time_inner}" if timing else "") + f"; {minutes:.1f} min "
             f"on a 2-core machine shared with other work. `uptime` before: `{load_before}`; after: `{load_after}`)",
             ""]
    if rows:
        n_tf = args.prompts * args.agree
        lines += [f"{args.prompts} Wikipedia prompts of {args.length} tokens (extracts joined; batches of {args.chunk}), "
                  f"protect_last={args.protect_last}; score `query` reads the attention of the last "
                  f"{args.query_rows} prompt token{'s' if args.query_rows > 1 else ''}"
                  + (f"; `query` and `transition` combine the scores of the {args.accumulate} blocks ending at the cut"
                     if args.accumulate > 1 else "")
                  + (f"; `query` and `transition` average each token's score over the {args.pool} positions "
                     f"centred on it (`pool={args.pool}`, SnapKV's clustering; rows `, pool 1`: without it)"
                     if args.pool > 1 else "") + f". Dense perplexity of the next {args.continuation} true tokens: "
                  f"**{dense_ppl:.2f}**. `next`: the greedy next token after the prompt equal to the dense model's "
                  f"(the issue's next-token agreement; {args.prompts} prompts, one prompt is "
                  f"{100 / args.prompts:.1f} points); `tf-agree` (stricter): top-1 equal to dense over {args.agree} "
                  f"teacher-forced positions of the true continuation through the pruned cache ({n_tf} positions, "
                  f"one is {100 / n_tf:.2f} points); `ppl`: perplexity of the {args.continuation} true continuation "
                  "tokens through the pruned cache; FLOPs ratio from the tokred report (prefill graph). The control "
                  "row keeps every token (keep=1.0) and must reproduce the dense numbers.", "",
                  "| score | at | keep | next | tf-agree | ppl | FLOPs ratio |", "|---|---|---|---|---|---|---|"]
        for score, at, keep, nxt, agree, ppl, fl in rows:
            lines.append(f"| {score} | {at} | {keep} | {100 * nxt:.1f}% | {100 * agree:.1f}% | {ppl:.2f} | {fl:.3f} |")
        target = [r for r in rows if r[1] == TARGET["at"] and r[2] == TARGET["keep"]]
        if target:
            lines += ["", f"Target (keep={TARGET['keep']}, at={TARGET['at']}: >= 95% next-token agreement): " + ", ".join(
                f"{r[0]} next {100 * r[3]:.1f}% ({'met' if r[3] >= 0.95 else 'NOT met'}), tf-agree {100 * r[4]:.1f}% "
                f"({'met' if r[4] >= 0.95 else 'NOT met'})" for r in target)]
    if timing:
        lines += timing_lines(timing, args, time_prune)
    if stable:
        lines += ["", f"Ranking stability at keep={TARGET['keep']}, at={TARGET['at']}: Jaccard overlap of the kept "
                  f"sets (read back from the pruned cache) of the first {min(args.stability_prompts, args.prompts)} "
                  f"prompts, each vs {args.perturb_seeds} perturbed copies with {100 * args.perturb:.0f}% of the "
                  "tokens replaced by random tokens:", "",
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
