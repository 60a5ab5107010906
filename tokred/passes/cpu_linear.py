"""CPU linear kernels for decoding: projections as oneDNN linears on weights packed once at compile.

    torch.compile(model, backend=tokred.backend(cpu_linear="onednn"))
    torch.compile(model, backend="tokred", options={"cpu_linear": {"kernel": "onednn", "min_rows": 2}})

Why: speculative decoding verifies w = 1 + k tokens in one forward, so its projections run with
M = w rows. On CPUs where MKL's sgemm is tuned for large M (measured on an AMD EPYC: a forward
over 2 tokens cost 1.69x a 1-token forward, 11 tokens 2.35x, where the FLOPs say ~1x: the weights
are read once either way), drafting barely pays. oneDNN's inner-product on a weight reordered
into its blocked layout (``torch.ops.mkldnn._reorder_linear_weight``) keeps the cost of a few rows
close to that of one (~1.1-1.2x at M = 2 for the large projections and the LM head).

What the pass does, on the graph Dynamo captured (after the token-reducing passes):
every projection site of the analysis (:class:`tokred.rewriter.analysis.ProjectionSite`: ``linear``,
GPT-2's ``addmm``, ``x @ W``) whose weight is a parameter or buffer, and whose input, weight and
bias are fp32 CPU tensors, becomes ``torch.ops.mkldnn._linear_pointwise(x, W_packed, b, "none",
[], "")``. ``W_packed`` is packed from the weight's value at compile time and stored on the
graph module as a new (non-persistent) buffer, read by a ``get_attr`` node; the op takes any
number of rows, so a dynamic token count (decode steps of 1..k+1 tokens, a growing KV cache)
needs no recompile. Every other site is left as it is, with the reason in the report (and an
error with ``strict=True``).

One row stays with MKL: where the graph fixes a projection's rows below ``min_rows`` (default 2;
Dynamo specialises a size of 1, so the plain decode step of one token gets its own graph), the
projection is kept as it is, because MKL's single-row kernel is as fast or faster there (oneDNN
adds ~10-25 us per call on the small projections). So plain greedy decoding runs the same kernels
with and without this option; only prefills and multi-token (verification) steps change kernel.

Inner compilers: "eager" and "aot_eager". With "inductor" (the backend's default inner compiler)
the pass packs nothing and says why: Inductor lowers the oneDNN linear only for frozen weights
(graph constants), and with ``freezing`` it packs fp32 weights for MKL itself.

Inference only: the packed weight is a copy, made once. The op has no autograd formula, so a graph
compiled with grad enabled for a weight that requires grad is left unchanged (the report says
so), and a weight changed in place after compiling is not seen by the compiled graph (compile
again, as with Inductor's freezing). Memory: one packed copy of every packed weight.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections import Counter
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import fx

from tokred.compat import torch_api
from tokred.compat.torch_api import FakeTensor, FakeTensorMode
from tokred.rewriter.analysis.graph import LINEAR_TARGETS, example_value, is_state, shape_of
from tokred.rewriter.driver import GraphPass, Skip
from tokred.rewriter.surgery import RewriteError

NAME = "cpu_linear"
KERNELS = ("onednn",)
PACKED_PREFIX = "_tokred_cpu_linear_"


# ----------------------------------------------------------------------------- options

@dataclass(frozen=True)
class CpuLinearOptions:
    """kernel: "onednn" (the one kernel so far).
    min_rows: a projection whose rows (the product of its input's leading dims) are a static number
              below this is kept as it is (default 2: a graph specialised to one token, the plain
              decode step, keeps MKL's single-row kernel, which oneDNN does not beat; graphs with
              a dynamic or larger token count are packed). 1 packs every site.
    """

    kernel: str = "onednn"
    min_rows: int = 2

    @classmethod
    def parse(cls, value: Any) -> "CpuLinearOptions":
        """``"onednn"`` or ``{"kernel": "onednn", "min_rows": int}``; a bad value raises naming the option."""
        if isinstance(value, str):
            value = {"kernel": value}
        if not isinstance(value, dict):
            raise ValueError(f"tokred option 'cpu_linear' must be one of {KERNELS} or a dict like "
                             f"{{'kernel': 'onednn'}}, got {value!r}")
        known = {"kernel", "min_rows"}
        for key in value:
            if key not in known:
                raise ValueError(f"unknown tokred option 'cpu_linear.{key}'; known: {', '.join(sorted(known))}")
        kernel = value.get("kernel", "onednn")
        if kernel not in KERNELS:
            raise ValueError(f"tokred option 'cpu_linear.kernel' must be one of {KERNELS}, got {kernel!r}")
        min_rows = value.get("min_rows", 2)
        if isinstance(min_rows, bool) or not isinstance(min_rows, int) or min_rows < 1:
            raise ValueError(f"tokred option 'cpu_linear.min_rows' must be an int >= 1, got {min_rows!r}")
        return cls(kernel=kernel, min_rows=min_rows)


# ----------------------------------------------------------------------------- availability

onednn_unavailable = torch_api.onednn_unavailable


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] fp32 CPU weight -> the same weight reordered into oneDNN's blocked layout (an opaque
    mkldnn tensor [out, in]) for :func:`packed_linear`."""
    return torch_api.onednn_pack_weight(weight)


# Packed copies shared by every graph compiled from the same weight: generate compiles several
# graphs of one model (prefill, one-token and multi-token steps), each would otherwise pack its own
# copy of every weight. Keyed by the weight tensor's identity (the module's own parameter; an
# entry leaves with its weight), per orientation and per value version (an in-place update packs
# again). Not a WeakKeyDictionary: it compares keys with ==, which a tensor answers elementwise.
_PACKED: dict[int, tuple[weakref.ref, dict]] = {}


def shared_pack(weight: torch.Tensor, transpose: bool) -> torch.Tensor:
    """:func:`pack_weight` of ``weight`` ([out, in]; [in, out] with ``transpose``), packed once per
    weight, orientation and value version and shared by the graphs that read it."""
    entry = _PACKED.get(id(weight))
    if entry is None or entry[0]() is not weight:
        entry = (weakref.ref(weight, lambda _, key=id(weight): _PACKED.pop(key, None)), {})
        _PACKED[id(weight)] = entry
    packs = entry[1]  # transpose -> (value version, packed)
    version, packed = packs.get(transpose, (None, None))
    if version != torch_api.tensor_version(weight):
        packed = pack_weight(weight.t() if transpose else weight)
        packs[transpose] = (torch_api.tensor_version(weight), packed)
    return packed


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x [..., in] fp32 CPU, packed from :func:`pack_weight`, bias [out] or None -> [..., out] =
    F.linear(x, weight, bias) up to fp32 rounding (oneDNN sums in another order than MKL)."""
    return torch_api.onednn_linear_op()(x, packed, bias, "none", [], "")


# ----------------------------------------------------------------------------- the pass

@dataclass(frozen=True)
class LinearPlan:
    """One projection to pack: its input node, the weight tensor ([out, in]; [in, out] with
    ``transpose``) and the bias node (or None)."""

    x: fx.Node
    weight: torch.Tensor
    transpose: bool
    bias: Optional[fx.Node]


class CpuLinear(GraphPass):
    """Every eligible projection of ``facts.projections`` becomes a packed oneDNN linear; the
    report says how many were packed and why the others were not."""

    name, Options = NAME, CpuLinearOptions
    marks_sites = False  # projections have no report row: counts go to the notes
    # each packed linear is checked to give its node's shape and dtype, and takes its metadata;
    # (fake propagation could not run the op on the real packed buffer anyway)
    propagates = True

    def precondition(self) -> str:
        if not self.facts.projections:
            return ""  # finish() says so
        unavailable = onednn_unavailable()
        if self.options.inner == "inductor":
            # Inductor lowers mkldnn._linear_pointwise only for weights that are graph constants
            # (freezing), and with freezing it packs fp32 weights for MKL itself.
            unavailable = ("the inner compiler is inductor, which runs oneDNN linears only on frozen weights; "
                           "use inner='eager' or 'aot_eager' with cpu_linear")
            warnings.warn(f"tokred cpu_linear: {unavailable}", stacklevel=2)
        if unavailable:
            return f"{unavailable}; {len(self.facts.projections)} projections left as they are"
        return ""

    def match(self) -> list:
        """Every projection, except those whose rows the graph fixes below ``min_rows`` (noted)."""
        self.values = _state_values(self.gm, self.example_inputs)
        self.kept = Counter()
        sites = []
        for site in self.facts.projections:
            rows = static_rows(site)
            if rows is not None and rows < self.opts.min_rows:
                self.kept[site.role] += 1
            else:
                sites.append(site)
        return sites

    def plan(self, site):
        plan = plan_site(site, self.values)
        return Skip(plan) if isinstance(plan, str) else LinearPlan(*plan)

    def apply(self, site, plan: LinearPlan) -> str:
        _rewrite(self.gm, site.node, plan.x, shared_pack(plan.weight, plan.transpose), plan.bias, self.options.verify)
        return f"packed {site.role}"

    def label(self, site) -> str:
        return f"{site.role} projection {site.node.name}"

    def skip(self, site, reason: str) -> None:
        self.skipped.append((site, reason))  # strict raises in finish(), after every site is counted

    def finish(self) -> None:
        sites = len(self.facts.projections)
        if not sites:
            self.report.note("cpu_linear: no projections found; nothing packed")
            return
        packed = Counter(site.role for site, _ in self.rewritten)
        self.report.note(f"cpu_linear: {sum(packed.values())} of {sites} projections packed for oneDNN "
                         f"({_counts_text(packed) or 'none'})")
        if self.kept:
            self.report.note(f"cpu_linear: {sum(self.kept.values())} projections ({_counts_text(self.kept)}) "
                             f"kept as they are: fewer than min_rows={self.opts.min_rows} rows in this graph")
        skipped: dict = {}
        for site, reason in self.skipped:
            skipped.setdefault(reason, Counter())[site.role] += 1
        for reason, roles in skipped.items():
            line = f"cpu_linear: {sum(roles.values())} projections ({_counts_text(roles)}) left as they are: {reason}"
            self.report.note(line)
            if self.options.strict:
                raise ValueError(f"tokred strict: {line}")


def static_rows(site) -> Optional[int]:
    """The rows a projection multiplies (the product of its input's leading dims) when the graph
    fixes them, None when a dim is symbolic (a dynamic token count)."""
    node = site.node
    x = node.args[1] if node.target is torch.addmm else node.args[0]
    shape = shape_of(x)
    if shape is None or not all(isinstance(d, int) for d in shape):
        return None
    return math.prod(shape[:-1])


def plan_site(site, values: dict):
    """(x node, weight tensor, transpose, bias node or None) for a packable projection site (the
    weight is [out, in], or [in, out] with ``transpose``), or the reason (str) it cannot be packed.
    ``values``: state node -> its real tensor."""
    node = site.node
    if node.target in LINEAR_TARGETS:
        x, w_node = node.args[0], node.args[1]
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        transpose = False
    elif node.target is torch.addmm:  # addmm(bias, x [M, in], W [in, out]) (GPT-2 Conv1D)
        if any(node.kwargs.get(k, 1) != 1 for k in ("beta", "alpha")):
            return "addmm with beta or alpha != 1"
        bias, x, w_node = node.args[0], node.args[1], node.args[2]
        transpose = True
    else:  # x @ W [in, out]
        x, w_node, bias = node.args[0], node.args[1], None
        transpose = True
    if not isinstance(w_node, fx.Node) or w_node not in values:
        return "its weight is computed in the graph, not a parameter or buffer"
    weight = values[w_node]
    if bias is not None and (not isinstance(bias, fx.Node) or bias not in values):
        return "its bias is computed in the graph, not a parameter or buffer"
    x_value = example_value(x)
    tensors = {"input": x_value, "weight": weight}
    if bias is not None:
        tensors["bias"] = values[bias]
    for what, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            return f"its {what} is not a tensor"
        if t.device.type != "cpu":
            return f"its {what} is on {t.device.type} (cpu_linear applies to CPU graphs)"
        if t.dtype != torch.float32:
            return f"its {what} is {t.dtype} (cpu_linear packs float32 only)"
    if weight.dim() != 2 or (bias is not None and tensors["bias"].dim() != 1) or x_value.dim() < 1:
        return f"unexpected shapes: weight {tuple(weight.shape)}, input {tuple(x_value.shape)}"
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors.values()):
        return "compiled with grad enabled for trainable weights (the packed linear is inference-only)"
    return x, weight, transpose, bias


def _rewrite(gm: fx.GraphModule, node: fx.Node, x: fx.Node, packed: torch.Tensor, bias, verify: bool) -> None:
    """Put ``packed_linear(x, packed, bias)`` in place of ``node``; ``packed`` becomes a buffer.
    With ``verify``, the op's fake (shape) function must give the replaced node's shape and dtype."""
    x_value = example_value(x)
    # The graph's own fake mode (Dynamo's, with its shape environment), for the new node's metadata.
    fake_mode = x_value.fake_mode if isinstance(x_value, FakeTensor) else FakeTensorMode(allow_non_fake_inputs=True)
    name = _free_name(gm, PACKED_PREFIX + node.name)
    gm.register_buffer(name, packed, persistent=False)
    sources = getattr(gm, "_param_name_to_source", None)
    if sources is not None:
        # aot_autograd (aot_eager, Inductor) lifts a Dynamo graph's buffers as inputs and wants a
        # source for each; this one is a constant of the compiled graph, made here.
        sources[name] = torch_api.constant_source(name)
    graph = gm.graph
    with graph.inserting_before(node):
        weight = graph.get_attr(name)
        weight.meta["example_value"] = fake_mode.from_tensor(packed, static_shapes=True)
        new = graph.call_function(torch_api.onednn_linear_op(), (x, weight, bias, "none", [], ""))
    if verify:  # a mismatch is a RewriteError: the driver undoes this site (strict: raises)
        check_same_result_type(node, x, weight, bias, fake_mode)
    new.meta = dict(node.meta)  # same output; keeps nn_module_stack for the report
    node.replace_all_uses_with(new)
    graph.erase_node(node)


def check_same_result_type(node: fx.Node, x: fx.Node, weight: fx.Node, bias, fake_mode) -> None:
    """The packed linear on the fake inputs of ``node`` gives its shape (symbolic sizes compared by
    name, so no guard is added) and dtype; raises ValueError naming the node otherwise."""
    expected = example_value(node)
    with fake_mode:
        got = packed_linear(example_value(x), example_value(weight), example_value(bias) if bias is not None else None)
    same = got.dtype == expected.dtype and [str(d) for d in got.shape] == [str(d) for d in expected.shape]
    if not same:
        raise RewriteError(f"the packed linear for {node.name} gives {got.dtype} "
                         f"{list(got.shape)}, the graph had {expected.dtype} {list(expected.shape)}")


def _state_values(gm: fx.GraphModule, example_inputs) -> dict:
    """Parameter/buffer node -> its real tensor: placeholders from the compile call's example inputs
    (Dynamo hands a backend the module's own parameter objects), get_attr nodes from the module."""
    values = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, example_inputs):
        if is_state(node) and isinstance(value, torch.Tensor) and not _is_fake(value):
            values[node] = value
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = _fetch(gm, node.target)
            if isinstance(value, torch.Tensor) and not _is_fake(value):
                values[node] = value
    return values


def _fetch(gm: fx.GraphModule, target: str):
    value = gm
    for part in target.split("."):
        value = getattr(value, part, None)
    return value


def _is_fake(t: torch.Tensor) -> bool:
    return isinstance(t, FakeTensor) or t.device.type == "meta"


def _free_name(gm: fx.GraphModule, base: str) -> str:
    name, i = base, 1
    while hasattr(gm, name):
        name, i = f"{base}_{i}", i + 1
    return name


def _counts_text(counts: Counter) -> str:
    return ", ".join(f"{role} {n}" for role, n in sorted(counts.items()))
