"""The token-count utility (rewriter/surgery.py) on real architectures.

A test-only rewrite keeps a fixed subset of the tokens after block 0; the others exit early and are
restored after the last block. It must equal a reference written with module hooks: cut the block's
output, gather every tensor a later block reads whose dims run over the N tokens (masks, rotary
tables, position ids), and scatter the result back into the stream as it was at the cut.
"""

from __future__ import annotations

import pytest
import torch

from tokred.backend import inner_compile
from tokred.rewriter import analysis, tokens
from tokred.rewriter.surgery import RewriteError, reduce_tokens
from zoo import ZOO, flatten_outputs, max_abs_diff, zoo_names, zoo_params


def kept_positions(n: int, prefix: int) -> tuple:
    """Prefix tokens plus every other token, and the last one: a fixed subset of N tokens."""
    rest = list(range(prefix, n, 2))
    if n - 1 not in rest:
        rest.append(n - 1)
    return tuple(range(prefix)) + tuple(rest)


class KeepSubsetBackend:
    """Dynamo backend: keep ``keep`` (token positions) after block ``after``; inner aot_eager."""

    def __init__(self, keep: tuple, after: int = 0):
        self.keep, self.after, self.cuts = keep, after, []

    def __call__(self, gm, example_inputs):
        facts = analysis.analyze(gm)
        if len(facts.blocks) > self.after + 1:
            make_index = lambda graph, stream: graph.call_function(tokens.fixed_token_index, (stream, self.keep))
            cut = reduce_tokens(gm, facts, facts.blocks[self.after], make_index, len(self.keep),
                                example_inputs=example_inputs)
            self.cuts.append(cut)
        return inner_compile(gm, example_inputs, "aot_eager")


def _gather_token_dims(value, keep: list, n: int):
    """Every tensor inside ``value`` (nested tuples/dicts) gathered on each dim >= 1 of size n."""
    if isinstance(value, torch.Tensor):
        index = torch.tensor(keep)
        for d in range(1, value.dim()):
            if value.shape[d] == n:
                value = value.index_select(d, index)
        return value
    if isinstance(value, (tuple, list)):
        return type(value)(_gather_token_dims(v, keep, n) for v in value)
    if isinstance(value, dict):
        return {k: _gather_token_dims(v, keep, n) for k, v in value.items()}
    return value


def reference_keep_subset(model, blocks: list, keep: tuple, n: int, run):
    """Hooks: cut after blocks[0], gather side inputs of blocks[1:], restore after blocks[-1]."""
    keep = list(keep)
    saved = {}

    def stream_of(out):
        return out[0] if isinstance(out, tuple) else out

    def with_stream(out, x):
        return (x, *out[1:]) if isinstance(out, tuple) else x

    def cut(mod, args, out):
        saved["stream"] = stream_of(out)
        return with_stream(out, stream_of(out)[:, keep])

    def gather_inputs(mod, args, kwargs):
        return _gather_token_dims(args, keep, n), _gather_token_dims(kwargs, keep, n)

    def restore(mod, args, out):
        full = saved["stream"].clone()
        full[:, keep] = stream_of(out)
        return with_stream(out, full)

    handles = [blocks[0].register_forward_hook(cut)]
    handles += [b.register_forward_pre_hook(gather_inputs, with_kwargs=True) for b in blocks[1:]]
    handles.append(blocks[-1].register_forward_hook(restore))
    try:
        return run()
    finally:
        for h in handles:
            h.remove()


KV_CACHE_MODELS = ["hf_llama_cache_sdpa"]


@pytest.mark.parametrize("name", zoo_params([n for n in zoo_names(attention=True) if n not in KV_CACHE_MODELS]))
def test_keep_subset_equals_reference(name, fresh_dynamo):
    zm = ZOO[name]()
    n = zm.token_count
    keep = kept_positions(n, zm.prefix_tokens)
    blocks = list(zm.model.get_submodule(zm.block_prefix))
    reference = reference_keep_subset(zm.model, blocks, keep, n, zm)
    be = KeepSubsetBackend(keep)
    with torch.no_grad():
        out = torch.compile(zm.model, backend=be)(*zm.args, **zm.kwargs)
    assert len(be.cuts) == 1, f"expected one rewritten graph, got {len(be.cuts)}"
    cut = be.cuts[0]
    assert cut.restored is not None and len(cut.region) > 0
    assert max_abs_diff(out, reference) <= 1e-5
    # the rewrite really changed the model: the reference differs from the dense output
    scale = max(t.abs().max().item() for t in flatten_outputs(reference) if t.is_floating_point())
    assert max_abs_diff(reference, zm()) > 1e-3 * scale


@pytest.mark.parametrize("name", zoo_params(names=["timm_vit_tiny_sdpa", "hf_bert_eager", "hf_llama_sdpa"]))
def test_keep_all_is_identity(name, fresh_dynamo):
    """Keeping every token (in order) reproduces the original outputs (invariant 2)."""
    zm = ZOO[name]()
    be = KeepSubsetBackend(tuple(range(zm.token_count)))
    with torch.no_grad():
        out = torch.compile(zm.model, backend=be)(*zm.args, **zm.kwargs)
    assert len(be.cuts) == 1
    assert max_abs_diff(out, zm()) <= 1e-5


@pytest.mark.parametrize("name", zoo_params(KV_CACHE_MODELS))
def test_kv_cache_output_is_refused(name, fresh_dynamo):
    """A decoder returning its KV cache: the later layers' keys carry the token axis to the output.
    Unless asked (``kv_outputs``, as the prune pass does for KV-consistent generation) the utility
    refuses, names the node, and leaves the graph as it was, so the compiled model still equals eager."""
    zm = ZOO[name]()
    errors = []

    def be(gm, example_inputs):
        facts = analysis.analyze(gm)
        before = str(gm.graph)
        make_index = lambda graph, stream: graph.call_function(tokens.fixed_token_index, (stream, (0, 1)))
        with pytest.raises(RewriteError, match="is a KV-cache output with the token axis") as info:
            reduce_tokens(gm, facts, facts.blocks[0], make_index, 2, example_inputs=example_inputs)
        errors.append(str(info.value))
        assert str(gm.graph) == before
        return gm.forward

    with torch.no_grad():
        out = torch.compile(zm.model, backend=be)(*zm.args, **zm.kwargs)
    assert errors
    assert max_abs_diff(out, zm()) <= 1e-5


def test_side_inputs_and_literals_are_reported(fresh_dynamo):
    """BERT: the attention mask is gathered; timm ViT: the reshape literals are rewritten."""
    for name, expect_side, expect_literals in (("hf_bert_eager", True, True), ("timm_vit_tiny_sdpa", False, True)):
        torch._dynamo.reset()
        zm = ZOO[name]()
        be = KeepSubsetBackend(kept_positions(zm.token_count, zm.prefix_tokens))
        with torch.no_grad():
            torch.compile(zm.model, backend=be)(*zm.args, **zm.kwargs)
        cut = be.cuts[0]
        assert bool(cut.side_inputs) == expect_side, cut.side_inputs
        assert (cut.literals > 0) == expect_literals


def test_escaping_token_tensor_is_refused(fresh_dynamo):
    """A per-layer tensor with the token axis returned as an output cannot be restored: the graph is
    left unchanged and the error names the node."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList(Block() for _ in range(2))

        def forward(self, x):
            maps = []
            for b in self.blocks:
                x, attn = b(x)
                maps.append(attn)
            return x, maps

    class Block(torch.nn.Module):
        def __init__(self, c=16):
            super().__init__()
            self.qkv, self.proj = torch.nn.Linear(c, 3 * c), torch.nn.Linear(c, c)
            self.fc1, self.fc2 = torch.nn.Linear(c, 2 * c), torch.nn.Linear(2 * c, c)

        def forward(self, x):
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            attn = (q @ k.transpose(-2, -1) * 0.25).softmax(dim=-1)
            x = x + self.proj(attn @ v)
            return x + self.fc2(torch.relu(self.fc1(x))), attn

    net = Net().eval()
    x = torch.randn(2, 9, 16)
    seen = {}

    def be(gm, example_inputs):
        facts = analysis.analyze(gm)
        before = str(gm.graph)
        make_index = lambda graph, stream: graph.call_function(tokens.fixed_token_index, (stream, (0, 2, 4)))
        with pytest.raises(RewriteError, match="carries the token axis"):
            reduce_tokens(gm, facts, facts.blocks[0], make_index, 3, example_inputs=example_inputs)
        seen["unchanged"] = str(gm.graph) == before
        return gm.forward

    with torch.no_grad():
        torch.compile(net, backend=be)(x)
    assert seen["unchanged"]
