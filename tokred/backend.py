"""The torch.compile backend: analyse the captured graph, run the passes, hand it to the inner compiler.

    torch.compile(model, backend="tokred", options={...})
    torch.compile(model, backend=tokred.backend(**options))
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from torch import fx

from tokred.passes import cpu_linear, merge, prune, sparse_attention
from tokred.rewriter import analysis
from tokred.rewriter.flops import graph_flops
from tokred.rewriter.options import Options, parse_options, register_pass_options
from tokred.rewriter.report import Report

# The pass table (option name -> pass module, in the order they run: the token-reducing passes,
# then sparse attention on the attention left, then the CPU linear kernels on the projections
# that are left: it runs last because it replaces projection nodes the others read). rewriter/ never imports it.
# A pass module has ``validate(value) -> dict`` (its options) and
# ``apply(gm, facts, opts, report, options, example_inputs)``.
PASSES: dict[str, Any] = {prune.NAME: prune, merge.NAME: merge, sparse_attention.NAME: sparse_attention,
                          cpu_linear.NAME: cpu_linear}
for _name, _module in PASSES.items():
    register_pass_options(_name, _module.validate)


def rewrite(gm: fx.GraphModule, example_inputs, options: Options) -> tuple[fx.GraphModule, Report]:
    """Analyse ``gm`` and apply the passes named in ``options``; returns the graph and its report.

    With no pass options the graph is analysed, not changed.
    """
    facts = analysis.analyze(gm)
    report = facts.to_report()
    with unguarded(example_inputs):
        report.flops_before = graph_flops(gm)
    for name, module in PASSES.items():
        if name in options.passes:
            module.apply(gm, facts, options.passes[name], report, options, example_inputs)
    if report.changed:
        gm.graph.lint()
        gm.recompile()
    with unguarded(example_inputs):
        report.flops_after = graph_flops(gm) if report.changed else report.flops_before
    return gm, report


def unguarded(example_inputs):
    """A context in which evaluating the graph's symbolic sizes adds no guard.

    For figures of the report only (FLOPs of a dynamic graph, taken at the sizes it was captured
    with): a guard there would pin each symbolic size to its example value, and Dynamo would
    recompile the graph for every other value (e.g. at each decode step of a growing KV cache).
    Never wrap code whose rewrite depends on a size: that must guard.
    """
    fake_mode = torch._guards.detect_fake_mode(example_inputs)
    shape_env = getattr(fake_mode, "shape_env", None)
    return shape_env.suppress_guards() if shape_env is not None else contextlib.nullcontext()


def inner_compile(gm: fx.GraphModule, example_inputs, inner: str) -> Callable:
    """Compile ``gm`` with the named inner compiler."""
    if inner == "inductor":
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)
    if inner == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, example_inputs)
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
        gm, report = rewrite(gm, example_inputs, self.options)
        report.graphs = 1
        self.reports.append(report)
        if self.on_report is not None:
            self.on_report(report)
        return inner_compile(gm, example_inputs, self.options.inner)

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
    """The entry point registered as ``torch_dynamo_backends: tokred``."""
    return TokredBackend(parse_options(options))(gm, example_inputs)


def _register_by_name() -> None:
    # The entry point covers installed copies; registering here covers a source checkout too.
    from torch._dynamo.backends.registry import _COMPILER_FNS, register_backend

    if "tokred" not in _COMPILER_FNS:
        register_backend(tokred_backend, name="tokred")


_register_by_name()
