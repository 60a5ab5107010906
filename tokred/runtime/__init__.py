"""tokred's runtime: what runs a model after (or without) compilation, above the graph passes.

- :mod:`tokred.runtime.generate`: :func:`tokred.generate`, speculative decoding (prompt lookup, the
  early-exit draft, a draft model), greedy and sampling, batched.
- :mod:`tokred.runtime.speculative`: the machinery under it: the batched KV-cache decoder with
  per-sequence lengths, draft length control, the acceptance rules.
- :mod:`tokred.runtime.drafters`: the ``Drafter`` interface and the early-exit draft sliced from the
  captured graph.
- :mod:`tokred.runtime.compressed_context`: :class:`tokred.CompressedContext`, a context prefilled
  once through a kv_cache-compiled forward, whose compressed cache answers many questions.
- :mod:`tokred.runtime.streaming`: :class:`tokred.StreamingCache`, a bounded KV cache (sinks +
  window) for generation past the context length.

Layer rule (ARCHITECTURE.md): runtime imports compat, triton_ops, rewriter and passes, never the
entry points (tokred.backend, explain, export) or tokred.tools.
"""
