"""The ``tokred`` command line.

    tokred explain SPEC [--option KEY=JSON ...] [--inner eager]
    tokred export SPEC -o OUT.onnx [--option KEY=JSON ...] [--static-batch] [--atol 1e-4]
    tokred demo [DEMO ARGS ...]      (tokred.tools.demo; ``tokred demo --help`` lists its arguments)
    tokred generate --model smollm2|hf:MODEL_TYPE --prompt TEXT [--max-new-tokens N]
                    [--draft none|prompt_lookup|early_exit] [--k 4] [--exit-layer L]
                    [--sample --temperature T --top-p P --seed S] [--cpu-linear]  (tokred.generate)

SPEC names a model and its example input (see :mod:`tokred.tools.models`): ``minilm``, ``timm:NAME``,
``hf:MODEL_TYPE``, ``FILE.py:FACTORY``. Options are tokred options; each value is JSON
(``--option strict=true``, ``--option 'merge={"r": 8}'``), and a value that is not JSON is taken
as a string (``--option inner=eager``).

Errors (a bad spec, a bad option, a failed export check, ...) print the error's message on stderr,
without a traceback, and exit with status 2; ``--debug`` raises them instead.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import sys
from typing import Any, Sequence

EXIT_ERROR = 2


def parse_option_args(items: Sequence[str]) -> dict[str, Any]:
    """``['strict=true', 'merge={"r": 8}', 'inner=eager']`` -> ``{'strict': True, 'merge': {'r': 8},
    'inner': 'eager'}``; a repeated key is an error."""
    options: dict[str, Any] = {}
    for item in items:
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ValueError(f"--option {item!r}: expected KEY=VALUE with a JSON value")
        if key in options:
            raise ValueError(f"--option {key!r} is given twice")
        try:
            options[key] = json.loads(raw)
        except json.JSONDecodeError:
            options[key] = raw
    return options


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokred",
        description="Find and rewrite attention in a model's captured graph (torch.compile backend).",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    spec_help = "model spec: minilm | timm:NAME[?k=v&...] | hf:MODEL_TYPE_OR_PATH[?k=v&...] | FILE.py:FACTORY"
    option_help = "a tokred option as KEY=VALUE, VALUE in JSON (repeatable)"

    explain = commands.add_parser("explain", help="print the report of what tokred finds and rewrites")
    explain.add_argument("spec", metavar="SPEC", help=spec_help)
    explain.add_argument("--option", "-O", action="append", default=[], metavar="KEY=VALUE", help=option_help)
    explain.add_argument("--inner", help="inner compiler the rewritten graph runs with (default: eager)")

    export = commands.add_parser("export", help="rewrite the model and export it to ONNX (checked in onnxruntime)")
    export.add_argument("spec", metavar="SPEC", help=spec_help)
    export.add_argument("-o", "--output", required=True, metavar="OUT.onnx", help="where to write the ONNX file")
    export.add_argument("--option", "-O", action="append", default=[], metavar="KEY=VALUE", help=option_help)
    export.add_argument("--static-batch", action="store_true", help="export with a fixed batch size")
    export.add_argument("--atol", type=float, default=1e-4,
                        help="largest abs difference allowed between onnxruntime and PyTorch (default 1e-4)")
    _add_generate_parser(commands)
    # The demo parses its own arguments (tokred.tools.demo.main); listed here for the help text.
    commands.add_parser("demo", add_help=False,
                        help="token merging on the real MiniLM model (see: tokred demo --help)")
    return parser


def _add_generate_parser(commands) -> None:
    gen = commands.add_parser("generate", help="generate text, speculatively (tokred.generate), and print its stats")
    gen.add_argument("--model", default="smollm2",
                     help="an offline causal LM (smollm2, see tokred.tools.offline) or hf:MODEL_TYPE[?k=v&...] "
                          "(random weights, no tokenizer: the prompt's UTF-8 bytes are the token ids)")
    gen.add_argument("--prompt", required=True, help="the prompt text")
    gen.add_argument("--max-new-tokens", type=int, default=32, metavar="N", help="tokens to generate (default 32)")
    gen.add_argument("--draft", choices=["none", "prompt_lookup", "early_exit"], default="none",
                     help="draft for speculative decoding (default none: plain decoding)")
    gen.add_argument("--k", type=int, default=4, help="most draft tokens per verification (default 4)")
    gen.add_argument("--fixed-k", action="store_true", help="do not adapt k to the acceptance")
    gen.add_argument("--ngram", type=int, default=3, help="longest n-gram prompt lookup matches (default 3)")
    gen.add_argument("--min-ngram", type=int, default=None,
                     help="shortest n-gram match prompt lookup drafts from (default min(2, --ngram): "
                          "1-token matches draft nothing)")
    gen.add_argument("--exit-layer", type=int, metavar="L", help="early exit: blocks the draft runs")
    gen.add_argument("--cpu-linear", action="store_true",
                     help="compile the model with tokred's cpu_linear pass (oneDNN linears on packed weights: "
                          "cheaper multi-token verification forwards on CPU, fp32)")
    gen.add_argument("--sample", action="store_true", help="sample (default: greedy)")
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, help="seed for sampling")


def _load_causal_lm(spec: str):
    """(model, tokenizer or None, description) for ``--model``."""
    from tokred.tools.offline import CAUSAL_LMS, load_causal_lm

    if spec in CAUSAL_LMS:
        model, tokenizer = load_causal_lm(spec)
        return model, tokenizer, f"{spec} ({type(model).__name__}, fp32)"
    if not spec.startswith("hf:"):
        raise ValueError(f"--model {spec!r}: expected one of {', '.join(CAUSAL_LMS)} or hf:MODEL_TYPE[?k=v&...]")
    from tokred.tools.models import load_spec

    if "task=" not in spec:
        spec += ("&" if "?" in spec else "?") + "task=causal-lm"
    loaded = load_spec(spec)
    return loaded.model, None, loaded.description.rsplit(", input ", 1)[0]


def run_generate(args: argparse.Namespace) -> None:
    import torch

    from tokred.runtime.generate import generate

    model, tokenizer, description = _load_causal_lm(args.model)
    print(f"model: {description}")
    if tokenizer is not None:
        ids = tokenizer(args.prompt, return_tensors="pt").input_ids
        eos = tokenizer.eos_token_id
    else:
        vocab = model.config.get_text_config(decoder=True).vocab_size
        ids = torch.tensor([[b % vocab for b in args.prompt.encode("utf-8")]])
        eos = None
    draft = None if args.draft == "none" else args.draft
    if args.cpu_linear:
        from tokred.backend import backend

        model = torch.compile(model, backend=backend(inner="eager", cpu_linear="onednn"))
    result = generate(model, ids, args.max_new_tokens, draft=draft, k=args.k, adaptive_k=not args.fixed_k,
                      do_sample=args.sample, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                      eos_token_id=eos, ngram=args.ngram, min_ngram=args.min_ngram,
                      exit_layer=args.exit_layer)
    new = result.sequences[0, ids.shape[1]:].tolist()
    if eos is not None and eos in new:
        new = new[:new.index(eos)]
    print(tokenizer.decode(new) if tokenizer is not None else f"token ids: {new}")
    _print_stats(result.stats, args.draft)


def _print_stats(stats, draft: str) -> None:
    rows = [("draft", draft),
            ("new tokens", str(stats.new_tokens)),
            ("target forwards", str(stats.target_forwards)),
            ("drafts proposed / accepted", f"{stats.proposed} / {stats.accepted}"),
            ("acceptance rate", f"{stats.acceptance_rate:.3f}"),
            ("tokens per target forward", f"{stats.mean_accepted_length:.3f}"),
            ("time to first token", f"{stats.time_to_first_token_s * 1e3:.1f} ms"),
            ("tokens/s", f"{stats.tokens_per_s:.1f}")]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        width = max(len(name) for name, _ in rows)
        for name, value in rows:
            print(f"{name:<{width}}  {value}")
        return
    table = Table(title="tokred.generate")
    table.add_column("stat")
    table.add_column("value", justify="right")
    for name, value in rows:
        table.add_row(name, value)
    Console(width=100).print(table)


def _load_model(args: argparse.Namespace, options: dict[str, Any]):
    """Validate ``options`` (before the model is built: that can take a while), then load the spec."""
    import tokred
    from tokred.tools.models import load_spec

    tokred.parse_options(options)
    loaded = load_spec(args.spec)
    print(f"model: {loaded.description}")
    return loaded


def run_explain(args: argparse.Namespace) -> None:
    import tokred

    options = parse_option_args(args.option)
    if args.inner is not None:
        options["inner"] = args.inner
    loaded = _load_model(args, options)
    report = tokred.explain(loaded.model, *loaded.args, example_kwargs=loaded.kwargs, **options)
    print(report)


def run_export(args: argparse.Namespace) -> None:
    import tokred

    options = parse_option_args(args.option)
    loaded = _load_model(args, options)
    result = tokred.export_onnx(loaded.model, loaded.args, args.output, example_kwargs=loaded.kwargs,
                                dynamic_batch=not args.static_batch, atol=args.atol, **options)
    print(result.report)
    print(f"wrote {result.path}")
    print(f"inputs: {', '.join(result.inputs)}; outputs: {', '.join(result.outputs)}; "
          f"batch axis: {'dynamic' if result.dynamic_batch else 'static'}")
    sizes = ", ".join(map(str, result.batch_sizes))
    print(f"checked in onnxruntime at batch sizes {sizes}: max |onnxruntime - torch| = "
          f"{result.max_abs_diff:.2e} (atol {args.atol:g})")


def run_demo(demo_argv: list[str]) -> int:
    from tokred.tools.demo import main as demo_main

    return demo_main(demo_argv)


COMMANDS = {"explain": run_explain, "export": run_export, "generate": run_generate}


def _error_message(error: BaseException) -> str:
    """The error as the user should read it: Dynamo wraps backend errors, so show the backend's own."""
    inner = getattr(error, "inner_exception", None)
    if isinstance(inner, BaseException):
        error = inner
    text = str(error).strip()
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    flags = list(itertools.takewhile(lambda a: a.startswith("-"), argv))
    command = argv[len(flags):len(flags) + 1]
    if command == ["demo"] and set(flags) <= {"--debug"}:
        # Everything after 'demo' belongs to the demo's own parser.
        debug, run = "--debug" in flags, functools.partial(run_demo, argv[len(flags) + 1:])
    else:
        args = build_parser().parse_args(argv)
        debug, run = args.debug, functools.partial(COMMANDS[args.command], args)
    try:
        return run() or 0
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # the CLI's contract: a message, not a traceback
        if debug:
            raise
        print(f"tokred: error: {_error_message(error)}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
