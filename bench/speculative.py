"""Speculative decoding speed: tokred.generate against transformers' generate, side by side, one run.

    python bench/speculative.py                      # SmolLM2-135M, 6 prompts x 64 new tokens (~10 min, 1 thread)
    python bench/speculative.py --prompts 12 --new-tokens 128 --exit-layer 12 --threads 0
    python bench/speculative.py --qwen               # Qwen2.5-Coder 1.5B target, 0.5B draft (slow: ~7 GB fp32)
    python bench/speculative.py --profile            # where decode time goes; what bounds prompt lookup

Prompts are input-grounded: Wikipedia lead extracts (``tokred.tools.offline.wiki_texts``) inside the
model's chat template, asking to summarise the text, to continue it, or to answer from it. Every
method decodes greedily from the same prompts; methods alternate prompt by prompt (the order
rotates), so a loaded machine slows them alike. Methods (SmolLM2):

    tokred plain          tokred.generate(draft=None)
    hf plain              model.generate(do_sample=False)
    tokred prompt_lookup  tokred.generate(draft="prompt_lookup", k=--lookup-k, ngram=--ngram, min_ngram=--min-ngram)
    hf prompt_lookup      model.generate(prompt_lookup_num_tokens=--hf-lookup-tokens)
    tokred early_exit     tokred.generate(draft="early_exit", exit_layer=L)   (L from a quick sweep)
    tokred early_exit, own cache   the same with EarlyExitDraft(share_cache=False)
    hf early_exit         model.generate(assistant_early_exit=L)

On CPU, tokred's target is the model compiled by tokred with ``cpu_linear="onednn"`` (inner
compiler "eager": Dynamo's graph, the projections of multi-token forwards as oneDNN linears on
weights packed once; one-token steps keep their kernels), for tokred plain and tokred prompt_lookup
alike, so the ratio between them compares the same forwards; ``--cpu-linear off`` runs them on the
model as loaded. The transformers rows and tokred's early-exit rows (whose draft hooks the
model's own modules) always use the model as loaded.

``--qwen``: tokred.generate(draft=<0.5B model>) against model.generate(assistant_model=<0.5B>), and
both plain. Tokens/s is new tokens over wall time, summed over the prompts. Every method's output
is compared with tokred's plain greedy output (and transformers' plain with it); mismatches are
reported. Writes bench/results/speculative.md (or speculative_qwen.md) with the command.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tokred  # noqa: E402
from tokred.compat.transformers_api import cache_argument  # noqa: E402
from tokred.runtime.generate import generate  # noqa: E402
from tokred.runtime.drafters import EarlyExitDraft  # noqa: E402
from tokred.runtime.speculative import crop_tail, model_config, new_cache, next_k, prompt_lookup  # noqa: E402
from tokred.tools.offline import load_causal_lm, wiki_texts  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
TASKS = {
    "summarise": "Summarise the following text in a few sentences, using its own words.\n\n{text}",
    "continue": "Here is the start of an encyclopedia article:\n\n{text}\n\nRepeat its last sentence, "
                "then continue the article.",
    "answer": "Read the text and answer the question using only the text.\n\nText: {text}\n\n"
              "Question: What is the text about, and what are its key facts? Quote the text.",
}
TARGETS = {"prompt_lookup": 1.8, "early_exit": 1.3, "draft_model": None}


# ----------------------------------------------------------------------------- prompts

def build_prompts(tokenizer, n: int, max_chars: int, device: str = "cpu", seed: int = 0) -> list:
    """n chat-template prompts [1, T] cycling over TASKS, each with its own Wikipedia extract."""
    texts = [t for t in wiki_texts(seed) if len(t) >= max_chars // 2]
    prompts = []
    for i in range(n):
        task = list(TASKS)[i % len(TASKS)]
        text = texts[i][:max_chars].rsplit(" ", 1)[0]
        messages = [{"role": "user", "content": TASKS[task].format(text=text)}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
        ids = ids if torch.is_tensor(ids) else ids["input_ids"]
        prompts.append((task, ids.to(device)))
    return prompts


# ----------------------------------------------------------------------------- methods

def tokred_method(model, **kwargs):
    def run(ids, new_tokens, eos):
        result = generate(model, ids, new_tokens, eos_token_id=eos, progress=False, **kwargs)
        return result.sequences, result.stats
    return run


def hf_method(model, **kwargs):
    def run(ids, new_tokens, eos):
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 do_sample=False, eos_token_id=eos, pad_token_id=eos, **kwargs)
        return out, None
    return run


def tokred_target(model, args, prompts: list, eos: int):
    """The model tokred's plain and prompt-lookup rows run: ``model`` itself, or (``--cpu-linear
    onednn`` on CPU) ``model`` compiled by tokred with the cpu_linear pass, warmed up so that the
    timed runs compile nothing. Returns (model, backend or None, warm-up seconds, a sentence for
    the results)."""
    if args.cpu_linear == "off" or args.device != "cpu":
        why = "--cpu-linear off" if args.cpu_linear == "off" else f"device {args.device}"
        return model, None, 0.0, f"tokred plain and prompt_lookup run the model as loaded ({why})."
    backend = tokred.backend(inner="eager", cpu_linear=args.cpu_linear)
    # Past Dynamo's recompile limit (8 graphs per frame) the model would run uncompiled, unnoticed;
    # generate needs ~7 graphs, the profile's bare forwards (logits_to_keep 0 and 1) a few more.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    compiled = torch.compile(model, backend=backend, dynamic=None)
    start = time.perf_counter()
    # Graphs: the prefill (static, then a dynamic length from a second prompt), one-token steps,
    # multi-token verification steps, caches of every layout the rollbacks leave (Dynamo guards
    # strides). The timed runs repeat exactly these calls (same prompts, same lengths, greedy), so
    # running each of them once here leaves nothing for them to compile.
    from tqdm import tqdm

    for _, ids in tqdm(prompts, desc="cpu_linear warm-up", unit="prompt"):
        generate(compiled, ids, args.new_tokens, eos_token_id=eos, progress=False)
        generate(compiled, ids, args.new_tokens, draft="prompt_lookup", k=args.lookup_k, ngram=args.ngram,
                 min_ngram=args.min_ngram, eos_token_id=eos, progress=False)
    warm_s = time.perf_counter() - start
    notes = sorted({n for r in backend.reports for n in r.notes if n.startswith("cpu_linear")})
    sentence = (f"tokred plain and prompt_lookup run the model compiled by tokred with "
                f"`cpu_linear=\"{args.cpu_linear}\"` (inner compiler eager; {len(backend.reports)} graphs captured "
                f"in a {warm_s:.0f} s warm-up; per graph: " + "; ".join(notes) + ").")
    return compiled, backend, warm_s, sentence


def new_tokens_of(sequences: torch.Tensor, prompt_len: int, eos: int) -> list:
    """The generated tokens up to and including the first eos."""
    out = sequences[0, prompt_len:].tolist()
    return out[:out.index(eos) + 1] if eos in out else out


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_methods(methods: dict, prompts: list, new_tokens: int, eos: int, desc: str, device: str = "cpu") -> dict:
    """Run every method on every prompt, the method order rotating per prompt; per-method records."""
    from tqdm import tqdm

    records = {name: [] for name in methods}
    names = list(methods)
    bar = tqdm(total=len(prompts) * len(names), desc=desc, unit="run")
    for p, (task, ids) in enumerate(prompts):
        order = names[p % len(names):] + names[:p % len(names)]
        for name in order:
            synchronize(device)
            start = time.perf_counter()
            sequences, stats = methods[name](ids, new_tokens, eos)
            synchronize(device)
            seconds = time.perf_counter() - start
            records[name].append({"prompt": p, "task": task, "seconds": seconds, "stats": stats,
                                  "tokens": new_tokens_of(sequences, ids.shape[1], eos)})
            bar.update(1)
    bar.close()
    return records


def summarise(records: dict, reference: str) -> dict:
    """Per method: tokens/s over all prompts, mismatching prompts, acceptance statistics."""
    rows = {}
    for name, recs in records.items():
        tokens = sum(len(r["tokens"]) for r in recs)
        seconds = sum(r["seconds"] for r in recs)
        mismatches = [r["prompt"] for r, ref in zip(recs, records[reference]) if r["tokens"] != ref["tokens"]]
        stats = [r["stats"] for r in recs if r["stats"] is not None]
        proposed = sum(s.proposed for s in stats)
        rows[name] = {
            "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds if seconds else 0.0,
            "mismatches": mismatches,
            "acceptance_rate": sum(s.accepted for s in stats) / proposed if proposed else None,
            "mean_accepted_length": (sum(s.committed_in_decode for s in stats) / sum(s.row_steps for s in stats)
                                     if stats and sum(s.row_steps for s in stats) and proposed else None),
            "ttft": (sum(s.time_to_first_token_s for s in stats) / len(stats)) if stats else None,
        }
    return rows


def sweep_exit_layer(model, prompts: list, layers: list, new_tokens: int, eos: int, k: int) -> dict:
    """tokens/s and mean accepted length of tokred early_exit at each exit layer (short runs)."""
    from tqdm import tqdm

    out = {}
    for layer in tqdm(layers, desc="exit-layer sweep", unit="layer"):
        tokens = seconds = committed = steps = 0
        for _, ids in prompts:
            start = time.perf_counter()
            result = generate(model, ids, new_tokens, draft="early_exit", exit_layer=layer, k=k, eos_token_id=eos,
                              progress=False)
            seconds += time.perf_counter() - start
            tokens += len(new_tokens_of(result.sequences, ids.shape[1], eos))
            committed += result.stats.committed_in_decode
            steps += result.stats.row_steps
        out[layer] = {"tokens_per_s": tokens / seconds, "mean_accepted_length": committed / max(steps, 1)}
    return out


# ----------------------------------------------------------------------------- report

def fmt(value, spec: str, none: str = "n/a") -> str:
    return none if value is None else format(value, spec)


def table(rows: dict, baselines: dict) -> list:
    """Markdown rows; each method's ratio is over its library's plain greedy (tokred or hf)."""
    lines = ["| method | new tokens | s | tokens/s | vs tokred plain | vs hf plain | acceptance | "
             "accepted length | TTFT s | mismatches |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, r in rows.items():
        ratio_t = r["tokens_per_s"] / rows[baselines["tokred"]]["tokens_per_s"]
        ratio_h = r["tokens_per_s"] / rows[baselines["hf"]]["tokens_per_s"]
        mism = ", ".join(map(str, r["mismatches"])) if r["mismatches"] else "none"
        lines.append(f"| {name} | {r['tokens']} | {r['seconds']:.1f} | {r['tokens_per_s']:.2f} | {ratio_t:.2f}x | "
                     f"{ratio_h:.2f}x | {fmt(r['acceptance_rate'], '.2f')} | {fmt(r['mean_accepted_length'], '.2f')} | "
                     f"{fmt(r['ttft'], '.2f')} | {mism} |")
    return lines


def verdicts(rows: dict, pairs: list) -> list:
    """One line per (family, tokred method, hf method): the target and whether it was met."""
    lines = []
    plain = rows["tokred plain"]["tokens_per_s"]
    for family, ours, theirs in pairs:
        speedup = rows[ours]["tokens_per_s"] / plain
        target = TARGETS[family]
        vs_hf = rows[ours]["tokens_per_s"] / rows[theirs]["tokens_per_s"]
        met = [] if target is None else [f"target >= {target}x: {'met' if speedup >= target else 'NOT met'}"]
        met.append(f"vs transformers' {theirs}: {vs_hf:.2f}x ({'not slower' if vs_hf >= 1.0 else 'SLOWER'})")
        exact = "identical to plain greedy" if not rows[ours]["mismatches"] else \
            f"MISMATCH on prompts {rows[ours]['mismatches']}"
        lines.append(f"- **{ours}**: {speedup:.2f}x over tokred plain; {'; '.join(met)}; output {exact}.")
    return lines


def write(path: str, lines: list) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {path}")


def load_note(args) -> str:
    """How loaded the machine was: ratios are trustworthy (same prompts, interleaved), absolute
    tokens/s on a shared CPU are not."""
    return (f"Load average (1 min) of this machine at the start of the run: {args.load_at_start:.1f}, at the end: "
            f"{os.getloadavg()[0]:.1f}, on "
            f"{os.cpu_count()} cores (shared with other jobs: absolute tokens/s are noisy; ratios come from "
            "the same prompts in the same run, interleaved).")


def environment(args) -> str:
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"
    return (f"{where}, torch "
            f"{torch.__version__}, transformers {__import__('transformers').__version__}, fp32, batch 1, greedy")


# ----------------------------------------------------------------------------- main

def run_smollm2(args, command: str) -> None:
    model, tokenizer = load_causal_lm("smollm2")
    model.to(args.device)
    eos = tokenizer.eos_token_id
    prompts = build_prompts(tokenizer, args.prompts, args.max_chars, args.device)
    # warm-up: first calls pay one-time costs (allocator, transformers' lazy setup, the draft's capture)
    start = time.perf_counter()
    generate(model, prompts[0][1], 4, draft="early_exit", exit_layer=1, eos_token_id=eos, progress=False)
    capture_s = time.perf_counter() - start
    hf_method(model)(prompts[0][1], 2, eos)

    fast, fast_backend, _, fast_note = tokred_target(model, args, prompts, eos)
    graphs_before = len(fast_backend.reports) if fast_backend is not None else 0

    if args.exit_layer is None:
        sweep = sweep_exit_layer(model, prompts[:args.sweep_prompts], args.sweep_layers, args.sweep_tokens, eos,
                                 args.k)
        exit_layer = max(sweep, key=lambda layer: sweep[layer]["tokens_per_s"])
    else:
        sweep, exit_layer = {}, args.exit_layer

    methods = {
        "tokred plain": tokred_method(fast),
        "hf plain": hf_method(model),
        "tokred prompt_lookup": tokred_method(fast, draft="prompt_lookup", k=args.lookup_k, ngram=args.ngram,
                                               min_ngram=args.min_ngram),
        "hf prompt_lookup": hf_method(model, prompt_lookup_num_tokens=args.hf_lookup_tokens),
        "tokred early_exit": tokred_method(model, draft="early_exit", exit_layer=exit_layer, k=args.k),
        "tokred early_exit, own cache": tokred_method(
            model, draft=EarlyExitDraft(model, exit_layer, share_cache=False), k=args.k),
        "hf early_exit": hf_method(model, assistant_early_exit=exit_layer),
    }
    records = run_methods(methods, prompts, args.new_tokens, eos, "methods x prompts", args.device)
    if fast_backend is not None:
        late = len(fast_backend.reports) - graphs_before
        fast_note += (f" The timed runs compiled {late} more graph{'s' if late != 1 else ''}"
                      f"{' (their compile time is inside the tokred rows)' if late else ''}.")
    rows = summarise(records, "tokred plain")
    pairs = [("prompt_lookup", "tokred prompt_lookup", "hf prompt_lookup"),
             ("early_exit", "tokred early_exit", "hf early_exit")]
    hf_vs_tokred_plain = [r["prompt"] for r, ref in zip(records["hf plain"], records["tokred plain"])
                          if r["tokens"] != ref["tokens"]]

    lines = [f"# Speculative decoding, SmolLM2-135M-Instruct, {args.device.upper()}", "",
             f"`{command}`", "",
             f"{environment(args)}. {len(prompts)} prompts ({', '.join(TASKS)} over Wikipedia extracts of at most "
             f"{args.max_chars} characters, chat template; prompt lengths "
             f"{min(p[1].shape[1] for p in prompts)}-{max(p[1].shape[1] for p in prompts)} tokens), up to "
             f"{args.new_tokens} new tokens each (stopping at eos). Methods alternate prompt by prompt (rotating "
             f"order). tokred draft lengths: early exit k <= {args.k}, prompt lookup k <= {args.lookup_k} (adaptive "
             f"within [1, k]), n-gram from {args.ngram} down to {args.min_ngram}; transformers prompt lookup "
             f"`prompt_lookup_num_tokens={args.hf_lookup_tokens}`, assisted early exit with its default "
             "draft-length schedule.",
             "",
             fast_note + " transformers' rows and tokred's early-exit rows run the model as loaded.", "",
             load_note(args), ""]
    lines += table(rows, {"tokred": "tokred plain", "hf": "hf plain"})
    lines += ["", "Ratios of each method's tokens/s over plain greedy of tokred and of transformers. "
              "Acceptance = accepted drafts / proposed drafts; accepted length = tokens committed per target "
              "forward in decoding (accepted drafts + the target's own token); TTFT = time to first token "
              "(tokred's stats). transformers' assisted generation does not report acceptance here (n/a).", ""]
    lines += ["## Targets", ""] + verdicts(rows, pairs)
    lines.append(f"- transformers' plain greedy vs tokred plain greedy: "
                 f"{'identical' if not hf_vs_tokred_plain else 'differs on prompts ' + str(hf_vs_tokred_plain)}.")
    lines += ["", "## Early-exit layer", ""]
    if sweep:
        lines += [f"Sweep over exit layers (tokred early_exit, {args.sweep_prompts} prompts x {args.sweep_tokens} "
                  f"tokens, k <= {args.k}): chose **L = {exit_layer}** of {model.config.num_hidden_layers}.", "",
                  "| exit layer | tokens/s | accepted length |", "|---:|---:|---:|"]
        lines += [f"| {layer} | {s['tokens_per_s']:.2f} | {s['mean_accepted_length']:.2f} |" for layer, s in sweep.items()]
    else:
        lines.append(f"L = {exit_layer} of {model.config.num_hidden_layers} (given with --exit-layer).")
    lines += ["", f"The early-exit draft is SmolLM2's own first L layers + final norm + LM head, sliced from the "
              f"captured graph (first call, capture and analysis included: {capture_s:.1f} s); it writes its K/V of "
              "layers < L into the target's cache and the verification runs layers >= L only (each token runs "
              "layers < L once); `own cache` is the same draft with its own KV cache of layers < L "
              "(`share_cache=False`: the verification recomputes them). SmolLM2 was not "
              "trained for early exit (no LayerSkip), so its early layers predict the final token poorly; "
              "transformers' `assistant_early_exit` runs the same truncated "
              "model (same L)."]
    write(args.out or os.path.join(RESULTS, "speculative.md"), lines)
    for name, r in rows.items():
        print(f"{name:22s} {r['tokens_per_s']:7.2f} tok/s  {r['tokens_per_s'] / rows['tokred plain']['tokens_per_s']:.2f}x"
              f"  accepted length {fmt(r['mean_accepted_length'], '.2f')}  mismatches {r['mismatches'] or 'none'}")


def run_qwen(args, command: str) -> None:
    target, tokenizer = load_causal_lm("qwen-coder-1.5b")
    draft, _ = load_causal_lm("qwen-coder-0.5b")
    target.to(args.device)
    draft.to(args.device)
    eos = tokenizer.eos_token_id
    prompts = build_prompts(tokenizer, args.prompts, args.max_chars, args.device)
    methods = {
        "tokred plain": tokred_method(target),
        "hf plain": hf_method(target),
        "tokred draft model": tokred_method(target, draft=draft, k=args.k),
        "hf assistant_model": hf_method(target, assistant_model=draft),
    }
    records = run_methods(methods, prompts, args.new_tokens, eos, "methods x prompts", args.device)
    rows = summarise(records, "tokred plain")
    lines = [f"# Speculative decoding, Qwen2.5-Coder 1.5B target with the 0.5B as draft, {args.device.upper()}", "",
             f"`{command}`", "", f"{environment(args)}. {len(prompts)} prompts, up to {args.new_tokens} new tokens.", "",
             load_note(args), ""]
    lines += table(rows, {"tokred": "tokred plain", "hf": "hf plain"})
    lines += ["", "## Targets", ""] + verdicts(rows, [("draft_model", "tokred draft model", "hf assistant_model")])
    write(args.out or os.path.join(RESULTS, "speculative_qwen.md"), lines)
    for name, r in rows.items():
        print(f"{name:22s} {r['tokens_per_s']:7.2f} tok/s  {r['tokens_per_s'] / rows['tokred plain']['tokens_per_s']:.2f}x")


# ----------------------------------------------------------------------------- profile and bounds

def forward_cost(models: dict, prompt: torch.Tensor, widths: list, reps: int) -> dict:
    """Median seconds of one target forward over w new tokens after a cached prompt, per model (name ->
    model) and width w (all positions' logits, as verification needs), plus "w last" with
    ``logits_to_keep=1``: {name: {w: s, "w last": s}}. Models and widths alternate within each
    repetition, after one untimed pass (a compiled model compiles its graphs there); each cache is
    cropped back after each forward."""
    caches = {name: new_cache() for name in models}
    vocab = model_config(next(iter(models.values()))).vocab_size
    times: dict = {name: {} for name in models}
    with torch.no_grad():
        for name, model in models.items():
            model(input_ids=prompt, **cache_argument(model, caches[name]), use_cache=True, logits_to_keep=1)
        for rep in range(reps + 1):
            for w in widths:
                for keep, key in ((0, w), (1, f"{w} last")):
                    new = torch.randint(0, vocab, (1, w))
                    for name, model in models.items():
                        start = time.perf_counter()
                        model(input_ids=new, past_key_values=caches[name], use_cache=True, logits_to_keep=keep)
                        if rep:
                            times[name].setdefault(key, []).append(time.perf_counter() - start)
                        crop_tail(caches[name], w)
    return {name: {key: sorted(ts)[len(ts) // 2] for key, ts in t.items()} for name, t in times.items()}


def cost_of(costs: dict, width: int) -> float:
    """Relative cost of a forward of ``width`` tokens (costs: measured widths -> relative cost;
    linear interpolation between them, the last slope beyond)."""
    known = sorted(w for w in costs if isinstance(w, int))
    if width in costs:
        return costs[width]
    lo = max([w for w in known if w < width], default=known[0])
    hi = min([w for w in known if w > width], default=None)
    if hi is None:
        lo, hi = known[-2], known[-1]
    return costs[lo] + (costs[hi] - costs[lo]) * (width - lo) / (hi - lo)


def simulate_lookup(runs: list, propose, costs: dict, prefill: float, k: int, adaptive: bool = True) -> dict:
    """Replay greedy decoding with a lookup policy on known greedy outputs, no model: each round
    proposes ``propose(context, k) -> list`` tokens, accepts the prefix equal to the true output,
    commits it + 1 token, and costs ``cost_of(costs, 1 + proposed)`` single-token forwards; each
    prompt adds ``prefill``. Returns the speedup over plain decoding (1 per token + prefill) and the
    mean accepted length. ``runs``: [(prompt ids list, greedy new tokens list)]."""
    total = plain = 0.0
    rounds = committed = 0
    for prompt, truth in runs:
        total += prefill
        plain += prefill + len(truth)
        context, i, step_k = list(prompt) + truth[:1], 1, k
        while i < len(truth):
            room = len(truth) - i - 1
            draft = propose(context, min(step_k, room))[:room] if room > 0 else []
            accepted = 0
            while accepted < len(draft) and draft[accepted] == truth[i + accepted]:
                accepted += 1
            context += truth[i:i + accepted + 1]
            i += accepted + 1
            total += cost_of(costs, 1 + len(draft))
            rounds += 1
            committed += accepted + 1
            if adaptive and draft:
                step_k = next_k(step_k, k, len(draft), accepted)
    return {"speedup": plain / total, "accepted_length": committed / max(rounds, 1)}


def hindsight_lookup(truth_ahead: list, context: list, k: int, costs: dict) -> list:
    """The best any prompt-lookup draft could do (knowing the answer): the longest prefix (<= k) of
    ``truth_ahead`` that some earlier occurrence of the context's last token continues with, or
    nothing where committing those n + 1 tokens costs more than n + 1 plain steps."""
    best = 0
    for start in range(1, len(context)):
        if context[start - 1] != context[-1]:
            continue
        n = 0
        while n < min(k, len(truth_ahead)) and start + n < len(context) and context[start + n] == truth_ahead[n]:
            n += 1
        best = max(best, n)
    return truth_ahead[:best] if best + 1 >= cost_of(costs, best + 1) else []


def run_profile(args, command: str) -> None:
    model, tokenizer = load_causal_lm("smollm2")
    eos = tokenizer.eos_token_id
    prompts = build_prompts(tokenizer, args.prompts, args.max_chars)
    widths = [1, 2, 3, 4, 6, 8, 11]
    fast, _, _, fast_note = tokred_target(model, args, prompts, eos)
    models = {"as loaded": model} if fast is model else {"as loaded": model, f"cpu_linear={args.cpu_linear}": fast}
    by_model = forward_cost(models, prompts[0][1], widths, args.profile_reps)
    used = list(models)[-1]  # the model tokred's rows run; the replay below uses its costs
    seconds = by_model[used]
    costs = {w: seconds[w] / seconds[1] for w in widths}

    runs, prefill_s, decode_s, outside_s, tokens = [], 0.0, 0.0, 0.0, 0
    forward_s = [0.0]
    original = fast.forward  # an OptimizedModule's forward is its own attribute: patched the same way

    def timed_forward(*a, **kw):  # time inside the model, to tell the runtime's own overhead apart
        start = time.perf_counter()
        out = original(*a, **kw)
        forward_s[0] += time.perf_counter() - start
        return out

    fast.forward = timed_forward
    try:
        for _, ids in prompts:
            forward_s[0] = 0.0
            result = generate(fast, ids, args.new_tokens, eos_token_id=eos, progress=False)
            stats = result.stats
            prefill_s += stats.time_to_first_token_s
            decode_s += stats.total_s - stats.time_to_first_token_s
            outside_s += stats.total_s - forward_s[0]
            tokens += stats.new_tokens
            runs.append((ids[0].tolist(), new_tokens_of(result.sequences, ids.shape[1], eos)))
    finally:
        fast.forward = original
    step_s = decode_s / max(tokens - len(prompts), 1)
    prefill = prefill_s / len(prompts) / step_s  # in single-token steps

    def lookup(ngram, min_ngram):
        return lambda context, k: prompt_lookup(torch.tensor(context), ngram, k, min_ngram).tolist()

    def truth_of(context):  # the true continuation of a replayed context (runs are prefixes of each other)
        for prompt, truth in runs:
            if context[:len(prompt)] == prompt:
                return truth[len(context) - len(prompt):]
        raise KeyError

    policies = {
        f"tokred, n-gram {args.ngram}..1 (before)": (lookup(args.ngram, 1), True),
        f"tokred, n-gram {args.ngram}..{args.min_ngram} (now)": (lookup(args.ngram, args.min_ngram), True),
        "best lookup in hindsight": (lambda c, k: hindsight_lookup(truth_of(c), c, k, costs), False),
        "perfect draft (the true continuation)": (lambda c, k: truth_of(c)[:k], False),
    }
    k = args.lookup_k
    lines = ["# Speculative decoding on CPU: where the time goes, what bounds prompt lookup", "", f"`{command}`", "",
             f"{environment(args)}. {load_note(args)}", "", fast_note, "",
             "## One target forward over w new tokens (KV cache of a "
             f"{prompts[0][1].shape[1]}-token prompt), median of {args.profile_reps}", "",
             "Models alternate within each repetition. all = all positions' logits (as verification needs), "
             "x = over the same model's w = 1 forward, last = `logits_to_keep=1`.", "",
             "| w | " + " | ".join(f"{name}: all ms | x (w=1) | last ms" for name in models) + " |",
             "|---:|" + "---:|---:|---:|" * len(models)]
    for w in widths:
        cells = [f"{t[w] * 1e3:.1f} | {t[w] / t[1]:.2f} | {t[f'{w} last'] * 1e3:.1f}" for t in by_model.values()]
        lines.append(f"| {w} | " + " | ".join(cells) + " |")
    if len(models) > 1:
        lines += ["", f"{used} over as loaded, same w: " + ", ".join(
            f"w={w} {by_model[used][w] / by_model['as loaded'][w]:.2f}x" for w in widths) + "."]
    lines += ["", f"The rest of this page uses the costs of **{used}** (the model tokred's rows run).", "",
              f"Plain greedy over {len(prompts)} prompts x <= {args.new_tokens} tokens: prefill "
              f"{prefill_s / len(prompts):.2f} s per prompt (= {prefill:.1f} decode steps), a decode step "
              f"{step_s * 1e3:.1f} ms; time outside the model's forward (the runtime: masks, cache crops, "
              f"acceptance, stats) {outside_s:.2f} s of {prefill_s + decode_s:.2f} s "
              f"({100 * outside_s / (prefill_s + decode_s):.1f} %).", "",
             "## Prompt lookup replayed on the greedy outputs (no model: cost = the forward costs above)", "",
             f"k <= {k}; speedup over plain greedy including the prefill, as the benchmark measures it.", "",
             "| policy | speedup | accepted length |", "|---|---:|---:|"]
    for name, (propose, adaptive) in policies.items():
        sim = simulate_lookup(runs, propose, costs, prefill, k, adaptive)
        lines.append(f"| {name} | {sim['speedup']:.2f}x | {sim['accepted_length']:.2f} |")
    lines += ["", "A draft of any length makes the forward cost at least the w = 2 figure, so drafting pays only "
              "where the expected accepted tokens exceed that cost minus one; the hindsight row knows which "
              "earlier occurrence continues correctly and drafts only what will be accepted: no prompt-lookup "
              "policy can beat it on these outputs and this machine."]
    lines += early_exit_ceiling(model, costs, seconds[1], args.profile_reps)
    write(args.out or os.path.join(RESULTS, "speculative_profile.md"), lines)
    print("\n".join(lines))


def early_exit_ceiling(model, costs: dict, step_s: float, reps: int) -> list:
    """Markdown: the most an early-exit draft could gain on this machine if every draft were accepted,
    from the measured forward costs, with the draft's own KV cache of layers < L (as now) and with
    LayerSkip-style sharing (draft KV written into the target's cache, verification runs layers >= L
    only, plus layers < L for the last draft). Layer costs are taken as proportional to L/n of a
    forward without the head; the head's share is measured."""
    head = model.get_output_embeddings()
    hidden = torch.randn(1, 1, head.in_features)
    with torch.no_grad():
        times = []
        for _ in range(max(reps, 3)):
            start = time.perf_counter()
            head(hidden)
            times.append(time.perf_counter() - start)
    h = min(sorted(times)[len(times) // 2] / step_s, 1.0)
    n = model.config.num_hidden_layers
    lines = ["", "## Early exit: ceiling with every draft accepted", "",
             f"LM head = {100 * h:.0f} % of a single-token forward. d drafts per round commit d + 1 tokens; a draft "
             "step costs L/n of the layers + the head; verification costs c(d + 1) (own cache: all layers) or "
             "L/n of the layers for the last draft + (1 - L/n) of the layers and the head at c(d + 1) (shared).", "",
             "| L | " + " | ".join(f"d={d} own / shared" for d in range(1, 5)) + " |", "|---:|" + "---:|" * 4]
    for layer in (n // 4, n // 2, (3 * n) // 4):
        f = layer / n
        cells = []
        for d in range(1, 5):
            draft = d * (f * (1 - h) + h)
            own = draft + cost_of(costs, d + 1)
            shared = draft + f * (1 - h) + ((1 - f) * (1 - h) + h) * cost_of(costs, d + 1)
            cells.append(f"{(d + 1) / own:.2f}x / {(d + 1) / shared:.2f}x")
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    lines += ["", "With a real acceptance a < 1 per draft, the d + 1 above becomes 1 + a + ... + a^d."]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=None, help="prompts (default 6; --qwen: 2)")
    parser.add_argument("--new-tokens", type=int, default=None, help="new tokens per prompt (default 64; --qwen: 32)")
    parser.add_argument("--max-chars", type=int, default=900, help="characters of each Wikipedia extract")
    parser.add_argument("--k", type=int, default=4, help="tokred early_exit / draft model: most draft tokens per "
                        "verification")
    parser.add_argument("--lookup-k", type=int, default=10, help="tokred prompt_lookup: most draft tokens per "
                        "verification (default: as many as transformers' prompt_lookup_num_tokens)")
    parser.add_argument("--ngram", type=int, default=3, help="tokred prompt lookup: longest n-gram matched")
    parser.add_argument("--min-ngram", type=int, default=2, help="tokred prompt lookup: shortest n-gram match "
                        "that drafts (shorter: no draft, a plain step)")
    parser.add_argument("--hf-lookup-tokens", type=int, default=10, help="transformers prompt_lookup_num_tokens")
    parser.add_argument("--exit-layer", type=int, default=None, help="early-exit layer (default: a quick sweep)")
    parser.add_argument("--sweep-layers", type=int, nargs="+", default=[8, 16, 24])
    parser.add_argument("--sweep-prompts", type=int, default=1)
    parser.add_argument("--sweep-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared, loaded machine 2 threads made single-token "
                             "SDPA up to 100x slower, spinning on a descheduled thread; 0 = torch's default)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (fp32 either way)")
    parser.add_argument("--cpu-linear", choices=["onednn", "off"], default="onednn",
                        help="CPU: tokred plain and prompt_lookup run the model compiled by tokred with this "
                             "cpu_linear kernel (oneDNN packed linears for multi-token forwards); off: the model "
                             "as loaded (default onednn; ignored on cuda)")
    parser.add_argument("--qwen", action="store_true", help="Qwen2.5-Coder 1.5B target with the 0.5B as draft")
    parser.add_argument("--profile", action="store_true",
                        help="forward cost by width, runtime overhead, and prompt lookup policies replayed on the "
                             "greedy outputs (bench/results/speculative_profile.md)")
    parser.add_argument("--profile-reps", type=int, default=7, help="--profile: repetitions per width")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.prompts is None:
        args.prompts = 2 if args.qwen else 6
    if args.new_tokens is None:
        args.new_tokens = 32 if args.qwen else 64
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    command = "python bench/speculative.py " + " ".join(sys.argv[1:])
    args.load_at_start = os.getloadavg()[0]
    torch.manual_seed(0)
    if args.out is None and args.device != "cpu":
        name = "speculative_qwen" if args.qwen else "speculative"
        args.out = os.path.join(RESULTS, f"{name}_{args.device.split(':')[0]}.md")
    if args.profile:
        run_profile(args, command.strip())
    else:
        (run_qwen if args.qwen else run_smollm2)(args, command.strip())


if __name__ == "__main__":
    main()
