"""Where a run's results go: results.md and results.json, and the README's table."""

from __future__ import annotations

import json
import os
import platform
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import trio

from benchmarks.results import Results, Settings, fmt, table

__all__ = [
    "README_END",
    "README_START",
    "fill_numbers",
    "machine_info",
    "markdown",
    "prose_value",
    "update_readme",
    "write",
]

README_START, README_END = "<!-- bench:start -->", "<!-- bench:end -->"

#: A number in the README's prose that a result row gives (the median), never typed by
#: hand: ``<!--bench:SCENARIO|VARIANT|METRIC-->VALUE<!--/bench-->``, rewritten by every
#: ``make bench``, checked against results.json by the tests.
_NUMBER = re.compile(r"<!--bench:([^|]+?)\|([^|]+?)\|([^|]+?)-->(.*?)<!--/bench-->")
_UNIT_SHOWN = {"x": "{}x", "%": "{}%", "us": "{} µs"}


def machine_info() -> dict[str, object]:
    """CPU, Python and library versions, and the date: what the numbers depend on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, object] = {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "trio": trio.__version__,
        "attrs": attrs.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    try:
        import openai
        import trio_asyncio

        info["openai"] = openai.__version__
        info["trio_asyncio"] = trio_asyncio.__version__
    except ImportError:
        pass
    return info


def markdown(results: Results, s: Settings, info: dict[str, object], total_s: float) -> str:
    """The machine line and the table: results.md, and the README between its markers."""
    return (
        f"Run {info['date']} on {info['cpu']} x{info['cpus']}, Python {info['python']}, "
        f"trio {info['trio']} ({s.mode}, {total_s:.0f} s).\n\n" + table(results.rows) + "\n"
    )


def write(out: Path, results: Results, s: Settings, info: dict[str, object], total_s: float) -> str:
    """Write results.md and results.json to ``out``; returns the Markdown."""
    md = markdown(results, s, info, total_s)
    (out / "results.md").write_text(md)
    document = {
        "machine": info,
        "mode": s.mode,
        "total_s": total_s,
        "rows": [row.as_dict() for row in results.rows],
        "extra": results.extra,
    }
    (out / "results.json").write_text(json.dumps(document, indent=2, default=str))
    return md


def prose_value(row: Mapping[str, Any]) -> str:
    """A row's median as the prose shows it: ``11.4 ms``, ``1.04x``, ``5.05%``."""
    unit, value = str(row["unit"]), float(row["median"])
    if not unit:  # a count: 72, not 72.0
        return str(int(value)) if value.is_integer() else fmt(value)
    return _UNIT_SHOWN.get(unit, "{} " + unit).format(fmt(value))


def fill_numbers(text: str, rows: Sequence[Mapping[str, Any]]) -> tuple[str, list[str]]:
    """``text`` with every prose number set from ``rows`` (dicts as in results.json), and
    the markers that name no row (left as they are)."""
    by_key: dict[tuple[Any, Any, Any], Mapping[str, Any]] = {}
    for row in rows:  # the first row of a key, as the table lists them
        by_key.setdefault((row["scenario"], row["variant"], row["metric"]), row)
    unknown: list[str] = []

    def value(match: re.Match[str]) -> str:
        row = by_key.get((match[1], match[2], match[3]))
        if row is None:
            unknown.append(f"{match[1]} | {match[2]} | {match[3]}")
            return match[0]
        return f"<!--bench:{match[1]}|{match[2]}|{match[3]}-->{prose_value(row)}<!--/bench-->"

    return _NUMBER.sub(value, text), unknown


def update_readme(readme: Path, md: str, rows: Sequence[Mapping[str, Any]] = ()) -> bool:
    """Replace what stands between the bench markers with ``md``, and the prose numbers
    with ``rows``' (those of rows the run has); False (and the file untouched) if either
    table marker is missing."""
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        return False
    head, rest = text.split(README_START, 1)
    tail = rest.split(README_END, 1)[1]
    text, _ = fill_numbers(f"{head}{README_START}\n{md}{README_END}{tail}", rows)
    readme.write_text(text)
    return True
