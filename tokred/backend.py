"""The torch.compile backend: analyse the captured graph, run the passes, hand it to the inner compiler.

    torch.compile(model, backend="tokred", options={...})
    torch.compile(model, backend=tokred.backend(**options))
"""

from __future__ import annotations

import contextlib
import copy
import logging
from typing import Any, Callable

from torch import fx

from tokred.compat import torch_api
from tokred.passes import cpu_linear, merge, prune, sparse_attention
from tokred.rewriter import analysis
from tokred.rewriter.flops import graph_flops
from tokred.rewriter.options import Options, parse_options, register_pass_options
from tokred.rewriter.report import Report, note_unchanged, unchanged_reason
from tokred.triton_ops.common import kernel_settings

log = logging.getLogger(__name__)

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

    With no pass options the graph is analysed, not changed. Analysis and each pass are
    transactions: where one fails, the graph is left as it was before it, the report says why in
    one line, and compilation goes on (``strict=True`` raises instead). A user's compile never
    fails because tokred could not handle a model.
    """
    try:
        facts = analysis.analyze(gm)
    except Exception as error:
        if options.strict:
            raise
        report = Report()
        report.note(f"analysis failed, the model passes through unchanged: {failure_line(error)}")
        log.debug("tokred: analysis failed", exc_info=True)
        return gm, report
    report = facts.to_report()
    with unguarded(example_inputs):
        report.flops_before = graph_flops(gm)
    for name, module in PASSES.items():
        if name in options.passes:
            _apply_pass(name, module, gm, facts, report, options, example_inputs)
    if report.changed:
        gm.graph.lint()
        gm.recompile()
    with unguarded(example_inputs):
        report.flops_after = graph_flops(gm) if report.changed else report.flops_before
    return gm, report


def _apply_pass(name: str, module, gm: fx.GraphModule, facts, report: Report, options: Options,
                example_inputs) -> None:
    """Run one pass; where it raises, put the graph and the site statuses back as they were."""
    saved_nodes = list(gm.graph.nodes)
    saved_graph = _copy_graph(gm.graph)
    saved_sites = [(s.status, s.reason, list(s.passes)) for s in report.attention_sites]
    try:
        module.apply(gm, facts, options.passes[name], report, options, example_inputs)
        if name != cpu_linear.NAME:  # cpu_linear notes its own counts
            reason = unchanged_reason(report, name)
            if reason is not None:
                note_unchanged(report, name, reason)  # an option that changed nothing says so
    except Exception as error:
        if options.strict or _is_option_error(error):
            raise
        log.debug("tokred: pass %s failed", name, exc_info=True)
        _keep_node_attributes(saved_nodes, saved_graph)
        gm.graph = saved_graph
        gm.recompile()
        for site, (status, reason, passes) in zip(report.attention_sites, saved_sites):
            site.status, site.reason, site.passes = status, reason, passes
        report.note(f"{name}: not applied, the graph is left as it was: {failure_line(error)}")


def _is_option_error(error: BaseException) -> bool:
    """A bad option found while a pass runs (a per-block list longer than the model's blocks):
    the user's error, raised as the options' own errors are, naming the option."""
    return isinstance(error, ValueError) and "option '" in str(error)


def _keep_node_attributes(originals: list, copies: fx.Graph) -> None:
    """Give each copied node the attributes Dynamo set on the original node object, outside its
    meta (``_dynamo_source`` on placeholders, which aot_autograd reads)."""
    for original, copied in zip(originals, copies.nodes):
        for attr, value in vars(original).items():
            if attr not in vars(copied):
                setattr(copied, attr, value)


def _copy_graph(graph: fx.Graph) -> fx.Graph:
    """A node-for-node copy of ``graph`` (fx copies each node's metadata shallowly: cheap)."""
    return copy.deepcopy(graph)


def failure_line(error: BaseException, limit: int = 300) -> str:
    """An exception as one line: its type and the first line of its message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0][:limit] if lines else 'no message'}"


def unguarded(example_inputs):
    """A context in which evaluating the graph's symbolic sizes adds no guard.

    For figures of the report only (FLOPs of a dynamic graph, taken at the sizes it was captured
    with): a guard there would pin each symbolic size to its example value, and Dynamo would
    recompile the graph for every other value (e.g. at each decode step of a growing KV cache).
    Never wrap code whose rewrite depends on a size: that must guard.
    """
    fake_mode = torch_api.detect_fake_mode(example_inputs)
    shape_env = getattr(fake_mode, "shape_env", None)
    return shape_env.suppress_guards() if shape_env is not None else contextlib.nullcontext()


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
