"""``tokred.export_onnx``: capture -> tokred rewrite -> ONNX -> checked in onnxruntime -> file.

    result = tokred.export_onnx(model, (images,), "vit.onnx")
    result = tokred.export_onnx(bert, (), "bert.onnx",
                                example_kwargs={"input_ids": ids, "attention_mask": mask})

Steps, each named in the error it raises when it fails:

1. ``options``: validated by :func:`tokred.rewriter.options.parse_options` before anything runs.
2. ``capture``: the model is captured as one torch-level FX graph.
3. ``rewrite``: :func:`tokred.backend.rewrite` analyses it and applies the passes in ``options``.
4. ``onnx export``: the rewritten graph, wrapped as a standalone module, goes through
   ``torch.onnx.export(dynamo=True)`` with tokred's op lowerings as the custom translation table.
5. ``onnx save``: the model is written to a temporary directory next to ``path``.
6. ``onnxruntime`` / ``onnxruntime check``: the ONNX model runs on the CPU provider, on the example
   inputs and (dynamic batch) on a second batch size, and every output is compared with PyTorch.
   Only when every comparison is within tolerance is the file moved to ``path`` (ARCHITECTURE.md,
   invariant 6); otherwise no file is written and :class:`ExportMismatchError` says which output
   differed and by how much.

Capture route: ``torch.compile(model, backend=<capturing backend>, fullgraph=True)``.
It hands :func:`tokred.backend.rewrite` exactly the graph and ``example_inputs`` the tokred backend
gets under ``torch.compile`` (parameters and buffers lifted to placeholders, SymInt placeholders for
dynamic sizes, ``nn_module_stack`` and ``example_value`` on the nodes), so an export runs the same
analysis and passes on the same IR as compilation does. ``torch._dynamo.export`` would hand back a
ready standalone module, but one whose weights are ``get_attr`` nodes: a different graph from the
backend's, which the analysis would have to support twice. The price of this route is to rebuild
the calling convention, which :class:`CapturedProgram` does: every placeholder is bound, by object
identity at the captured call, to a user input tensor, a constant (parameter/buffer), or a dynamic
size read from an input's shape; every model output tensor is bound to a graph output the same way.
Capturing goes through ``tokred.compat.torch_api.capture`` (as ``tokred.explain`` does): the
caller's other compiled models keep their compiled code.

Dynamic batch: dim 0 of every tensor input whose dim 0 equals the first input's is marked dynamic
(Dynamo's ``mark_dynamic`` on shallow copies, so the caller's tensors are left unmarked), so
reshape arguments carry the batch as a symbol, not a literal. Where that capture fails, or torch
specialises the batch anyway (batch size 1 always is), the export falls back to a static batch and
the report says so. The ONNX axis is named ``"batch"`` on every input and output that has it.

Inputs and outputs of the ONNX model are the tensor leaves of ``(example_inputs, example_kwargs)``
and of the model's output, in ``torch.utils._pytree`` order: tuples and lists in order, dicts and
transformers ``ModelOutput`` in key insertion order (``None`` fields are absent), nested containers
depth first. Non-tensor leaves (``None``, numbers, strings) are constants of the export and are not
inputs or outputs. Names are the leaves' paths: ``input_ids``, ``attention_mask``, ``x``,
``last_hidden_state``, ``pooler_output``, ``output_0``, ... (:attr:`ExportResult.inputs`/``outputs``).

The reference every ONNX output is compared with is the original model run eagerly in PyTorch when
the rewrite left the graph unchanged; when passes rewrote sites (``report.changed``), it is the
rewritten graph run eagerly in PyTorch (a token-reducing rewrite changes the numbers on purpose;
the passes' own tests hold it to its reference implementation).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import fx

from tokred.backend import rewrite
from tokred.compat import torch_api
from tokred.compat.torch_api import mark_dynamic
from tokred.rewriter.options import parse_options
from tokred.rewriter.report import Report
from tokred.export_io import (  # noqa: F401  (names kept importable from here)
    ExportError, ExportMismatchError, error_summary, FlatInputs, flatten_inputs, flatten_outputs, second_batch_inputs, run_onnxruntime, compare,
)

__all__ = ["export_onnx", "ExportResult", "ExportError", "ExportMismatchError", "CapturedProgram"]

BATCH_AXIS = "batch"


@dataclass
class ExportResult:
    """What :func:`export_onnx` wrote and how it was checked.

    path:          the ONNX file (written only after every check passed).
    report:        the tokred report of the captured graph (its notes say how the export went).
    max_abs_diff:  the largest |onnxruntime - PyTorch| over every output and every batch size checked.
    outputs:       names of the ONNX outputs, all compared, in the documented flattening order.
    inputs:        names of the ONNX inputs, in the same order as the flattened example inputs.
    dynamic_batch: whether the ONNX model has a dynamic ``batch`` axis.
    batch_sizes:   the batch sizes onnxruntime was checked at.
    """

    path: Path
    report: Report
    max_abs_diff: float
    outputs: list
    inputs: list = field(default_factory=list)
    dynamic_batch: bool = False
    batch_sizes: tuple = ()


# ------------------------------------------------------------------------------------------ capture

@dataclass
class Captured:
    """One Dynamo graph of the model and how to call it.

    bindings: one per placeholder: ("input", k) the k-th flat input tensor, ("const", tensor) a
              parameter/buffer/other tensor the graph reads, ("size", k, d) dim d of input k.
    outputs:  for each model output tensor (flattening order), the index of the graph output.
    """

    gm: fx.GraphModule
    example_inputs: list
    bindings: list
    outputs: list
    output_names: list
    batch_inputs: list  # flat input indices whose dim 0 is the dynamic batch in the graph
    batch_outputs: list  # model output indices whose dim 0 is the dynamic batch


def _batch_candidates(tensors: Sequence[torch.Tensor]) -> list[int]:
    """Inputs whose dim 0 is the batch: dim 0 equal to the first input tensor's dim 0."""
    if not tensors or tensors[0].dim() == 0:
        return []
    batch = tensors[0].shape[0]
    return [k for k, t in enumerate(tensors) if t.dim() > 0 and t.shape[0] == batch]


def _symbol(value: Any) -> Any:
    """The sympy expression behind a SymInt, or None for a plain int."""
    return value.node.expr if isinstance(value, torch.SymInt) else None


def _placeholder_value(node: fx.Node) -> Any:
    return node.meta.get("example_value", node.meta.get("val"))


def _bind_placeholders(gm: fx.GraphModule, runtime_args: Sequence[Any],
                       inputs: Sequence[torch.Tensor]) -> list:
    """Bind each placeholder of ``gm`` to a flat input, a constant tensor or an input's size."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(runtime_args):
        raise ExportError("capture", f"the graph has {len(placeholders)} inputs but was called with "
                                     f"{len(runtime_args)}")
    by_id = {id(t): k for k, t in enumerate(inputs)}
    bindings: list = [None] * len(placeholders)
    for i, value in enumerate(runtime_args):
        if isinstance(value, torch.Tensor):
            k = by_id.get(id(value))
            bindings[i] = ("input", k) if k is not None else ("const", value)
    # Sizes: a SymInt placeholder is found again as a dim of an input placeholder's fake tensor.
    input_dims: dict = {}
    for node, binding in zip(placeholders, bindings):
        if binding is not None and binding[0] == "input":
            fake = _placeholder_value(node)
            for d, size in enumerate(getattr(fake, "shape", ())):
                if _symbol(size) is not None:
                    input_dims.setdefault(_symbol(size), (binding[1], d))
    for i, (node, value) in enumerate(zip(placeholders, runtime_args)):
        if bindings[i] is not None:
            continue
        symbol = _symbol(_placeholder_value(node))
        where = input_dims.get(symbol) if isinstance(value, int) and symbol is not None else None
        if where is None:
            raise ExportError("capture", f"graph input {node.name} ({type(value).__name__}) is neither an "
                                         "input tensor, a weight, nor a size of an input")
        bindings[i] = ("size", *where)
    return bindings


def _bind_outputs(graph_outputs: Sequence[Any], model_outputs: Sequence[torch.Tensor],
                  names: Sequence[str]) -> list[int]:
    """For each model output tensor, the index of the graph output it is (by identity)."""
    by_id = {id(t): j for j, t in enumerate(graph_outputs) if isinstance(t, torch.Tensor)}
    slots = []
    for t, name in zip(model_outputs, names):
        j = by_id.get(id(t))
        if j is None:
            raise ExportError("capture", f"model output '{name}' is not computed by the captured graph "
                                         "(an input or a weight returned as is cannot be exported)")
        slots.append(j)
    return slots


def _graph_output_values(gm: fx.GraphModule) -> list:
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    values = output.args[0]
    values = values if isinstance(values, (tuple, list)) else [values]
    return [v.meta.get("example_value", v.meta.get("val")) if isinstance(v, fx.Node) else v for v in values]


def _dim0_is_symbolic(value: Any) -> bool:
    shape = getattr(value, "shape", ())
    return len(shape) > 0 and isinstance(shape[0], torch.SymInt)


def _capture_once(model: torch.nn.Module, flat: FlatInputs, mark_batch: Sequence[int]) -> Captured:
    """Run ``model`` once under ``torch.compile(fullgraph=True)`` and keep the graph Dynamo captured."""
    # Shallow copies: mark_dynamic writes to the tensor object, and the caller's must stay unmarked.
    inputs = [t.detach() for t in flat.tensors]
    for k in mark_batch:
        mark_dynamic(inputs[k], 0)
    args, kwargs = flat.rebuild(inputs)
    graphs: list = []

    def capturing_backend(gm: fx.GraphModule, example_inputs: list) -> Callable:
        record = {"gm": gm, "example_inputs": list(example_inputs)}
        graphs.append(record)

        def run(*runtime_args):
            outs = gm(*runtime_args)
            record["runtime_args"], record["outputs"] = list(runtime_args), outs
            return outs

        return run

    with torch.no_grad():
        output = torch_api.capture(model, args, kwargs, backend=capturing_backend, fullgraph=True, dynamic=None)
    if len(graphs) != 1 or "outputs" not in graphs[0]:
        raise ExportError("capture", f"expected one captured graph, got {len(graphs)}")
    record = graphs[0]
    gm = record["gm"]
    try:
        out_tensors, out_names = flatten_outputs(output)
    except TypeError as e:
        raise ExportError("capture", str(e)) from None
    graph_outs = record["outputs"]
    graph_outs = graph_outs if isinstance(graph_outs, (tuple, list)) else [graph_outs]
    bindings = _bind_placeholders(gm, record["runtime_args"], inputs)
    slots = _bind_outputs(graph_outs, out_tensors, out_names)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    batch_inputs = sorted({b[1] for node, b in zip(placeholders, bindings)
                           if b[0] == "input" and b[1] in mark_batch
                           and _dim0_is_symbolic(_placeholder_value(node))})
    fake_outs = _graph_output_values(gm)
    batch_outputs = [i for i, j in enumerate(slots) if j < len(fake_outs) and _dim0_is_symbolic(fake_outs[j])]
    return Captured(gm, record["example_inputs"], bindings, slots, out_names, batch_inputs, batch_outputs)


@contextlib.contextmanager
def _silenced(logger_name: str):
    """Mute one logger for the duration (for failures that are expected and handled)."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


def capture(model: torch.nn.Module, flat: FlatInputs, dynamic_batch: bool, report_notes: list) -> Captured:
    """Capture with a dynamic batch where asked and possible, else with a static one (noted)."""
    candidates = _batch_candidates(flat.tensors) if dynamic_batch else []
    if dynamic_batch and candidates:
        batch = flat.tensors[candidates[0]].shape[0]
        if batch < 2:
            report_notes.append(f"onnx: static batch {batch}: torch specialises batch size {batch}; "
                                "give example inputs with batch >= 2 for a dynamic batch axis")
        else:
            try:
                # A failed dynamic capture is handled below; torch would log its whole trace first.
                with _silenced("torch._guards"):
                    captured = _capture_once(model, flat, candidates)
            except ExportError:
                raise
            except Exception as e:  # the dynamic capture failed: try a static one below
                report_notes.append(f"onnx: static batch {batch}: capturing with a dynamic batch failed "
                                    f"({error_summary(e)})")
            else:
                if captured.batch_inputs:
                    return captured
                report_notes.append(f"onnx: static batch {batch}: torch specialised the batch dimension")
    try:
        return _capture_once(model, flat, [])
    except ExportError:
        raise
    except Exception as e:
        raise ExportError("capture", f"torch.compile(fullgraph=True) could not capture the model as one "
                                     f"graph: {error_summary(e)}", e) from None


# ----------------------------------------------------------------------------------- the program

class CapturedProgram(torch.nn.Module):
    """A captured (and rewritten) graph as a standalone module.

    ``forward(*input_tensors)`` takes the flat input tensors (the ONNX inputs, in order) and returns
    the tuple of model output tensors (the ONNX outputs, in order). Weights the graph reads are
    buffers of this module, so they become ONNX initializers.
    """

    def __init__(self, gm: fx.GraphModule, bindings: Sequence[tuple], output_slots: Sequence[int]):
        super().__init__()
        self.graph_module = gm
        self._bindings = []
        for i, binding in enumerate(bindings):
            if binding[0] == "const":
                name = f"const_{i}"
                self.register_buffer(name, binding[1].detach(), persistent=False)
                self._bindings.append(("const", name))
            else:
                self._bindings.append(tuple(binding))
        self._output_slots = list(output_slots)

    def forward(self, *inputs: torch.Tensor) -> tuple:
        args = []
        for binding in self._bindings:
            if binding[0] == "input":
                args.append(inputs[binding[1]])
            elif binding[0] == "size":
                args.append(inputs[binding[1]].shape[binding[2]])
            else:
                args.append(getattr(self, binding[1]))
        outs = self.graph_module(*args)
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        return tuple(outs[j] for j in self._output_slots)


# ------------------------------------------------------------------------------------- onnx export

def _translation_table() -> dict:
    """tokred's custom-op lowerings (``{}`` while tokred.triton_ops does not provide them)."""
    module = importlib.import_module("tokred.triton_ops")
    table_fn = getattr(module, "onnx_translation_table", None)
    return dict(table_fn()) if table_fn is not None else {}


def _name_batch_axes(onnx_program: Any, input_names: Sequence[str], output_names: Sequence[str],
                     batch_inputs: Sequence[int], batch_outputs: Sequence[int]) -> None:
    """Name dim 0 ``batch`` on the ONNX inputs/outputs that have the dynamic batch."""
    from onnxscript import ir  # the exporter's IR (onnx_ir, re-exported)

    graph = onnx_program.model.graph
    wanted = {input_names[k] for k in batch_inputs} | {output_names[k] for k in batch_outputs}
    for value in [*graph.inputs, *graph.outputs]:
        if value.name in wanted and value.shape is not None and len(value.shape) > 0 \
                and not isinstance(value.shape[0], int):
            value.shape = ir.Shape([BATCH_AXIS, *list(value.shape)[1:]])


@contextlib.contextmanager
def _quiet_exporter():
    """Silence the exporter's benign chatter; real failures still raise."""
    # onnxscript's constant folder logs a warning for every value it declines to fold.
    folding = logging.getLogger("onnxscript.optimizer._constant_folding")
    level = folding.level
    folding.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            # Emitted when several inputs share the one batch Dim, which is what we ask for.
            warnings.filterwarnings("ignore", message=r".*axis name: .* will not be used")
            yield
    finally:
        folding.setLevel(level)


def export_program(program: CapturedProgram, inputs: Sequence[torch.Tensor], captured: Captured,
                   input_names: Sequence[str], output_names: Sequence[str], opset: Optional[int]) -> Any:
    """``torch.onnx.export(dynamo=True)`` of the program; returns the ONNXProgram."""
    batch = torch.export.Dim(BATCH_AXIS)
    dynamic = None
    if captured.batch_inputs:
        # forward(*inputs): one spec per input, wrapped once more for the varargs parameter.
        dynamic = (tuple({0: batch} if k in captured.batch_inputs else None for k in range(len(inputs))),)
    table = _translation_table()
    try:
        with _quiet_exporter():
            onnx_program = torch.onnx.export(
                program, tuple(inputs), dynamo=True, input_names=list(input_names),
                output_names=list(output_names), dynamic_shapes=dynamic, opset_version=opset,
                custom_translation_table=table or None, verbose=False, report=False,
            )
    except Exception as e:
        raise ExportError("onnx export", f"torch.onnx.export failed: {error_summary(e)}", e) from None
    if captured.batch_inputs:
        _name_batch_axes(onnx_program, input_names, output_names, captured.batch_inputs,
                         captured.batch_outputs)
    return onnx_program


# ------------------------------------------------------------------------------------------- entry

def _batch_size(tensors: Sequence[torch.Tensor], batch_inputs: Sequence[int]) -> int:
    """Dim 0 of the first batch input (of the first input when the batch is static)."""
    first = tensors[batch_inputs[0] if batch_inputs else 0]
    return first.shape[0] if first.dim() else 1


def _move_into_place(tmp_dir: str, tmp_path: str, path: Path) -> None:
    """Move the checked model (and its external-data files, same relative names) to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for name in os.listdir(tmp_dir):
        src = os.path.join(tmp_dir, name)
        dst = path if src == tmp_path else path.parent / name
        shutil.move(src, dst)


def export_onnx(model: torch.nn.Module, example_inputs: tuple, path: str | os.PathLike, *,
                example_kwargs: dict | None = None, dynamic_batch: bool = True, atol: float = 1e-4,
                rtol: float = 1e-4, opset: int | None = None, **options: Any) -> ExportResult:
    """Export ``model`` (rewritten by tokred with ``options``) to ONNX at ``path``, checked first.

    example_inputs / example_kwargs: ``model(*example_inputs, **example_kwargs)`` is one forward;
        tensors in them (nested containers allowed) become the ONNX inputs.
    dynamic_batch: give the ONNX model a dynamic ``batch`` axis (dim 0) and check a second batch size.
    atol, rtol: every ONNX output must satisfy |onnx - torch| <= atol + rtol*|torch|.
    opset: ONNX opset (torch.onnx's default when None).
    options: tokred options (passes etc.), validated before anything else runs.

    Raises ValueError for bad options, ExportError naming the failing step, and
    ExportMismatchError (a ValueError too) when onnxruntime and PyTorch disagree; in every failure
    case nothing is written to ``path``.
    """
    parsed = parse_options(options)
    if not isinstance(example_inputs, tuple):
        raise ValueError(f"example_inputs must be a tuple, got {type(example_inputs).__name__}")
    kwargs = dict(example_kwargs or {})
    path = Path(path)
    flat = flatten_inputs(model, example_inputs, kwargs)
    if not flat.tensors:
        raise ValueError("the example inputs contain no tensor, so the ONNX model would have no input")

    notes: list[str] = []
    captured = capture(model, flat, dynamic_batch, notes)
    gm, report = rewrite(captured.gm, captured.example_inputs, parsed)
    for line in notes:
        report.note(line)
    program = CapturedProgram(gm, captured.bindings, captured.outputs).eval()
    input_names, output_names = flat.names, captured.output_names
    # What the ONNX model must reproduce: the model itself, unless passes changed it on purpose.
    reference_name = "rewritten graph in PyTorch" if report.changed else "original model"

    def reference(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        with torch.no_grad():
            if report.changed:
                return list(program(*tensors))
            args, kw = flat.rebuild(tensors)
            return flatten_outputs(model(*args, **kw))[0]

    checks = [list(flat.tensors)]
    if captured.batch_inputs:
        checks.append(second_batch_inputs(flat.tensors, captured.batch_inputs))
    batch_sizes = tuple(_batch_size(c, captured.batch_inputs) for c in checks)

    onnx_program = export_program(program, flat.tensors, captured, input_names, output_names, opset)
    staging = path.parent if path.parent.exists() else None  # same file system: the move is a rename
    with tempfile.TemporaryDirectory(prefix=".tokred-export-", dir=staging) as tmp:
        tmp_path = os.path.join(tmp, path.name)
        try:
            onnx_program.save(tmp_path)
        except Exception as e:
            raise ExportError("onnx save", f"could not write the ONNX model: {error_summary(e)}", e) from None
        worst = 0.0
        for tensors, batch in zip(checks, batch_sizes):
            got = run_onnxruntime(tmp_path, tensors, input_names)
            worst = max(worst, compare(got, reference(tensors), output_names, atol, rtol,
                                       f"reference: {reference_name}, batch {batch}"))
        _move_into_place(tmp, tmp_path, path)
    report.note(f"onnx: wrote {path} ({len(input_names)} inputs, {len(output_names)} outputs, "
                f"{'dynamic' if captured.batch_inputs else 'static'} batch; max abs diff vs the "
                f"{reference_name} {worst:.3g} at batch sizes {', '.join(map(str, batch_sizes))})")
    return ExportResult(path=path, report=report, max_abs_diff=worst, outputs=list(output_names),
                        inputs=list(input_names), dynamic_batch=bool(captured.batch_inputs),
                        batch_sizes=batch_sizes)
