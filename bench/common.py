"""What every benchmark script does at its end: write its results table and show it.

Benchmarks run as ``python bench/<name>.py`` from the repository root; each puts the root on
``sys.path`` first, so they import this module as ``bench.common``.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path


def write_results(text: str, path: str | Path) -> Path:
    """Write the markdown ``text`` to ``path`` (creating its folder), print it and where it went."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print()
    print(text)
    print(f"written to {path}")
    return path


def alternating_medians(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each function, calls alternating between them (warm-up call first)."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def load_average() -> str:
    """The 1/5/15-minute load averages as ``uptime`` prints them."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load: " + " ".join(f"{v:.2f}" for v in os.getloadavg())


def save_figure(fig, ax, path: str | Path, dpi: int = 130, legend_size=None) -> None:
    """Finish a results plot: legend, tight layout, PNG at ``path``, figure closed."""
    import matplotlib.pyplot as plt

    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
