"""Streaming decode with a bounded cache (tokred.runtime.streaming) on a tiny random Llama.

The model has max_position_embeddings 32; the streams below run past it. References are written
here from the definitions: rotary embedding from the config's theta and head_dim applied to keys
captured before rotary (k_proj hooks), and a sliding-window model (the sparse attention reference)
decoded greedily without any cache.
"""

from __future__ import annotations

import pytest
import torch
from sparse_reference import reference_attention

from tokred.runtime.streaming import StreamingCache, rotate_keys, streaming_generate
from tokred.compat.transformers_api import cache_argument

HEADS, KV_HEADS, HEAD_DIM, LAYERS = 4, 2, 16, 2
MAX_POSITIONS = 32


@pytest.fixture(scope="module")
def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=100, hidden_size=HEADS * HEAD_DIM, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, intermediate_size=96,
                         max_position_embeddings=MAX_POSITIONS)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None  # always generate max_new_tokens
    return model


def prompt(length: int) -> torch.Tensor:
    return torch.randint(3, 100, (2, length), generator=torch.Generator().manual_seed(length))


def theta(model) -> float:
    return float(model.config.rope_parameters["rope_theta"])


def rope(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """Rotary embedding from its definition: channel pair (c, c + d/2) rotated by p / base^(2c/d).
    x [B, H, L, D], positions [L]."""
    d = x.shape[-1]
    inv_freq = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = positions.double()[:, None] * inv_freq[None]  # [L, d/2]
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x.double()[..., : d // 2], x.double()[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def test_window_covering_everything_equals_plain_greedy(llama):
    ids = prompt(7)
    with torch.no_grad():
        plain = llama.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
        cache = StreamingCache(2, 64, llama)
        streamed = llama.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0, **cache_argument(llama, cache))
    assert torch.equal(streamed, plain)
    assert torch.equal(streaming_generate(llama, ids, 12, sinks=2, window=64).sequences, plain)
    assert cache.cached_length() == 7 + 12 - 1  # nothing evicted


def test_memory_is_flat_past_the_context_length(llama):
    sinks, window, steps = 2, 6, 40
    ids = prompt(5)
    result = streaming_generate(llama, ids, steps, sinks=sinks, window=window)
    assert result.sequences.shape == (2, 5 + steps)
    assert 5 + steps > MAX_POSITIONS
    capacity = sinks + window - 1
    # keys + values of `capacity` entries, plus the sinks' first keys, per layer (fp32)
    full = LAYERS * ids.shape[0] * KV_HEADS * HEAD_DIM * 4 * (2 * capacity + sinks)
    assert result.cached_length == [5] + [min(5 + i, capacity) for i in range(1, steps)]
    assert max(result.cache_bytes) == full
    assert result.cache_bytes[-(steps - 3):] == [full] * (steps - 3)
    assert result.cache.get_seq_length() == 5 + steps - 1  # tokens seen, the next position


def test_model_generate_runs_past_the_context_length(llama):
    ids = prompt(5)
    cache = StreamingCache(2, 6, llama)
    with torch.no_grad():
        out = llama.generate(ids, max_new_tokens=40, do_sample=False, pad_token_id=0, **cache_argument(llama, cache))
    assert torch.equal(out, streaming_generate(llama, ids, 40, sinks=2, window=6).sequences)
    assert cache.cached_length() == 2 + 6 - 1


def test_cached_keys_equal_keys_recomputed_at_their_new_positions(llama):
    """After eviction the cache holds the sinks and the last window - 1 tokens at consecutive
    positions ending right before the next token; recompute them from pre-rotary keys."""
    sinks, window, steps, n0 = 3, 5, 14, 6
    captured = {i: ([], []) for i in range(LAYERS)}

    def hook(layer: int, which: int):
        def record(module, args, output):  # [B, n, Hkv * D] -> [B, Hkv, n, D]
            b, n, _ = output.shape
            captured[layer][which].append(output.view(b, n, KV_HEADS, HEAD_DIM).transpose(1, 2))
        return record

    handles = []
    for i, layer in enumerate(llama.model.layers):
        handles.append(layer.self_attn.k_proj.register_forward_hook(hook(i, 0)))
        handles.append(layer.self_attn.v_proj.register_forward_hook(hook(i, 1)))
    try:
        result = streaming_generate(llama, prompt(n0), steps, sinks=sinks, window=window)
    finally:
        for h in handles:
            h.remove()
    seen = n0 + steps - 1
    kept = list(range(sinks)) + list(range(seen - (window - 1), seen))
    positions = torch.arange(seen - len(kept), seen)
    for i, layer in enumerate(result.cache.layers):
        keys = torch.cat(captured[i][0], dim=2)[:, :, kept]
        values = torch.cat(captured[i][1], dim=2)[:, :, kept]
        assert torch.allclose(layer.keys, rope(keys, positions, theta(llama)), atol=1e-5)
        assert torch.equal(layer.values, values)


def test_sinkless_stream_equals_a_sliding_window_model_without_cache(llama):
    """sinks=0: every step attends to the last `window` tokens at their relative distances, which
    is the sliding-window model run on the whole sequence (prompt within the window)."""
    window, steps = 6, 16
    ids = prompt(5)
    streamed = streaming_generate(llama, ids, steps, sinks=0, window=window).sequences
    seq = ids
    with torch.no_grad(), reference_attention(llama, {"pattern": "sink_window", "sinks": 0, "window": window}):
        for _ in range(steps):
            logits = llama(input_ids=seq, use_cache=False).logits
            seq = torch.cat([seq, logits[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
    assert torch.equal(streamed, seq)


def test_rotate_keys_composes_and_keeps_partial_channels():
    torch.manual_seed(0)
    keys = torch.randn(1, 2, 5, 8)
    inv_freq = 1.0 / 100.0 ** (torch.arange(0, 4, 2, dtype=torch.float32) / 4)  # rotary on 4 of 8 channels
    moved = rotate_keys(rotate_keys(keys, 3, inv_freq), 4, inv_freq)
    assert torch.allclose(moved, rotate_keys(keys, 7, inv_freq), atol=1e-5)
    assert torch.equal(moved[..., 4:], keys[..., 4:])
    assert torch.allclose(rotate_keys(moved, -7, inv_freq), keys, atol=1e-5)


def test_bad_arguments(llama):
    with pytest.raises(ValueError, match="'window'"):
        StreamingCache(2, 0, llama)
    with pytest.raises(ValueError, match="'sinks'"):
        StreamingCache(-1, 4, llama)
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=1, n_head=2, n_positions=16))
    with pytest.raises(ValueError, match="rotary"):
        StreamingCache(2, 4, gpt2)
    cache = StreamingCache(1, 3, llama)
    with pytest.raises(NotImplementedError, match="cropped"):
        cache.crop(-1)
