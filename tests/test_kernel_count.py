"""Kernel launches per layer do not grow: each pass's launches in inductor's generated code (CPU)
are at most the figures committed in bench/results/kernel_count.json (python bench/kernel_count.py
writes them; rerun it when a change lowers a count, and explain a rise in the commit)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECORDED = ROOT / "bench" / "results" / "kernel_count.json"


@pytest.fixture(scope="module")
def kernel_count():
    sys.path.insert(0, str(ROOT))
    from bench import kernel_count

    return kernel_count


def test_kernel_launch_counting_reads_the_wrapper():
    from tokred.compat.torch_api import kernel_launches

    code = ("class Runner:\n    def call(self, args):\n        cpp_fused_add_0(buf0, arg0_1)\n"
            "        buf1 = torch.ops.aten.cumsum.default(buf0, dim=1)\n"
            "        extern_kernels.mm(buf0, buf1, out=buf2)\n        triton_poi_fused_1.run(buf2, 4)\n"
            "        return (buf2, )\n\n    def other(self):\n        cpp_fused_add_0(x)\n")
    assert kernel_launches(code) == {"generated": 2, "extern": 2}


@pytest.mark.parametrize("case", [0, 1, 2])
def test_launches_do_not_grow(kernel_count, case, fresh_dynamo):
    recorded = {(r["model"], r["case"]): r for r in json.loads(RECORDED.read_text())}
    model_name, name, options = kernel_count.CASES[case]
    got = kernel_count.count(model_name, options)
    before = recorded[(model_name, name)]
    assert got["rewritten_layers"] == before["rewritten_layers"], (name, got)
    launches = got["generated"] + got["extern"]
    assert launches <= before["launches"], (f"{model_name} {name}: {launches} kernel launches per call, "
                                            f"{before['launches']} recorded in {RECORDED.name}")
