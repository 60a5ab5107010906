"""tokred's one compatibility boundary: every private or version-sensitive API of torch, Triton
and transformers that tokred uses is reached through this package, with a version check and a
clear error where a version is unsupported.

- :mod:`tokred.compat.torch_api`: Dynamo (sources, capture, backend registry, decorators), fake
  tensors, inductor and aot_eager, private op targets.
- :mod:`tokred.compat.triton_api`: the reduction combine functions kernels pass to ``tl.reduce``.
- :mod:`tokred.compat.transformers_api`: the cache keyword (``past_key_values`` / ``cache``), the
  cache's per-layer tensors, and temporary forward replacement.

The supported ranges are stated here and in pyproject.toml/README; tests/test_compat.py checks them.
"""

from tokred.compat.torch_api import TORCH_MIN, check_torch_version

__all__ = ["TORCH_MIN", "check_torch_version"]
