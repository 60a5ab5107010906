"""The sparse attention pass on the zoo, against the independent reference in sparse_reference.py.

Every comparison compiles a tiny zoo model with ``tokred.backend(inner="aot_eager",
sparse_attention={...})`` and runs the same weights eagerly with transformers' attention function
replaced by a dense attention masked to the pattern (``reference_attention``). Text inputs are
batch 2, 11 tokens (odd), so every pattern below cuts blocks and windows unevenly.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from sparse_reference import dense_attention, reference_attention, sink_window_allowed
from torch import nn
from zoo import SEQ_LEN, ZOO, max_abs_diff

import tokred
from tokred.compat.transformers_api import cache_argument
from tokred.passes import sparse_attention as sa
from tokred.rewriter.report import FOUND, REWRITTEN, SKIPPED

TOL = 1e-5
backend_module = importlib.import_module("tokred.backend")

SINK_WINDOW = {"pattern": "sink_window", "sinks": 2, "window": 4}
BLOCK_TOPK = {"pattern": "block_topk", "block": 4, "topk": 1, "sinks": 0, "local": 1}


def every_third(b, h, q_idx, kv_idx):
    """A FlexAttention-style mask: keys at a distance divisible by 3, and the first key."""
    return ((q_idx - kv_idx) % 3 == 0) | (kv_idx == 0)


MASK = {"pattern": "mask", "mask": every_third}
PATTERNS = {"sink_window": SINK_WINDOW, "block_topk": BLOCK_TOPK, "mask": MASK}
DECODERS = ["hf_llama_sdpa", "hf_llama_eager", "hf_qwen2_sdpa", "hf_gemma3_sdpa", "hf_gpt2_sdpa", "hf_gpt2_eager"]
# the rest run with --long (each case compiles a model: seconds apiece on a shared CPU)
QUICK = {("hf_llama_sdpa", "sink_window"), ("hf_llama_eager", "block_topk"), ("hf_gpt2_eager", "mask")}


@pytest.fixture(autouse=True)
def sparse_pass(fresh_dynamo):
    """Every test compiles afresh; the pass is in the backend's table."""
    assert backend_module.PASSES[sa.NAME] is sa.SparseAttention
    yield


def compiled(zm, spec: dict, **options):
    """(outputs, report) of the zoo model compiled with the sparse attention pass."""
    be = tokred.backend(inner=options.pop("inner", "aot_eager"), sparse_attention=spec, **options)
    with torch.no_grad():
        out = torch.compile(zm.model, backend=be)(*zm.args, **zm.kwargs)
    return out, be.report


def reference(zm, spec: dict):
    with reference_attention(zm.model, spec):
        return zm()


def case_params():
    return [pytest.param(name, kind, id=f"{name}-{kind}",
                         marks=() if (name, kind) in QUICK else (pytest.mark.long,))
            for name in DECODERS for kind in PATTERNS]


# ----------------------------------------------------------------------------- decoders

@pytest.mark.parametrize("name,kind", case_params())
def test_decoder_equals_reference(name, kind):
    zm = ZOO[name]()
    spec = PATTERNS[kind]
    out, report = compiled(zm, spec)
    assert [s.status for s in report.attention_sites] == [REWRITTEN] * zm.n_attention, str(report)
    assert max_abs_diff(out, reference(zm, spec)) <= TOL
    # and the pattern is not the identity at these sizes
    assert max_abs_diff(out, zm()) > 1e-3


def test_padded_decoder_passes_the_padding_mask_on():
    """Right padding in row 1: the mask depends on the input, so it goes to the kernel as attn_bias."""
    zm = ZOO["hf_llama_sdpa"]()
    mask = torch.ones(2, SEQ_LEN, dtype=torch.long)
    mask[1, -3:] = 0
    zm.kwargs["attention_mask"] = mask
    out, report = compiled(zm, SINK_WINDOW)
    assert all(s.status == REWRITTEN and "folded" not in s.reason for s in report.attention_sites)
    assert max_abs_diff(out, reference(zm, SINK_WINDOW)) <= TOL


def test_layers_option_rewrites_only_the_listed_layers():
    zm = ZOO["hf_llama_eager"]()
    spec = {**SINK_WINDOW, "layers": [1]}
    out, report = compiled(zm, spec)
    assert [s.status for s in report.attention_sites] == [FOUND, REWRITTEN]
    assert max_abs_diff(out, reference(zm, spec)) <= TOL


# ----------------------------------------------------------------------------- encoders

def test_encoder_skips_sink_window_with_the_reason():
    zm = ZOO["hf_bert_sdpa"]()
    out, report = compiled(zm, SINK_WINDOW)
    assert [s.status for s in report.attention_sites] == [SKIPPED] * zm.n_attention
    assert all("sink_window needs causal attention" in s.reason for s in report.attention_sites)
    assert max_abs_diff(out, zm()) <= TOL


def test_encoder_sink_window_strict_is_an_error():
    zm = ZOO["hf_bert_sdpa"]()
    with pytest.raises(Exception, match="sink_window needs causal attention"):
        compiled(zm, SINK_WINDOW, strict=True)


@pytest.mark.parametrize("kind", ["block_topk", "mask"])
def test_encoder_equals_reference(kind):
    """Bidirectional with a padded row: the pattern is not causal, padding goes to attn_bias."""
    zm = ZOO["hf_bert_sdpa"]()
    spec = PATTERNS[kind]
    out, report = compiled(zm, spec)
    assert [s.status for s in report.attention_sites] == [REWRITTEN] * zm.n_attention, str(report)
    assert max_abs_diff(out, reference(zm, spec)) <= TOL
    assert max_abs_diff(out, zm()) > 1e-3


# ----------------------------------------------------------------------------- identity

@pytest.mark.parametrize("name,spec", [
    ("hf_llama_sdpa", {"pattern": "sink_window", "sinks": 4, "window": SEQ_LEN}),
    pytest.param("hf_gemma3_sdpa", {"pattern": "sink_window", "sinks": 0, "window": 64}, marks=pytest.mark.long),
    pytest.param("hf_gpt2_eager", {"pattern": "block_topk", "block": 4, "topk": 3, "sinks": 0, "local": 1},
                 marks=pytest.mark.long),
    ("hf_bert_sdpa", {"pattern": "block_topk", "block": 2, "topk": 6, "sinks": 0, "local": 0}),
])
def test_zero_reduction_is_identity(name, spec):
    zm = ZOO[name]()
    out, report = compiled(zm, spec)
    assert all(s.status == REWRITTEN for s in report.attention_sites), str(report)
    assert max_abs_diff(out, zm()) <= TOL
    # and the report says so: the attention costs its dense count (block_topk adds its selection)
    assert any(n.startswith("sparse_attention: changed nothing: ") and n.endswith(": identity")
               for n in report.notes), report.notes
    assert report.flops_after == report.flops_before if spec["pattern"] == "sink_window" else \
        report.flops_after > report.flops_before


# ----------------------------------------------------------------------------- report

def test_report_says_what_each_site_got():
    zm = ZOO["hf_gemma3_sdpa"]()  # layer 0: sliding window 6; layer 1: full causal
    _, report = compiled(zm, {"pattern": "sink_window", "sinks": 4, "window": 8})
    sliding, full = report.attention_sites
    assert sliding.reason.startswith("sink_window sinks=0 window=6 (")
    assert "keeps its own sliding window 6 (narrower than 8)" in sliding.reason
    assert full.reason.startswith("sink_window sinks=4 window=8 (density ")
    assert "at N=4096" in full.reason and "causal mask folded" in full.reason
    assert "GQA in the kernel" in full.reason and full.passes == [sa.NAME]
    note = next(n for n in report.notes if n.startswith("sparse_attention: 2 sites use the sink_window kernel"))
    assert note.endswith("on CPU: tokred's C++ kernel")
    assert "rewritten" in str(report)


def test_report_says_which_cpu_code_runs_a_mask_rule():
    zm = ZOO["hf_gemma3_sdpa"]()
    _, report = compiled(zm, {"pattern": "mask", "mask": lambda b, h, q_idx, kv_idx: (q_idx - kv_idx) % 2 == 0})
    assert any(n.endswith("on CPU: torch ops (flex_attention inside inductor graphs)") for n in report.notes), \
        report.notes


@pytest.mark.long
def test_gemma3_wider_own_window_stays_as_bias():
    zm = ZOO["hf_gemma3_sdpa"]()
    out, report = compiled(zm, SINK_WINDOW)  # window 4 < the model's own 6
    assert "the model's own sliding window 6 is kept as attn_bias" in report.attention_sites[0].reason
    assert max_abs_diff(out, reference(zm, SINK_WINDOW)) <= TOL


def test_density_matches_the_reference_mask():
    for n, sinks, window in [(11, 2, 4), (4096, 4, 1024), (7, 0, 7), (9, 3, 2)]:
        allowed = sink_window_allowed(n, n, sinks, window)
        expected = allowed.sum().item() / (n * (n + 1) // 2)
        assert sa.sink_window_density(n, n, sinks, window) == pytest.approx(expected)


def test_own_window_recognises_causal_and_sliding_masks():
    n = 9
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    assert sa.own_window(causal, n, n) == n
    assert sa.own_window(causal & ~torch.ones(n, n, dtype=torch.bool).tril(-3), n, n) == 3
    assert sa.own_window(torch.ones(n, n, dtype=torch.bool), n, n) is None
    padded = causal[None].repeat(2, 1, 1)
    padded[1, :, -2:] = False
    assert sa.own_window(padded, n, n) is None


# ----------------------------------------------------------------------------- options

@pytest.mark.parametrize("value,key", [
    ({"pattern": "dense"}, "sparse_attention.pattern"),
    ({"pattern": "sink_window"}, "sparse_attention.window"),
    ({"pattern": "sink_window", "window": 0}, "sparse_attention.window"),
    ({"pattern": "sink_window", "window": 8, "sinks": -1}, "sparse_attention.sinks"),
    ({"pattern": "sink_window", "window": 8, "topk": 2}, "sparse_attention.topk"),
    ({"pattern": "block_topk", "block": 0}, "sparse_attention.block"),
    ({"pattern": "block_topk", "topk": True}, "sparse_attention.topk"),
    ({"pattern": "mask", "mask": 3}, "sparse_attention.mask"),
    ({"pattern": "mask", "mask": lambda b, h, q, k: q.float() > k}, "sparse_attention.mask"),
    ({"pattern": "sink_window", "window": 8, "layers": [0, -1]}, "sparse_attention.layers"),
    ({"pattern": "sink_window", "window": 8, "layers": 1}, "sparse_attention.layers"),
    ("sink_window", "sparse_attention"),
])
def test_bad_options_name_the_key(value, key):
    with pytest.raises(ValueError, match=f"'{key}'"):
        tokred.backend(sparse_attention=value)


def test_options_are_normalised():
    assert sa.SparseOptions.parse({"pattern": "block_topk"}) == sa.SparseOptions(
        pattern="block_topk", layers=None, block=64, topk=16, sinks=0, local=1)
    assert sa.SparseOptions.parse({"pattern": "sink_window", "window": 5, "layers": [3, 1, 3]}).layers == (1, 3)


# ----------------------------------------------------------------------------- written-out attention

class MaskedFillAttention(nn.Module):
    """Causal self-attention written out with ``masked_fill`` (True = masked) and an optional
    padding mask input [B, N] (1 = token), as older models do. x [B, N, C] -> [B, N, C]."""

    def __init__(self, dim: int = 24, heads: int = 3):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, pad=None):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5
        future = torch.triu(torch.ones(n, n, dtype=torch.bool, device=x.device), 1)
        masked = future if pad is None else future | (pad[:, None, None, :] == 0)
        attn = scores.masked_fill(masked, float("-inf")).softmax(dim=-1)
        return x + self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))

    def reference(self, x, pad, sinks: int, window: int):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        allowed = sink_window_allowed(n, n, sinks, window)[None, None]
        if pad is not None:
            allowed = allowed & (pad[:, None, None, :] != 0)
        out = dense_attention(q, k, v, allowed, (c // self.heads) ** -0.5)
        return x + self.proj(out.transpose(1, 2).reshape(b, n, c))


@pytest.mark.parametrize("padded", [False, True])
def test_masked_fill_chain(padded):
    """masked_fill's mask (True = masked) is folded when constant, inverted into attn_bias when not."""
    torch.manual_seed(0)
    model = MaskedFillAttention().eval()
    x = torch.randn(2, 13, 24)
    pad = torch.tensor([[1] * 13, [1] * 10 + [0] * 3]) if padded else None
    be = tokred.backend(inner="aot_eager", sparse_attention={"pattern": "sink_window", "sinks": 1, "window": 3})
    with torch.no_grad():
        out = torch.compile(model, backend=be)(x, pad)
        expected = model.reference(x, pad, 1, 3)
    (site,) = be.report.attention_sites
    assert site.status == REWRITTEN and ("causal mask folded" in site.reason) != padded
    assert (out - expected).abs().max().item() <= TOL


# ----------------------------------------------------------------------------- Gemma3 and inductor

def gemma3(layer_type: str, window: int):
    """A random-weight two-layer Gemma3 with every layer ``layer_type``; one rope theta for both."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    rope = {"rope_type": "default", "rope_theta": 10000.0}
    config = Gemma3TextConfig(vocab_size=100, hidden_size=96, num_hidden_layers=2, num_attention_heads=12,
                              num_key_value_heads=4, head_dim=8, intermediate_size=128,
                              max_position_embeddings=64, sliding_window=window,
                              layer_types=[layer_type] * 2,
                              rope_parameters={"full_attention": dict(rope), "sliding_attention": dict(rope)})
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return Gemma3ForCausalLM(config).eval()


def test_gemma3_full_with_sink_window_equals_its_own_sliding_window():
    window, n = 5, 13
    full, sliding = gemma3("full_attention", window), gemma3("sliding_attention", window)
    sliding.load_state_dict(full.state_dict())
    ids = torch.randint(3, 100, (2, n), generator=torch.Generator().manual_seed(1))
    be = tokred.backend(inner="aot_eager", sparse_attention={"pattern": "sink_window", "sinks": 0, "window": window})
    with torch.no_grad():
        out = torch.compile(full, backend=be)(input_ids=ids, use_cache=False).logits
        expected = sliding(input_ids=ids, use_cache=False).logits
        dense = full(input_ids=ids, use_cache=False).logits
    assert all(s.status == REWRITTEN for s in be.report.attention_sites)
    assert (out - expected).abs().max().item() <= TOL
    assert (dense - expected).abs().max().item() > 1e-3  # the window does cut at this length


@pytest.mark.long  # an inductor compile takes about a minute on the shared CPU
def test_inductor_on_a_tiny_decoder():
    zm = ZOO["hf_llama_sdpa"]()
    out, report = compiled(zm, SINK_WINDOW, inner="inductor")
    assert all(s.status == REWRITTEN for s in report.attention_sites)
    assert max_abs_diff(out, reference(zm, SINK_WINDOW)) <= 1e-4


# ----------------------------------------------------------------------------- decoding with a KV cache

@pytest.mark.parametrize("spec", [
    {"pattern": "sink_window", "sinks": 1, "window": 3},
    {"pattern": "block_topk", "block": 2, "topk": 1, "sinks": 1, "local": 1},
], ids=["sink_window", "block_topk"])
def test_generate_keeps_the_pattern_in_decode_steps_with_a_symbolic_cache_length(fresh_dynamo, spec):
    """model.generate on the tokred-compiled forward: Dynamo compiles the prefill, the first step and
    then one step with a symbolic cache length, which serves every later step. That graph's sites
    are rewritten too (decided from the graph's structure, no guard on the length: no recompiles),
    and the greedy tokens equal those of the same decoding with the reference attention."""
    zm = ZOO["hf_llama_sdpa"]()
    model, ids, new_tokens = zm.model, zm.kwargs["input_ids"][:1], 8
    backend = tokred.backend(inner="aot_eager", sparse_attention=spec)
    forward = model.forward
    model.forward = torch.compile(lambda *a, **k: forward(*a, **k), backend=backend)
    try:
        with torch.no_grad():
            seq = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=0)
    finally:
        del model.forward
    assert len(backend.reports) == 3
    symbolic = backend.reports[-1].attention_sites
    assert all(s.status == REWRITTEN and "symbolic length" in s.reason for s in symbolic), \
        [s.reason for s in symbolic]
    # the reference decodes with a cache too: a decode step's query is a block of its own (block_topk
    # selects for it alone), so it is compared step by step, not against one pass over the sequence
    with torch.no_grad(), reference_attention(model, spec):
        expected = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                  pad_token_id=0)
    assert torch.equal(seq, expected)
    with torch.no_grad():  # and the pattern does change what this model generates
        dense = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                               pad_token_id=0)
    assert not torch.equal(seq, dense)


def test_symbolic_lengths_with_a_mask_rule_are_skipped_with_the_reason(fresh_dynamo):
    zm = ZOO["hf_llama_sdpa"]()
    backend = tokred.backend(inner="aot_eager", sparse_attention=MASK)
    compiled_model = torch.compile(zm.model, backend=backend, dynamic=True)
    with torch.no_grad():
        out = compiled_model(input_ids=zm.kwargs["input_ids"][:, :9]).logits
        assert torch.allclose(out, zm.model(input_ids=zm.kwargs["input_ids"][:, :9]).logits, atol=TOL)
    assert all("with a mask rule" in s.reason for s in backend.reports[0].attention_sites)


@pytest.mark.long  # one compile per cache length: about a minute on the shared CPU
def test_decode_steps_over_a_kv_cache_equal_the_reference():
    """Prefill and single-token steps over a DynamicCache: the pass treats the cached sites as
    causal with the queries last; greedy tokens and logits equal the pattern applied to the whole
    sequence without a cache."""
    from transformers import DynamicCache

    zm = ZOO["hf_llama_sdpa"]()
    spec = {"pattern": "sink_window", "sinks": 1, "window": 3}
    be = tokred.backend(inner="aot_eager", sparse_attention=spec)
    model = torch.compile(zm.model, backend=be, dynamic=False)  # one graph per cache length
    ids, cache, steps = zm.kwargs["input_ids"][:, :5], DynamicCache(), 4
    with torch.no_grad():
        logits = model(input_ids=ids, **cache_argument(zm.model, cache), use_cache=True).logits[:, -1]
        seq = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        for _ in range(steps):
            logits = model(input_ids=seq[:, -1:], **cache_argument(zm.model, cache), use_cache=True).logits[:, -1]
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
        with reference_attention(zm.model, spec):
            expected = zm.model(input_ids=seq[:, :-1], use_cache=False).logits[:, -1]
            for i in range(5, seq.shape[1]):
                step = zm.model(input_ids=seq[:, :i], use_cache=False).logits[:, -1]
                assert torch.equal(step.argmax(-1), seq[:, i])
    decode = [r for r in be.reports if r.attention_sites and r.attention_sites[0].q_shape[2] == 1]
    assert len(decode) == steps
    assert all(s.status == REWRITTEN for r in decode for s in r.attention_sites)
    assert (logits - expected).abs().max().item() <= TOL
