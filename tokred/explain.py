"""``tokred.explain``: run a model once through tokred and return the report, without compiling."""

from __future__ import annotations

from typing import Any

import torch

from tokred.backend import TokredBackend
from tokred.compat.torch_api import capture
from tokred.rewriter.options import parse_options
from tokred.rewriter.report import Report


def explain(model: torch.nn.Module, *example_inputs: Any, example_kwargs: dict | None = None,
            **options: Any) -> Report:
    """Capture ``model(*example_inputs, **example_kwargs)``, apply ``options``, return the report.

    The rewritten graphs run eagerly (``inner="eager"`` unless given), so this is cheap. Nothing
    else in the process is touched: models compiled before keep their compiled code.
    """
    options.setdefault("inner", "eager")
    be = TokredBackend(parse_options(options))
    with torch.no_grad():
        capture(model, example_inputs, example_kwargs, backend=be, dynamic=False)
    report = be.report
    if not be.reports:
        report.note("no graph was captured (the model ran entirely in Python)")
    return report
