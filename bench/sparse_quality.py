"""Sparse attention quality on a real LM: sinks + window against window only against dense (StreamingLLM).

    python bench/sparse_quality.py [--tokens 8192] [--stream-tokens 10240] [--chunk 64]
                                   [--sinks 4] [--window 1024] [--inner eager] [--generate 32]

SmolLM2-135M (Llama, 30 layers, GQA 9/3, real weights) on Wikipedia extracts, three attention
patterns: dense causal; sinks + window (query i sees keys i-window+1 .. i and keys 0 .. sinks-1);
window only (sinks 0). Measured two ways:

1. mask: one forward over ``--tokens`` tokens, every query sees exactly its pattern.
   - "tokred": the model compiled with ``tokred.backend(sparse_attention=...)`` (the pass);
   - "reference": the same model with a dense masked attention written here (an SDPA call with the
     pattern's boolean mask, registered through transformers' AttentionInterface), independent of
     tokred, so the effect is measured even without the pass and the pass is checked against it.
2. streaming: StreamingLLM-style teacher forcing over ``--stream-tokens`` tokens: the true tokens
   are fed ``--chunk`` at a time through a KV cache, ``tokred.runtime.streaming.StreamingCache(sinks,
   window)`` (bounded, positions re-rotated inside the cache) or a dense ``DynamicCache``; cache
   bytes and process RSS are recorded as the stream grows, past the model's 8192 positions. Then
   ``--generate`` tokens are decoded greedily from the bounded cache.

Writes bench/results/sparse_quality.md (with the command that made it), sparse_quality.png
(perplexity in ``--bin``-token bins against position) and streaming_memory.png (cache bytes and RSS
against tokens). Target (issue 5): sinks + window within 5% of dense perplexity; window only worse.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tokred
from tokred.tools.offline import load_causal_lm, wiki_token_ids

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
REFERENCE_ATTENTION = "tokred_bench_sink_window_reference"
MB = 1024 * 1024
MAX_POSITIONS = 8192  # SmolLM2's max_position_embeddings, marked on the plots


# ---------------------------------------------------------------------------------------------
# patterns and the reference attention


def settings(sinks: int, window: int) -> dict:
    """Setting name -> (sinks, window) of its pattern; None is dense causal attention."""
    return {"dense": None, f"sinks {sinks} + window {window}": (sinks, window),
            f"window {window} only": (0, window)}


def sink_window_mask(query_pos: torch.Tensor, key_pos: torch.Tensor, sinks: int, window: int) -> torch.Tensor:
    """[Nq, Nk] bool for query positions [Nq] and key positions [Nk], True where the query may
    attend: causal, and within the last ``window`` keys (itself included) or among the first
    ``sinks`` positions."""
    q, k = query_pos[:, None], key_pos[None, :]
    return (k <= q) & ((q - k < window) | (k < sinks))


_REFERENCE_PATTERN = {"sinks": 0, "window": 1, "block": 512}


def _reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """SDPA with the sink/window boolean mask. query [B, H, N, D], key/value [B, Hkv, N, D];
    returns ([B, N, H, D], None) as transformers' attention functions do. No KV cache: key j sits
    at position j. Queries go in blocks that see only the keys their mask can reach (the sinks and
    the last window + block keys), with the exact element mask, so memory and time grow with
    N * window rather than N^2; the result equals one dense masked SDPA."""
    if query.shape[2] != key.shape[2]:
        raise ValueError("the reference attention is for single full forwards (no KV cache)")
    sinks, window, block = (_REFERENCE_PATTERN[k] for k in ("sinks", "window", "block"))
    groups = query.shape[1] // key.shape[1]  # GQA: each kv head serves `groups` query heads
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    n = query.shape[2]
    out = torch.empty_like(query)
    for start in range(0, n, block):
        end = min(n, start + block)
        low = max(0, start - window + 1)  # the first key any query of the block has in its window
        cols = torch.cat([torch.arange(min(sinks, low)), torch.arange(low, end)]).to(query.device)
        mask = sink_window_mask(torch.arange(start, end, device=query.device), cols, sinks, window)
        out[:, :, start:end] = F.scaled_dot_product_attention(
            query[:, :, start:end], key[:, :, cols], value[:, :, cols], attn_mask=mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def use_reference_attention(model, sinks: int, window: int) -> None:
    """Switch ``model`` to the reference sink/window attention (transformers passes it no mask)."""
    from transformers import AttentionInterface

    AttentionInterface.register(REFERENCE_ATTENTION, _reference_attention)
    _REFERENCE_PATTERN.update(sinks=sinks, window=window)
    model.set_attn_implementation(REFERENCE_ATTENTION)


# ---------------------------------------------------------------------------------------------
# perplexity


def token_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[N-1] negative log-likelihood of ids[0, 1:] from logits [1, N, V] (logit t predicts t+1)."""
    return F.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="none")


def perplexity(nll: torch.Tensor) -> float:
    return math.exp(nll.mean().item())


def binned_perplexity(nll: torch.Tensor, bin_size: int) -> tuple[list, list]:
    """(bin centres as token positions, perplexity of each bin) for per-token nll [N-1], where
    nll[t] is the loss of token t+1."""
    centres, ppl = [], []
    for start in range(0, len(nll), bin_size):
        chunk = nll[start:start + bin_size]
        centres.append(start + 1 + len(chunk) / 2)
        ppl.append(math.exp(chunk.mean().item()))
    return centres, ppl


def forward_nll(model, ids: torch.Tensor) -> torch.Tensor:
    """Per-token nll [N-1] of one full forward (no cache)."""
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
        return token_nll(logits, ids)


def tokred_pass_available(args, log) -> bool:
    """Whether this checkout's backend accepts the sparse_attention option."""
    try:
        tokred.backend(sparse_attention={"pattern": "sink_window", "sinks": args.sinks, "window": args.window})
        return True
    except ValueError as err:
        log(f"no tokred sparse_attention pass in this checkout ({err}); reference masks only")
        return False


def mask_runs(model, ids: torch.Tensor, args, state: dict, log) -> tuple[dict, dict]:
    """Full-forward nll per (setting, implementation), and notes on the tokred compile reports.
    Results found in ``state`` (a resumed run) are reused; new ones are added to it."""
    from tqdm import tqdm

    if not args.no_tokred and not tokred_pass_available(args, log):
        args.no_tokred = True
    pats = settings(args.sinks, args.window)
    # the model is causal, so the loss at position t only depends on tokens <= t: a reference over
    # the first reference_tokens checks the pass's 8k run on those positions at a fraction of the cost
    n_ref = ids.shape[1] if args.no_tokred else min(args.reference_tokens, ids.shape[1])
    jobs = [("dense", "sdpa", None)]
    for name, pat in pats.items():
        if pat is None:
            continue
        if not args.no_tokred:
            jobs.append((name, "tokred", pat))
        if not args.no_reference:
            jobs.append((name, "reference", pat))
    nll, notes = {}, {}
    for name, impl, pat in tqdm(jobs, desc=f"mask: full forwards over {ids.shape[1]} tokens"):
        t0 = time.perf_counter()
        key = ("mask", name, impl)
        if key in state:
            nll[(name, impl)], notes[(name, impl)] = state[key]
            log(f"mask {name} [{impl}]: ppl {perplexity(nll[(name, impl)]):.3f} (resumed)", keep=False)
            continue
        if impl == "sdpa":
            model.set_attn_implementation("sdpa")
            nll[(name, impl)] = forward_nll(model, ids)
        elif impl == "reference":
            use_reference_attention(model, *pat)
            nll[(name, impl)] = forward_nll(model, ids[:, :n_ref])
            model.set_attn_implementation("sdpa")
        else:
            model.set_attn_implementation("sdpa")
            torch._dynamo.reset()
            backend = tokred.backend(inner=args.inner, sparse_attention={
                "pattern": "sink_window", "sinks": pat[0], "window": pat[1]})
            compiled = torch.compile(model, backend=backend)
            nll[(name, impl)] = forward_nll(compiled, ids)
            report = backend.report
            sites = report.attention_sites
            rewritten = sum(s.status == "rewritten" for s in sites)
            notes[(name, impl)] = (f"{rewritten}/{len(sites)} attention sites rewritten; graph FLOPs "
                                   f"{report.flops_after / report.flops_before:.3f}x dense")
            summary = [line for line in str(report).splitlines()
                       if line.startswith(("attention sites", "FLOPs", "note"))]
            log(f"tokred report for {name}: " + " | ".join(summary))
            torch._dynamo.reset()
        log(f"mask {name} [{impl}]: ppl {perplexity(nll[(name, impl)]):.3f} "
            f"({time.perf_counter() - t0:.0f} s)")
        state[key] = (nll[(name, impl)].cpu(), notes.get((name, impl), ""))
        save_state(state, args)
    for name, pat in pats.items():
        if (name, "tokred") in nll and (name, "reference") in nll:
            ref, ours = nll[(name, "reference")], nll[(name, "tokred")]
            diff = (ours[:len(ref)] - ref[:len(ours)]).abs().max().item()
            notes[(name, "reference")] = (f"max abs per-token nll diff to tokred {diff:.1e} over the "
                                          f"first {min(len(ref), len(ours)) + 1} tokens")
    return nll, notes


# ---------------------------------------------------------------------------------------------
# streaming


def cache_bytes(cache) -> int:
    """Bytes held by the tensors of a transformers cache (its layers' attributes), each storage
    counted once."""
    seen, total = set(), 0
    holders = [cache] + list(getattr(cache, "layers", []) or [])
    for holder in holders:
        for value in vars(holder).values():
            tensors = value if isinstance(value, (list, tuple)) else [value]
            for t in tensors:
                if isinstance(t, torch.Tensor) and t.numel() > 0:
                    storage = t.untyped_storage()
                    if storage.data_ptr() not in seen:
                        seen.add(storage.data_ptr())
                        total += storage.nbytes()
    return total


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc); on CUDA the bytes allocated on the device."""
    if torch.cuda.is_initialized():
        return torch.cuda.memory_allocated()
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap back to the OS (glibc malloc_trim), so that each run's
    RSS is not inflated by what the previous one freed."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def make_cache(pattern, model):
    """A dense DynamicCache (pattern None) or tokred's bounded StreamingCache(sinks, window)."""
    if pattern is None:
        from transformers import DynamicCache

        return DynamicCache()
    from tokred.runtime.streaming import StreamingCache

    return StreamingCache(sinks=pattern[0], window=pattern[1], model=model)


def stream_nll(model, ids: torch.Tensor, cache, chunk: int, mem_every: int, desc: str):
    """Teacher forcing through ``cache``: feed ids [1, N] ``chunk`` tokens per forward.

    Returns (per-token nll [N-1], memory rows [(tokens fed, cache bytes, RSS bytes)], last logits
    [V]). Position ids are left to the model and the cache (a StreamingCache re-rotates them)."""
    from tqdm import tqdm

    n = ids.shape[1]
    # one buffer for the losses: small tensors kept per step sat between the freed [chunk, vocab]
    # logits on glibc's heap and made RSS grow ~10 MB a step with a flat cache (measured)
    losses, memory = torch.empty(n - 1, device=ids.device), []
    next_mark = mem_every
    with torch.no_grad():
        for start in tqdm(range(0, n, chunk), desc=desc, leave=False):
            piece = ids[:, start:start + chunk]
            logits = model(input_ids=piece, past_key_values=cache, use_cache=True).logits[0].float()
            # logit j of this piece predicts token start+j+1, the last one the next piece's first
            targets = ids[0, start + 1:start + 1 + piece.shape[1]]
            losses[start:start + len(targets)] = F.cross_entropy(logits[:len(targets)], targets, reduction="none")
            last = logits[-1].clone()
            del logits  # free the [chunk, vocab] logits before the next forward
            fed = start + piece.shape[1]
            if fed >= next_mark or fed == n:
                memory.append((fed, cache_bytes(cache), rss_bytes()))
                next_mark = (fed // mem_every + 1) * mem_every
    return losses, memory, last


def greedy_continue(model, cache, last_logits: torch.Tensor, steps: int, fed: int, mem_every: int):
    """Greedy decoding from a filled cache, one token per forward; returns (token ids, memory rows)."""
    tokens, memory = [], []
    with torch.no_grad():
        logits = last_logits
        for i in range(steps):
            token = logits.argmax().view(1, 1)
            tokens.append(token.item())
            logits = model(input_ids=token, past_key_values=cache, use_cache=True).logits[0, -1]
            if (i + 1) % mem_every == 0 or i + 1 == steps:
                memory.append((fed + i + 1, cache_bytes(cache), rss_bytes()))
    return tokens, memory


def stream_runs(model, tok, ids: torch.Tensor, patterns: dict, args, state: dict, log):
    """Streaming nll, memory rows and generated text per setting of ``patterns`` (reused from and
    added to ``state`` as in mask_runs)."""
    model.set_attn_implementation("sdpa")
    nll, memory, texts = {}, {}, {}
    for name, pat in patterns.items():
        t0 = time.perf_counter()
        if ("stream", name) in state:
            nll[name], memory[name], text = state[("stream", name)]
            if text:
                texts[name] = text
            log(f"stream {name}: ppl {perplexity(nll[name][:args.tokens - 1]):.3f} (resumed)", keep=False)
            continue
        release_freed_memory()
        cache = make_cache(pat, model)
        nll[name], memory[name], last = stream_nll(model, ids, cache, args.chunk, args.mem_every,
                                                   f"stream {name}")
        if args.generate and pat == (args.sinks, args.window):
            tokens, more = greedy_continue(model, cache, last, args.generate, ids.shape[1],
                                           max(1, args.generate // 4))
            memory[name] += more
            texts[name] = tok.decode(tokens)
        log(f"stream {name}: ppl {perplexity(nll[name][:args.tokens - 1]):.3f} over the first "
            f"{args.tokens} tokens, {perplexity(nll[name]):.3f} over {ids.shape[1]}; cache "
            f"{memory[name][-1][1] / MB:.1f} MiB at the end ({time.perf_counter() - t0:.0f} s)")
        del cache
        state[("stream", name)] = (nll[name].cpu(), memory[name], texts.get(name, ""))
        save_state(state, args)
    return nll, memory, texts


def state_path(args) -> str:
    """Where a run keeps its finished measurements, named by the settings that determine them."""
    tag = (f"{args.model}-{args.device}-t{args.tokens}-s{args.stream_tokens}-c{args.chunk}-"
           f"sinks{args.sinks}-w{args.window}-r{args.reference_tokens}-g{args.generate}-{args.inner}")
    return os.path.join(os.path.expanduser("~/.cache/tokred/sparse_quality"), tag + ".pt")


def save_state(state: dict, args) -> None:
    path = state_path(args)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(state, path)


# ---------------------------------------------------------------------------------------------
# plots and the report


def plot_quality(mask_nll: dict, stream: dict, args, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    panels = [p for p in ("mask", "stream") if (mask_nll if p == "mask" else stream)]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 5.0), squeeze=False)
    colours = dict(zip(settings(args.sinks, args.window), ("C0", "C2", "C3")))
    for ax, panel in zip(axes[0], panels):
        if panel == "mask":
            for (name, impl), nll in mask_nll.items():
                x, y = binned_perplexity(nll, args.bin)
                style = "--" if impl == "reference" else "-"
                marker = "" if impl == "reference" else "."
                ax.plot(x, y, style, marker=marker, color=colours[name], label=f"{name} [{impl}]")
            ax.set_title(f"one forward over {args.tokens} tokens (masks)")
        else:
            for name, nll in stream.items():
                x, y = binned_perplexity(nll, args.bin)
                ax.plot(x, y, ".-", color=colours[name],
                        label=name + (" (DynamicCache)" if name == "dense" else " (StreamingCache)"))
            if args.stream_tokens > MAX_POSITIONS:
                ax.axvline(MAX_POSITIONS, color="0.6", ls=":", lw=1)
                ax.text(MAX_POSITIONS, ax.get_ylim()[1], f" {MAX_POSITIONS} (max positions)", fontsize=7,
                        va="top", color="0.4")
            ax.set_title(f"streaming, teacher forcing {args.chunk} tokens per step")
        ax.axvline(args.window, color="0.8", ls="--", lw=0.8)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.set_xlabel(f"token position ({args.bin}-token bins)")
        ax.set_ylabel("perplexity in the bin")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)
    fig.suptitle("SmolLM2-135M on Wikipedia extracts: attention sinks (StreamingLLM)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_memory(memory: dict, args, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, rows in memory.items():
        label = name + (" (DynamicCache)" if name == "dense" else " (StreamingCache)")
        ax.plot([r[0] for r in rows], [r[1] / MB for r in rows], ".-", label=label)
        ax2.plot([r[0] for r in rows], [r[2] / MB for r in rows], ".-", label=label)
    for a in (ax, ax2):
        if max(r[0] for rows in memory.values() for r in rows) > MAX_POSITIONS:
            a.axvline(MAX_POSITIONS, color="0.6", ls=":", lw=1)
        a.set_xlabel("tokens fed (teacher forcing, then greedy generation)")
        a.legend(fontsize=7)
    ax.set_ylabel("KV cache tensors (MiB)")
    ax.set_title("KV cache memory")
    on_cuda = args.device.startswith("cuda")
    ax2.set_ylabel("CUDA memory allocated (MiB)" if on_cuda else "process RSS (MiB)")
    ax2.set_title("CUDA memory allocated" if on_cuda else "process RSS (model, activations, allocator)")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def quality_table(mask_nll: dict, notes: dict, stream: dict, args) -> list:
    """Markdown rows: perplexity over all tokens and over the positions past the window, each
    against dense on the same positions and measured the same way."""
    lines = [("| measured by | setting | implementation | tokens | ppl (all) | ppl (positions >= window) "
              "| dense, same positions | vs dense | notes |"), "|---|---|---|---|---|---|---|---|---|"]
    past = args.window - 1  # nll[t] is the loss of token t+1: from index window-1 on the patterns differ
    rows = [("mask", name, impl, nll) for (name, impl), nll in mask_nll.items()]
    rows += [("streaming", name, "DynamicCache" if name == "dense" else "StreamingCache",
              nll[:args.tokens - 1]) for name, nll in stream.items()]
    dense = {by: nll for by, name, _, nll in rows if name == "dense"}
    for by, name, impl, nll in rows:
        p_past = perplexity(nll[past:])
        cells = ["", ""]
        if by in dense:
            d_past = perplexity(dense[by][past:len(nll)])
            cells = [f"{d_past:.3f}", f"{100 * (p_past / d_past - 1):+.1f}%"]
        lines.append(f"| {by} | {name} | {impl} | {len(nll) + 1} | {perplexity(nll):.3f} | {p_past:.3f} | "
                     f"{cells[0]} | {cells[1]} | {notes.get((name, impl), '')} |")
    return lines


def verdict(mask_nll: dict, stream: dict, args) -> list:
    """One line per measurement way: each pattern's perplexity past the window against dense's on
    the same positions, and the issue's target (sinks + window within 5% of dense)."""
    past = args.window - 1
    ways = {"mask": {name: nll for (name, impl), nll in mask_nll.items() if impl in ("sdpa", "tokred")},
            "streaming": {name: nll[:args.tokens - 1] for name, nll in stream.items()}}
    if not any(n != "dense" for n in ways["mask"]):  # no tokred runs: report the reference
        ways["mask"].update({name: nll for (name, impl), nll in mask_nll.items() if impl == "reference"})
    lines = []
    for way, runs in ways.items():
        if "dense" not in runs or len(runs) < 2:
            continue
        parts = []
        for name, nll in runs.items():
            if name == "dense":
                continue
            n = min(len(nll), len(runs["dense"]))
            ratio = perplexity(nll[past:n]) / perplexity(runs["dense"][past:n]) - 1
            target = ""
            if name.startswith("sinks"):
                target = " (target <= +5%: " + ("met" if ratio <= 0.05 else "NOT met") + ")"
            parts.append(f"{name} {100 * ratio:+.1f}%{target}")
        lines.append(f"- {way}: perplexity past the window against dense: " + "; ".join(parts) + ".")
    beyond = {name: nll[MAX_POSITIONS - 1:] for name, nll in stream.items() if len(nll) >= MAX_POSITIONS}
    if beyond:
        lines.append(f"- streaming past the model's {MAX_POSITIONS} positions (tokens {MAX_POSITIONS}.."
                     f"{args.stream_tokens}): perplexity " + "; ".join(
                         f"{name} {perplexity(nll):.3f}" for name, nll in beyond.items()) + ".")
    return lines


def memory_table(memory: dict) -> list:
    lines = ["| setting | tokens | KV cache (MiB) | RSS (MiB) |", "|---|---|---|---|"]
    for name, rows in memory.items():
        picks = sorted({0, len(rows) // 4, len(rows) // 2, 3 * len(rows) // 4, len(rows) - 1})
        for i in picks:
            fed, cb, rss = rows[i]
            lines.append(f"| {name} | {fed} | {cb / MB:.1f} | {rss / MB:.0f} |")
    return lines


def report_markdown(mask_nll, notes, stream, memory, texts, log_lines, elapsed, args) -> str:
    """The results page: the command, the setup, the perplexity and memory tables, the log."""
    cmd = ("python bench/sparse_quality.py " + " ".join(sys.argv[1:])).strip()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        f"# Sparse attention quality: attention sinks on SmolLM2-135M ({args.device})", "",
        (f"`{cmd}` (torch {torch.__version__}, {torch.get_num_threads()} torch thread(s), "
         f"{elapsed:.0f} s in all; load average {load:.1f} at the end: a shared 2-core machine "
         f"running other jobs, so wall times are not comparable between runs)"), "",
        (f"Model `{args.model}` (fp32, real weights), text: Wikipedia extracts joined by blank lines "
         f"(`wiki_token_ids`). Patterns: sinks {args.sinks} + window {args.window} and window "
         f"{args.window} only, against dense causal attention. Query i sees keys i-window+1..i, plus "
         f"keys 0..sinks-1. The first {args.window} positions see the same keys under every pattern, "
         f"so the column 'positions >= window' is where the patterns differ; 'vs dense' compares it "
         f"with dense on the same positions, measured the same way."), ""]
    if mask_nll or stream:
        lines += ["## Perplexity", ""]
    if mask_nll:
        lines += [
            (f"mask: one forward over {args.tokens} tokens. `tokred` = `torch.compile(model, "
             f"backend=tokred.backend(inner=\"{args.inner}\", sparse_attention={{\"pattern\": "
             f"\"sink_window\", ...}}))`; `reference` = SDPA with the pattern's boolean mask written in "
             f"this script (transformers AttentionInterface, independent of tokred), over the first "
             f"{args.reference_tokens} tokens when the tokred runs are on (the model is causal, so those "
             f"positions are comparable with the tokred run); `sdpa` = the model as loaded."), ""]
    if stream:
        lines += [
            (f"streaming: teacher forcing through a KV cache, {args.chunk} true tokens per forward, "
             f"`StreamingCache(sinks, window, model)` from `tokred.runtime.streaming` (holds sinks + window - 1 "
             f"entries between steps, positions re-rotated inside the cache as StreamingLLM does) or a "
             f"dense `DynamicCache`. Within a {args.chunk}-token step the first query sees exactly its "
             f"pattern and later ones up to {args.chunk - 1} more recent keys, so streaming perplexity "
             f"is slightly optimistic next to the mask run. Table: the first {args.tokens} tokens; the "
             f"stream goes on to {args.stream_tokens} (plot, right)."), ""]
    if mask_nll or stream:
        lines += verdict(mask_nll, stream, args) + [""]
        lines += quality_table(mask_nll, notes, stream, args)
        lines += ["", f"![perplexity against position]({args.out}.png)", ""]
    if memory:
        lines += ["## Memory while streaming", "",
                  ("KV cache: the bytes of the cache's tensor storages (StreamingCache also keeps the "
                   "sinks' first keys). RSS: the whole process (weights, activations, allocator caches; "
                   "noisy; on CUDA the column holds torch.cuda.memory_allocated instead). Rows: teacher "
                   "forcing, then greedy decoding from the bounded cache."), ""]
        lines += memory_table(memory)
        lines += ["", f"![memory against tokens]({args.memory_out}.png)", ""]
        for name, text in texts.items():
            lines += [(f"Greedy continuation ({args.generate} tokens) from the bounded cache ({name}) "
                       f"after {args.stream_tokens} tokens: `{text.strip()!r}`"), ""]
    lines += ["## Log", "", "```", *log_lines, "```"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens of the mask evaluation")
    parser.add_argument("--stream-tokens", type=int, default=10240, help="tokens fed in the streaming runs")
    parser.add_argument("--chunk", type=int, default=64, help="tokens per forward in the streaming runs")
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--bin", type=int, default=512, help="tokens per perplexity bin in the plot")
    parser.add_argument("--mem-every", type=int, default=512, help="record memory every this many tokens")
    parser.add_argument("--generate", type=int, default=32,
                        help="greedy tokens decoded from the bounded cache after the stream (0: none)")
    parser.add_argument("--inner", default="eager", choices=["eager", "aot_eager", "inductor"])
    parser.add_argument("--no-tokred", action="store_true", help="skip the tokred-compiled mask runs")
    parser.add_argument("--no-reference", action="store_true", help="skip the reference mask runs")
    parser.add_argument("--reference-tokens", type=int, default=2048,
                        help="tokens of the reference mask runs when the tokred runs are on (the "
                             "reference then checks the pass on those positions; with --no-tokred "
                             "it runs over --tokens)")
    parser.add_argument("--no-mask", action="store_true", help="skip the full-forward (mask) runs")
    parser.add_argument("--no-stream", action="store_true", help="skip the streaming runs")
    parser.add_argument("--stream-dense-only", action="store_true",
                        help="streaming runs with the dense cache only (no tokred.runtime.streaming needed)")
    parser.add_argument("--out", default="sparse_quality", help="name of the md/png under bench/results")
    parser.add_argument("--memory-out", default="streaming_memory",
                        help="name of the memory plot under bench/results (starts with 'streaming')")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (on CUDA the pass runs the Triton kernel)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; 1 by default: on a shared, oversubscribed machine two "
                             "OpenMP threads ran the 64-token steps 10-20x slower than one")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the measurements an interrupted run with the same settings saved "
                             "under ~/.cache/tokred/sparse_quality/")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    log_lines: list = []

    state: dict = {"log": []}  # finished measurements (see --resume) and the log lines that made them

    def log(line: str, keep: bool = True) -> None:
        from tqdm import tqdm

        tqdm.write(line)
        log_lines.append(line)
        if keep:
            state["log"].append(line)

    t_start = time.perf_counter()
    model, tok = load_causal_lm(args.model)
    model.to(args.device)
    ids = wiki_token_ids(tok, max(args.tokens, args.stream_tokens)).to(args.device)
    if args.resume and os.path.exists(state_path(args)):
        state.update(torch.load(state_path(args), weights_only=False))
        state.setdefault("log", [])
        log_lines.extend(f"(earlier run) {line}" for line in state["log"])
        log(f"resuming from {state_path(args)}: {len(state) - 1} finished measurements", keep=False)
    mask_nll, notes = ({}, {}) if args.no_mask else mask_runs(model, ids[:, :args.tokens], args, state, log)
    stream, memory, texts = {}, {}, {}
    if not args.no_stream:
        # the bounded caches first: the dense cache's growth would otherwise sit in their RSS
        patterns = dict(sorted(settings(args.sinks, args.window).items(), key=lambda kv: kv[1] is None))
        if args.stream_dense_only:
            patterns = {"dense": None}
        stream, memory, texts = stream_runs(model, tok, ids[:, :args.stream_tokens], patterns, args, state, log)

    elapsed = time.perf_counter() - t_start
    text = report_markdown(mask_nll, notes, stream, memory, texts, log_lines, elapsed, args)
    print(text)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"{args.out}.md"), "w") as f:
        f.write(text)
    if mask_nll or stream:
        plot_quality(mask_nll, stream, args, os.path.join(RESULTS, f"{args.out}.png"))
    if memory:
        plot_memory(memory, args, os.path.join(RESULTS, f"{args.memory_out}.png"))


if __name__ == "__main__":
    main()
