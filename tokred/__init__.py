"""tokred: graph-level token reduction for transformer inference, as a torch.compile backend."""

from tokred.backend import backend, rewrite
from tokred.compat.transformers_api import cache_argument
from tokred.explain import explain
from tokred.generate import generate
from tokred.rewriter.options import Options, parse_options
from tokred.rewriter.report import Report, SiteRecord

__all__ = ["backend", "rewrite", "cache_argument", "explain", "generate", "export_onnx", "Options", "parse_options", "Report", "SiteRecord"]


def __getattr__(name):
    # export pulls in onnx/onnxscript, an optional extra: import it only when asked for.
    if name == "export_onnx":
        from tokred.export import export_onnx

        return export_onnx
    raise AttributeError(name)
