"""The ONNX lowering of ``tokred::sparse_attention``: dense masked attention in standard ops.

``onnx_lowering()`` returns the onnxscript function the exporter puts in place of the op
(``tokred.triton_ops.onnx_translation_table`` collects it, through ``sparse_attention.onnx_lowering``).
It reads the op's arguments only: the block layout, the element rule (lowered by
``sparse_rule.eval_rule_onnx``) and the bias, so it imports nothing but the rule language.
onnx and onnxscript are optional extras, imported when the lowering is built.
"""

from __future__ import annotations

from tokred.triton_ops import sparse_rule


def onnx_lowering():
    """ONNX translation of ``tokred::sparse_attention``: dense masked attention in standard ops.

    The element mask is (key block listed in kv_index[:kv_count]) & rule & (key < Nk), the rule
    lowered by ``sparse_rule.eval_rule_onnx``; scores in fp32, rows with no allowed key give 0.
    """
    import onnx
    from onnxscript import opset18 as op

    def ints(*values):
        return op.Constant(value_ints=list(values))

    def size(x, axis):  # scalar int64
        return op.Squeeze(op.Shape(x, start=axis, end=axis + 1), ints(0))

    def arange(n):
        return op.Range(op.Constant(value_int=0), n, op.Constant(value_int=1))

    def tokred_sparse_attention(q, k, v, kv_count, kv_index, bias, scale: float, q_offset: int, block_m: int,
                                block_n: int, rule: str, band_sinks: int = 0, band_window: int = 0):
        # band_sinks/band_window only pick a CPU strategy: layout & rule give the same allowed set
        float_type = onnx.TensorProto.FLOAT
        qf, kf, vf = (op.Cast(t, to=float_type) for t in (q, k, v))
        heads, kv_heads = size(q, 1), size(k, 1)
        num_queries, num_keys = size(q, 2), size(k, 2)
        group = op.Div(heads, kv_heads)

        def repeat_heads(t):  # [B, Hkv, S, D] -> [B, H, S, D], head h reads h // group
            expanded = op.Expand(op.Unsqueeze(t, ints(2)),
                                 op.Concat(op.Shape(t, start=0, end=2), op.Reshape(group, ints(1)),
                                           op.Shape(t, start=2), axis=0))
            return op.Reshape(expanded, op.Concat(op.Shape(t, start=0, end=1), op.Reshape(heads, ints(1)),
                                                  op.Shape(t, start=2), axis=0))

        kf, vf = repeat_heads(kf), repeat_heads(vf)
        scores = op.Mul(op.MatMul(qf, op.Transpose(kf, perm=[0, 1, 3, 2])), op.Constant(value_float=scale))

        # Kept blocks [B, H, NQB, NKB] from the layout, then per element via the block of each row/key.
        num_k_blocks = op.Div(op.Add(num_keys, op.Constant(value_int=block_n - 1)), op.Constant(value_int=block_n))
        entries = op.Less(arange(size(kv_index, 3)), op.Unsqueeze(op.Cast(kv_count, to=onnx.TensorProto.INT64),
                                                                   ints(3)))
        hits = op.And(op.Equal(op.Unsqueeze(op.Cast(kv_index, to=onnx.TensorProto.INT64), ints(4)),
                               arange(num_k_blocks)), op.Unsqueeze(entries, ints(4)))
        kept = op.ReduceMax(op.Cast(hits, to=onnx.TensorProto.INT32), ints(3), keepdims=0)  # [B, H, NQB, NKB]
        q_rows = arange(num_queries)
        k_cols = arange(num_keys)
        kept = op.Gather(kept, op.Div(q_rows, op.Constant(value_int=block_m)), axis=2)
        kept = op.Gather(kept, op.Div(k_cols, op.Constant(value_int=block_n)), axis=3)
        allowed = op.Cast(kept, to=onnx.TensorProto.BOOL)
        if rule:
            names = {"b": op.Reshape(arange(size(q, 0)), ints(-1, 1, 1, 1)),
                     "h": op.Reshape(arange(heads), ints(1, -1, 1, 1)),
                     "q_idx": op.Reshape(op.Add(q_rows, op.Constant(value_int=q_offset)), ints(1, 1, -1, 1)),
                     "kv_idx": op.Reshape(k_cols, ints(1, 1, 1, -1))}
            allowed = op.And(allowed, sparse_rule.eval_rule_onnx(rule, op, names))
        neg_inf = op.Constant(value_float=float("-inf"))
        if bias is not None:
            scores = op.Add(scores, op.Cast(bias, to=float_type))
            allowed = op.And(allowed, op.Greater(op.Cast(bias, to=float_type), neg_inf))
        scores = op.Where(allowed, scores, neg_inf)
        weights = op.Softmax(scores, axis=-1)
        row_open = op.Cast(op.ReduceMax(op.Cast(allowed, to=onnx.TensorProto.INT32), ints(-1), keepdims=1),
                           to=onnx.TensorProto.BOOL)
        out = op.Where(row_open, op.MatMul(weights, vf), op.Constant(value_float=0.0))
        return op.CastLike(out, q)

    return tokred_sparse_attention
