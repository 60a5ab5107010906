"""The flex_attention lowering of sparse attention (CPU, inside a graph being compiled).

torch's ``flex_attention`` over a pattern's kept blocks: the ``BlockMask`` is built from the
static layout's full/partial block split (``sparse_layout.static_layout(..., for_flex=True)``,
once per shape, a constant of the traced graph) and the pattern's ``mask_mod``
(``sparse_pattern.pattern_mask_mod``, composed with flex's ``and_masks``/``or_masks``), which flex
evaluates on the partial blocks. Inductor lowers it to its CPU flex template, measured faster than
the gathered-block op for mask rules (bench/results/sparse_attention_speed.md). Where it is taken
is the dispatcher's decision (``sparse_attention.use_flex_path``); only sink_window and mask
patterns (static layouts) come here.
"""

from __future__ import annotations

from torch import Tensor

from tokred.triton_ops.sparse_layout import static_layout, static_layout_spec
from tokred.triton_ops.sparse_pattern import SparsePattern, layout_blocks, pattern_mask_mod

# Blocks the CPU flex path takes: multiples of this. torch 2.14's CPU flex kernel returned wrong
# values (NaN, or errors of O(1)) for blocks of 8 and 24 (16, 32, 48, 64, 128 measured right).
FLEX_CPU_BLOCK_MULTIPLE = 16


def flex_cpu_attention(q: Tensor, k: Tensor, v: Tensor, pattern: SparsePattern, rule: str, scale: float,
                       q_offset: int) -> Tensor:
    """torch's flex_attention over the pattern's kept blocks: q [B, H, Nq, D], k/v [B, Hkv, Nk, D/Dv]
    -> [B, H, Nq, Dv] (a sink_window or mask pattern; ``rule`` its element rule, which keys the
    layout; the BlockMask tensors from ``static_layout``)."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    blocks = static_layout(q, k, q_offset, static_layout_spec(pattern, rule), True)
    mask = BlockMask((q.shape[2], k.shape[2]), *blocks, BLOCK_SIZE=layout_blocks(pattern),
                     mask_mod=pattern_mask_mod(pattern, q_offset))
    return flex_attention(q, k, v, block_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
