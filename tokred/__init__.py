"""tokred: graph-level token reduction for transformer inference, as a torch.compile backend.

Layout and import rule: ARCHITECTURE.md (compat < triton_ops < rewriter < passes < runtime <
these entry points < tools).
"""

from tokred.backend import backend, rewrite
from tokred.compat.transformers_api import cache_argument
from tokred.explain import explain
from tokred.rewriter.options import Options, parse_options
from tokred.rewriter.report import Report, SiteRecord, TokredWarning
from tokred.runtime.compressed_context import CompressedContext
from tokred.runtime.generate import generate

__all__ = ["backend", "rewrite", "cache_argument", "CompressedContext", "explain", "generate", "export_onnx", "StreamingCache", "Options",
           "parse_options", "Report", "SiteRecord", "TokredWarning"]


def __getattr__(name):
    # Optional extras, imported only when asked for: export pulls in onnx/onnxscript, the streaming
    # cache transformers.
    if name == "export_onnx":
        from tokred.export import export_onnx

        return export_onnx
    if name == "StreamingCache":
        from tokred.runtime.streaming import StreamingCache

        return StreamingCache
    raise AttributeError(name)
