"""The cpu_linear pass: projections as oneDNN linears on weights packed at compile time.

Checks: option validation; the packed op against F.linear; the rewritten graphs of real transformers
architectures (Llama, Qwen2 with q/k/v biases, GPT-2's Conv1D addmm, a tied LM head) against the
uncompiled model in fp32; the sites it must leave alone (one-row graphs, float64, trainable
weights under grad, no oneDNN) and what the report says about them; dynamic token counts without a
recompile per decode step; tokred.generate greedy output equal to the uncompiled model's plain
greedy decoding, plain and with prompt lookup.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tokred
from tokred.backend import rewrite
from tokred.runtime.generate import generate
from tokred.passes import cpu_linear
from tokred.rewriter.options import parse_options

pytestmark = pytest.mark.skipif(cpu_linear.onednn_unavailable() is not None,
                                reason=f"oneDNN: {cpu_linear.onednn_unavailable()}")

VOCAB = 97


def tiny(arch: str, dtype=torch.float32, layers: int = 2, hidden: int = 64) -> torch.nn.Module:
    """A random-weight causal LM, eval mode, with a sharpened head (wide argmax gaps, looping greedy
    paths that prompt lookup can match)."""
    import transformers as tf

    torch.manual_seed(0)
    common = {"vocab_size": VOCAB, "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": 4,
              "intermediate_size": 2 * hidden, "max_position_embeddings": 128}
    if arch == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(num_key_value_heads=2, **common))
    elif arch == "llama_tied":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(num_key_value_heads=2, tie_word_embeddings=True, **common))
    elif arch == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(num_key_value_heads=2, **common))
    elif arch == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=hidden, n_layer=layers, n_head=4,
                                                 n_inner=2 * hidden, n_positions=128))
    else:
        raise KeyError(arch)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    return model.eval().to(dtype)


def compiled(model, dynamic=False, **options):
    backend = tokred.backend(inner=options.pop("inner", "eager"), cpu_linear=options.pop("cpu_linear", "onednn"),
                             **options)
    return torch.compile(model, backend=backend, dynamic=dynamic), backend


def notes(backend) -> list[str]:
    return [n for r in backend.reports for n in r.notes if n.startswith("cpu_linear")]


def packed_counts(backend) -> list[tuple[int, int]]:
    """(packed, sites) per captured graph, from the report notes."""
    out = []
    for r in backend.reports:
        for n in r.notes:
            if " projections packed for oneDNN" in n:
                words = n.split()
                out.append((int(words[1]), int(words[3])))
    return out


# ---- options -------------------------------------------------------------------------------------


def test_options():
    assert parse_options({"cpu_linear": "onednn"}).passes["cpu_linear"] == cpu_linear.CpuLinearOptions("onednn", 2)
    assert parse_options({"cpu_linear": {"min_rows": 1}}).passes["cpu_linear"].min_rows == 1
    assert "cpu_linear" not in parse_options({"cpu_linear": None}).passes
    for bad, name in (("mkl", "cpu_linear.kernel"), ({"kernel": "x"}, "cpu_linear.kernel"), (3, "cpu_linear"),
                      ({"min_rows": 0}, "cpu_linear.min_rows"), ({"min_rows": True}, "cpu_linear.min_rows"),
                      ({"rows": 2}, "cpu_linear.rows")):
        with pytest.raises(ValueError, match=name.replace(".", r"\.")):
            tokred.backend(cpu_linear=bad)


# ---- the op --------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 11])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_linear(rows, bias):
    torch.manual_seed(rows)
    weight = torch.randn(192, 576) / 24
    b = torch.randn(192) if bias else None
    x = torch.randn(1, rows, 576)
    got = cpu_linear.packed_linear(x, cpu_linear.pack_weight(weight), b)
    expected = F.linear(x.double(), weight.double(), b.double() if bias else None).float()
    assert got.shape == (1, rows, 192)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# ---- the pass on real architectures ---------------------------------------------------------------


@pytest.mark.parametrize("arch,sites", [("llama", 15), ("llama_tied", 15), ("qwen2", 15), ("gpt2", 9)])
@pytest.mark.parametrize("dynamic", [False, True])
def test_rewrite_equals_original(fresh_dynamo, arch, sites, dynamic):
    model = tiny(arch)
    fast, backend = compiled(model, dynamic=dynamic)
    with torch.no_grad():
        for batch, tokens in ((2, 7), (1, 5)):
            ids = torch.randint(0, VOCAB, (batch, tokens))
            expected = model(input_ids=ids, use_cache=False).logits
            got = fast(input_ids=ids, use_cache=False).logits
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    counts = packed_counts(backend)
    assert counts and all(c == (sites, sites) for c in counts), notes(backend)


def test_graph_holds_packed_weights(fresh_dynamo):
    """The rewritten graph calls the oneDNN op on get_attr buffers of the mkldnn layout (packed once);
    no projection calls linear any more."""
    graphs = []
    model = tiny("qwen2")
    options = parse_options({"inner": "eager", "cpu_linear": "onednn"})

    def capture(gm, example_inputs):
        gm = rewrite(gm, example_inputs, options)[0]
        graphs.append(gm)
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=capture, dynamic=False)(input_ids=torch.randint(0, VOCAB, (1, 6)), use_cache=False)
    (gm,) = graphs
    ops = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.mkldnn._linear_pointwise.default]
    assert len(ops) == 15
    assert not [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (F.linear, torch._C._nn.linear)]
    packed = [getattr(gm, n.args[1].target) for n in ops]
    assert all(p.layout == torch._mkldnn for p in packed)
    assert sum(n.args[2] is not None for n in ops) == 2 * 3  # Qwen2's q, k, v biases in 2 layers


def test_one_row_graph_is_kept(fresh_dynamo):
    """A graph whose projections multiply one row (batch 1, one token: Dynamo specialises size 1) keeps
    the plain linear, so plain greedy decoding runs the same kernels with and without the option."""
    model = tiny("llama")
    fast, backend = compiled(model)
    with torch.no_grad():
        ids = torch.randint(0, VOCAB, (1, 1))
        torch.testing.assert_close(fast(input_ids=ids, use_cache=False).logits,
                                   model(input_ids=ids, use_cache=False).logits, rtol=0, atol=0)
    assert packed_counts(backend) == [(0, 15)]
    assert any("15 projections" in n and "fewer than min_rows=2 rows" in n for n in notes(backend))
    fast, backend = compiled(model, cpu_linear={"min_rows": 1})
    with torch.no_grad():
        fast(input_ids=ids, use_cache=False)
    assert packed_counts(backend) == [(15, 15)]


def test_float64_left_alone_with_reason(fresh_dynamo):
    model = tiny("llama", dtype=torch.float64)
    fast, backend = compiled(model)
    ids = torch.randint(0, VOCAB, (2, 4))
    with torch.no_grad():
        torch.testing.assert_close(fast(input_ids=ids, use_cache=False).logits,
                                   model(input_ids=ids, use_cache=False).logits, rtol=0, atol=0)
    assert packed_counts(backend) == [(0, 15)]
    assert any("torch.float64 (cpu_linear packs float32 only)" in n for n in notes(backend)), notes(backend)
    torch._dynamo.reset()
    strict, _ = compiled(model, strict=True)
    with torch.no_grad(), pytest.raises(Exception, match="cpu_linear packs float32 only"):
        strict(input_ids=ids, use_cache=False)


def test_grad_enabled_left_alone(fresh_dynamo):
    """The packed op has no autograd formula: a graph compiled with grad enabled for trainable weights
    keeps its linears (and its gradients)."""
    model = tiny("llama")
    fast, backend = compiled(model)
    ids = torch.randint(0, VOCAB, (2, 4))
    fast(input_ids=ids, use_cache=False).logits.sum().backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None
    assert packed_counts(backend) == [(0, 15)]
    assert any("inference-only" in n for n in notes(backend)), notes(backend)


def test_without_onednn_left_alone(fresh_dynamo, monkeypatch):
    monkeypatch.setattr(cpu_linear, "onednn_unavailable", lambda: "oneDNN (mkldnn) is not available in this torch build")
    model = tiny("llama")
    fast, backend = compiled(model)
    with torch.no_grad():
        fast(input_ids=torch.randint(0, VOCAB, (2, 4)), use_cache=False)
    assert any("not available in this torch build; 15 projections left as they are" in n for n in notes(backend))


# ---- decoding ------------------------------------------------------------------------------------


def prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Two left-padded prompts; the first repeats a motif (prompt lookup matches)."""
    g = torch.Generator().manual_seed(3)
    motif = torch.randint(0, VOCAB, (4,), generator=g).tolist()
    rows = [motif * 3, torch.randint(0, VOCAB, (7,), generator=g).tolist()]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


@pytest.mark.parametrize("batch", [1, 2])
def test_generate_greedy_identity_without_recompiles(fresh_dynamo, batch):
    """Plain and prompt-lookup greedy decoding through the packed graphs give the uncompiled model's
    plain greedy tokens; decode steps of 1..k+1 tokens on a growing KV cache reuse a few graphs."""
    model = tiny("llama")
    ids, mask = prompts()
    ids, mask = ids[:batch], mask[:batch]
    expected = generate(model, ids, 12, attention_mask=mask).sequences
    fast, backend = compiled(model, dynamic=None)
    plain = generate(fast, ids, 12, attention_mask=mask)
    lookup = generate(fast, ids, 12, attention_mask=mask, draft="prompt_lookup", k=4)
    assert torch.equal(plain.sequences, expected)
    assert torch.equal(lookup.sequences, expected)
    assert lookup.stats.accepted > 0 and len(set(lookup.stats.k_history)) > 1  # the widths varied
    assert any(p > 0 for p, _ in packed_counts(backend))
    # Graphs: the prefill; one-token and multi-token steps; a dynamic cache length; cache tensors
    # freshly concatenated, cropped by a rollback, or shifted per row (batch 2), which Dynamo guards
    # by stride. A few runs see them all; then longer runs (caches past every length seen, other
    # widths) compile nothing.
    graphs = []
    for new_tokens in (16, 24, 30, 30):
        longer = generate(fast, ids, new_tokens, attention_mask=mask, draft="prompt_lookup", k=4)
        graphs.append(len(backend.reports))
    assert graphs[-1] == graphs[-2] <= 8 < longer.stats.target_forwards, graphs
    assert torch.equal(longer.sequences, generate(model, ids, 30, attention_mask=mask).sequences)


def test_aot_eager_inner(fresh_dynamo):
    """The rewritten graph also goes through aot_autograd (the path Inductor takes)."""
    model = tiny("llama")
    fast, backend = compiled(model, inner="aot_eager")
    ids = torch.randint(0, VOCAB, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(fast(input_ids=ids, use_cache=False).logits,
                                   model(input_ids=ids, use_cache=False).logits, rtol=1e-5, atol=1e-4)
    assert packed_counts(backend) == [(15, 15)]


def test_inductor_inner_left_alone_with_reason(fresh_dynamo):
    """Inductor lowers the oneDNN linear only for frozen weights: nothing is packed, the report says why."""
    model = tiny("llama")
    fast, backend = compiled(model, inner="inductor")
    ids = torch.randint(0, VOCAB, (2, 3))
    with torch.no_grad(), pytest.warns(UserWarning, match="inner compiler is inductor"):
        torch.testing.assert_close(fast(input_ids=ids, use_cache=False).logits,
                                   model(input_ids=ids, use_cache=False).logits, rtol=1e-5, atol=1e-4)
    assert any("inner compiler is inductor" in n and "15 projections left as they are" in n for n in notes(backend))


def test_graphs_of_one_model_share_the_packed_weights():
    """Each graph compiled from the same weights reuses one packed copy (generate compiles several
    graphs of a model); an in-place change of the weight packs again."""
    weight = torch.nn.Parameter(torch.randn(8, 4), requires_grad=False)
    first = cpu_linear.shared_pack(weight, False)
    assert cpu_linear.shared_pack(weight, False) is first
    assert cpu_linear.shared_pack(weight, True) is not first  # the other orientation: its own pack
    with torch.no_grad():
        weight.mul_(2)
    again = cpu_linear.shared_pack(weight, False)
    assert again is not first
    x = torch.randn(3, 4)
    torch.testing.assert_close(cpu_linear.packed_linear(x, again, None), x @ weight.t())
