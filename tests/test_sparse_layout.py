"""sparse_attention's static block layouts (sink_window, mask) and the band-path decision.

* ``static_layout`` builds a layout once per (pattern rule, lengths, q_offset, block, device) and
  reuses it: eagerly from a bounded cache, in a traced graph as constants; with symbolic lengths
  (dynamic shapes) it is built inside the graph.
* the entry point decides once whether causal sink_window takes the band path and tells the op.

Every result is compared with ``sparse_attention_reference`` (dense masked SDPA) or with a layout
built from scratch by ``block_layout(kept_blocks(...))``, never with another cached value.
"""

from __future__ import annotations

import collections

import pytest
import torch

from tokred.triton_ops import sparse_attention as sparse_module
from tokred.triton_ops import sparse_layout
from tokred.triton_ops.sparse_attention import (
    SparsePattern,
    additive_mask,
    block_layout,
    element_rule,
    kept_blocks,
    max_kept_blocks,
    sparse_attention,
    sparse_attention_reference,
    static_layout,
    static_layout_spec,
)

TOL = dict(atol=1e-5, rtol=1e-5)


def qkv(batch, heads, kv_heads, num_queries, num_keys, dim=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    make = lambda h, n: torch.randn(batch, h, n, dim, generator=generator)
    return make(heads, num_queries), make(kv_heads, num_keys), make(kv_heads, num_keys)


def every_third(b, h, q_idx, kv_idx):
    return ((q_idx - kv_idx) % 3 == 0) | (kv_idx < 2)


def every_fifth(b, h, q_idx, kv_idx):
    return ((q_idx - kv_idx) % 5 == 0) | (kv_idx < 2)


def by_head(b, h, q_idx, kv_idx):
    """Reads h: head h sees keys within 4 * (h + 1) positions, batch row 1 also key 0."""
    return (q_idx - kv_idx < 4 * (h + 1)) | ((b == 1) & (kv_idx == 0))


@pytest.fixture
def builds(monkeypatch):
    """An empty layout cache and a counter of layouts built from scratch (key: spec kind, for_flex)."""
    monkeypatch.setattr(sparse_layout, "_STATIC_LAYOUTS", collections.OrderedDict())
    counter = collections.Counter()
    build = sparse_layout.build_static_layout

    def counting_build(spec, *args, **kwargs):
        counter[spec[0]] += 1
        return build(spec, *args, **kwargs)

    monkeypatch.setattr(sparse_layout, "build_static_layout", counting_build)
    return counter


def fresh_layout(pattern, q, k, q_offset):
    """(count, index) built from scratch, without the cache, trimmed to the largest count."""
    kept = kept_blocks(pattern, q, k, q_offset, element_rule(pattern))
    count, _ = block_layout(kept, max_kept_blocks(pattern, q.shape[2], k.shape[2]))
    return block_layout(kept, max(1, int(count.max())))


# ----------------------------------------------------------------------------------------------
# The cache
# ----------------------------------------------------------------------------------------------


def test_layout_is_built_once_and_reused(builds):
    q, k, v = qkv(2, 4, 2, 50, 50)
    pattern = SparsePattern("sink_window", sinks=2, window=11, block=16)
    spec = static_layout_spec(pattern, element_rule(pattern))
    first = static_layout(q, k, 0, spec, False)
    again = static_layout(q, k, 0, spec, False)
    assert builds["sink_window"] == 1
    assert all(a is b for a, b in zip(first, again))
    # the same lengths with other data and batch size: still the same layout
    q2, k2, v2 = qkv(3, 4, 2, 50, 50, seed=1)
    assert static_layout(q2, k2, 0, spec, False)[1] is first[1]
    for _ in range(3):
        torch.testing.assert_close(sparse_attention(q2, k2, v2, pattern),
                                   sparse_attention_reference(q2, k2, v2, pattern), **TOL)
    assert builds["sink_window"] == 1


def test_layout_equals_one_built_from_scratch():
    q, k, _ = qkv(1, 4, 2, 37, 61)
    for pattern in (SparsePattern("sink_window", sinks=3, window=20, block=16),
                    SparsePattern("mask", mask_fn=every_third, block=16)):
        count, index = static_layout(q, k, 24, static_layout_spec(pattern, element_rule(pattern)), False)
        want_count, want_index = fresh_layout(pattern, q, k, 24)
        assert torch.equal(count, want_count)
        if pattern.kind == "mask":  # a mask's MAXK is its largest count
            assert torch.equal(index, want_index)
        else:  # sink_window keeps its static bound: entries past count repeat the last block
            assert torch.equal(index[..., :want_index.shape[-1]], want_index)


SINK_WINDOW = SparsePattern("sink_window", sinks=2, window=9, block=8)
MASK = SparsePattern("mask", mask_fn=every_third, block=8)
# Pairs of calls (pattern, Nq, Nk, q_offset) that differ in one thing the layout depends on. 24
# queries against more keys: not a prefill, so the op reads the layout (not the band path).
CHANGES = {
    "length": [(SINK_WINDOW, 24, 40, None), (SINK_WINDOW, 24, 56, None)],
    "q_offset": [(SINK_WINDOW, 24, 40, 16), (SINK_WINDOW, 24, 40, 8)],
    "window": [(SINK_WINDOW, 24, 40, None), (SparsePattern("sink_window", sinks=2, window=17, block=8), 24, 40, None)],
    "sinks": [(SINK_WINDOW, 24, 40, None), (SparsePattern("sink_window", sinks=9, window=9, block=8), 24, 40, None)],
    "block": [(SINK_WINDOW, 24, 40, None), (SparsePattern("sink_window", sinks=2, window=9, block=16), 24, 40, None)],
    "causal": [(SINK_WINDOW, 24, 40, None),
               (SparsePattern("sink_window", sinks=2, window=9, block=8, causal=False), 24, 40, None)],
    "mask_rule": [(MASK, 24, 40, None), (SparsePattern("mask", mask_fn=every_fifth, block=8), 24, 40, None)],
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_no_stale_layout_after_a_change(builds, change):
    """Two calls that differ in one thing the layout depends on: each equals the reference (a
    reused layout would drop or add blocks, or not fit), and the second builds its own layout."""
    for pattern, num_queries, num_keys, q_offset in CHANGES[change]:
        q, k, v = qkv(2, 4, 2, num_queries, num_keys)
        torch.testing.assert_close(sparse_attention(q, k, v, pattern, q_offset=q_offset),
                                   sparse_attention_reference(q, k, v, pattern, q_offset=q_offset), **TOL)
    assert builds[CHANGES[change][0][0].kind] == 2


def test_mask_rule_reading_heads_is_keyed_by_heads_and_batch(builds):
    pattern = SparsePattern("mask", mask_fn=by_head, block=8)
    for batch, heads in ((2, 4), (2, 2), (1, 2)):
        q, k, v = qkv(batch, heads, heads, 30, 30)
        torch.testing.assert_close(sparse_attention(q, k, v, pattern),
                                   sparse_attention_reference(q, k, v, pattern), **TOL)
    assert builds["mask"] == 3


def test_mask_rule_not_reading_heads_shares_one_layout_across_heads(builds):
    pattern = SparsePattern("mask", mask_fn=every_third, block=8)
    for batch, heads, kv_heads in ((2, 4, 2), (1, 6, 3)):
        q, k, v = qkv(batch, heads, kv_heads, 30, 30)
        torch.testing.assert_close(sparse_attention(q, k, v, pattern),
                                   sparse_attention_reference(q, k, v, pattern), **TOL)
    assert builds["mask"] == 1


def test_cache_is_bounded_least_recently_used_first(builds, monkeypatch):
    monkeypatch.setattr(sparse_layout, "STATIC_LAYOUT_CACHE_SIZE", 2)
    pattern = SparsePattern("sink_window", sinks=1, window=5, block=8)
    spec = static_layout_spec(pattern, element_rule(pattern))
    tensors = {n: qkv(1, 2, 1, n, n)[:2] for n in (16, 24, 32)}
    static_layout(*tensors[16], 0, spec, False)
    static_layout(*tensors[24], 0, spec, False)
    static_layout(*tensors[16], 0, spec, False)  # 16 used last: 24 is the one to drop
    static_layout(*tensors[32], 0, spec, False)
    assert len(sparse_layout._STATIC_LAYOUTS) == 2 and builds["sink_window"] == 3
    static_layout(*tensors[16], 0, spec, False)
    assert builds["sink_window"] == 3
    static_layout(*tensors[24], 0, spec, False)
    assert builds["sink_window"] == 4


# ----------------------------------------------------------------------------------------------
# Compiled: constants of the graph (static shapes), built in the graph (dynamic shapes)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sink_window_decode", "mask", "sink_window_prefill"])
def test_compiled_static_shapes_hold_the_layout_as_graph_constants(fresh_dynamo, builds, name):
    """After the compile, calls neither build nor look up the layout: emptying the cache builds
    nothing new, and the results still equal the reference."""
    pattern = SparsePattern("mask", mask_fn=every_third, block=8) if name == "mask" else \
        SparsePattern("sink_window", sinks=2, window=9, block=8)
    num_queries = 5 if name == "sink_window_decode" else 37
    q, k, v = qkv(2, 4, 2, num_queries, 37)
    compiled = torch.compile(lambda q, k, v: sparse_attention(q, k, v, pattern), backend="aot_eager",
                             fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(q, k, v), sparse_attention_reference(q, k, v, pattern), **TOL)
    built = sum(builds.values())
    assert built >= 1
    sparse_layout._STATIC_LAYOUTS.clear()
    for seed in (1, 2):
        q, k, v = qkv(2, 4, 2, num_queries, 37, seed=seed)
        torch.testing.assert_close(compiled(q, k, v), sparse_attention_reference(q, k, v, pattern), **TOL)
    assert sum(builds.values()) == built


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("name", ["sink_window", "mask", "block_topk"])
def test_compiled_dynamic_shapes_equal_the_reference(fresh_dynamo, backend, name):
    """dynamic=True: lengths are symbolic, so the layout is built inside the graph; every length
    (prefill, decode with a cache) must still equal the reference."""
    # Blocks of 8 take the op under inductor (see the next test). With blocks that take flex,
    # inductor's CPU flex lowering fails on symbolic lengths (torch 2.14: "'Add' object has no
    # attribute 'get_name'"); tokred's pass compiles sparse sites with static lengths only.
    shapes = [(37, 37), (50, 50), (3, 41), (64, 64)]
    pattern = {"sink_window": SparsePattern("sink_window", sinks=2, window=9, block=8),
               "mask": SparsePattern("mask", mask_fn=every_third, block=8),
               "block_topk": SparsePattern("block_topk", block=8, topk=2, sinks=1, local=1)}[name]
    compiled = torch.compile(lambda q, k, v: sparse_attention(q, k, v, pattern), backend=backend,
                             fullgraph=True, dynamic=True)
    for num_queries, num_keys in shapes:
        q, k, v = qkv(2, 4, 2, num_queries, num_keys)
        torch.testing.assert_close(compiled(q, k, v), sparse_attention_reference(q, k, v, pattern), **TOL)


@pytest.mark.parametrize("block, flex", [(8, False), (24, False), (16, True)])
def test_inductor_takes_flex_only_for_blocks_it_computes_right(fresh_dynamo, monkeypatch, block, flex):
    """torch 2.14's CPU flex kernel returned NaN or O(1) errors for blocks of 8 and 24: those run
    the op; multiples of 16 take flex. Either way the result equals the reference (prefill and a
    decode-like shape)."""
    taken = []
    choose = sparse_module.use_flex_path
    monkeypatch.setattr(sparse_module, "use_flex_path", lambda *a: taken.append(choose(*a)) or taken[-1])
    pattern = SparsePattern("mask", mask_fn=every_third, block=block)
    compiled = torch.compile(lambda q, k, v: sparse_attention(q, k, v, pattern), backend="inductor",
                             fullgraph=True, dynamic=False)
    for num_queries, num_keys in [(37, 37), (3, 41)]:
        q, k, v = qkv(2, 4, 2, num_queries, num_keys)
        torch.testing.assert_close(compiled(q, k, v), sparse_attention_reference(q, k, v, pattern), **TOL)
    assert taken == [flex, flex]


def test_compiled_static_then_automatic_dynamic(fresh_dynamo):
    """dynamic=None: the first compile has static lengths (constants), a new length recompiles
    with symbolic ones; neither may keep the other's layout."""
    pattern = SparsePattern("sink_window", sinks=2, window=9, block=8)
    compiled = torch.compile(lambda q, k, v: sparse_attention(q, k, v, pattern), backend="aot_eager")
    for n in (37, 50, 29, 37):
        q, k, v = qkv(1, 4, 2, 3, n)  # decode-like: 3 queries at the end of n keys
        torch.testing.assert_close(compiled(q, k, v), sparse_attention_reference(q, k, v, pattern), **TOL)


def test_onnx_export_holds_a_sink_window_layout_as_constants(tmp_path):
    """The exported graph reads the layout from initializers: no TopK (the layout's sort) in it."""
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import onnx

    from tokred import triton_ops

    class Layer(torch.nn.Module):
        def forward(self, q, k, v):
            return sparse_attention(q, k, v, SparsePattern("sink_window", sinks=2, window=9, block=8))

    q, k, v = qkv(1, 4, 2, 37, 37)
    path = tmp_path / "sink_window.onnx"
    torch.onnx.export(Layer().eval(), (q, k, v), str(path), dynamo=True,
                      custom_translation_table=triton_ops.onnx_translation_table())
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "TopK" not in ops, sorted(ops)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), (q, k, v))}
    got = torch.from_numpy(session.run(None, feeds)[0])
    pattern = SparsePattern("sink_window", sinks=2, window=9, block=8)
    torch.testing.assert_close(got, sparse_attention_reference(q, k, v, pattern), atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# The band path: decided once, by the entry point
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case,expected", [("prefill", True), ("decode", False), ("bias", False),
                                           ("not_causal", False), ("window_0", False), ("mask_same_rule", False)])
def test_band_path_is_taken_exactly_where_decided(monkeypatch, torch_sparse_paths, case, expected):
    calls = []
    band = sparse_module.sink_window_band_attention

    def spy(q, k, v, sinks, window, scale, **kwargs):
        calls.append((sinks, window))
        return band(q, k, v, sinks, window, scale, **kwargs)

    monkeypatch.setattr(sparse_module, "sink_window_band_attention", spy)
    pattern = SparsePattern("sink_window", sinks=3, window=10, block=8,
                            causal=case != "not_causal")
    if case == "window_0":
        pattern = SparsePattern("sink_window", sinks=3, window=0, block=8)
    if case == "mask_same_rule":  # the same allowed set written as a mask rule: not sink_window
        pattern = SparsePattern("mask", mask_fn=lambda b, h, q_idx, kv_idx: (kv_idx < 3) | (q_idx - kv_idx < 10),
                                block=8)
    q, k, v = qkv(2, 4, 2, 5 if case == "decode" else 45, 45)
    bias = None
    if case == "bias":
        bias = torch.ones(2, 1, 1, 45, dtype=torch.bool)
        bias[1, ..., 40:] = False
    torch.testing.assert_close(sparse_attention(q, k, v, pattern, attn_bias=bias),
                               sparse_attention_reference(q, k, v, pattern, attn_bias=bias), **TOL)
    assert calls == ([(3, 10)] if expected else [])


def test_op_refuses_a_band_request_outside_a_prefill():
    q, k, v = qkv(1, 2, 2, 5, 40)
    pattern = SparsePattern("sink_window", sinks=2, window=9, block=8)
    count, index, rule = sparse_module.pattern_layout(pattern, q, k, 35)
    with pytest.raises(RuntimeError, match="band_window"):
        torch.ops.tokred.sparse_attention(q, k, v, count.contiguous(), index.contiguous(), None, 0.25, 35, 8, 8,
                                          rule, 2, 9)


def test_additive_mask():
    allowed = torch.tensor([[True, False], [False, True]])
    for dtype in (torch.float32, torch.bfloat16):
        got = additive_mask(allowed, dtype)
        assert got.dtype == dtype
        assert torch.equal(got.float(), torch.tensor([[0.0, -torch.inf], [-torch.inf, 0.0]]))
