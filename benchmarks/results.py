"""What a benchmark run produces: rows of samples, collected in run order."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence

import attrs

__all__ = ["Results", "Row", "Settings", "table"]


@attrs.frozen
class Settings:
    """How hard a run tries: ``quick`` (< 1 minute) or full."""

    quick: bool

    @property
    def reps(self) -> int:
        return 5 if self.quick else 15

    @property
    def warmup(self) -> int:
        return 1 if self.quick else 3

    @property
    def mode(self) -> str:
        return "quick" if self.quick else "full"


def _floats(samples: Iterable[float]) -> tuple[float, ...]:
    return tuple(float(x) for x in samples)


@attrs.frozen
class Row:
    """One metric of one variant of a scenario: its samples and how to read them.

    ``median``, ``low`` and ``high`` are NaN for no samples.
    """

    scenario: str
    variant: str
    metric: str
    unit: str
    samples: tuple[float, ...] = attrs.field(converter=_floats)
    target: str = ""
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else math.nan

    @property
    def low(self) -> float:
        return min(self.samples, default=math.nan)

    @property
    def high(self) -> float:
        return max(self.samples, default=math.nan)

    def as_dict(self) -> dict[str, object]:
        return {**attrs.asdict(self), "median": self.median, "min": self.low, "max": self.high}


@attrs.define
class Results:
    """The rows of a run in the order scenarios add them, and whatever raw data a
    scenario wants kept beside them in results.json (``extra``)."""

    rows: list[Row] = attrs.Factory(list)
    extra: dict[str, object] = attrs.Factory(dict)

    def add(self, row: Row) -> None:
        self.rows.append(row)


def fmt(x: float) -> str:
    """Three significant-ish digits; ``-`` for NaN."""
    if math.isnan(x):
        return "-"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.3f}" if abs(x) < 1 else f"{x:.2f}"


HEADER = (
    "| scenario | variant | metric | median | spread (min-max) | target | note |\n"
    "|---|---|---|---:|---|---|---|"
)


def table(rows: Sequence[Row], *, header: bool = True) -> str:
    """The rows as a Markdown table (the README's format)."""
    lines = [HEADER] if header else []
    for r in rows:
        spread = f"{fmt(r.low)} - {fmt(r.high)}" if len(r.samples) > 1 else ""
        lines.append(
            f"| {r.scenario} | {r.variant} | {r.metric} | {fmt(r.median)} {r.unit} | {spread} "
            f"| {r.target} | {r.note} |"
        )
    return "\n".join(lines)
