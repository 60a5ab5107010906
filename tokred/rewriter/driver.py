"""The pass driver: one protocol for every graph pass, one place for undo, verify, strict and the report.

    class Merge(GraphPass):
        name, Options = "merge", MergeOptions
        def match(self):          return self.facts.blocks            # the sites, in order
        def plan(self, block):    return MergePlan(...) or Skip("causal attention: ...")
        def apply(self, block, plan): ...; return "merge r=8: 197 -> 189 tokens"

    run_passes(gm, facts, report, options, example_inputs, [(Merge, merge_options), ...])

A pass is a class (one instance per captured graph and run, so its running state lives on it,
not in shared dicts) with a typed options dataclass and three steps:

- ``match()`` -> the sites it considers, in the order it rewrites them;
- ``plan(site)`` -> a plan (plain data a test can assert on without rewriting anything),
  :class:`Skip` with the reason it cannot be rewritten, in words, or :class:`Keep` where the
  options ask nothing of the site;
- ``apply(site, plan)`` -> rewrites the graph for one site and returns what it did (the report's
  reason); a :class:`~tokred.rewriter.surgery.RewriteError` skips that site, its changes undone.

The driver (:func:`run_pass`) owns the rest, the same for every pass: the per-site undo, ``strict``
(a skipped site raises), the report's per-pass status history of each site, the whole-pass
transaction (any other failure puts the graph back as it was, with a one-line note), a final lint,
recompile and, with ``verify``, the output contract, and dropping from the facts the nodes a pass
erased (so the next pass reads no stale site).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Optional

from torch import fx

from tokred.compat import torch_api
from tokred.rewriter.options import Options
from tokred.rewriter.report import FOUND, REWRITTEN, SKIPPED, Report, SiteRecord, note_unchanged, unchanged_reason
from tokred.rewriter.surgery import GraphUndo, RewriteError
from tokred.rewriter.verify import (
    PredictedShapes, ShapeCheckError, check_output_contract, output_signature, propagate_shapes,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Skip:
    """A site a pass leaves as it is, and why (in words a user understands)."""

    reason: str


@dataclass(frozen=True)
class Keep:
    """A site the options ask nothing of (``r`` is 0 at this block): left as it is, the reason
    recorded, never an error."""

    reason: str


class GraphPass:
    """Base of every graph pass; see the module docstring. Subclasses set ``name`` (the option
    name) and ``Options`` (a dataclass with ``parse(value)`` raising ``ValueError`` naming the
    option), and implement :meth:`match`, :meth:`plan` and :meth:`apply`."""

    name: ClassVar[str] = ""
    Options: ClassVar[type] = object
    # whether the pass marks attention-site records (False: it reports in notes only, as cpu_linear)
    marks_sites: ClassVar[bool] = True
    # whether apply() leaves every node's shape metadata true (cpu_linear runs the graph), so that
    # the driver's check needs no propagation of its own
    propagates: ClassVar[bool] = False

    def __init__(self, gm: fx.GraphModule, facts, opts, report: Report, options: Options, example_inputs):
        self.gm, self.facts, self.opts = gm, facts, opts
        self.report, self.options, self.example_inputs = report, options, example_inputs
        self.rewritten: list = []  # (site, what it did)
        self.skipped: list = []  # (site, reason)
        self.cache_outputs: frozenset = frozenset()  # graph outputs allowed fewer tokens (a pruned KV cache)
        self.shapes = PredictedShapes()  # shapes token cuts set without propagation; checked at the end

    def precondition(self) -> str:
        """Why the whole pass cannot run on this graph ("" if it can): the report's note."""
        return ""

    def idle(self) -> str:
        """Why this graph, by design, holds nothing for the pass ("" if it may): a prefill-time pass
        in a decode step's graph. Noted in the report; no site is marked and nothing is warned."""
        return ""

    def match(self) -> list:
        raise NotImplementedError

    def plan(self, site) -> Any:
        raise NotImplementedError

    def apply(self, site, plan) -> str:
        raise NotImplementedError

    def finish(self) -> None:
        """After every site: work over all rewritten sites, and the pass's notes."""

    def record(self, site) -> Optional[SiteRecord]:
        """The report row of ``site`` (None: a site without one, e.g. a projection)."""
        record = getattr(site, "record", None)
        if record is None and hasattr(site, "attention"):
            record = getattr(site.attention, "record", None)
        return record

    def label(self, site) -> str:
        """How ``site`` is named in a strict error."""
        record = self.record(site)
        return record.module if record is not None else str(getattr(site, "module", "") or site)

    # ------------------------------------------------------------------ used by the driver

    def skip(self, site, reason: str) -> None:
        """Leave ``site`` as it is: recorded in the report; with ``strict``, an error."""
        self.skipped.append((site, reason))
        record = self.record(site) if self.marks_sites else None
        text = f"{self.name}: {reason}"
        if record is not None:
            record.mark(SKIPPED, text, self.name)
        if self.options.strict:
            raise ValueError(f"tokred strict: {self.label(site)}: {text}")

    def done(self, site, what: str) -> None:
        self.rewritten.append((site, what))
        record = self.record(site) if self.marks_sites else None
        if record is not None:
            record.mark(REWRITTEN, what, self.name)


def run_pass(pass_type: type, gm: fx.GraphModule, facts, opts, report: Report, options: Options,
             example_inputs) -> Optional[GraphPass]:
    """Run one pass as a transaction; returns the pass (None where it failed and was undone).

    Any failure other than a site's RewriteError (and other than a bad option or ``strict``, which
    are raised) leaves the graph, the site statuses and the facts as they were before the pass, and
    the report says why in one line.
    """
    saved_nodes = list(gm.graph.nodes)
    saved_graph = copy.deepcopy(gm.graph)  # fx copies node metadata shallowly: cheap
    saved_history = [len(s.history) for s in report.attention_sites]
    saved_notes = len(report.notes)  # what the pass said it did is undone with it
    outputs_before = output_signature(gm)
    try:
        p = pass_type(gm, facts, opts, report, options, example_inputs)
        idle = p.idle()
        if idle:
            report.note(f"{p.name}: {idle}")
            return p
        _run_sites(p)
        if p.rewritten:
            gm.graph.lint()
            gm.recompile()
            # once per pass: true shapes for the next pass (predicted ones are replaced), then the checks
            if example_inputs is not None and (options.verify or p.shapes.expected) and not p.propagates:
                propagate_shapes(gm, example_inputs)
            if options.verify and example_inputs is not None:
                p.shapes.check(gm.graph)
                check_output_contract(outputs_before, output_signature(gm), skip=p.cache_outputs)
        forget_erased(facts, gm.graph)
        if p.marks_sites:
            reason = unchanged_reason(report, p.name)
            if reason is not None:
                note_unchanged(report, p.name, reason)  # an option that changed nothing says so
        return p
    except Exception as error:
        if options.strict or is_option_error(error):
            raise
        log.debug("tokred: pass %s failed", pass_type.name, exc_info=True)
        _keep_node_attributes(saved_nodes, saved_graph)
        gm.graph = saved_graph
        gm.recompile()
        _rebind_facts(facts, saved_nodes, list(saved_graph.nodes))
        for site, length in zip(report.attention_sites, saved_history):
            del site.history[length:]
        del report.notes[saved_notes:]
        if isinstance(error, ShapeCheckError):  # the check refused the rewrite: a reason, not a failure
            note_unchanged(report, pass_type.name, f"the graph is left as it was: {failure_line(error)}")
        else:
            report.note(f"{pass_type.name}: not applied, the graph is left as it was: {failure_line(error)}")
        return None


def _run_sites(p: GraphPass) -> None:
    reason = p.precondition()
    if reason:
        p.report.note(f"{p.name}: {reason}")
        if p.options.strict:
            raise ValueError(f"tokred strict: {p.name}: {reason}")
        return
    for site in p.match():
        plan = p.plan(site)
        if isinstance(plan, Skip):
            p.skip(site, plan.reason)
            continue
        if isinstance(plan, Keep):
            record = p.record(site) if p.marks_sites else None
            if record is not None:
                record.mark(FOUND, f"{p.name}: {plan.reason}", p.name)
            continue
        undo, predicted = GraphUndo(p.gm.graph), p.shapes.snapshot()
        try:
            what = p.apply(site, plan)
        except RewriteError as exc:
            undo.restore()
            p.shapes.restore(predicted)
            p.gm.recompile()
            p.skip(site, str(exc))
            continue
        if what is not None:
            p.done(site, what)
    p.finish()


def forget_erased(facts, graph: fx.Graph) -> None:
    """Drop from ``facts`` the projection sites whose node a pass erased (sparse attention replaces
    a decomposed attention's nodes): a later pass must not read them."""
    if facts is None:
        return
    alive = set(graph.nodes)
    facts.projections = [s for s in facts.projections if s.node in alive]


def _rebind_facts(facts, originals: list, copies: list) -> None:
    """After an undo that swapped in a copy of the graph, point the facts at the copy's nodes."""
    if facts is None:
        return
    mapping = dict(zip(originals, copies))
    for obj in _fact_objects(facts):
        for attr, value in vars(obj).items():
            if isinstance(value, fx.Node) and value in mapping:
                setattr(obj, attr, mapping[value])
    axes = facts.token_axes
    axes.dims = {mapping.get(node, node): dims for node, dims in axes.dims.items() if node in mapping}


def _fact_objects(facts) -> Iterable:
    yield from facts.attention_sites
    yield from facts.projections
    yield from facts.blocks


def is_option_error(error: BaseException) -> bool:
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


def failure_line(error: BaseException, limit: int = 300) -> str:
    """An exception as one line: its type and the first line of its message (a shape check's
    message alone: it says in words where the graph stopped fitting)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0][:limit] if lines else "no message"
    return text if isinstance(error, ShapeCheckError) else f"{type(error).__name__}: {text}"


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
