"""Streaming decode with a bounded KV cache (attention sinks + a recent window, StreamingLLM).

    cache = StreamingCache(sinks=4, window=1020, model=model)
    out = model.generate(input_ids, cache=cache, max_new_tokens=10_000, do_sample=False)
    # (transformers < 5.24 names the keyword past_key_values; cache_argument(model, cache) picks it)
    # or, with a progress bar and the cache size per step:
    result = streaming_generate(model, input_ids, max_new_tokens=10_000, sinks=4, window=1020)

Each layer keeps the first ``sinks`` tokens and the last ``window - 1`` tokens: the new token's
query then sees the sinks and a window of ``window`` tokens including itself (the ``sink_window``
pattern of the sparse attention pass), and the cache holds ``sinks + window - 1`` entries per
layer whatever the length, so generation runs past the model's context length with flat memory.

Positions (rotary models). StreamingLLM gives the cached tokens their positions *within the cache*,
so that no distance between a query and a key exceeds the cache size. With rotary embeddings only
distances matter, and this cache keeps the stored tokens at consecutive positions ending right
before the incoming token, whose position is the one the model already gives it (the number of
tokens seen, as ``model.generate`` and a plain forward compute it). The recent tokens are at those
positions anyway; when tokens are evicted, the sink tokens are re-rotated forward by the number
evicted so far, so that they sit right before the window. Query-key distances are therefore
exactly StreamingLLM's (at most ``sinks + window - 1``) without feeding positions explicitly, and
``model.generate`` works unchanged. The sinks are re-rotated from their first (prefill) keys each
time, so rounding does not accumulate over a long stream.

Supported: transformers decoders with ``rotate_half`` rotary embeddings whose frequencies do not
depend on the position (rope types default, linear, llama3, yarn, longrope at a fixed length; not
"dynamic"), partial rotary (the first 2 * len(inv_freq) channels), per-layer-type rotary
(Gemma3); beam search (the sinks' first keys are reordered with the rest). Not supported: padded
batches (every row must have the same length; the padding mask columns of the sinks would not line
up), ``crop`` (assisted/speculative decoding rollback, so not ``tokred.generate``'s drafts), and
models with learned absolute positions (GPT-2: positions cannot be moved). A model compiled by
tokred recompiles at every step while the cache grows (its lengths and ``start`` are Python ints).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from tqdm.auto import tqdm
from transformers.cache_utils import Cache, CacheLayerMixin

from tokred.compat.transformers_api import cache_argument

# ----------------------------------------------------------------------------- rotary

def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[.., D] -> cat(-x[.., D/2:], x[.., :D/2]) (the rotary convention of Llama and most decoders)."""
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def rotate_keys(keys: torch.Tensor, shift, inv_freq: torch.Tensor) -> torch.Tensor:
    """Move rotary-embedded keys [B, H, L, D] by ``shift`` positions (an int, or [L] per key).

    Rotary embedding rotates channel pair (c, c + d/2) by angle ``position * inv_freq[c]``;
    rotations compose, so rotating by ``shift * inv_freq`` moves a key from position p to p + shift
    (any attention scaling the rope type applies is already in the key and is kept). Channels past
    ``2 * len(inv_freq)`` (partial rotary) are left as they are. Computed in fp32.
    """
    rot = 2 * inv_freq.shape[0]
    shift = torch.as_tensor(shift, dtype=torch.float32, device=keys.device)
    angles = shift.reshape(-1, 1) * inv_freq.to(device=keys.device, dtype=torch.float32)  # [L | 1, d/2]
    emb = torch.cat([angles, angles], dim=-1)
    x = keys[..., :rot].float()
    moved = (x * emb.cos() + rotate_half(x) * emb.sin()).to(keys.dtype)
    return moved if rot == keys.shape[-1] else torch.cat([moved, keys[..., rot:]], dim=-1)


def rotary_frequencies(model: torch.nn.Module) -> list:
    """The rotary ``inv_freq`` [d/2] of each decoder layer of a transformers model.

    One rotary module with ``inv_freq`` (Llama, Qwen2, Mistral, ...), or one with
    ``<layer type>_inv_freq`` buffers and ``config.layer_types`` (Gemma3).
    """
    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    layers = config.num_hidden_layers
    for module in model.modules():
        buffers = dict(module.named_buffers(recurse=False))
        if any(name.endswith("inv_freq") for name in buffers) and getattr(module, "rope_type", None) == "dynamic":
            raise ValueError("StreamingCache: 'dynamic' rope scaling changes the frequencies with the length; "
                             "keys rotated with them cannot be moved")
        if "inv_freq" in buffers:
            return [buffers["inv_freq"]] * layers
        types = getattr(config, "layer_types", None)
        if types and all(f"{t}_inv_freq" in buffers for t in set(types)):
            return [buffers[f"{t}_inv_freq"] for t in types]
    raise ValueError(f"StreamingCache: no rotary embedding (an inv_freq buffer) found in {type(model).__name__}; "
                     "streaming needs rotary positions (learned absolute positions cannot be moved)")


# ----------------------------------------------------------------------------- the cache

class StreamingLayer(CacheLayerMixin):
    """One layer: ``keys``/``values`` [B, Hkv, L, D] with L <= sinks + window - 1 after each update.

    ``start`` is the position of entry 0; entries sit at positions start, start + 1, ...; the
    incoming tokens are at start + L onwards (the model's own positions). ``seen`` counts every
    token this layer was given.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, sinks: int, window: int, inv_freq: torch.Tensor):
        super().__init__()
        self.sinks, self.window, self.inv_freq = sinks, window, inv_freq
        self.capacity = sinks + window - 1
        self.start = 0
        self.seen = 0
        self.sink_keys: Optional[torch.Tensor] = None  # the sinks' keys at positions 0..sinks-1

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states[:, :, :0]
        self.values = value_states[:, :, :0]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append the new keys/values [B, Hkv, n, D]; return every entry for this step's attention
        (the kept ones and the new ones), then evict down to the capacity."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        self.seen += key_states.shape[-2]
        if self.sink_keys is None or self.sink_keys.shape[-2] < self.sinks:
            # still at their first positions (start == 0); a copy, not a view that keeps the prompt alive
            self.sink_keys = keys[:, :, : self.sinks].clone()
        self.keys, self.values = self._evict(keys, values)
        return keys, values

    def _evict(self, keys: torch.Tensor, values: torch.Tensor):
        """Keep the sinks and the last window - 1 entries; move the sinks right before them."""
        evicted = keys.shape[-2] - self.capacity
        if evicted <= 0:
            return keys, values
        s = self.sinks
        self.start += evicted
        sinks = rotate_keys(self.sink_keys, self.start, self.inv_freq) if s else keys[:, :, :0]
        recent = slice(keys.shape[-2] - (self.window - 1), None)
        return (torch.cat([sinks, keys[:, :, recent]], dim=-2),
                torch.cat([values[:, :, :s], values[:, :, recent]], dim=-2))

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        """(kv_length, kv_offset): the kept entries and the new ones, entry 0 at position ``start``.
        ``query_length``: the new tokens' count, or (transformers < 5.x's layer API) their
        cache_position tensor [n]."""
        if isinstance(query_length, torch.Tensor):
            query_length = query_length.shape[0]
        return self.get_cached_length() + query_length, self.start

    def get_cached_length(self) -> int:
        return 0 if not self.is_initialized else self.keys.shape[-2]

    def get_seq_length(self) -> int:
        """Tokens seen: the position of the next token (what the model's default positions use)."""
        return self.seen

    def get_max_length(self) -> int:
        return self.capacity

    get_max_cache_shape = get_max_length  # the same, under the older layer API's name

    def reset(self) -> None:
        self.keys = self.values = self.sink_keys = None
        self.is_initialized = False
        self.start = self.seen = 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("StreamingCache cannot be cropped: evicted tokens are gone "
                                  "(assisted/speculative decoding needs a full cache)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.sink_keys is not None:
            self.sink_keys = self.sink_keys.index_select(0, beam_idx.to(self.sink_keys.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.keys = self.keys.repeat_interleave(repeats, dim=0)
            self.values = self.values.repeat_interleave(repeats, dim=0)
            if self.sink_keys is not None:
                self.sink_keys = self.sink_keys.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.keys, self.values = self.keys[indices], self.values[indices]
            if self.sink_keys is not None:
                self.sink_keys = self.sink_keys[indices]


class StreamingCache(Cache):
    """A transformers KV cache that keeps ``sinks`` first tokens and a recent ``window`` per layer.

    sinks:   attention-sink tokens kept from the start of the sequence (StreamingLLM uses 4).
    window:  the new token's query sees the last ``window`` tokens, itself included, plus the sinks;
             the cache holds ``sinks + window - 1`` entries per layer between steps.
    model:   the transformers causal LM it serves (for its rotary frequencies and layer count).
    """

    def __init__(self, sinks: int, window: int, model: torch.nn.Module):
        for name, value, low in (("sinks", sinks, 0), ("window", window, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"StreamingCache '{name}' must be an int >= {low}, got {value!r}")
        self.sinks, self.window = sinks, window
        super().__init__(layers=[StreamingLayer(sinks, window, f) for f in rotary_frequencies(model)])

    def cache_bytes(self) -> int:
        """Bytes held by the cached keys, values and the sinks' first keys, over all layers."""
        total = 0
        for layer in self.layers:
            for t in (layer.keys, layer.values, layer.sink_keys):
                if t is not None:
                    total += t.numel() * t.element_size()
        return total

    def cached_length(self, layer_idx: int = 0) -> int:
        """Entries held by a layer (<= sinks + window - 1), unlike get_seq_length (tokens seen)."""
        return self.layers[layer_idx].get_cached_length()


# ----------------------------------------------------------------------------- greedy loop

@dataclass
class StreamingResult:
    """sequences [B, T + new]; cache_bytes[i] and cached_length[i]: the cache after step i
    (step 0 is the prompt); ``cache`` the cache as the last step left it."""

    sequences: torch.Tensor
    cache: Optional[StreamingCache] = None
    cache_bytes: list = field(default_factory=list)
    cached_length: list = field(default_factory=list)


def streaming_generate(model: torch.nn.Module, input_ids: torch.Tensor, max_new_tokens: int, sinks: int = 4,
                       window: int = 1020, progress: Optional[bool] = None) -> StreamingResult:
    """Greedy decoding of ``max_new_tokens`` tokens with a :class:`StreamingCache`.

    input_ids [B, T] (no padding: every row the same length). Positions are the model's own (see
    the module doc). Shows a tqdm bar with the cache size (None: when stderr is a terminal) and
    returns the cache size after every step.
    """
    import sys

    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"streaming_generate: input_ids must be [B, T] with T >= 1, got {tuple(input_ids.shape)}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"streaming_generate: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    cache = StreamingCache(sinks, window, model)
    result = StreamingResult(sequences=input_ids, cache=cache)
    show = sys.stderr.isatty() if progress is None else progress
    tokens = input_ids
    with torch.no_grad(), tqdm(total=max_new_tokens, disable=not show, unit="tok", leave=False) as bar:
        for _ in range(max_new_tokens):
            logits = model(input_ids=tokens, **cache_argument(model, cache), use_cache=True).logits
            result.cache_bytes.append(cache.cache_bytes())
            result.cached_length.append(cache.cached_length())
            tokens = logits[:, -1].argmax(dim=-1, keepdim=True)
            result.sequences = torch.cat([result.sequences, tokens], dim=1)
            bar.set_postfix(cache=f"{result.cache_bytes[-1] / 2**20:.2f} MiB", refresh=False)
            bar.update(1)
    return result
