"""Where a run's results go: results.md and results.json, and the README's table."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import attrs
import trio

from benchmarks.results import Results, Settings, table

__all__ = ["README_END", "README_START", "machine_info", "markdown", "update_readme", "write"]

README_START, README_END = "<!-- bench:start -->", "<!-- bench:end -->"


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


def update_readme(readme: Path, md: str) -> bool:
    """Replace what stands between the bench markers with ``md``; False (and the file
    untouched) if either marker is missing."""
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        return False
    head, rest = text.split(README_START, 1)
    tail = rest.split(README_END, 1)[1]
    readme.write_text(f"{head}{README_START}\n{md}{README_END}{tail}")
    return True
