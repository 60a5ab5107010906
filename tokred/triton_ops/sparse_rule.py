"""Element mask rules of sparse attention as expressions: traced from Python, run in torch, Triton and ONNX.

A rule says whether query position ``q_idx`` may attend to key position ``kv_idx`` in batch row
``b`` and query head ``h``. It is kept as one expression string over those four names, in a small
language that three backends evaluate the same way:

    names     b, h, q_idx, kv_idx; integer and boolean literals
    operators & | ~ (boolean), < <= > >= == !=, + - * (integer), // and % (operands must be >= 0:
              torch floors, Triton truncates, so negative operands would differ)
    calls     where(cond, a, b), minimum(a, b), maximum(a, b), abs(a)

``rule_from_mask_fn`` traces a FlexAttention-style ``mask_fn(b, h, q_idx, kv_idx) -> bool`` with
torch.fx and writes its graph as such an expression; ``eval_rule_torch`` evaluates a rule on
broadcastable index tensors (the CPU path, the reference and the block mask), the Triton
kernel embeds the string into generated source (sparse_kernel.py), and ``eval_rule_onnx``
emits ONNX ops for it. The empty string means "no rule" (every key allowed).
"""

from __future__ import annotations

import ast
import functools
import operator
from collections.abc import Callable

import torch
import torch.fx

RULE_NAMES = ("b", "h", "q_idx", "kv_idx")

# fx call_function targets and call_method names -> a binary operator of the rule language.
_BINARY = {
    operator.and_: "&", operator.or_: "|", operator.xor: "^",
    operator.lt: "<", operator.le: "<=", operator.gt: ">", operator.ge: ">=",
    operator.eq: "==", operator.ne: "!=",
    operator.add: "+", operator.sub: "-", operator.mul: "*",
    operator.floordiv: "//", operator.mod: "%",
    torch.logical_and: "&", torch.logical_or: "|", torch.logical_xor: "^",
    torch.bitwise_and: "&", torch.bitwise_or: "|",
    torch.lt: "<", torch.le: "<=", torch.gt: ">", torch.ge: ">=", torch.eq: "==", torch.ne: "!=",
    torch.add: "+", torch.sub: "-", torch.mul: "*", torch.remainder: "%",
}
_BINARY_METHODS = {
    "__and__": "&", "__or__": "|", "__xor__": "^", "logical_and": "&", "logical_or": "|",
    "bitwise_and": "&", "bitwise_or": "|", "lt": "<", "le": "<=", "gt": ">", "ge": ">=", "eq": "==",
    "ne": "!=", "add": "+", "sub": "-", "mul": "*", "remainder": "%",
}
_CALLS = {torch.where: "where", torch.minimum: "minimum", torch.maximum: "maximum", torch.abs: "abs",
          operator.abs: "abs"}
_CALL_METHODS = {"abs": "abs", "minimum": "minimum", "maximum": "maximum"}
_NOT = {operator.invert, operator.not_, torch.logical_not, torch.bitwise_not}
_NOT_METHODS = {"__invert__", "logical_not", "bitwise_not"}


def rule_from_mask_fn(mask_fn: Callable) -> str:
    """Trace ``mask_fn(b, h, q_idx, kv_idx)`` with torch.fx into a rule expression (see module doc).

    Raises ValueError (``sparse attention mask_fn ...``) for an op outside the rule language,
    e.g. indexing a captured tensor.
    """
    try:
        graph = torch.fx.symbolic_trace(mask_fn, concrete_args=None).graph
    except Exception as error:  # fx raises many types for untraceable code
        raise ValueError(f"sparse attention mask_fn could not be traced by torch.fx: {error}") \
            from error
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    if len(placeholders) != 4:
        raise ValueError("sparse attention mask_fn must take (b, h, q_idx, kv_idx), "
                         f"got {len(placeholders)} arguments")
    exprs: dict[torch.fx.Node, str] = {node: name for node, name in zip(placeholders, RULE_NAMES)}

    def arg(value) -> str:
        if isinstance(value, torch.fx.Node):
            return exprs[value]
        if isinstance(value, bool):
            return "True" if value else "False"
        if isinstance(value, int):
            return f"({value})"
        raise ValueError(f"sparse attention mask_fn: constant {value!r} is not an integer "
                         "or boolean (the rule language has no floats)")

    def unsupported(node) -> ValueError:
        return ValueError(f"sparse attention mask_fn: {node.op} {node.target} is not "
                          "supported in a traced mask rule (use comparisons, & | ~, + - * // %, where, "
                          "minimum, maximum, abs on b, h, q_idx, kv_idx)")

    output = None
    for node in graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            output = exprs[node.args[0]] if isinstance(node.args[0], torch.fx.Node) else arg(node.args[0])
            break
        if node.kwargs:
            raise unsupported(node)
        target = node.target
        if node.op == "call_function" and target in _BINARY or node.op == "call_method" and target in _BINARY_METHODS:
            symbol = _BINARY[target] if node.op == "call_function" else _BINARY_METHODS[target]
            exprs[node] = f"({arg(node.args[0])} {symbol} {arg(node.args[1])})"
        elif node.op == "call_function" and target in _NOT or node.op == "call_method" and target in _NOT_METHODS:
            exprs[node] = f"(~{arg(node.args[0])})"
        elif node.op == "call_function" and target is operator.neg:
            exprs[node] = f"(0 - {arg(node.args[0])})"
        elif node.op == "call_function" and target in _CALLS or node.op == "call_method" and target in _CALL_METHODS:
            name = _CALLS[target] if node.op == "call_function" else _CALL_METHODS[target]
            exprs[node] = f"{name}({', '.join(arg(a) for a in node.args)})"
        else:
            raise unsupported(node)
    if output is None:
        raise ValueError("sparse attention mask_fn returned nothing")
    return output


def check_rule(rule: str) -> ast.Expression:
    """Parse ``rule`` and raise ValueError unless it uses only the rule language."""
    tree = _parse(rule)
    allowed = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Compare, ast.Call, ast.Name, ast.Constant, ast.Load,
               ast.BitAnd, ast.BitOr, ast.BitXor, ast.Invert, ast.Add, ast.Sub, ast.Mult, ast.FloorDiv, ast.Mod,
               ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.Eq, ast.NotEq, ast.USub)
    for node in ast.walk(tree):
        if not isinstance(node, allowed):
            raise ValueError(f"sparse attention rule {rule!r}: {type(node).__name__} is not in the rule language")
        if isinstance(node, ast.Name) and node.id not in RULE_NAMES + ("where", "minimum", "maximum", "abs"):
            raise ValueError(f"sparse attention rule {rule!r}: unknown name {node.id!r}")
        if isinstance(node, ast.Compare) and len(node.ops) != 1:
            raise ValueError(f"sparse attention rule {rule!r}: chained comparisons are not supported")
        if isinstance(node, ast.Constant) and not isinstance(node.value, (bool, int)):
            raise ValueError(f"sparse attention rule {rule!r}: constant {node.value!r} is not an int or bool")
    return tree


@functools.lru_cache(maxsize=256)
def rule_names(rule: str) -> frozenset[str]:
    """Which of b, h, q_idx, kv_idx ``rule`` reads (empty for the empty rule)."""
    if not rule:
        return frozenset()
    return frozenset(node.id for node in ast.walk(check_rule(rule))
                     if isinstance(node, ast.Name) and node.id in RULE_NAMES)


@functools.lru_cache(maxsize=256)
def _parse(rule: str) -> ast.Expression:
    return ast.parse(rule, mode="eval")


_TORCH_CALLS = {"where": torch.where, "minimum": torch.minimum, "maximum": torch.maximum, "abs": torch.abs}

# rule -> a Python function (b, h, q_idx, kv_idx) -> tensor, built once by ``torch_rule_fn``. A plain
# dict lookup, so Dynamo traces ``eval_rule_torch`` (into the generated function's bytecode) once
# the rule was built eagerly (``sparse_pattern.element_rule`` does that at trace time).
_RULE_FNS: dict[str, Callable] = {}


def torch_rule_fn(rule: str) -> Callable:
    """``rule`` as a Python function of (b, h, q_idx, kv_idx) evaluated with torch ops (cached)."""
    if rule not in _RULE_FNS:
        check_rule(rule)
        # Normal builtins: check_rule already limits the expression to the rule language, and
        # Dynamo (tracing flex_attention's mask_mod) needs __import__ in the function's globals.
        namespace = dict(_TORCH_CALLS)
        exec(f"def rule_fn(b, h, q_idx, kv_idx):\n    return {rule}\n", namespace)  # noqa: S102 (checked grammar)
        _RULE_FNS[rule] = namespace["rule_fn"]
    return _RULE_FNS[rule]


def rule_fn(rule: str) -> Callable | None:
    """The torch function of ``rule`` (None for the empty rule); a dict lookup once built."""
    if not rule:
        return None
    return _RULE_FNS[rule] if rule in _RULE_FNS else torch_rule_fn(rule)


def eval_rule_torch(rule: str, b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor,
                    kv_idx: torch.Tensor) -> torch.Tensor | None:
    """Evaluate ``rule`` on broadcastable int64 index tensors; None for the empty rule.

    The result is a bool tensor of the broadcast shape (or of a smaller shape broadcastable to it
    where the rule ignores some names).
    """
    if not rule:
        return None
    rule_fn = _RULE_FNS[rule] if rule in _RULE_FNS else torch_rule_fn(rule)
    result = rule_fn(b, h, q_idx, kv_idx)
    if not isinstance(result, torch.Tensor):
        result = torch.full((), bool(result), device=q_idx.device)
    return result.bool()


def eval_rule_onnx(rule: str, op, names: dict):
    """ONNX ops for ``rule`` (``op`` an onnxscript opset; ``names`` maps b/h/q_idx/kv_idx to INT64 values)."""
    import onnx

    tree = check_rule(rule)
    compare = {ast.Lt: op.Less, ast.LtE: op.LessOrEqual, ast.Gt: op.Greater, ast.GtE: op.GreaterOrEqual,
               ast.Eq: op.Equal}
    arith = {ast.Add: op.Add, ast.Sub: op.Sub, ast.Mult: op.Mul}

    def is_bool(node) -> bool:
        if isinstance(node, ast.Compare) or isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Invert):
            return True
        if isinstance(node, ast.Constant):
            return isinstance(node.value, bool)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.BitAnd, ast.BitOr, ast.BitXor)):
            return is_bool(node.left)
        if isinstance(node, ast.Call) and node.func.id == "where":
            return is_bool(node.args[1])
        return False

    def emit(node):
        if isinstance(node, ast.Expression):
            return emit(node.body)
        if isinstance(node, ast.Name):
            return names[node.id]
        if isinstance(node, ast.Constant):
            if isinstance(node.value, bool):
                return op.Constant(value=onnx.helper.make_tensor("c", onnx.TensorProto.BOOL, [], [node.value]))
            return op.Constant(value_int=int(node.value))
        if isinstance(node, ast.UnaryOp):
            value = emit(node.operand)
            if isinstance(node.op, ast.USub):
                return op.Neg(value)
            return op.Not(value) if is_bool(node.operand) else op.BitwiseNot(value)
        if isinstance(node, ast.Compare):
            left, right = emit(node.left), emit(node.comparators[0])
            if isinstance(node.ops[0], ast.NotEq):
                return op.Not(op.Equal(left, right))
            return compare[type(node.ops[0])](left, right)
        if isinstance(node, ast.BinOp):
            left, right = emit(node.left), emit(node.right)
            if isinstance(node.op, (ast.BitAnd, ast.BitOr, ast.BitXor)):
                if is_bool(node.left):
                    return {ast.BitAnd: op.And, ast.BitOr: op.Or, ast.BitXor: op.Xor}[type(node.op)](left, right)
                return {ast.BitAnd: op.BitwiseAnd, ast.BitOr: op.BitwiseOr,
                        ast.BitXor: op.BitwiseXor}[type(node.op)](left, right)
            if isinstance(node.op, ast.FloorDiv):
                return op.Div(left, right)  # integer Div truncates; operands are >= 0 by the rule language
            if isinstance(node.op, ast.Mod):
                return op.Mod(left, right, fmod=0)
            return arith[type(node.op)](left, right)
        if isinstance(node, ast.Call):
            args = [emit(a) for a in node.args]
            return {"where": op.Where, "minimum": op.Min, "maximum": op.Max, "abs": op.Abs}[node.func.id](*args)
        raise ValueError(f"sparse attention rule {rule!r}: cannot lower {ast.dump(node)}")

    return emit(tree)
