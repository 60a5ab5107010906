"""The torch.compile backend: analyse the captured graph, run the passes, hand it to the inner compiler.

    torch.compile(model, backend="tokred", options={...})
    torch.compile(model, backend=tokred.backend(**options))
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from torch import fx

from tokred.compat import torch_api
from tokred.passes import cpu_linear, kv_cache, merge, prune, sparse_attention
from tokred.rewriter import analysis
from tokred.rewriter.flops import graph_flops
from tokred.rewriter.normalize import normalize
from tokred.rewriter.options import Options, parse_options, register_pass_options
from tokred.rewriter.driver import failure_line, run_pass, unguarded
from tokred.rewriter.report import Report, warn_unchanged
from tokred.triton_ops.common import kernel_settings

log = logging.getLogger(__name__)

# The pass table (option name -> pass class, in the order they run: the token-reducing passes,
# then the KV-cache cut (it reads the attention's queries and keys before sparse attention
# replaces them), then sparse attention on the attention left, then the CPU linear kernels on the
# projections that are left: it runs last because it replaces projection nodes the others read). rewriter/
# never imports it. Every pass follows rewriter.driver's protocol (options -> match -> plan -> apply).
PASSES: dict[str, type] = {p.name: p for p in (prune.Prune, merge.Merge, kv_cache.KVCache,
                                               sparse_attention.SparseAttention, cpu_linear.CpuLinear)}
for _name, _pass in PASSES.items():
    register_pass_options(_name, _pass.Options.parse)


def rewrite(gm: fx.GraphModule, example_inputs, options: Options) -> tuple[fx.GraphModule, Report]:
    """Analyse ``gm`` and apply the passes named in ``options``; returns the graph and its report.

    With no pass options the graph is analysed, not changed. Analysis and each pass are
    transactions: where one fails, the graph is left as it was before it, the report says why in
    one line, and compilation goes on (``strict=True`` raises instead). A user's compile never
    fails because tokred could not handle a model.
    """
    requested = [name for name in PASSES if name in options.passes]  # in the table's order
    try:
        normalize(gm)  # one spelling per op (in-place arithmetic out of place, where it is safe)
        facts = analysis.analyze(gm)
    except Exception as error:
        if options.strict:
            raise
        report = Report()
        report.note(f"analysis failed, the model passes through unchanged: {failure_line(error)}")
        log.debug("tokred: analysis failed", exc_info=True)
        warn_unchanged(report, requested)
        return gm, report
    report = facts.to_report()
    with unguarded(example_inputs):
        report.flops_before = graph_flops(gm)
    for name in requested:
        run_pass(PASSES[name], gm, facts, options.passes[name], report, options, example_inputs)
    with unguarded(example_inputs):
        report.flops_after = graph_flops(gm) if report.changed else report.flops_before
    warn_unchanged(report, requested)  # nothing silent
    return gm, report


def inner_compile(gm: fx.GraphModule, example_inputs, inner: str, mode: str | None = None) -> Callable:
    """Compile ``gm`` with the named inner compiler (``mode``: inductor's, as torch.compile takes it)."""
    if inner == "inductor":
        return torch_api.compile_inductor(gm, example_inputs, mode)
    if inner == "aot_eager":
        return torch_api.compile_aot_eager(gm, example_inputs)
    return gm.forward


class TokredBackend:
    """A configured backend: ``torch.compile(model, backend=TokredBackend(options))``.

    ``reports`` collects one :class:`Report` per captured graph (graph breaks give several).
    """

    def __init__(self, options: Options, on_report: Callable[[Report], None] | None = None):
        self.options = options
        self.reports: list[Report] = []
        self.on_report = on_report

    def __call__(self, gm: fx.GraphModule, example_inputs) -> Callable:
        settings = self.options.kernel_settings
        with kernel_settings(**settings):  # the passes and the inner compiler's tracing read them
            gm, report = rewrite(gm, example_inputs, self.options)
            report.graphs = 1
            self.reports.append(report)
            if self.on_report is not None:
                self.on_report(report)
            compiled = inner_compile(gm, example_inputs, self.options.inner, self.options.mode)
        if not settings:
            return compiled

        def run(*args):  # ops decide at run time too (eager graphs, the custom ops' dispatch)
            with kernel_settings(**settings):
                return compiled(*args)

        # inductor's compiled function takes its inputs as one list ("boxed"): so does the wrapper
        run._boxed_call = getattr(compiled, "_boxed_call", False)
        return run

    @property
    def report(self) -> Report:
        """All captured graphs' reports folded into one."""
        total = Report()
        for r in self.reports:
            total.merge(r)
        return total


def backend(**options: Any) -> TokredBackend:
    """A configured tokred backend; options are validated now, before anything is compiled."""
    return TokredBackend(parse_options(options))


def tokred_backend(gm: fx.GraphModule, example_inputs, options: dict | None = None, mode: str | None = None):
    """The entry point registered as ``torch_dynamo_backends: tokred``; torch.compile passes its
    ``mode`` here (or give it as the option ``mode``)."""
    options = dict(options or {})
    if mode is not None:
        options.setdefault("mode", mode)
    return TokredBackend(parse_options(options))(gm, example_inputs)


# The entry point covers installed copies; registering here covers a source checkout too.
torch_api.register_backend(tokred_backend, "tokred")
