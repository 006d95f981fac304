"""Taking one measurement: wall time per call under trio or asyncio, peak memory."""

from __future__ import annotations

import asyncio
import gc
import time
import tracemalloc
from collections.abc import Awaitable, Callable

import trio

__all__ = ["Batch", "asyncio_times", "ms", "over", "peak_bytes", "timed", "trio_times"]

#: Something to time: each call runs one batch (see ``benchmarks.workloads``).
Batch = Callable[[], Awaitable[object]]


async def timed(batch: Batch, reps: int, warmup: int) -> list[float]:
    """Seconds per call of ``batch``, after ``warmup`` untimed calls.

    Loop-agnostic (it only awaits what it is given), so trio and asyncio are timed by the
    very same code.
    """
    times = []
    for i in range(warmup + reps):
        t0 = time.perf_counter()
        await batch()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def trio_times(batch: Batch, reps: int, warmup: int) -> list[float]:
    """:func:`timed` in a fresh ``trio.run``."""
    return trio.run(timed, batch, reps, warmup)


def asyncio_times(batch: Batch, reps: int, warmup: int) -> list[float]:
    """:func:`timed` in a fresh ``asyncio.run``."""
    return asyncio.run(timed(batch, reps, warmup))


def peak_bytes(run: Callable[[], object]) -> int:
    """The peak of Python allocations (tracemalloc) while ``run()`` runs, after a full GC."""
    gc.collect()
    tracemalloc.start()
    try:
        run()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak


def ms(seconds: list[float]) -> list[float]:
    return [t * 1e3 for t in seconds]


def over(values: list[float], unit: float) -> list[float]:
    """``values`` in multiples of ``unit`` (elapsed / ideal, seconds / agents)."""
    return [v / unit for v in values]
