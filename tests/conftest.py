"""pytest setup shared by every test under tests/.

- No model hub: HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE are set before anything imports transformers.
  Models are built from configs with random weights (see ``zoo.py``).
- ``tests/`` is on ``sys.path``, so test modules import helpers by their bare name:
  ``from zoo import ZOO, zoo_params`` (not ``tests.zoo``). The repo root is on it too, so a source
  checkout imports ``tokred`` without being installed.
- ``--long``: tests marked ``@pytest.mark.long`` (fuzzing, big sweeps) are skipped unless given.
- ``fresh_dynamo``: a fixture that resets torch._dynamo before and after a test, so that compiled
  code, caches and recompile limits do not leak between tests.
"""

from __future__ import annotations

import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)
# tests/ for the helpers; the repo root so that a source checkout imports tokred without installing.
for path in (REPO_ROOT, TESTS_DIR):
    if path not in sys.path:
        sys.path.insert(0, path)

import pytest
import torch

# The machine has 2 cores; under pytest-xdist each worker gets one so workers do not fight.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--long", action="store_true", default=False,
                     help="also run tests marked 'long' (fuzzing, sweeps over the whole zoo)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "long: slow test, skipped unless pytest is given --long")


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    if config.getoption("--long"):
        return
    skip_long = pytest.mark.skip(reason="long test: run with --long")
    for item in items:
        if item.get_closest_marker("long") is not None:
            item.add_marker(skip_long)


@pytest.fixture
def fresh_dynamo():
    """Reset torch._dynamo around the test (compiled frames, guards, recompile counters)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def torch_sparse_paths():
    """Sparse attention on CPU without tokred's C++ kernel (sparse_cpu.cpp): the op's torch paths
    (band, past blocks, gathered blocks), as on a machine where the kernel cannot be built."""
    from tokred.triton_ops import sparse_cpu

    with sparse_cpu.disabled():
        yield
