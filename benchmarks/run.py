"""Run the benchmarks: the kernel and its baselines, side by side, in one process.

    python -m benchmarks.run [--quick] [--out DIR] [--only NAME ...] [--no-plot]
                             [--update-readme]

Each scenario warms up, repeats, and reports the median and the spread (min-max) of the
kernel *and* of its baselines measured in the same process, minutes apart at most, so
that ratios survive a noisy shared machine.  Prints each scenario's rows as it finishes;
writes ``results.md`` and ``results.json`` (with machine info) to ``--out``, and the plot
unless ``--only`` or ``--no-plot``.

Baselines (``benchmarks.baselines``):
  reference  asyncio.gather + asyncio.Semaphore(72) + set pool + halt check at start only
  bare-trio  a trio nursery + CapacityLimiter, no kernel features (the floor for trio)
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks import report
from benchmarks.plot import plot
from benchmarks.processes import ROOT
from benchmarks.results import Results, Settings, table
from benchmarks.scenarios import SCENARIOS


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    s = Settings(quick=args.quick)
    results = Results()
    args.out.mkdir(parents=True, exist_ok=True)
    info = report.machine_info()
    print(f"# conclave-kernel benchmarks ({s.mode})")
    print(f"{info['cpu']} x{info['cpus']}, Python {info['python']}, trio {info['trio']}\n")
    t_all = time.perf_counter()
    for name in args.only or SCENARIOS:
        t0 = time.perf_counter()
        before = len(results.rows)
        SCENARIOS[name](s, results)
        print(table(results.rows[before:], header=False))
        print(f"  ({name}: {time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    if not args.no_plot and not args.only:
        plot(s, results, args.out)
    md = report.write(args.out, results, s, info, time.perf_counter() - t_all)
    print("\n" + md)
    print(f"wrote {args.out / 'results.json'}", file=sys.stderr)
    rows = [row.as_dict() for row in results.rows]
    if args.update_readme and report.update_readme(ROOT / "README.md", md, rows):
        print("updated README.md", file=sys.stderr)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (< 1 min)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=sorted(SCENARIOS),
        metavar="NAME",
        help=f"run only these: {', '.join(SCENARIOS)}",
    )
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument(
        "--update-readme",
        action="store_true",
        help="replace the table between the README's bench markers",
    )
    return parser


if __name__ == "__main__":
    sys.exit(main())
