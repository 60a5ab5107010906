"""The private and version-sensitive parts of torch that tokred uses, in one place.

Supported: torch >= 2.4 (``TORCH_MIN``); developed and tested on the version pinned in
constraints/dev.txt, and on the GPU machine's 2.11. Every name here is either a private torch API
(``torch._dynamo``, ``torch._guards``, ``torch._subclasses``, ``torch._inductor``) or a spelling
that moved between torch releases; callers elsewhere in tokred use only what this module exports.

Dynamo sources: a captured graph names each module and parameter by the *source* Dynamo read it
from (``L['self'].blocks[3].attn``, ``L['args'][0]._modules['model']...``). How the root of that
path is spelled depends on how the model was called (transformers wraps ``forward`` in decorators,
so the model becomes ``L['args'][0]``), so tokred never matches on the spelling. It tokenizes a
source into attribute and item accesses, finds the *module roots* of a graph structurally (the
object whose ``_modules`` / ``_parameters`` / ``_buffers`` dicts a parameter was read through),
and names a module by the accesses after its root, as ``named_modules()`` does.
"""

from __future__ import annotations

import re
import types
import weakref
from typing import Any, Callable, Optional

import torch
from torch import fx

TORCH_MIN = (2, 4)


def version_tuple(version: str) -> tuple[int, int]:
    """``"2.14.1+cu130"`` -> ``(2, 14)``."""
    major, minor = re.match(r"(\d+)\.(\d+)", version).groups()
    return int(major), int(minor)


def check_torch_version(version: str = torch.__version__) -> None:
    """Raise a clear error on a torch older than tokred supports."""
    if version_tuple(version) < TORCH_MIN:
        raise RuntimeError(f"tokred needs torch >= {'.'.join(map(str, TORCH_MIN))}, found torch {version}")


check_torch_version()

import torch._dynamo  # noqa: E402  (after the version check: an old torch fails with the message above)
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torch.utils._pytree as pytree  # noqa: E402
from torch.utils._python_dispatch import _disable_current_modes as disable_current_modes  # noqa: E402,F401

tree_leaves = pytree.tree_leaves


def tree_flatten_with_path(tree: Any):
    """``pytree.tree_flatten_with_path``, also for containers registered without key paths
    (transformers 5.0's model outputs): those are read as the mappings or sequences they are."""
    try:
        return pytree.tree_flatten_with_path(tree)
    except ValueError as error:
        if "flatten_with_keys" not in str(error):
            raise
        return pytree.tree_flatten_with_path(_plain_containers(tree))


def _plain_containers(tree: Any) -> Any:
    from collections.abc import Mapping

    if isinstance(tree, Mapping):
        return {k: _plain_containers(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)) and not hasattr(tree, "_fields"):
        return type(tree)(_plain_containers(v) for v in tree) if type(tree) in (list, tuple) else \
            [_plain_containers(v) for v in tree]
    return tree

# ----------------------------------------------------------------------------- op targets

# Functions a Dynamo graph calls under private names (torch-level graphs keep them as they are).
LINEAR_FUNCS = {torch._C._nn.linear}
SDPA_FUNCS = {torch._C._nn.scaled_dot_product_attention}
SOFTMAX_FUNCS = {f for f in (getattr(torch._C._nn, "softmax", None), getattr(torch, "_softmax", None)) if f}
ACTIVATION_FUNCS = {f for f in (getattr(torch._C._nn, "gelu", None), getattr(torch._C._nn, "silu", None)) if f}


def is_grouped_mm(target) -> bool:
    """A grouped matrix product ``(x [T, C], w [E, C, F], offs) -> [T, F]`` (each row of x by its
    group's matrix: MoE experts): ``F.grouped_mm`` / ``torch._grouped_mm`` (torch >= 2.9) or the
    CPU fallback op transformers registers (``torch.ops.transformers.grouped_mm_fallback``)."""
    known = [getattr(F, "grouped_mm", None), getattr(torch, "_grouped_mm", None)]
    namespace = getattr(torch.ops, "transformers", None)
    known.append(getattr(namespace, "grouped_mm_fallback", None) if namespace is not None else None)
    packet = getattr(target, "overloadpacket", target)  # an OpOverload names its packet
    return any(f is not None and (target is f or packet is f) for f in known)

# ----------------------------------------------------------------------------- oneDNN (passes/cpu_linear.py)

def onednn_unavailable() -> Optional[str]:
    """Why oneDNN packed linears cannot run in this torch build (None: they can)."""
    if not torch.backends.mkldnn.is_available():
        return "oneDNN (mkldnn) is not available in this torch build"
    for name in ("_reorder_linear_weight", "_linear_pointwise"):
        if not hasattr(torch.ops.mkldnn, name):
            return f"torch.ops.mkldnn.{name} is missing in torch {torch.__version__}"
    return None


def onednn_pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] fp32 CPU weight -> oneDNN's blocked layout (an opaque mkldnn tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), None)


def onednn_linear_op():
    """The op overload of a linear on a packed weight: (x, packed, bias, "none", [], "")."""
    return torch.ops.mkldnn._linear_pointwise.default


def tensor_version(t: torch.Tensor) -> int:
    """The in-place update counter of a tensor."""
    return t._version

# ----------------------------------------------------------------------------- Dynamo

assume_constant_result = torch._dynamo.assume_constant_result
# an async device-side assertion: no host sync (torch._assert_async)
assert_async = torch._assert_async
# the types of a custom op as a graph target
OP_TYPES = (torch._ops.OpOverload, torch._ops.OpOverloadPacket)
allow_in_graph = torch._dynamo.allow_in_graph
mark_dynamic = torch._dynamo.mark_dynamic
# a dimension Dynamo compiles as symbolic where it can (no error where a graph specializes it)
maybe_mark_dynamic = torch._dynamo.maybe_mark_dynamic
mark_static = torch._dynamo.mark_static


def compile_backend(model: Any) -> tuple:
    """(backend, kwargs) a ``torch.compile``'d module was compiled with: the backend object or
    function as given (behind Dynamo's wrappers) and the ``options`` torch.compile passed it
    ({"options": {...}} or {}); (None, {}) for a module that is not compiled."""
    current = getattr(getattr(model, "dynamo_ctx", None), "callback", None)
    kwargs: dict = {}
    for _ in range(16):
        if current is None:
            return None, {}
        if not kwargs and isinstance(getattr(current, "kwargs", None), dict):
            kwargs = current.kwargs
        inner = getattr(current, "_torchdynamo_orig_backend", None) or getattr(current, "compiler_fn", None)
        if inner is None:
            return current, kwargs
        current = inner
    return None, {}


def detect_fake_mode(inputs) -> Optional[FakeTensorMode]:
    """The fake mode of a graph's example inputs (None outside a compile)."""
    return torch._guards.detect_fake_mode(inputs)


def statically_known_true(condition) -> bool:
    """Whether a SymBool of symbolic sizes holds for every value of them; adds no guard."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true as known

    return known(condition)


def is_fake(value: Any) -> bool:
    return isinstance(value, FakeTensor)


def constant_source(name: str):
    """A Dynamo source for a constant a pass adds to a graph (aot_autograd wants one per buffer)."""
    from torch._dynamo.source import ConstantSource

    return ConstantSource(name)


def register_backend(fn: Callable, name: str) -> None:
    """Register ``fn`` as the Dynamo backend ``name`` unless one is registered under it."""
    from torch._dynamo.backends.registry import _COMPILER_FNS, register_backend as register

    if name not in _COMPILER_FNS:
        register(fn, name=name)


def compile_inductor(gm: fx.GraphModule, example_inputs, mode: Optional[str] = None) -> Callable:
    """Inductor on a Dynamo graph; ``mode`` as torch.compile takes it (None: the default)."""
    from torch._inductor.compile_fx import compile_fx

    if mode in (None, "default"):
        return compile_fx(gm, example_inputs)
    from torch._inductor import list_mode_options

    return compile_fx(gm, example_inputs, config_patches=list_mode_options(mode))


def run_and_get_inductor_code(fn: Callable, *args, **kwargs) -> tuple:
    """``(fn(*args, **kwargs), [the Python wrapper code inductor generated, one per graph])``."""
    from torch._inductor.utils import run_and_get_code

    return run_and_get_code(fn, *args, **kwargs)


# A kernel launch in inductor's wrapper code (its ``call`` function): a kernel it generated
# (``cpp_fused_*(...)`` on CPU, ``triton_*.run(...)`` on CUDA), a library kernel
# (``extern_kernels.mm(...)``) or an ATen fallback (``torch.ops.aten.cumsum.default(...)``).
_LAUNCHES = {
    "generated": re.compile(r"^\s+(?:\w+ = )?(cpp_fused_\w+|triton_\w+\.run)\(", re.M),
    "extern": re.compile(r"^\s+(?:\w+ = )?(extern_kernels\.\w+|torch\.ops\.\w+\.\w+\.\w+)\(", re.M),
}


def kernel_launches(code: str) -> dict:
    """Launches per call of inductor's wrapper ``code``: {"generated": n, "extern": m}."""
    start = code.find("def call(")
    body = code[start:] if start >= 0 else code
    indent = len(code[:start]) - len(code[:start].rstrip(" ")) if start >= 0 else 0
    # the function ends where a line at its own indent or less starts something else
    end = re.search(rf"\n {{0,{indent}}}\S", body)
    body = body if end is None else body[:end.start()]
    return {kind: len(pattern.findall(body)) for kind, pattern in _LAUNCHES.items()}


def compile_aot_eager(gm: fx.GraphModule, example_inputs) -> Callable:
    from torch._dynamo.backends.debugging import aot_eager

    return aot_eager(gm, example_inputs)


def capture(fn: Callable, args: tuple = (), kwargs: Optional[dict] = None, *, backend: Callable,
            fullgraph: bool = False, dynamic: Optional[bool] = False):
    """``torch.compile(fn, backend=backend, ...)(*args, **kwargs)`` without touching anyone else's
    compiled code: returns fn's output.

    Dynamo keeps compiled code per code object, and a model's ``forward`` is shared by every
    instance of its class: compiling a user's model again (explain, export, the early-exit draft)
    would add entries to the cache the user's own compiled model lives in, and the classic fix,
    ``torch._dynamo.reset()``, throws every compiled model in the process away. Here the frame
    Dynamo starts from is a private copy of a trampoline's code object, so the entries it makes
    die with it; nothing global is reset. (With graph breaks, Dynamo also compiles the frames it
    resumes in, as for any torch.compile call.)
    """
    def trampoline(*a, **k):
        return fn(*a, **k)

    def keeping_sources(gm: fx.GraphModule, example_inputs):
        # Dynamo drops the placeholders' sources once the backend returns; the captured graph
        # is analysed later, so they are kept on the nodes (see placeholder_source)
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                node.meta[SOURCE_KEY] = placeholder_source(node)
        return backend(gm, example_inputs)

    private = types.FunctionType(trampoline.__code__.replace(co_name="tokred_capture"),
                                 trampoline.__globals__, "tokred_capture", None, trampoline.__closure__)
    compiled = torch.compile(private, backend=keeping_sources, fullgraph=fullgraph, dynamic=dynamic)
    return compiled(*args, **(kwargs or {}))


# ----------------------------------------------------------------------------- sources and module names

# One access of a source path: ("attr", name) for ``.name``, ("item", key) for ``[key]``.
_TOKEN = re.compile(r"""\.(\w+)|\[(['"])(.*?)\2\]|\[(-?\d+)\]""")
_BASE = re.compile(r"^(\w+)")
# nn.Module's own dicts: an access through one of them is the structure of the module tree.
MODULE_DICTS = ("_modules", "_parameters", "_buffers")


def source_tokens(path: str) -> list:
    """``"L['args'][0]._modules['lin'].weight"`` -> [("base", "L"), ("item", "args"), ("item", "0"),
    ("attr", "_modules"), ("item", "lin"), ("attr", "weight")]. Unparsable text ends the list."""
    base = _BASE.match(path)
    if base is None:
        return []
    tokens, pos = [("base", base.group(1))], base.end()
    while pos < len(path):
        match = _TOKEN.match(path, pos)
        if match is None:
            break
        attr, _, key, index = match.groups()
        tokens.append(("attr", attr) if attr is not None else ("item", key if key is not None else index))
        pos = match.end()
    return tokens


def _source_name(source) -> Optional[str]:
    name = getattr(source, "name", None)
    name = name() if callable(name) else name
    return name if isinstance(name, str) else None


SOURCE_KEY = "tokred_source"


def placeholder_source(node: fx.Node) -> Optional[str]:
    """The source path Dynamo read a placeholder's value from (None where it records none): its
    ``grapharg`` while the backend runs, the copy :func:`capture` keeps after."""
    name = _source_name(getattr(node.meta.get("grapharg"), "source", None))
    return name if name is not None else node.meta.get(SOURCE_KEY)


def _root_of(tokens: list) -> Optional[tuple]:
    """The tokens before the first access through a module dict (None: the path has none)."""
    for i, (kind, name) in enumerate(tokens):
        if kind == "attr" and name in MODULE_DICTS:
            return tuple(tokens[:i])
    return None


_ROOTS: "weakref.WeakKeyDictionary[fx.Graph, frozenset]" = weakref.WeakKeyDictionary()


def module_roots(graph: fx.Graph) -> frozenset:
    """The module roots of a captured graph: token prefixes of the objects whose module dicts the
    graph's parameters and buffers were read through (the model: ``L['self']``, ``L['args'][0]``)."""
    if graph not in _ROOTS:
        roots = set()
        for node in graph.nodes:
            if node.op == "placeholder":
                root = _root_of(source_tokens(placeholder_source(node) or ""))
                if root is not None:
                    roots.add(root)
        _ROOTS[graph] = frozenset(roots)
    return _ROOTS[graph]


def _strip_root(tokens: list, roots: frozenset) -> list:
    """``tokens`` after the longest module root they start with; with none (a spelling not seen
    before, or a graph without parameters), after the base name and the item accesses that follow
    it (``L['self']``, ``L['args'][0]``, ``G['model']``): a module tree is walked by attributes."""
    for root in sorted(roots, key=len, reverse=True):
        if tuple(tokens[:len(root)]) == root:
            return tokens[len(root):]
    i = 1
    while i < len(tokens) and tokens[i][0] == "item":
        i += 1
    return tokens[i:]


def module_name(path: str, roots: frozenset = frozenset()) -> str:
    """The ``named_modules()`` name of the module at source ``path``: ``L['self'].blocks[3].attn``
    -> ``blocks.3.attn``; ``L['args'][0]._modules['model']`` -> ``model``; the root -> ``''``."""
    tokens = _strip_root(source_tokens(path), roots)
    return ".".join(name for kind, name in tokens if not (kind == "attr" and name == "_modules"))


def is_module_state(node: fx.Node) -> bool:
    """A placeholder that holds a parameter or buffer of a module, not a user input: by what it is
    (an ``nn.Parameter``), else by where Dynamo read it (through a module's parameter or buffer
    dict, or as an attribute of a module root: a tensor the module keeps)."""
    value = node.meta.get("example_value", getattr(node.meta.get("grapharg"), "example", None))
    if isinstance(value, torch.nn.Parameter):
        return True
    tokens = source_tokens(placeholder_source(node) or "")
    if any(kind == "attr" and name in ("_parameters", "_buffers") for kind, name in tokens):
        return True
    for root in module_roots(node.graph):
        if tuple(tokens[:len(root)]) == root and len(tokens) > len(root) and tokens[len(root)][0] == "attr":
            return True
    # a source-less graph (hand-built, or another tracer): Dynamo's placeholder names
    return node.name.startswith("l_self_")
