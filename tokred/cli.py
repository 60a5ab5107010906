"""The ``tokred`` command line.

    tokred explain SPEC [--option KEY=JSON ...] [--inner eager]
    tokred export SPEC -o OUT.onnx [--option KEY=JSON ...] [--static-batch] [--atol 1e-4]
    tokred demo [DEMO ARGS ...]      (tokred.demo; ``tokred demo --help`` lists its arguments)

SPEC names a model and its example input (see :mod:`tokred.models`): ``minilm``, ``timm:NAME``,
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
    # The demo parses its own arguments (tokred.demo.main); listed here for the help text.
    commands.add_parser("demo", add_help=False,
                        help="token merging on the real MiniLM model (see: tokred demo --help)")
    return parser


def _load_model(args: argparse.Namespace, options: dict[str, Any]):
    """Validate ``options`` (before the model is built: that can take a while), then load the spec."""
    import tokred
    from tokred.models import load_spec

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
    from tokred.demo import main as demo_main

    return demo_main(demo_argv)


COMMANDS = {"explain": run_explain, "export": run_export}


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
