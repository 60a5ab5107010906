"""Deprecated alias of :mod:`tokred.runtime.streaming`, where the module moved. Use
``tokred.StreamingCache`` (or ``from tokred.runtime.streaming import ...``). Kept because earlier
READMEs showed ``from tokred.streaming import StreamingCache``."""

import warnings

from tokred.runtime.streaming import (  # noqa: F401
    StreamingCache, StreamingLayer, StreamingResult, rotary_frequencies, rotate_half, rotate_keys,
    streaming_generate,
)

warnings.warn("tokred.streaming moved to tokred.runtime.streaming: use tokred.StreamingCache or "
              "tokred.runtime.streaming", DeprecationWarning, stacklevel=2)
