"""FR9, commit before view: a hash-chained, append-only SQLite log of agent outputs.

Every output the kernel releases is first committed here: one row per output, with a
gap-free ``sequence`` and a ``chain_hash`` = SHA-256 over the previous row's chain hash
and a canonical encoding of this row (content hash included).  Editing, deleting,
reordering or inserting a row breaks the chain, and :func:`verify_log` says where.
:meth:`SqliteWitness.get_for_viewing` is the only sanctioned way to read an output back:
it refuses one that was never committed or whose row no longer verifies, and records who
viewed what.

**Group commit, off the trio loop.**  Commits are queued for one writer thread, which
writes everything queued in one transaction: a 72-agent batch costs a few transactions,
not 72.  Sequence numbers are assigned inside the write transaction (``BEGIN
IMMEDIATE``), so they stay gap-free across concurrent batches and processes.

**Nothing slow stands between a halt and the caller.**  The writer takes SQLite's write
lock in short slices (:data:`BUSY_SLICE_S`), and an output is only bound to a
transaction once that lock is held, just before its row is inserted (the *point of no
return*).  Until then a cancelled :meth:`SqliteWitness.commit` withdraws its output at
once, whatever the database is doing; see that method for the full contract.

**An audit never writes.**  :func:`verify_log` opens the file read-only and refuses
anything that is not a witness log.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Any, Literal, TypeVar
from uuid import UUID

import attrs
import trio

from kernel import AgentOutput, CommitReceipt, ConclaveError, InvalidRequestError, utc_now
from kernel.validate import check_seconds

__all__ = [
    "BUSY_SLICE_S",
    "GENESIS_HASH",
    "SqliteWitness",
    "VerifyReport",
    "WitnessError",
    "WitnessStatistics",
    "verify_log",
]

log = logging.getLogger("adapters.sqlite_witness")

T = TypeVar("T")

GENESIS_HASH = "0" * 64

#: How long one attempt to take SQLite's write lock waits (seconds).  Between attempts
#: the writer drops withdrawn outputs and gives up if none is left.
BUSY_SLICE_S = 0.02

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outputs (
    sequence      INTEGER PRIMARY KEY,
    output_id     TEXT NOT NULL UNIQUE,
    agent_id      TEXT NOT NULL,
    request_id    TEXT NOT NULL,
    batch_id      TEXT,
    content_hash  TEXT NOT NULL,
    content_type  TEXT NOT NULL,
    generated_at  TEXT NOT NULL,
    committed_at  TEXT NOT NULL,
    metadata      TEXT NOT NULL,
    content       TEXT NOT NULL,
    prev_hash     TEXT NOT NULL,
    chain_hash    TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS views (
    id         INTEGER PRIMARY KEY,
    output_id  TEXT NOT NULL,
    sequence   INTEGER NOT NULL,
    viewer_id  TEXT NOT NULL,
    viewed_at  TEXT NOT NULL
);
"""

_COLUMNS = (
    "sequence",
    "output_id",
    "agent_id",
    "request_id",
    "batch_id",
    "content_hash",
    "content_type",
    "generated_at",
    "committed_at",
    "metadata",
    "content",
    "prev_hash",
    "chain_hash",
)
_NULLABLE = frozenset({"batch_id"})
_HEX64 = re.compile(r"[0-9a-f]{64}")


class WitnessError(ConclaveError):
    """The witness refused: an output not committed, a tampered row, an unusable log."""


@attrs.frozen(slots=True)
class VerifyReport:
    """What :func:`verify_log` found.  ``first_bad_sequence`` is None when ok (and when
    the bad record has no usable sequence number)."""

    ok: bool
    records: int
    first_bad_sequence: int | None = None
    problem: str | None = None

    def __bool__(self) -> bool:
        return self.ok


@attrs.frozen(slots=True)
class WitnessStatistics:
    """Counters of :class:`SqliteWitness` (like trio's ``statistics()``).

    ``transactions``: write transactions so far (one per group commit).
    ``lock_waits``: attempts at the write lock that found it held by another connection.
    ``queued``: outputs waiting for a transaction right now.
    """

    transactions: int
    lock_waits: int
    queued: int


def canonical_record(row: dict[str, Any]) -> bytes:
    """The bytes a row's chain hash covers: every field but the content itself (whose hash
    is covered) and the chain hash; JSON with sorted keys and no whitespace."""
    fields = {k: row[k] for k in _COLUMNS if k not in ("content", "chain_hash")}
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def chain_hash(prev_hash: str, row: dict[str, Any]) -> str:
    return hashlib.sha256(prev_hash.encode("ascii") + b"\n" + canonical_record(row)).hexdigest()


# ---------------------------------------------------------------- reading rows back

# Every column with its SQLite type; text comes back as raw bytes (decoded strictly
# below), so a row holding invalid UTF-8 is a finding, not a decoding exception.
_TYPED_SELECT = "SELECT " + ", ".join(
    f"typeof({c}), CASE typeof({c}) WHEN 'integer' THEN {c} END"
    if c == "sequence"
    else f"typeof({c}), CAST({c} AS BLOB)"
    for c in _COLUMNS
)


def _decode_row(raw: tuple[Any, ...]) -> tuple[dict[str, Any], str | None]:
    """A row from ``_TYPED_SELECT`` as a dict, and what is wrong with its types (or None)."""
    row: dict[str, Any] = {}
    problem = None
    for i, column in enumerate(_COLUMNS):
        kind, value = raw[2 * i], raw[2 * i + 1]
        if column == "sequence":
            ok = kind == "integer"
        elif kind == "null":
            ok = column in _NULLABLE
        elif kind == "text":
            try:
                value = bytes(value).decode("utf-8")
                ok = True
            except UnicodeDecodeError:
                ok, kind = False, "invalid UTF-8"
        else:
            ok = False
        row[column] = value
        if not ok and problem is None:
            found = kind if kind == "invalid UTF-8" else kind.upper()  # NULL, BLOB, REAL...
            expected = "an integer" if column == "sequence" else "text"
            problem = f"column {column} holds {found} where {expected} was expected"
    return row, problem


def _row_problem(row: dict[str, Any]) -> str | None:
    """What is wrong with a well-typed row on its own (content or chain hash), or None."""
    if hashlib.sha256(row["content"].encode("utf-8")).hexdigest() != row["content_hash"]:
        return "content does not match its content_hash (edited)"
    if not isinstance(row["prev_hash"], str) or not _HEX64.fullmatch(row["prev_hash"]):
        return "prev_hash is not a SHA-256 hex digest"
    if chain_hash(row["prev_hash"], row) != row["chain_hash"]:
        return "record does not match its chain_hash (edited)"
    return None


# ---------------------------------------------------------------- read-only audit


def verify_log(path: str | os.PathLike[str], expected_head: str | None = None) -> VerifyReport:
    """Verify the witness log at ``path`` without writing to it (blocking: from trio, run it
    in a worker thread, or use :meth:`SqliteWitness.verify`).

    Walks the whole chain and reports the first broken record: a gap or insertion in the
    sequence, a ``prev_hash`` that does not follow, an edited row, or a value of the
    wrong type (NULL, BLOB, a number, invalid UTF-8) -- all as ``VerifyReport(ok=False,
    ...)``.  A chain only proves that its rows agree with each other; pass the chain
    hash of a receipt kept elsewhere as ``expected_head`` to also prove that the log
    still ends (or passes) where it did.

    Raises :class:`WitnessError` if ``path`` is not a witness log at all: missing (it is
    never created), not a regular file, not an SQLite database, or without an
    ``outputs`` table holding the witness columns.  Raises
    :class:`~kernel.InvalidRequestError` for an ``expected_head`` that is not a SHA-256
    hex digest.

    Read-only: the file is opened with ``mode=ro``, no table is created and no pragma
    is set.  The database file and its ``-wal`` never change.  If the log has no
    ``-wal``/``-shm``/``-journal`` beside it (no writer open, last one closed
    cleanly), it is opened ``immutable`` and no side file is created; if a ``-wal``
    exists (a writer is open, or crashed), SQLite's readers need the ``-shm`` index
    and create it if it is missing (its lock bytes are what readers use to coordinate
    with a live writer).
    """
    if expected_head is not None and (
        not isinstance(expected_head, str) or not _HEX64.fullmatch(expected_head)
    ):
        raise InvalidRequestError("expected_head must be a chain hash: 64 lowercase hex digits")
    path = Path(path)
    db = _open_readonly(path)
    try:
        _check_is_witness_log(db, path)
        try:
            return _walk_chain(db, expected_head)
        except sqlite3.Error as exc:
            raise WitnessError(f"{path}: cannot read the witness log: {exc}") from None
    finally:
        db.close()


def _open_readonly(path: Path) -> sqlite3.Connection:
    if not os.path.lexists(path):
        raise WitnessError(f"{path}: no such witness log")
    if not path.is_file():
        raise WitnessError(f"{path}: not a witness log (not a regular file)")
    side_files = (Path(f"{path}{suffix}") for suffix in ("-wal", "-shm", "-journal"))
    immutable = not any(os.path.lexists(p) for p in side_files)
    uri = path.absolute().as_uri() + ("?mode=ro&immutable=1" if immutable else "?mode=ro")
    try:
        return sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise WitnessError(f"{path}: cannot open the witness log read-only: {exc}") from None


def _check_is_witness_log(db: sqlite3.Connection, path: Path) -> None:
    try:
        kind = db.execute("SELECT type FROM sqlite_master WHERE name = 'outputs'").fetchone()
        columns = {r[1] for r in db.execute("PRAGMA table_info(outputs)")}
    except sqlite3.DatabaseError as exc:
        raise WitnessError(f"{path}: not a witness log ({exc})") from None
    if kind is None or kind[0] != "table" or not columns:
        # A view named outputs has the columns too, but it is not where a log is kept.
        raise WitnessError(f"{path}: not a witness log (no outputs table)")
    missing = [c for c in _COLUMNS if c not in columns]
    if missing:
        raise WitnessError(f"{path}: not a witness log (outputs table lacks {', '.join(missing)})")


def _refuse_other_databases(path: Path) -> None:
    """Before anything is written: a file that already holds data must be a witness log.

    Opening a witness creates its tables and switches the file to WAL: done to another
    application's database (a mistyped path), that would change it, and its own
    ``outputs`` table would fail every commit.  A missing or empty file is a new log.
    """
    try:
        if not path.is_file() or path.stat().st_size == 0:
            return  # new (or not a file at all: connect() says so)
    except OSError:
        return  # let connect() report it
    db = _open_readonly(path)
    try:
        with contextlib.suppress(sqlite3.DatabaseError):  # not SQLite: the check says so
            if db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0:
                return  # a database with nothing in it yet (another witness creating it)
        _check_is_witness_log(db, path)
    finally:
        db.close()


def _walk_chain(db: sqlite3.Connection, expected_head: str | None) -> VerifyReport:
    expected_seq, prev, count = 1, GENESIS_HASH, 0
    head_seen = expected_head is None
    for raw in db.execute(f"{_TYPED_SELECT} FROM outputs ORDER BY sequence"):
        row, problem = _decode_row(raw)
        seq = row["sequence"] if isinstance(row["sequence"], int) else None
        if problem is None:
            if seq != expected_seq:
                problem = f"sequence {seq} where {expected_seq} was expected (missing or inserted)"
            elif row["prev_hash"] != prev:
                problem = "prev_hash does not match the previous record (deleted or reordered)"
            else:
                problem = _row_problem(row)
        if problem:
            log.error("witness chain broken", extra={"sequence": seq, "problem": problem})
            return VerifyReport(False, count, seq, problem)
        prev, expected_seq, count = row["chain_hash"], expected_seq + 1, count + 1
        head_seen = head_seen or prev == expected_head
    if not head_seen:
        return VerifyReport(False, count, None, "the expected chain head is not in the log")
    return VerifyReport(True, count)


# ---------------------------------------------------------------- group commit


class _State(Enum):
    PENDING = "pending"  # queued; its waiter may still withdraw it
    WITHDRAWN = "withdrawn"  # its waiter was cancelled first: never written
    COMMITTING = "committing"  # in the open transaction: past the point of no return
    DONE = "done"  # durable; receipt set
    FAILED = "failed"  # not written; error set


class _Item:
    """One output on its way into the log, shared by its waiter and the writer thread
    (``state``, ``receipt`` and ``error`` change only under the committer's mutex)."""

    __slots__ = ("done", "error", "output", "receipt", "row", "state", "submitted", "token")

    def __init__(self, output: AgentOutput, row: dict[str, Any]) -> None:
        self.output = output
        self.row = row
        self.state = _State.PENDING
        self.receipt: CommitReceipt | None = None
        self.error: str | None = None
        self.done = trio.Event()
        self.token = trio.lowlevel.current_trio_token()
        self.submitted = time.monotonic()


def _prepared_row(out: AgentOutput) -> dict[str, Any]:
    """The row's fields that do not depend on its place in the chain."""
    row = {
        "output_id": str(out.output_id),
        "agent_id": out.agent_id,
        "request_id": str(out.request_id),
        "batch_id": str(out.batch_id) if out.batch_id else None,
        "content_hash": out.content_hash,
        "content_type": out.content_type,
        "generated_at": out.generated_at.isoformat(),
        "metadata": json.dumps(dict(out.metadata), sort_keys=True),
        "content": out.content,
    }
    for name, value in row.items():
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise WitnessError(f"output {out.output_id}: {name} is not valid Unicode") from None
    return row


class _GroupCommitter:
    """The writer thread and its queue: everything pending goes in one transaction.

    The trio side only touches the queue under ``_mutex``, which is never held across
    a call into SQLite, so a waiter is never blocked by the database.
    """

    def __init__(self, db: sqlite3.Connection, path: Path, busy_timeout_s: float) -> None:
        self._db = db  # the writer's own connection, used only by the writer thread
        self._path = path
        self._busy_timeout_s = busy_timeout_s
        self._mutex = threading.Lock()
        self._wake = threading.Condition(self._mutex)
        self._queue: list[_Item] = []
        self._round_open = False  # outputs are still arriving in this trio scheduling round
        self._closing = False
        self._thread: threading.Thread | None = None
        self.transactions = 0
        self.lock_waits = 0

    # ---- trio side

    def submit(self, item: _Item) -> None:
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

    def statistics(self) -> WitnessStatistics:
        with self._mutex:
            return WitnessStatistics(self.transactions, self.lock_waits, len(self._queue))

    def withdraw(self, item: _Item) -> bool:
        """For a cancelled waiter: True if ``item`` is not and never will be in the log,
        False if it is past the point of no return (wait for its result)."""
        with self._mutex:
            if item.state is _State.PENDING:
                item.state = _State.WITHDRAWN
                self._queue.remove(item)
                return True
            return item.state in (_State.WITHDRAWN, _State.FAILED)

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
        if not group:
            db.execute("ROLLBACK")
            return
        try:
            written = self._insert(db, group)
            self._commit(db)
        except BaseException as exc:  # whatever it was, every waiter gets an answer
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            error = f"commit failed: {exc}" if isinstance(exc, sqlite3.Error) else "commit failed"
            self._finish([(item, None, error) for item in group])
            return
        self.transactions += 1
        self._finish(written)

    def _insert(
        self, db: sqlite3.Connection, group: list[_Item]
    ) -> list[tuple[_Item, CommitReceipt | None, str | None]]:
        last = db.execute(
            "SELECT sequence, chain_hash FROM outputs ORDER BY sequence DESC LIMIT 1"
        ).fetchone()
        sequence, prev = (last[0], last[1]) if last else (0, GENESIS_HASH)
        committed_at = utc_now()
        results: list[tuple[_Item, CommitReceipt | None, str | None]] = []
        for item in group:
            row = {
                **item.row,
                "sequence": sequence + 1,
                "committed_at": committed_at.isoformat(),
                "prev_hash": prev,
            }
            row["chain_hash"] = chain_hash(prev, row)
            try:
                db.execute(
                    f"INSERT INTO outputs ({', '.join(_COLUMNS)}) "
                    f"VALUES ({', '.join('?' for _ in _COLUMNS)})",
                    [row[c] for c in _COLUMNS],
                )
            except sqlite3.IntegrityError:
                # Only this statement is undone; the others in the group still go in.
                results.append((item, None, f"output {row['output_id']} is already committed"))
                continue
            sequence, prev = row["sequence"], row["chain_hash"]
            out = item.output
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
            for item in failed:  # in the same step as leaving the queue (see withdraw)
                item.state, item.error = _State.FAILED, why
        self._wake_waiters(failed)

    def _finish(self, results: list[tuple[_Item, CommitReceipt | None, str | None]]) -> None:
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


# ---------------------------------------------------------------- the witness


class SqliteWitness:
    """An :class:`~kernel.OutputWitness` backed by an SQLite file in WAL mode.

    Args:
        path: the database file (created with its tables if missing).
        synchronous: SQLite's ``synchronous`` pragma.  ``"FULL"`` (default) makes each
            commit durable against power loss; ``"NORMAL"`` only against a crash of the
            process (faster on slow disks).
        busy_timeout_s: how long a commit waits for a write lock another connection
            holds before it fails with :class:`WitnessError` (default 30 s).  A
            cancelled commit does not wait at all (see :meth:`commit`).

    Use ``async with SqliteWitness(path) as witness`` or call :meth:`aclose`.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        synchronous: Literal["FULL", "NORMAL"] = "FULL",
        busy_timeout_s: float = 30.0,
    ) -> None:
        if synchronous not in ("FULL", "NORMAL"):
            raise InvalidRequestError(f"synchronous must be FULL or NORMAL, got {synchronous!r}")
        self.busy_timeout_s = check_seconds(busy_timeout_s, "busy_timeout_s")
        if str(path) == ":memory:":
            # SQLite would give each of our two connections its own empty database: every
            # commit would fail, and nothing would be kept to audit.
            raise InvalidRequestError("the witness log must be a file, not ':memory:'")
        self.path = Path(path)
        _refuse_other_databases(self.path)
        db = writer = None
        try:
            # Readers (verify aside) use this connection, one worker thread at a time.
            db = sqlite3.connect(
                self.path, check_same_thread=False, isolation_level=None, timeout=busy_timeout_s
            )
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                # In another journal mode a COMMIT past the point of no return waits for
                # readers, shielded: that could delay a halt by the busy timeout.
                raise sqlite3.OperationalError(f"journal mode is {mode}, WAL is required")
            db.executescript(_SCHEMA)
            # The writer thread's own connection; each attempt at the write lock is short.
            writer = sqlite3.connect(
                self.path, check_same_thread=False, isolation_level=None, timeout=BUSY_SLICE_S
            )
            writer.execute(f"PRAGMA synchronous={synchronous}")
        except sqlite3.Error as exc:
            for conn in (db, writer):
                if conn is not None:
                    conn.close()
            raise WitnessError(f"{self.path}: cannot open witness log: {exc}") from None
        self._db = db
        self._lock = trio.Lock()
        self._committer = _GroupCommitter(writer, self.path, self.busy_timeout_s)

    def __repr__(self) -> str:
        return f"<SqliteWitness {str(self.path)!r}>"

    @property
    def transactions(self) -> int:
        """How many write transactions (group commits) so far."""
        return self._committer.transactions

    def statistics(self) -> WitnessStatistics:
        """Group-commit counters: transactions, lock waits, outputs queued now."""
        return self._committer.statistics()

    async def __aenter__(self) -> SqliteWitness:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Finish queued commits (each waits at most ``busy_timeout_s`` for a locked
        database), stop the writer thread, close the connections."""
        try:
            await self._committer.aclose()
        finally:
            with trio.CancelScope(shield=True):
                async with self._lock:
                    self._db.close()

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` in a worker thread, holding the reader connection."""
        async with self._lock:
            try:
                return await trio.to_thread.run_sync(fn, *args)
            except sqlite3.Error as exc:
                raise WitnessError(f"{self.path}: {exc}") from None

    # ------------------------------------------------------------ commit (OutputWitness)

    async def commit(self, output: AgentOutput) -> CommitReceipt:
        """Append ``output`` to the chain; return its receipt once it is durable.

        The contract the kernel relies on -- every output whose ``commit`` returned a
        receipt is in the log, and every output whose ``commit`` raised is not, now or
        later:

        * Returns a :class:`~kernel.CommitReceipt` once the output's transaction is
          committed.  Concurrent commits share transactions (group commit).
        * **Cancelled before the point of no return** (its row not yet part of a
          transaction that holds the write lock -- e.g. while another connection holds
          the lock): the output is withdrawn and never written, and ``trio.Cancelled``
          propagates at once, without waiting for the database.
        * **Cancelled after it** (its transaction is being inserted and committed, which
          takes milliseconds): waits for that, shielded, and returns the receipt
          normally; the cancellation is seen at the caller's next checkpoint.  Had the
          transaction failed, ``trio.Cancelled`` propagates.
        * Cancelling one commit never fails or drops the other commits of its group.
        * Database locked by another connection: a commit that is not cancelled keeps
          trying for ``busy_timeout_s``, then raises :class:`WitnessError` (not written).
        * Other failures (a dropped table, a full disk, an output id already in the
          log) raise :class:`WitnessError`; the output is not written.
        """
        if not isinstance(output, AgentOutput):
            raise InvalidRequestError(
                f"can only witness an AgentOutput, got {type(output).__name__}"
            )
        item = _Item(output, _prepared_row(output))
        self._committer.submit(item)
        try:
            await item.done.wait()
        except trio.Cancelled:
            if self._committer.withdraw(item):
                raise
            with trio.CancelScope(shield=True):  # past the point of no return: milliseconds
                await item.done.wait()
            if item.receipt is None:
                raise
            return item.receipt
        if item.receipt is None:
            raise WitnessError(f"{self.path}: {item.error}")
        return item.receipt

    # ------------------------------------------------------------ verify

    async def verify(self, expected_head: str | None = None) -> VerifyReport:
        """:func:`verify_log` on this witness's file, in a worker thread (read-only)."""
        return await trio.to_thread.run_sync(verify_log, self.path, expected_head)

    def verify_blocking(self, expected_head: str | None = None) -> VerifyReport:
        """:func:`verify_log` on this witness's file (blocking)."""
        return verify_log(self.path, expected_head)

    # ------------------------------------------------------------ view

    async def get_for_viewing(self, output_id: UUID | str, viewer_id: str) -> AgentOutput:
        """The committed output, after checking its row, and a record of this view.

        Raises :class:`WitnessError` if the output was never committed or its row no
        longer matches its hashes (or holds values of the wrong type).
        """
        if not isinstance(viewer_id, str) or not viewer_id.strip():
            raise InvalidRequestError("viewer_id must be a non-empty string")
        return await self._in_thread(self._view, str(output_id), viewer_id)

    def _view(self, output_id: str, viewer_id: str) -> AgentOutput:
        raw = self._db.execute(
            f"{_TYPED_SELECT} FROM outputs WHERE output_id = ?", (output_id,)
        ).fetchone()
        if raw is None:
            raise WitnessError(f"FR9: output {output_id} was never committed; it cannot be viewed")
        row, problem = _decode_row(raw)
        tampered = WitnessError(
            f"FR9: output {output_id} (sequence {row['sequence']}) was tampered with"
        )
        if (problem or _row_problem(row)) is not None:
            raise tampered
        try:
            output = AgentOutput(
                agent_id=row["agent_id"],
                request_id=UUID(row["request_id"]),
                content=row["content"],
                content_type=row["content_type"],
                output_id=UUID(row["output_id"]),
                generated_at=datetime.fromisoformat(row["generated_at"]),
                batch_id=UUID(row["batch_id"]) if row["batch_id"] else None,
                metadata=json.loads(row["metadata"]),
            )
        except ValueError:  # a consistent forgery of fields no writer produces
            raise tampered from None
        self._db.execute(
            "INSERT INTO views (output_id, sequence, viewer_id, viewed_at) VALUES (?, ?, ?, ?)",
            (output_id, row["sequence"], viewer_id, utc_now().isoformat()),
        )
        return output

    async def views(self, output_id: UUID | str) -> list[tuple[str, datetime]]:
        """Who viewed an output, and when."""
        rows = await self._in_thread(
            lambda: self._db.execute(
                "SELECT viewer_id, viewed_at FROM views WHERE output_id = ? ORDER BY id",
                (str(output_id),),
            ).fetchall()
        )
        return [(r[0], datetime.fromisoformat(r[1])) for r in rows]

    async def count(self) -> int:
        row = await self._in_thread(
            lambda: self._db.execute("SELECT COUNT(*) FROM outputs").fetchone()
        )
        return int(row[0])
