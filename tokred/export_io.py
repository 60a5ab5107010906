"""What export_onnx passes through and checks: a model's inputs and outputs flattened into named
tensors (ONNX names), a second batch size for the dynamic-batch check, the exported file run in
onnxruntime and compared with PyTorch (|onnx - torch| <= atol + rtol * |torch|, NaN equal to NaN),
and the errors export_onnx raises.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from tokred.compat import torch_api
from tokred.compat.torch_api import pytree


class ExportError(RuntimeError):
    """An export step failed. ``step`` names it; ``original`` is the underlying exception, if any."""

    def __init__(self, step: str, message: str, original: Optional[BaseException] = None):
        super().__init__(f"tokred.export_onnx failed at step '{step}': {message}")
        self.step = step
        self.original = original


class ExportMismatchError(ExportError, ValueError):
    """onnxruntime's outputs differ from PyTorch's beyond the tolerance; no file was written."""

    def __init__(self, message: str, output_index: int, max_abs_diff: float):
        super().__init__("onnxruntime check", message)
        self.output_index = output_index
        self.max_abs_diff = max_abs_diff


def error_summary(e: BaseException, limit: int = 400) -> str:
    """One line saying what went wrong, without torch's advice and stack traces.

    torch.onnx puts the real cause under "## Exception summary" as "<class 'pkg.Error'>: message";
    Dynamo's shape-constraint errors put it on a "- You marked ..." line with the user's source
    line under "User stack:". Anything else: the message's first line.
    """
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # torch colours some messages
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    kind, message = type(e).__name__, lines[0] if lines else ""
    if "## Exception summary" in lines:
        for line in lines[lines.index("## Exception summary") + 1:]:
            match = re.match(r"<class '(?:[\w.]+\.)?(\w+)'>: (.*)", line)
            if match:
                kind, message = match.groups()
                break
    detail = next((line[2:] for line in lines[1:] if line.startswith("- You marked")), None)
    if detail:
        message = detail.split(". If ")[0]  # drop torch's advice on mark_dynamic
        if "User stack:" in lines:
            stack = lines[lines.index("User stack:") + 1:]
            files = [i for i, line in enumerate(stack) if line.startswith("File ")]
            if files and files[-1] + 1 < len(stack):
                where = re.sub(r'^File "(?:.*/)?([^"]+)", line (\d+), in (\w+)', r"\1:\2", stack[files[-1]])
                message += f" at {where}: {stack[files[-1] + 1]}"
    return f"{kind}: {message[:limit]}"


# --------------------------------------------------------------------------------------- flattening

def _key_name(key: Any) -> str:
    if isinstance(key, pytree.SequenceKey):
        return str(key.idx)
    if isinstance(key, pytree.MappingKey):
        return str(key.key)
    if isinstance(key, pytree.GetAttrKey):
        return key.name
    return str(key)


def _path_name(parts: Sequence[str], default: str) -> str:
    """``['past', 0, 'keys']`` -> ``past_0_keys``: characters ONNX tools accept in a name."""
    name = re.sub(r"[^0-9A-Za-z_]+", "_", "_".join(parts)).strip("_")
    if not name:
        return default
    return name if not name[0].isdigit() else f"{default}_{name}"


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        n = seen.get(name, 0)
        seen[name] = n + 1
        out.append(name if n == 0 else f"{name}_{n}")
    return out


def _positional_names(model: torch.nn.Module, n: int) -> list[str]:
    """Names of ``model.forward``'s first ``n`` positional parameters (``input_i`` where unknown)."""
    try:
        params = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    names = [p.name for p in params[:n]]
    return names + [f"input_{i}" for i in range(len(names), n)]


@dataclass
class FlatInputs:
    """``(args, kwargs)`` flattened: ``leaves`` in pytree order, tensor leaves at ``tensor_index``."""

    leaves: list
    spec: Any
    tensor_index: list  # positions in ``leaves`` of the tensor leaves (the ONNX inputs)
    names: list         # one per tensor leaf

    @property
    def tensors(self) -> list[torch.Tensor]:
        return [self.leaves[i] for i in self.tensor_index]

    def rebuild(self, tensors: Sequence[torch.Tensor]) -> tuple[tuple, dict]:
        """``(args, kwargs)`` with the tensor leaves replaced by ``tensors`` (same order)."""
        leaves = list(self.leaves)
        for i, t in zip(self.tensor_index, tensors):
            leaves[i] = t
        args, kwargs = pytree.tree_unflatten(leaves, self.spec)
        return args, kwargs


def flatten_inputs(model: torch.nn.Module, args: tuple, kwargs: dict) -> FlatInputs:
    paths_leaves, spec = torch_api.tree_flatten_with_path((tuple(args), dict(kwargs)))
    positional = _positional_names(model, len(args))
    leaves = [leaf for _, leaf in paths_leaves]
    tensor_index = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
    names = []
    for k, i in enumerate(tensor_index):
        (selector, first, *rest), _ = paths_leaves[i]  # selector: (args, kwargs)[0 or 1]
        head = positional[first.idx] if selector.idx == 0 else _key_name(first)
        names.append(_path_name([head, *map(_key_name, rest)], f"input_{k}"))
    names = _unique(names)
    return FlatInputs(leaves, spec, tensor_index, names)


def flatten_outputs(output: Any) -> tuple[list[torch.Tensor], list[str]]:
    """The tensor leaves of a model output and their names, in pytree order.

    ``None``, numbers and strings are skipped; any other non-tensor leaf (an object pytree does not
    know how to open) raises ``TypeError``, so that no output goes unchecked silently.
    """
    paths_leaves, _ = torch_api.tree_flatten_with_path(output)
    tensors, names = [], []
    for path, leaf in paths_leaves:
        if isinstance(leaf, torch.Tensor):
            tensors.append(leaf)
            names.append(_path_name([_key_name(key) for key in path], "output"))
        elif leaf is not None and not isinstance(leaf, (bool, int, float, str)):
            raise TypeError(f"model output {pytree.keystr(path) or '(root)'} is a {type(leaf).__name__}, "
                            "which cannot be flattened into tensors")
    return tensors, _unique(names)


# ------------------------------------------------------------------------------------------ checks

def second_batch_inputs(tensors: Sequence[torch.Tensor], batch_inputs: Sequence[int],
                        seed: int = 0) -> list[torch.Tensor]:
    """Inputs with batch B+1 of the same kind as ``tensors`` (B = their batch size).

    Every batch input gets the same B+1 rows of the original batch (a permutation plus one random
    row), so that ids, masks and positions stay consistent with one another. Then float
    inputs are redrawn from a normal with the original's mean and std, and integer inputs with more
    than two distinct values (token ids) are redrawn uniformly in the original's [min, max]; integer
    inputs with two values or fewer (masks, token types) and bool inputs keep the copied rows.
    Inputs without the batch axis are returned unchanged.
    """
    g = torch.Generator().manual_seed(seed)
    batch = tensors[batch_inputs[0]].shape[0]
    rows = torch.cat([torch.randperm(batch, generator=g), torch.randint(0, batch, (1,), generator=g)])
    out = list(tensors)
    for k in batch_inputs:
        t = tensors[k][rows]
        if t.is_floating_point():
            ref = tensors[k].double()
            std = ref.std().item() if ref.numel() > 1 else 1.0
            noise = torch.randn(t.shape, generator=g, dtype=torch.float64)
            t = (noise * (std or 1.0) + ref.mean()).to(t.dtype)
        elif t.dtype != torch.bool and not t.is_complex() and torch.unique(tensors[k]).numel() > 2:
            low, high = int(tensors[k].min()), int(tensors[k].max())
            t = torch.randint(low, high + 1, t.shape, generator=g, dtype=t.dtype)
        out[k] = t.contiguous()
    return out


def _to_numpy(t: torch.Tensor):
    if t.dtype == torch.bfloat16:
        raise ExportError("onnxruntime", "bfloat16 inputs cannot be fed to onnxruntime from numpy")
    return t.detach().cpu().contiguous().numpy()


def run_onnxruntime(path: str, inputs: Sequence[torch.Tensor], input_names: Sequence[str]) -> list:
    """Run the ONNX file in onnxruntime (CPU); returns numpy outputs in the file's output order."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        feeds = dict(zip(input_names, inputs))
        wanted = [i.name for i in session.get_inputs()]
        return session.run(None, {name: _to_numpy(feeds[name]) for name in wanted})
    except ExportError:
        raise
    except Exception as e:
        raise ExportError("onnxruntime", f"onnxruntime could not run the exported model: {error_summary(e)}",
                          e) from None


def compare(onnx_outputs: Sequence[Any], reference: Sequence[torch.Tensor], names: Sequence[str],
            atol: float, rtol: float, what: str) -> float:
    """Max |onnx - reference| over all outputs; raises ExportMismatchError beyond atol + rtol*|ref|."""
    if len(onnx_outputs) != len(reference):
        raise ExportMismatchError(f"the ONNX model has {len(onnx_outputs)} outputs, PyTorch {len(reference)} "
                                  f"({what})", -1, float("inf"))
    worst = 0.0
    for i, (got, ref) in enumerate(zip(onnx_outputs, reference)):
        got_t = torch.as_tensor(got)
        ref_t = ref.detach().cpu()
        if tuple(got_t.shape) != tuple(ref_t.shape):
            raise ExportMismatchError(f"output {i} ('{names[i]}') has shape {tuple(got_t.shape)} in "
                                      f"onnxruntime and {tuple(ref_t.shape)} in PyTorch ({what})",
                                      i, float("inf"))
        if ref_t.numel() == 0:
            continue
        max_diff = _max_abs_diff(got_t, ref_t)
        worst = max(worst, max_diff)
        try:  # the verdict is torch's: |onnx - torch| <= atol + rtol*|torch|, NaN equal to NaN
            torch.testing.assert_close(got_t, ref_t, atol=atol, rtol=rtol, equal_nan=True,
                                       check_dtype=False, check_device=False)
        except AssertionError as exc:
            counts = next((line.strip() for line in str(exc).splitlines() if "Mismatched elements" in line),
                          str(exc).strip().splitlines()[0])
            raise ExportMismatchError(
                f"output {i} ('{names[i]}') differs from PyTorch by up to {max_diff:.3g} ({what}); "
                f"tolerance: |onnx - torch| <= atol + rtol*|torch| with atol={atol:g}, rtol={rtol:g} "
                f"({counts}). No file was written.", i, max_diff) from None
    return worst


def _max_abs_diff(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest |got - ref| (the figure the result reports): equal values, infinities included, and
    NaN on both sides differ by 0; NaN on one side, or an infinity against anything else, by inf."""
    got_d, ref_d = got.to(torch.float64), ref.to(torch.float64)
    same = (got_d == ref_d) | (torch.isnan(got_d) & torch.isnan(ref_d))
    return torch.where(same, 0.0, (got_d - ref_d).abs().nan_to_num(nan=float("inf"))).max().item()
