"""CPU thread control of sparse attention's torch paths: small ops on one thread, SDPA on all.

On a loaded machine each multi-threaded op waits for every OpenMP thread to be scheduled
(measured: a mask op of ~1 ms took 20-40 ms with 2 threads, 1 ms with 1). The layout and mask
ops run under ``single_thread``; the SDPA calls inside such a block under ``all_threads``. Both
restore the thread count they found (tests/test_compat.py checks it).
"""

from __future__ import annotations

import contextlib

import torch

# Thread counts saved by the active ``single_thread`` blocks (outermost first).
_SAVED_THREADS: list[int] = []


@contextlib.contextmanager
def single_thread():
    """Run the enclosed small elementwise/indexing ops on one CPU thread.

    On a loaded machine each multi-threaded op waits for every OpenMP thread to be scheduled
    (measured: a mask op of ~1 ms took 20-40 ms with 2 threads, 1 ms with 1); the SDPA calls run
    under ``all_threads`` instead.
    """
    _SAVED_THREADS.append(torch.get_num_threads())
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(_SAVED_THREADS.pop())


@contextlib.contextmanager
def all_threads():
    """Run the enclosed op with the thread count in force before any ``single_thread`` block."""
    threads = torch.get_num_threads()
    torch.set_num_threads(_SAVED_THREADS[0] if _SAVED_THREADS else threads)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
