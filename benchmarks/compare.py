"""The kernel's overhead at another commit against this tree's, measured in one run.

    python -m benchmarks.compare --baseline-ref REF [--rounds N] [--reps N] [--repeat N]

Exports ``kernel/`` and ``adapters/`` at ``REF`` (``git archive``) into a temporary
directory and measures the cost per agent of 72 agents that do nothing (the ``overhead``
scenario's job), through the kernel and through a bare trio nursery, with REF's code and
with this working tree's.  Every trial is a fresh interpreter that imports the kernel of
one tree; the four variants take turns, round after round, in a rotating order, so that
a noisy machine hits all of them alike.  Prints the table: the medians, and the ratio
kernel / bare-trio of each tree (median of the per-round ratios) -- the number a kernel
change must not make worse.

The workloads only use names the kernel has always exported; a REF that predates
``adapters/stub.py`` or those names cannot be compared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from benchmarks.processes import ROOT
from benchmarks.results import Row, table
from benchmarks.timing import over, trio_times
from benchmarks.workloads import BareBatch, KernelBatch

KINDS = ("kernel", "bare-trio")
AGENTS = 72
THIS_TREE = "working tree"


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.trial:
        print(json.dumps(_trial(args.trial, args.repeat, args.reps)))
        return 0
    if not args.baseline_ref:
        parser.error("--baseline-ref is required")
    with exported(args.baseline_ref) as baseline:
        trees = {args.baseline_ref: baseline, THIS_TREE: ROOT}
        rounds = [_round(trees, i, args.reps, args.repeat) for i in range(args.rounds)]
    print(
        f"# kernel overhead, {args.baseline_ref} against the {THIS_TREE}: {args.rounds} rounds "
        f"x {args.reps} reps of {args.repeat} batches of {AGENTS} agents that do nothing\n"
    )
    print(table(_rows(list(trees), rounds)))
    return 0


#: One round's trials: (tree label, kind) -> microseconds per agent, one per rep.
Round = dict[tuple[str, str], list[float]]


def _round(trees: dict[str, Path], index: int, reps: int, repeat: int) -> Round:
    """One trial of every variant, starting one variant further on than the round before."""
    variants = [(label, kind) for label in trees for kind in KINDS]
    shift = index % len(variants)
    return {
        (label, kind): _run_trial(trees[label], kind, repeat, reps)
        for label, kind in variants[shift:] + variants[:shift]
    }


def _rows(labels: list[str], rounds: list[Round]) -> list[Row]:
    """Cost per agent of each variant over all rounds; each tree's kernel / bare-trio
    ratio, one per round; and how the second tree's ratio compares with the first's."""
    rows = []
    for label in labels:
        for kind in KINDS:
            samples = [x for r in rounds for x in r[label, kind]]
            rows.append(Row("overhead", f"{kind} @ {label}", "cost per agent", "us", samples))
    ratios = {label: [_kernel_to_bare(r, label) for r in rounds] for label in labels}
    for label in labels:
        rows.append(Row("overhead", f"kernel / bare-trio @ {label}", "ratio", "x", ratios[label]))
    baseline, current = ratios.values()
    change = [c / b for b, c in zip(baseline, current, strict=True)]
    note = "< 1: this tree's kernel adds less over bare trio"
    rows.append(
        Row("overhead", f"{THIS_TREE} / baseline", "ratio of ratios", "x", change, note=note)
    )
    return rows


def _kernel_to_bare(trials: Round, label: str) -> float:
    kernel, bare = (statistics.median(trials[label, kind]) for kind in KINDS)
    return kernel / bare


def _run_trial(tree: Path, kind: str, repeat: int, reps: int) -> list[float]:
    """One trial in a fresh interpreter that imports ``kernel`` and ``adapters`` from
    ``tree`` (its working directory comes first on ``sys.path``) and ``benchmarks`` from
    this repository."""
    command = [sys.executable, "-m", "benchmarks.compare", "--trial", kind]
    command += ["--repeat", str(repeat), "--reps", str(reps)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, check=True)
    report = json.loads(out.stdout)
    if not Path(report["kernel"]).is_relative_to(tree):
        raise RuntimeError(f"the trial for {tree} imported {report['kernel']}")
    samples: list[float] = report["us_per_agent"]
    return samples


def _trial(kind: str, repeat: int, reps: int) -> dict[str, object]:
    import kernel

    if kind == "kernel":
        batch: KernelBatch | BareBatch = KernelBatch(AGENTS, 0.0, repeat=repeat)
    else:
        batch = BareBatch(AGENTS, 0.0, repeat=repeat)
    seconds = trio_times(batch, reps, warmup=2)
    return {"kernel": kernel.__file__, "us_per_agent": over(seconds, AGENTS * repeat / 1e6)}


@contextmanager
def exported(ref: str) -> Iterator[Path]:
    """``kernel/`` and ``adapters/`` as they are at ``ref``, in a temporary directory.

    Raises SystemExit with git's message if ``ref`` is not a commit of this repository.
    """
    archive = subprocess.run(
        ["git", "archive", "--format=tar", ref, "kernel", "adapters"],
        cwd=ROOT,
        capture_output=True,
    )
    if archive.returncode:
        raise SystemExit(f"error: cannot export {ref!r}: {archive.stderr.decode().strip()}")
    with tempfile.TemporaryDirectory(prefix="conclave-baseline-") as tmp:
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        yield Path(tmp)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.compare", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--baseline-ref", metavar="REF", help="the commit to compare against")
    parser.add_argument("--rounds", type=int, default=10, help="trials per variant (10)")
    parser.add_argument("--reps", type=int, default=5, help="timed reps per trial (5)")
    parser.add_argument("--repeat", type=int, default=20, help="batches per rep (20)")
    parser.add_argument("--trial", choices=KINDS, help=argparse.SUPPRESS)
    return parser


if __name__ == "__main__":
    sys.exit(main())
