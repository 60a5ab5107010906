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
   are fed ``--chunk`` at a time through a KV cache, ``tokred.streaming.StreamingCache(sinks,
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

import tokred  # noqa: E402
from tokred.offline import load_causal_lm, wiki_token_ids  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
REFERENCE_ATTENTION = "tokred_bench_sink_window_reference"
MB = 1024 * 1024


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
        cols = torch.cat([torch.arange(min(sinks, low)), torch.arange(low, end)])
        mask = sink_window_mask(torch.arange(start, end), cols, sinks, window)
        out[:, :, start:end] = F.scaled_dot_product_attention(
            query[:, :, start:end], key[:, :, cols], value[:, :, cols], attn_mask=mask.to(query.device),
            scale=scaling)
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


def mask_runs(model, ids: torch.Tensor, args, log) -> tuple[dict, dict]:
    """Full-forward nll per (setting, implementation), and notes on the tokred compile reports."""
    from tqdm import tqdm

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
        if impl == "sdpa":
            model.set_attn_implementation("sdpa")
            nll[(name, impl)] = forward_nll(model, ids)
        elif impl == "reference":
            use_reference_attention(model, *pat)
            nll[(name, impl)] = forward_nll(model, ids[:, :n_ref])
            model.set_attn_implementation("sdpa")
            if (name, "tokred") in nll:
                diff = (nll[(name, "tokred")][:n_ref - 1] - nll[(name, impl)]).abs().max().item()
                notes[(name, impl)] = f"first {n_ref} tokens only; max abs nll diff to tokred {diff:.2e}"
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
            notes[(name, impl)] = f"{rewritten}/{len(sites)} attention sites rewritten"
            log(f"tokred report for {name}:\n{report}")
            torch._dynamo.reset()
        log(f"mask {name} [{impl}]: ppl {perplexity(nll[(name, impl)]):.3f} "
            f"({time.perf_counter() - t0:.0f} s)")
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
    """Resident set size of this process (Linux /proc)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def make_cache(pattern):
    """A dense DynamicCache (pattern None) or tokred's bounded StreamingCache(sinks, window)."""
    if pattern is None:
        from transformers import DynamicCache

        return DynamicCache()
    from tokred.streaming import StreamingCache

    return StreamingCache(sinks=pattern[0], window=pattern[1])


def stream_nll(model, ids: torch.Tensor, cache, chunk: int, mem_every: int, desc: str):
    """Teacher forcing through ``cache``: feed ids [1, N] ``chunk`` tokens per forward.

    Returns (per-token nll [N-1], memory rows [(tokens fed, cache bytes, RSS bytes)], last logits
    [V]). Position ids are left to the model and the cache (a StreamingCache re-rotates them)."""
    from tqdm import tqdm

    n = ids.shape[1]
    losses, memory = [], []
    next_mark = mem_every
    with torch.no_grad():
        for start in tqdm(range(0, n, chunk), desc=desc, leave=False):
            piece = ids[:, start:start + chunk]
            logits = model(input_ids=piece, past_key_values=cache, use_cache=True).logits[0].float()
            # logit j of this piece predicts token start+j+1, the last one the next piece's first
            targets = ids[0, start + 1:start + 1 + piece.shape[1]]
            losses.append(F.cross_entropy(logits[:len(targets)], targets, reduction="none"))
            fed = start + piece.shape[1]
            if fed >= next_mark or fed == n:
                memory.append((fed, cache_bytes(cache), rss_bytes()))
                next_mark = (fed // mem_every + 1) * mem_every
    return torch.cat(losses), memory, logits[-1]


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


def stream_runs(model, tok, ids: torch.Tensor, patterns: dict, args, log) -> tuple[dict, dict, dict]:
    """Streaming nll, memory rows and generated text per setting of ``patterns``."""
    model.set_attn_implementation("sdpa")
    nll, memory, texts = {}, {}, {}
    for name, pat in patterns.items():
        t0 = time.perf_counter()
        cache = make_cache(pat)
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
    return nll, memory, texts


# ---------------------------------------------------------------------------------------------
# plots and the report


def plot_quality(mask_nll: dict, stream: dict, args, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in ("mask", "stream") if (mask_nll if p == "mask" else stream)]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.3), squeeze=False)
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
            ax.axvline(8192, color="0.6", ls=":", lw=1)
            ax.text(8192, ax.get_ylim()[1], " 8192 positions", fontsize=7, va="top", color="0.4")
            ax.set_title(f"streaming, teacher forcing {args.chunk} tokens per step")
        ax.axvline(args.window, color="0.8", ls="--", lw=0.8)
        ax.set_yscale("log")
        ax.set_xlabel(f"token position ({args.bin}-token bins)")
        ax.set_ylabel("perplexity in the bin")
        ax.legend(fontsize=7)
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
        a.axvline(8192, color="0.6", ls=":", lw=1)
        a.set_xlabel("tokens fed (teacher forcing, then greedy generation)")
        a.legend(fontsize=7)
    ax.set_ylabel("KV cache tensors (MiB)")
    ax.set_title("KV cache memory")
    ax2.set_ylabel("process RSS (MiB)")
    ax2.set_title("process RSS (model, activations, allocator)")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def quality_table(mask_nll: dict, notes: dict, stream: dict, args) -> list:
    """Markdown rows: perplexity over all tokens and over the positions past the window, each
    against dense on the same positions and measured the same way."""
    lines = ["| measured by | setting | implementation | tokens | ppl (all) | ppl (positions >= window) "
             "| dense, same positions | vs dense | notes |", "|---|---|---|---|---|---|---|---|---|"]
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


def memory_table(memory: dict) -> list:
    lines = ["| setting | tokens | KV cache (MiB) | RSS (MiB) |", "|---|---|---|---|"]
    for name, rows in memory.items():
        picks = sorted({0, len(rows) // 4, len(rows) // 2, 3 * len(rows) // 4, len(rows) - 1})
        for i in picks:
            fed, cb, rss = rows[i]
            lines.append(f"| {name} | {fed} | {cb / MB:.1f} | {rss / MB:.0f} |")
    return lines


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
                        help="streaming runs with the dense cache only (no tokred.streaming needed)")
    parser.add_argument("--out", default="sparse_quality", help="name of the md/png under bench/results")
    args = parser.parse_args()
    torch.manual_seed(0)
    log_lines: list = []

    def log(line: str) -> None:
        from tqdm import tqdm

        tqdm.write(line)
        log_lines.append(line)

    t_start = time.perf_counter()
    model, tok = load_causal_lm(args.model)
    ids = wiki_token_ids(tok, max(args.tokens, args.stream_tokens))
    mask_nll, notes = ({}, {}) if args.no_mask else mask_runs(model, ids[:, :args.tokens], args, log)
    stream, memory, texts = {}, {}, {}
    if not args.no_stream:
        patterns = settings(args.sinks, args.window)
        if args.stream_dense_only:
            patterns = {"dense": None}
        stream, memory, texts = stream_runs(model, tok, ids[:, :args.stream_tokens], patterns, args, log)

    os.makedirs(RESULTS, exist_ok=True)
    cmd = "python bench/sparse_quality.py " + " ".join(sys.argv[1:])
    lines = [f"# Sparse attention quality: attention sinks on SmolLM2-135M (CPU)", "",
             f"`{cmd.strip()}` (torch {torch.__version__}, {torch.get_num_threads()} threads, "
             f"{time.perf_counter() - t_start:.0f} s in all on a shared, loaded 2-core machine: "
             f"wall times are not comparable between runs)", "",
             f"Model `{args.model}` (fp32), text: Wikipedia extracts joined by blank lines "
             f"(`wiki_token_ids`). Patterns: sinks {args.sinks} + window {args.window} and window "
             f"{args.window} only, against dense causal attention. The first {args.window} positions "
             f"see the same keys under every pattern, so the column 'positions >= window' is where "
             f"the patterns differ.", ""]
    if mask_nll:
        lines += ["## Perplexity", "",
                  f"mask: one forward over {args.tokens} tokens; `tokred` = "
                  f"`torch.compile(model, backend=tokred.backend(inner=\"{args.inner}\", "
                  f"sparse_attention={{...}}))`, `reference` = dense SDPA with the pattern's boolean "
                  f"mask written in this script (transformers AttentionInterface), `sdpa` = the "
                  f"model as loaded."]
    if stream:
        lines += ["" if mask_nll else "## Perplexity", "",
                  f"streaming: teacher forcing {args.chunk} tokens per forward through the KV cache; "
                  f"perplexity over the first {args.tokens} tokens (the stream goes on to "
                  f"{args.stream_tokens}, see the plot)."]
    if mask_nll or stream:
        lines += [""] + quality_table(mask_nll, notes, stream, args) + [
            "", "![perplexity against position](sparse_quality.png)", ""]
    if memory:
        lines += ["## Memory while streaming", "",
                  f"Cache bytes: the storages of the cache's tensors; RSS: the whole process "
                  f"(model weights, activations, allocator caches), noisy.", ""]
        lines += memory_table(memory)
        lines += ["", "![memory against tokens](streaming_memory.png)", ""]
        for name, text in texts.items():
            lines += [f"Greedy continuation from the bounded cache ({name}) after "
                      f"{args.stream_tokens} tokens: `{text.strip()!r}`", ""]
    lines += ["## Log", "", "```"] + log_lines + ["```"]
    text = "\n".join(lines) + "\n"
    print(text)
    with open(os.path.join(RESULTS, f"{args.out}.md"), "w") as f:
        f.write(text)
    if mask_nll or stream:
        plot_quality(mask_nll, stream, args, os.path.join(RESULTS, f"{args.out}.png"))
    if memory:
        plot_memory(memory, args, os.path.join(RESULTS, "streaming_memory.png"))


if __name__ == "__main__":
    main()
