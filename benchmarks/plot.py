"""The README's plot: batch elapsed against the number of agents, kernel vs reference."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from benchmarks.results import Results, Settings
from benchmarks.timing import asyncio_times, trio_times
from benchmarks.workloads import KernelBatch, ReferenceBatch

__all__ = ["plot"]


def plot(s: Settings, results: Results, out: Path) -> None:
    """Capacity 72, 10 ms agents, up to 5,000 of them (2,000 when quick); writes
    ``agents_vs_elapsed.png`` to ``out`` and keeps the data in ``results.extra["plot"]``.
    Without matplotlib (the ``bench`` extra) it keeps the data and says so."""
    sizes = [10, 72, 144, 500, 1000, 2000, *([] if s.quick else [5000])]
    kernel_ms: list[float] = []
    reference_ms: list[float] = []
    for n in sizes:
        kernel = trio_times(KernelBatch(n, 10.0, overflow="queue"), 3, 1)
        reference = asyncio_times(ReferenceBatch(n, 10.0, admit=False), 3, 1)
        kernel_ms.append(statistics.median(kernel) * 1e3)
        reference_ms.append(statistics.median(reference) * 1e3)
    data = {
        "kernel": kernel_ms,
        "reference": reference_ms,
        "ideal": [math.ceil(n / 72) * 10.0 for n in sizes],
    }
    results.extra["plot"] = {"sizes": sizes, **data}
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot; pip install -e '.[bench]')")
        return
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(sizes, data["ideal"], "k:", label="ideal: ceil(n/72) x 10 ms")
    ax.plot(sizes, data["kernel"], "o-", label="conclave-kernel (trio, overflow=queue)")
    ax.plot(sizes, data["reference"], "s--", label="reference (asyncio.gather + Semaphore)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("agents in the batch (capacity 72, 10 ms each)")
    ax.set_ylabel("batch elapsed (ms)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "agents_vs_elapsed.png", dpi=110)
    plt.close(fig)
