"""``conclave deliberate --resume BATCH_ID --witness-db FILE``: continue a batch a halt,
a crash or a Ctrl-C stopped, calling only the agents without a committed answer.

An operator can only resume a batch whose id they know: a run with a witness log says
its batch id on stderr as it starts (:class:`AnnouncedBatches`), before any agent is
called, so even a run killed mid-batch has said it, and says how to resume when it
ends short of every answer (:func:`print_resume_hint`).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from uuid import UUID

from adapters.cli._backend import UsageError
from adapters.witness.sqlite import SqliteWitness
from kernel import RESUMED, AgentOutput, CommitReceipt, ConcurrentResult, RecordedBatch

__all__ = ["AnnouncedBatches", "add_option", "check_usage", "print_resume_hint"]


def add_option(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--resume",
        metavar="BATCH_ID",
        help="continue batch BATCH_ID of --witness-db: agents whose answer is committed "
        "there are not called again (same agents and topic as the batch)",
    )


def check_usage(args: argparse.Namespace) -> None:
    """Refuse a --resume that cannot work, before anything is opened or created."""
    if args.resume is None:
        return
    if args.witness_db is None:
        raise UsageError("--resume needs --witness-db FILE (the log that holds the batch)")
    if args.sequential:
        raise UsageError("--sequential and --resume do not mix (a resume runs concurrently)")
    try:
        UUID(args.resume)
    except ValueError:
        raise UsageError(f"--resume {args.resume!r}: not a batch id (a UUID)") from None
    # Opening a witness creates a missing log: a mistyped path would resume from nothing.
    if not Path(args.witness_db).is_file():
        raise UsageError(f"--witness-db {args.witness_db}: no witness log there to resume from")


class AnnouncedBatches:
    """The SQLite witness, saying on stderr which batch starts a run (the id to resume)."""

    def __init__(self, witness: SqliteWitness) -> None:
        self._witness = witness

    async def commit(self, output: AgentOutput) -> CommitReceipt:
        return await self._witness.commit(output)

    def begin_run(self, batch_id: UUID, requests: Mapping[str, str]) -> Callable[[], None]:
        print(
            f"conclave: batch {batch_id} (witness log {self._witness.path})",
            file=sys.stderr,
            flush=True,
        )
        return self._witness.begin_run(batch_id, requests)

    async def recorded_batch(self, batch_id: UUID) -> RecordedBatch | None:
        return await self._witness.recorded_batch(batch_id)


def print_resume_hint(args: argparse.Namespace, result: ConcurrentResult | None) -> None:
    """On stderr: what a resumed run took from the log, and, if some agent has no answer
    and the run had a witness log, the command that resumes it."""
    if result is None or args.witness_db is None:
        return
    resumed = sum(1 for o in result.outputs if o.metadata.get(RESUMED) is True)
    if args.resume is not None:
        print(
            f"conclave: batch {result.batch_id}: {resumed} answers resumed from the witness "
            f"log, {result.total_count - resumed} outcomes from this run",
            file=sys.stderr,
        )
    if result.failure_count == 0:
        return
    witness_db = shlex.quote(str(args.witness_db))
    print(
        f"conclave: {result.failure_count} agents have no answer; once the cause is "
        f"cleared, call only them: conclave deliberate --resume {result.batch_id} "
        f"--witness-db {witness_db} (same agents and topic)",
        file=sys.stderr,
    )
