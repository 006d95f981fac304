"""The witness's group commit: one writer thread, and the point of no return.

Commits are queued for one writer thread, which writes everything queued in one
transaction: a 72-agent batch costs a few transactions, not 72.  An idle writer starts
once the current trio scheduling round is over, so agents finishing together share a
transaction.  Sequence numbers are assigned inside the write transaction (``BEGIN
IMMEDIATE``), so they stay gap-free across concurrent batches and processes.

**The point of no return.**  Nothing slow stands between a halt and the caller.  The
writer takes SQLite's write lock in short slices (:data:`BUSY_SLICE_S`), and an output
is only bound to a transaction once that lock is held, just before its row is inserted:
that moment is the output's point of no return.  The contract of
:meth:`GroupCommitter.commit` (which :meth:`SqliteWitness.commit
<adapters.witness.sqlite.SqliteWitness.commit>` is) -- every output whose commit
returned a receipt is in the log, and every output whose commit raised is not, now or
later:

* Returns a :class:`~kernel.CommitReceipt` once the output's transaction is committed.
* **Cancelled before the point of no return** (e.g. while another connection holds the
  lock): the output is withdrawn and never written, and ``trio.Cancelled`` propagates
  at once, without waiting for the database.
* **Cancelled after it** (its transaction is being inserted and committed, which takes
  milliseconds): waits for that, shielded, and returns the receipt normally; the
  cancellation is seen at the caller's next checkpoint.  Had the transaction failed,
  ``trio.Cancelled`` propagates.
* Cancelling one commit never fails or drops the other commits of its group.
* Database locked by another connection: a commit that is not cancelled keeps trying
  for ``busy_timeout_s``, then raises :class:`WitnessError` (not written).
* Other failures (a dropped table, a full disk, an output id already in the log, a
  second output of one agent in one batch) raise :class:`WitnessError`; the output is
  not written.

**Runs.**  A run of a batch begun with :meth:`GroupCommitter.begin_run` is written (a
``batch_runs`` row: its number and request set) in the transaction of the first output
of that batch, before it: an output of a recorded batch is never in the log without the
request set, and a run that committed nothing leaves no row.

How: the trio side touches the queue only under the committer's mutex, which is never
held across a call into SQLite, so a waiter is never blocked by the database.  An
output leaves the queue in the same step as its state changes: withdrawn by its
waiter, failed, or taken into the transaction (``COMMITTING``) once the lock is held.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sqlite3
import threading
import time
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Any, Literal
from uuid import UUID

import attrs
import trio

from adapters.witness._chain import WitnessError, chain_tip, insert_row, output_fields
from kernel import AgentOutput, CommitReceipt, utc_now

__all__ = ["BATCH_RUNS_SCHEMA", "BUSY_SLICE_S", "GroupCommitter", "WitnessStatistics"]

log = logging.getLogger("adapters.witness.sqlite")

#: How long one attempt to take SQLite's write lock waits (seconds).  Between attempts
#: the writer drops withdrawn outputs and gives up if none is left.
BUSY_SLICE_S = 0.02

# Each run of a batch; the first one's request set is what a resume must match.  Not
# chained: it names no output, and a forged one can only make a resume be refused or
# run agents again, never release an output that was not committed.
BATCH_RUNS_SCHEMA = """
CREATE TABLE IF NOT EXISTS batch_runs (
    batch_id    TEXT NOT NULL,
    run         INTEGER NOT NULL,
    started_at  TEXT NOT NULL,
    requests    TEXT NOT NULL,
    PRIMARY KEY (batch_id, run)
);
"""


@attrs.frozen(slots=True)
class WitnessStatistics:
    """Counters of :class:`~adapters.witness.sqlite.SqliteWitness` (like trio's
    ``statistics()``).

    ``transactions``: write transactions so far (one per group commit).
    ``lock_waits``: attempts at the write lock that found it held by another connection.
    ``queued``: outputs waiting for a transaction right now.
    """

    transactions: int
    lock_waits: int
    queued: int


class _State(Enum):
    PENDING = "pending"  # queued; its waiter may still withdraw it
    WITHDRAWN = "withdrawn"  # its waiter was cancelled first: never written
    COMMITTING = "committing"  # in the open transaction: past the point of no return
    DONE = "done"  # durable; receipt set
    FAILED = "failed"  # not written; error set


class _Item:
    """One output on its way into the log, shared by its waiter and the writer thread
    (``state``, ``receipt`` and ``error`` change only under the committer's mutex)."""

    __slots__ = ("done", "error", "fields", "output", "receipt", "state", "submitted", "token")

    def __init__(self, output: AgentOutput, fields: dict[str, Any]) -> None:
        self.output = output
        self.fields = fields
        self.state = _State.PENDING
        self.receipt: CommitReceipt | None = None
        self.error: str | None = None
        self.done = trio.Event()
        self.token = trio.lowlevel.current_trio_token()
        self.submitted = time.monotonic()


class _Run:
    """A run of a batch, begun and not yet written (``written`` changes only under the
    committer's mutex)."""

    __slots__ = ("batch_id", "requests", "started_at", "written")

    def __init__(self, batch_id: str, requests: str) -> None:
        self.batch_id = batch_id
        self.requests = requests  # JSON: agent id -> context fingerprint
        self.started_at = utc_now().isoformat()
        self.written = False


_Result = tuple[_Item, CommitReceipt | None, str | None]


class GroupCommitter:
    """The writer thread, its own connection to ``path`` and its queue.

    Opening raises ``sqlite3.Error`` if the connection cannot be set up; the caller
    owns the log's schema and journal mode.
    """

    def __init__(
        self, path: Path, *, synchronous: Literal["FULL", "NORMAL"], busy_timeout_s: float
    ) -> None:
        # Each attempt at the write lock is short: withdrawn outputs are dropped between.
        db = sqlite3.connect(
            path, check_same_thread=False, isolation_level=None, timeout=BUSY_SLICE_S
        )
        try:
            db.execute(f"PRAGMA synchronous={synchronous}")
        except BaseException:
            db.close()
            raise
        self._db = db  # used only by the writer thread (or closed by aclose if none ran)
        self._path = path
        self._busy_timeout_s = busy_timeout_s
        self._mutex = threading.Lock()
        self._wake = threading.Condition(self._mutex)
        self._queue: list[_Item] = []
        self._runs: dict[str, _Run] = {}  # by batch id: runs begun, not ended
        self._round_open = False  # outputs are still arriving in this trio scheduling round
        self._closing = False
        self._thread: threading.Thread | None = None
        self.transactions = 0
        self.lock_waits = 0

    # ---- trio side

    async def commit(self, output: AgentOutput) -> CommitReceipt:
        """Append ``output`` to the chain; return its receipt once it is durable
        (cancellation and failures: see the module docstring)."""
        item = _Item(output, output_fields(output))
        self._submit(item)
        try:
            await item.done.wait()
        except trio.Cancelled:
            if self._withdraw(item):
                raise
            with trio.CancelScope(shield=True):  # past the point of no return: milliseconds
                await item.done.wait()
            if item.receipt is None:
                raise
            return item.receipt
        if item.receipt is None:
            raise WitnessError(f"{self._path}: {item.error}")
        return item.receipt

    def begin_run(self, batch_id: UUID, requests: str) -> Callable[[], None]:
        """A run of ``batch_id`` starts (``requests``: its request set, JSON); it is
        written with the batch's first output committed before the returned function is
        called.  Neither blocks."""
        run = _Run(str(batch_id), requests)
        with self._mutex:
            self._runs[run.batch_id] = run

        def end() -> None:
            with self._mutex:
                if self._runs.get(run.batch_id) is run:
                    del self._runs[run.batch_id]

        return end

    def _submit(self, item: _Item) -> None:
        """Queue ``item``.  An idle writer starts once the current trio scheduling round
        is over, so agents finishing in the same round share one transaction."""
        with self._mutex:
            if self._closing:
                raise WitnessError(f"{self._path}: the witness is closed")
            self._queue.append(item)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="conclave-witness-writer", daemon=True
                )
                self._thread.start()
            if self._round_open:
                return
            self._round_open = True
        try:
            item.token.run_sync_soon(self._close_round)
        except trio.RunFinishedError:  # pragma: no cover - submit runs inside trio
            self._close_round()

    def _close_round(self) -> None:
        with self._mutex:
            self._round_open = False
            self._wake.notify()

    def _withdraw(self, item: _Item) -> bool:
        """For a cancelled waiter: True if ``item`` is not and never will be in the log,
        False if it is past the point of no return (wait for its result)."""
        with self._mutex:
            if item.state is _State.PENDING:
                item.state = _State.WITHDRAWN
                self._queue.remove(item)
                return True
            return item.state in (_State.WITHDRAWN, _State.FAILED)

    def statistics(self) -> WitnessStatistics:
        with self._mutex:
            return WitnessStatistics(self.transactions, self.lock_waits, len(self._queue))

    async def aclose(self) -> None:
        """Stop taking commits, let the writer finish what is queued, and join it.

        Bounded: a queued output waits at most ``busy_timeout_s`` for a locked database.
        If this call is cancelled the thread still exits on its own after that.
        """
        with self._mutex:
            self._closing = True
            self._wake.notify()
            thread = self._thread
        if thread is None:
            self._db.close()
        else:
            await trio.to_thread.run_sync(thread.join, abandon_on_cancel=True)

    # ---- writer thread

    def _run(self) -> None:
        try:
            while True:
                with self._mutex:
                    while (not self._queue or self._round_open) and not self._closing:
                        self._wake.wait()
                    if not self._queue:
                        return
                try:
                    self._write_queued()
                except BaseException as exc:  # never leave a waiter without an answer
                    log.exception("witness writer failed", extra={"witness": str(self._path)})
                    self._fail_queued(f"commit failed: {type(exc).__name__}")
        finally:
            self._db.close()

    def _write_queued(self) -> None:
        """One transaction holding everything queued once the write lock is held."""
        db = self._db
        while True:
            with self._mutex:
                if not self._queue:
                    return  # every output was withdrawn while we waited: give up
            started = time.monotonic()
            try:
                db.execute("BEGIN IMMEDIATE")  # waits up to BUSY_SLICE_S for the lock
                break
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc):
                    self._fail_queued(f"commit failed: {exc}")
                    return
            self.lock_waits += 1
            self._fail_queued(
                f"the database stayed locked for more than {self._busy_timeout_s:g} s",
                submitted_before=time.monotonic() - self._busy_timeout_s,
            )
            _sleep_rest_of_slice(started)
        with self._mutex:  # the point of no return for everything still queued
            group, self._queue = self._queue, []
            for item in group:
                item.state = _State.COMMITTING
            runs = self._unwritten_runs(group)
        if not group:
            db.execute("ROLLBACK")
            return
        try:
            for run in runs:
                _insert_run(db, run)
            written = self._insert(db, group)
            self._commit(db)
        except BaseException as exc:  # whatever it was, every waiter gets an answer
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            error = f"commit failed: {exc}" if isinstance(exc, sqlite3.Error) else "commit failed"
            self._finish([(item, None, error) for item in group])
            return
        self.transactions += 1
        with self._mutex:
            for run in runs:
                run.written = True
        self._finish(written)

    def _unwritten_runs(self, group: list[_Item]) -> list[_Run]:
        """The runs begun and not yet written that outputs of ``group`` belong to (under
        the mutex)."""
        runs: dict[str, _Run] = {}
        for item in group:
            run = self._runs.get(item.fields["batch_id"] or "")
            if run is not None and not run.written:
                runs[run.batch_id] = run
        return list(runs.values())

    def _insert(self, db: sqlite3.Connection, group: list[_Item]) -> list[_Result]:
        sequence, prev = chain_tip(db)
        committed_at = utc_now()
        results: list[_Result] = []
        for item in group:
            out = item.output
            try:
                prev = insert_row(db, item.fields, sequence + 1, prev, committed_at)
            except sqlite3.IntegrityError as exc:
                # Only this statement is undone; the others in the group still go in.
                results.append((item, None, _duplicate(out, exc)))
                continue
            sequence += 1
            receipt = CommitReceipt(out.output_id, out.content_hash, sequence, prev, committed_at)
            results.append((item, receipt, None))
        return results

    def _commit(self, db: sqlite3.Connection) -> None:
        """COMMIT, retried while busy (only in a non-WAL journal mode, where it must wait
        for readers) for up to busy_timeout_s; a failed COMMIT leaves the transaction open."""
        deadline = time.monotonic() + self._busy_timeout_s
        while True:
            started = time.monotonic()
            try:
                db.execute("COMMIT")
                return
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc) or started >= deadline:
                    raise
            _sleep_rest_of_slice(started)

    def _fail_queued(self, why: str, submitted_before: float = math.inf) -> None:
        """Fail the queued (not yet committing) outputs submitted before a time."""
        with self._mutex:
            failed = [item for item in self._queue if item.submitted < submitted_before]
            self._queue = [item for item in self._queue if item.submitted >= submitted_before]
            for item in failed:  # in the same step as leaving the queue (see _withdraw)
                item.state, item.error = _State.FAILED, why
        self._wake_waiters(failed)

    def _finish(self, results: list[_Result]) -> None:
        """Record the results of a transaction's outputs (all COMMITTING) and wake them."""
        with self._mutex:
            for item, receipt, error in results:
                item.receipt, item.error = receipt, error
                item.state = _State.DONE if receipt is not None else _State.FAILED
        self._wake_waiters([item for item, _, _ in results])

    def _wake_waiters(self, items: list[_Item]) -> None:
        for item in items:
            if item.error is not None:
                log.error(
                    "witness commit failed",
                    extra={"witness": str(self._path), "output_id": str(item.output.output_id)},
                )
            with contextlib.suppress(trio.RunFinishedError):
                item.token.run_sync_soon(item.done.set)


def _insert_run(db: sqlite3.Connection, run: _Run) -> None:
    """Insert ``run`` as the next run of its batch (inside the open transaction)."""
    (last,) = db.execute(
        "SELECT COALESCE(MAX(run), 0) FROM batch_runs WHERE batch_id = ?", (run.batch_id,)
    ).fetchone()
    db.execute(
        "INSERT INTO batch_runs (batch_id, run, started_at, requests) VALUES (?, ?, ?, ?)",
        (run.batch_id, last + 1, run.started_at, run.requests),
    )


def _duplicate(out: AgentOutput, exc: sqlite3.IntegrityError) -> str:
    """Why the log refused ``out`` as a duplicate."""
    if "output_id" in str(exc):
        return f"output {out.output_id} is already committed"
    return (
        f"agent {out.agent_id!r} already has an output committed in batch {out.batch_id} "
        "(one output per agent of a batch)"
    )


def _sleep_rest_of_slice(started: float) -> None:
    """If SQLite answered "busy" without waiting out its busy timeout, wait the rest of
    the slice here, so a locked database is polled, not spun on."""
    rest = BUSY_SLICE_S - (time.monotonic() - started)
    if rest > 0:
        time.sleep(rest)


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return bool(code & 0xFF == sqlite3.SQLITE_BUSY)
    return "locked" in str(exc)
