"""FR9, commit before view: :class:`SqliteWitness`, a hash-chained, append-only SQLite log.

Every output the kernel releases is first committed here (:meth:`SqliteWitness.commit`),
and :meth:`SqliteWitness.get_for_viewing` is the only sanctioned way to read one back: it
refuses one that was never committed or whose row no longer verifies, and records who
viewed what.

The witness is three modules, one concept each; this one opens a log and holds the
public API (every public name is importable from here):

* :mod:`adapters.witness._chain`: the row format, the hash chain, and the read-only
  audit :func:`verify_log` (an audit never writes to what it audits).
* :mod:`adapters.witness._writer`: group commit on one writer thread, and the point of
  no return that lets a cancelled commit return at once, however locked the database.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import stat
import threading
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, TypeVar
from uuid import UUID

import trio

from adapters.witness._chain import (
    GENESIS_HASH,
    ONE_OUTPUT_PER_AGENT,
    OUTPUTS_SCHEMA,
    VerifyReport,
    WitnessError,
    check_is_witness_log,
    decoded_rows,
    log_head,
    open_readonly,
    recorded_output,
    verify_log,
)
from adapters.witness._chain import canonical_record as canonical_record  # public, as before
from adapters.witness._chain import chain_hash as chain_hash  # public, as before
from adapters.witness._writer import (
    BATCH_RUNS_SCHEMA,
    BUSY_SLICE_S,
    GroupCommitter,
    WitnessStatistics,
)
from kernel import AgentOutput, CommitReceipt, InvalidRequestError, RecordedBatch, utc_now
from kernel.validate import check_seconds

__all__ = [
    "BUSY_SLICE_S",
    "GENESIS_HASH",
    "SqliteWitness",
    "VerifyReport",
    "WitnessError",
    "WitnessStatistics",
    "log_head",
    "verify_log",
]

T = TypeVar("T")

log = logging.getLogger("adapters.witness.sqlite")

#: The log's schema version (SQLite's ``user_version``).  1 (stored as 0): the outputs
#: and views tables.  2: one output per agent of a batch (a unique index), and the
#: ``batch_runs`` table.  Opening an older log migrates it in place; a newer one is
#: refused (this code would not keep its rules).
SCHEMA_VERSION = 2

# The files SQLite keeps beside a log, by the path it derives from the log's.
_SIDE_FILES = ("-wal", "-shm", "-journal")

# Who viewed what (the outputs table belongs to the chain).
_VIEWS_SCHEMA = """
CREATE TABLE IF NOT EXISTS views (
    id         INTEGER PRIMARY KEY,
    output_id  TEXT NOT NULL,
    sequence   INTEGER NOT NULL,
    viewer_id  TEXT NOT NULL,
    viewed_at  TEXT NOT NULL
);
"""


def _claim_file(path: Path) -> tuple[int, int] | None:
    """Make sure the log and its side files are reached without a symbolic link, and
    create a new log private (0600, whatever the umask; SQLite gives its -wal and -shm
    files the log's mode).  Returns the log's (device, inode), None if it is not a file.

    A link planted at any of those paths (in a shared directory, by someone else) would
    make SQLite write every answer where the link points, creating the target if it is
    missing: refused, with nothing created or changed.  An existing log keeps its mode
    (an operator may have opened it to a group of auditors); a log that others can read
    is logged as a warning.
    """
    _check_directory(path)
    for suffix in ("", *_SIDE_FILES):
        side = Path(f"{path}{suffix}")
        if side.is_symlink():
            raise WitnessError(
                f"{side}: is a symbolic link; a witness log is never opened through one"
            )
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        pass
    except OSError as exc:
        raise WitnessError(f"{path}: cannot open witness log: {exc.strerror or exc}") from None
    else:
        try:
            os.fchmod(fd, 0o600)  # the umask may have taken bits away; never more than these
        finally:
            os.close(fd)
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise WitnessError(f"{path}: cannot open witness log: {exc.strerror or exc}") from None
    if stat.S_ISLNK(st.st_mode):  # planted between the check and now
        raise WitnessError(f"{path}: is a symbolic link; a witness log is never opened through one")
    if not stat.S_ISREG(st.st_mode):
        return None  # connect() says what it is
    if st.st_mode & 0o077:
        log.warning(
            "witness log is accessible to other users",
            extra={"witness_path": str(path), "mode": oct(stat.S_IMODE(st.st_mode))},
        )
    return st.st_dev, st.st_ino


def _check_directory(path: Path) -> None:
    """Refuse a log in a directory others can write to, unless it is sticky.

    The checks here and SQLite's open are two steps by name: whoever can rename entries
    in the directory can swap a link in between, and SQLite (which follows a link at
    the log's own path) would create or convert the link's target before the swap is
    seen.  In a sticky directory (like /tmp) others cannot rename or remove what this
    process created, and the kernel's protected_symlinks keeps their links from being
    followed.
    """
    directory = path.parent
    try:
        st = os.stat(directory)
    except OSError:
        return  # the open reports it
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
        raise WitnessError(
            f"{directory}: writable by other users (mode {stat.S_IMODE(st.st_mode):o}) and not "
            "sticky: anyone there could swap the witness log for a link while it is opened; "
            "keep it in a directory only its owner can write"
        )


def _check_still(path: Path, identity: tuple[int, int] | None) -> None:
    """After SQLite opened ``path`` by name: it was the file :func:`_claim_file` saw
    (not a link swapped in meanwhile)."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise sqlite3.OperationalError(f"the log vanished while opening: {exc}") from None
    if stat.S_ISLNK(st.st_mode) or (identity is not None and (st.st_dev, st.st_ino) != identity):
        raise sqlite3.OperationalError("the log was replaced while opening")


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
    db = open_readonly(path)
    try:
        with contextlib.suppress(sqlite3.DatabaseError):  # not SQLite: the check says so
            if db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0:
                return  # a database with nothing in it yet (another witness creating it)
        check_is_witness_log(db, path)
    finally:
        db.close()


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
        identity = _claim_file(self.path)
        _refuse_other_databases(self.path)
        db = batches = None
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
            _migrate(db, self.path)
            _check_still(self.path, identity)
            # Resume reads: their own connection, so that a read a halt abandons in its
            # thread never shares one with the next.
            batches = sqlite3.connect(
                self.path, check_same_thread=False, isolation_level=None, timeout=busy_timeout_s
            )
            self._committer = GroupCommitter(
                self.path, synchronous=synchronous, busy_timeout_s=self.busy_timeout_s
            )
        except (sqlite3.Error, WitnessError) as exc:
            for connection in (db, batches):
                if connection is not None:
                    connection.close()
            if isinstance(exc, WitnessError):
                raise
            raise WitnessError(f"{self.path}: cannot open witness log: {exc}") from None
        self._db = db
        self._lock = trio.Lock()
        self._batches = batches
        self._batches_lock = threading.Lock()

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
                # After a read abandoned by a halt has finished with the connection.
                await trio.to_thread.run_sync(self._close_batches)

    def _close_batches(self) -> None:
        with self._batches_lock:
            self._batches.close()

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

        Concurrent commits share transactions (group commit).  What a cancelled, failed
        or locked-out commit does is the point-of-no-return rule, stated in
        :mod:`adapters.witness._writer`.  Raises :class:`~kernel.InvalidRequestError`
        for anything but an :class:`~kernel.AgentOutput`.
        """
        if not isinstance(output, AgentOutput):
            raise InvalidRequestError(
                f"can only witness an AgentOutput, got {type(output).__name__}"
            )
        return await self._committer.commit(output)

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
        found = list(decoded_rows(self._db, "WHERE output_id = ?", (output_id,)))
        if not found:
            raise WitnessError(f"FR9: output {output_id} was never committed; it cannot be viewed")
        [(row, problem)] = found  # output_id is UNIQUE
        output = recorded_output(row, problem)
        if output is None:
            raise WitnessError(
                f"FR9: output {output_id} (sequence {row['sequence']}) was tampered with"
            )
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

    # ------------------------------------------------------------ batches (BatchLog)

    def begin_run(self, batch_id: UUID, requests: Mapping[str, str]) -> Callable[[], None]:
        """A run of ``batch_id`` starts with ``requests`` (agent id -> context
        fingerprint); it is written with the batch's first output committed before the
        returned function is called (see :mod:`adapters.witness._writer`).  Neither
        blocks."""
        if not isinstance(batch_id, UUID):
            raise InvalidRequestError(f"batch_id must be a UUID, got {type(batch_id).__name__}")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in requests.items()):
            raise InvalidRequestError("requests must map agent ids to context fingerprints")
        encoded = json.dumps(dict(requests), sort_keys=True, ensure_ascii=False)
        return self._committer.begin_run(batch_id, encoded)

    async def recorded_batch(self, batch_id: UUID) -> RecordedBatch | None:
        """What the log holds of ``batch_id``: its first run's request set, its committed
        outputs (each row checked against its own hashes), how many runs; None if
        nothing.  Raises :class:`WitnessError` if a row of the batch does not verify,
        rows are missing from the log (a gap in its sequence, or a recorded run with no
        output left) or the log cannot be read (a locked log: after ``busy_timeout_s``)."""
        if not isinstance(batch_id, UUID):
            raise InvalidRequestError(f"batch_id must be a UUID, got {type(batch_id).__name__}")
        return await self._batch_call(self._read_batch, batch_id)

    def _read_batch(self, batch_id: UUID) -> RecordedBatch | None:
        db = self._batches
        db.execute("BEGIN")  # one snapshot: the runs and the outputs agree
        try:
            runs = db.execute(
                "SELECT requests FROM batch_runs WHERE batch_id = ? ORDER BY run",
                (str(batch_id),),
            ).fetchall()
            rows = list(decoded_rows(db, "WHERE batch_id = ? ORDER BY sequence", (str(batch_id),)))
            # Sequences run 1, 2, ... without a gap: fewer rows than the last sequence
            # means rows were deleted, perhaps answers of this batch (which would be
            # paid for again, on a broken chain).  A count, not a full audit (verify).
            count, last = db.execute(
                "SELECT count(*), COALESCE(max(sequence), 0) FROM outputs"
            ).fetchone()
        finally:
            db.execute("ROLLBACK")
        if not runs and not rows:
            return None
        if count != last:
            raise WitnessError(
                f"{self.path}: {last - count} rows are missing from the log (a gap in its "
                f"sequence): batch {batch_id} is not resumed from it (audit it with `conclave "
                "verify`)"
            )
        if runs and not rows:  # a run is written in its first output's transaction
            raise WitnessError(
                f"{self.path}: the log records a run of batch {batch_id} but none of its "
                "outputs (deleted): the batch is not resumed from it"
            )
        outputs: dict[str, AgentOutput] = {}
        for row, problem in rows:
            output = recorded_output(row, problem)
            if output is None:
                raise WitnessError(
                    f"output {row['output_id']} of batch {batch_id} (sequence "
                    f"{row['sequence']}) does not verify: the batch is not resumed from it"
                )
            if output.agent_id in outputs:  # a log the unique index did not guard
                raise WitnessError(f"batch {batch_id} has two outputs of agent {output.agent_id!r}")
            outputs[output.agent_id] = output
        requests = _request_set(runs[0][0], batch_id) if runs else None
        return RecordedBatch(batch_id, requests, outputs, len(runs))

    async def _batch_call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn`` on the batch connection, in a worker thread a cancellation abandons
        (the thread finishes on its own; the next call waits for it)."""

        def locked() -> T:
            with self._batches_lock:
                return fn(*args)

        try:
            return await trio.to_thread.run_sync(locked, abandon_on_cancel=True)
        except sqlite3.Error as exc:
            raise WitnessError(f"{self.path}: {exc}") from None


def _request_set(encoded: object, batch_id: UUID) -> dict[str, str]:
    try:
        requests = json.loads(encoded) if isinstance(encoded, str) else None
    except ValueError:
        requests = None
    if not isinstance(requests, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in requests.items()
    ):
        raise WitnessError(f"the recorded request set of batch {batch_id} is unreadable")
    return requests


def _migrate(db: sqlite3.Connection, path: Path) -> None:
    """Bring a log to :data:`SCHEMA_VERSION` (a new one is created at it), in one
    transaction: a refused or killed migration leaves the log as it was."""
    (version,) = db.execute("PRAGMA user_version").fetchone()
    if version > SCHEMA_VERSION:
        raise WitnessError(
            f"{path}: witness log schema version {version} is newer than this code's "
            f"({SCHEMA_VERSION}); open it with a newer conclave-kernel"
        )
    if version == SCHEMA_VERSION:
        return
    db.execute("BEGIN IMMEDIATE")  # another process may be migrating it too: one at a time
    try:
        (version,) = db.execute("PRAGMA user_version").fetchone()
        for statement in (OUTPUTS_SCHEMA + _VIEWS_SCHEMA + BATCH_RUNS_SCHEMA).split(";"):
            if statement.strip():
                db.execute(statement)
        try:
            db.execute(ONE_OUTPUT_PER_AGENT.strip().rstrip(";"))
        except sqlite3.IntegrityError:
            _refuse_duplicates(db, path)
        if version < SCHEMA_VERSION:
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        db.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        raise


def _refuse_duplicates(db: sqlite3.Connection, path: Path) -> None:
    batch, agent = db.execute(
        "SELECT batch_id, agent_id FROM outputs WHERE batch_id IS NOT NULL "
        "GROUP BY batch_id, agent_id HAVING count(*) > 1 LIMIT 1"
    ).fetchone()
    # Legal when it was written: its chain verifies.  What it cannot be is written to.
    raise WitnessError(
        f"{path}: the log holds two outputs of one agent in one batch (agent {agent!r} "
        f"of batch {batch}, at least); it cannot take the one-output-per-agent rule. "
        "Keep it as it is (`conclave verify` still audits it) and write new runs to a "
        "new log"
    )
