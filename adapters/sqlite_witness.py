"""FR9, commit before view: a hash-chained, append-only SQLite log of agent outputs.

Every output the kernel releases is first committed here: one row per output, with a
gap-free ``sequence`` and a ``chain_hash`` = SHA-256 over the previous row's chain hash
and a canonical encoding of this row (content hash included).  Editing, deleting,
reordering or inserting a row breaks the chain, and :meth:`SqliteWitness.verify` says
where.  :meth:`SqliteWitness.get_for_viewing` is the only sanctioned way to read an
output back: it refuses one that was never committed or whose row no longer verifies,
and records who viewed what.

Commits never block the trio loop: SQLite runs in a worker thread.  Concurrent commits
are grouped (group commit): while one transaction is being written, the commits that
arrive queue up and go together in the next, so a 72-agent batch costs a transaction
or two, not 72.  Sequence numbers are assigned inside the write transaction, so they
stay gap-free across concurrent batches and across processes sharing the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, TypeVar
from uuid import UUID

import attrs
import trio

from kernel import AgentOutput, CommitReceipt, ConclaveError, InvalidRequestError, utc_now

__all__ = ["GENESIS_HASH", "SqliteWitness", "VerifyReport", "WitnessError"]

log = logging.getLogger("adapters.sqlite_witness")

T = TypeVar("T")

GENESIS_HASH = "0" * 64

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


class WitnessError(ConclaveError):
    """The witness refused: an output not committed, a tampered row, an unusable log."""


@attrs.frozen(slots=True)
class VerifyReport:
    """What :meth:`SqliteWitness.verify` found.  ``first_bad_sequence`` is None when ok."""

    ok: bool
    records: int
    first_bad_sequence: int | None = None
    problem: str | None = None

    def __bool__(self) -> bool:
        return self.ok


def canonical_record(row: dict[str, Any]) -> bytes:
    """The bytes a row's chain hash covers: every field but the content itself (whose hash
    is covered) and the chain hash; JSON with sorted keys and no whitespace."""
    fields = {k: row[k] for k in _COLUMNS if k not in ("content", "chain_hash")}
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def chain_hash(prev_hash: str, row: dict[str, Any]) -> str:
    return hashlib.sha256(prev_hash.encode("ascii") + b"\n" + canonical_record(row)).hexdigest()


def _edit_in(row: dict[str, Any]) -> str | None:
    """What is wrong with a row on its own (its content or its chain hash), or None."""
    if hashlib.sha256(row["content"].encode("utf-8")).hexdigest() != row["content_hash"]:
        return "content does not match its content_hash (edited)"
    if chain_hash(row["prev_hash"], row) != row["chain_hash"]:
        return "record does not match its chain_hash (edited)"
    return None


class _Pending:
    __slots__ = ("done", "error", "output", "receipt")

    def __init__(self, output: AgentOutput) -> None:
        self.output = output
        self.done = trio.Event()
        self.receipt: CommitReceipt | None = None
        self.error: BaseException | None = None


class SqliteWitness:
    """An :class:`~kernel.OutputWitness` backed by an SQLite file in WAL mode.

    Args:
        path: the database file (created with its tables if missing).
        synchronous: SQLite's ``synchronous`` pragma.  ``"FULL"`` (default) makes each
            commit durable against power loss; ``"NORMAL"`` only against a crash of the
            process (faster on slow disks).

    Use ``async with SqliteWitness(path) as witness`` or call :meth:`aclose`.
    """

    def __init__(
        self, path: str | Path, *, synchronous: Literal["FULL", "NORMAL"] = "FULL"
    ) -> None:
        if synchronous not in ("FULL", "NORMAL"):
            raise InvalidRequestError(f"synchronous must be FULL or NORMAL, got {synchronous!r}")
        self.path = Path(path)
        db = None
        try:
            # One connection, used by one worker thread at a time (the lock below).
            db = sqlite3.connect(
                self.path, check_same_thread=False, isolation_level=None, timeout=30.0
            )
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={synchronous}")
            db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            if db is not None:
                db.close()
            raise WitnessError(f"{self.path}: cannot open witness log: {exc}") from None
        self._db = db
        self._db.row_factory = sqlite3.Row
        self._lock = trio.Lock()
        self._pending: list[_Pending] = []
        self._flushing = False
        self.transactions = 0  # how many write transactions (group commits) so far

    def __repr__(self) -> str:
        return f"<SqliteWitness {str(self.path)!r}>"

    async def __aenter__(self) -> SqliteWitness:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        async with self._lock:
            self._db.close()

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` in a worker thread, holding the connection (one user at a time)."""
        async with self._lock:
            return await trio.to_thread.run_sync(fn, *args)

    # ------------------------------------------------------------ commit (OutputWitness)

    async def commit(self, output: AgentOutput) -> CommitReceipt:
        """Append ``output`` to the chain; return once it is durable."""
        if not isinstance(output, AgentOutput):
            raise InvalidRequestError(
                f"can only witness an AgentOutput, got {type(output).__name__}"
            )
        pending = _Pending(output)
        self._pending.append(pending)
        if not self._flushing:
            # This task writes every queued commit, its own included, until none is left.
            self._flushing = True
            try:
                while self._pending:
                    group, self._pending = self._pending, []
                    await self._write_group(group)
            finally:
                self._flushing = False
        await pending.done.wait()
        if pending.error is not None:
            raise pending.error
        assert pending.receipt is not None
        return pending.receipt

    async def _write_group(self, group: list[_Pending]) -> None:
        # Shielded as a whole: the task that writes a group may belong to an agent a halt
        # is cancelling, but the other agents of the group are waiting for the answer, so
        # the group is written (a millisecond or two) before that cancellation lands.
        with trio.CancelScope(shield=True):
            try:
                receipts = await self._in_thread(self._append, group)
            except BaseException as exc:
                error: BaseException = exc
                if isinstance(exc, sqlite3.Error):
                    error = WitnessError(f"{self.path}: commit failed: {exc}")
                elif not isinstance(exc, Exception):
                    error = WitnessError("commit interrupted")
                for p in group:
                    p.error = error
                    p.done.set()
                if not isinstance(exc, Exception):
                    raise
                return
        for p, receipt in zip(group, receipts, strict=True):
            p.receipt = receipt
            p.done.set()

    def _append(self, group: list[_Pending]) -> list[CommitReceipt]:
        db = self._db
        db.execute("BEGIN IMMEDIATE")  # takes the write lock: sequence read + inserts are one step
        try:
            last = db.execute(
                "SELECT sequence, chain_hash FROM outputs ORDER BY sequence DESC LIMIT 1"
            ).fetchone()
            sequence, prev = (last["sequence"], last["chain_hash"]) if last else (0, GENESIS_HASH)
            committed_at = utc_now()
            receipts = []
            for p in group:
                out = p.output
                sequence += 1
                row = {
                    "sequence": sequence,
                    "output_id": str(out.output_id),
                    "agent_id": out.agent_id,
                    "request_id": str(out.request_id),
                    "batch_id": str(out.batch_id) if out.batch_id else None,
                    "content_hash": out.content_hash,
                    "content_type": out.content_type,
                    "generated_at": out.generated_at.isoformat(),
                    "committed_at": committed_at.isoformat(),
                    "metadata": json.dumps(dict(out.metadata), sort_keys=True),
                    "content": out.content,
                    "prev_hash": prev,
                }
                row["chain_hash"] = prev = chain_hash(prev, row)
                db.execute(
                    f"INSERT INTO outputs ({', '.join(_COLUMNS)}) "
                    f"VALUES ({', '.join('?' for _ in _COLUMNS)})",
                    [row[c] for c in _COLUMNS],
                )
                receipts.append(
                    CommitReceipt(out.output_id, out.content_hash, sequence, prev, committed_at)
                )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self.transactions += 1
        return receipts

    # ------------------------------------------------------------ verify

    async def verify(self, expected_head: str | None = None) -> VerifyReport:
        """Walk the whole chain; report the first broken record, if any.

        A chain only proves that its rows agree with each other: someone able to rewrite
        every row after an edit could make a consistent forgery.  Pass the chain hash of
        a receipt kept elsewhere as ``expected_head`` to also prove that the chain still
        ends (or passes) where it did.
        """
        return await self._in_thread(self.verify_blocking, expected_head)

    def verify_blocking(self, expected_head: str | None = None) -> VerifyReport:
        expected_seq, prev, count = 1, GENESIS_HASH, 0
        head_seen = expected_head is None
        for row in self._rows():
            seq = row["sequence"]
            problem = None
            if seq != expected_seq:
                problem = f"sequence {seq} where {expected_seq} was expected (missing or inserted)"
            elif row["prev_hash"] != prev:
                problem = "prev_hash does not match the previous record (deleted or reordered)"
            else:
                problem = _edit_in(row)
            if problem:
                log.error("witness chain broken", extra={"sequence": seq, "problem": problem})
                return VerifyReport(False, count, seq, problem)
            prev, expected_seq, count = row["chain_hash"], seq + 1, count + 1
            head_seen = head_seen or prev == expected_head
        if not head_seen:
            return VerifyReport(False, count, None, "the expected chain head is not in the log")
        return VerifyReport(True, count)

    def _rows(self) -> Iterator[dict[str, Any]]:
        cursor = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM outputs ORDER BY sequence")
        for r in cursor:
            yield dict(r)

    # ------------------------------------------------------------ view

    async def get_for_viewing(self, output_id: UUID | str, viewer_id: str) -> AgentOutput:
        """The committed output, after checking its row, and a record of this view.

        Raises :class:`WitnessError` if the output was never committed or its row no
        longer matches its hashes.
        """
        if not isinstance(viewer_id, str) or not viewer_id.strip():
            raise InvalidRequestError("viewer_id must be a non-empty string")
        return await self._in_thread(self._view, str(output_id), viewer_id)

    def _view(self, output_id: str, viewer_id: str) -> AgentOutput:
        row = self._db.execute(
            f"SELECT {', '.join(_COLUMNS)} FROM outputs WHERE output_id = ?", (output_id,)
        ).fetchone()
        if row is None:
            raise WitnessError(f"FR9: output {output_id} was never committed; it cannot be viewed")
        row = dict(row)
        if _edit_in(row) is not None:
            raise WitnessError(
                f"FR9: output {output_id} (sequence {row['sequence']}) was tampered with"
            )
        self._db.execute(
            "INSERT INTO views (output_id, sequence, viewer_id, viewed_at) VALUES (?, ?, ?, ?)",
            (output_id, row["sequence"], viewer_id, utc_now().isoformat()),
        )
        return AgentOutput(
            agent_id=row["agent_id"],
            request_id=UUID(row["request_id"]),
            content=row["content"],
            content_type=row["content_type"],
            output_id=UUID(row["output_id"]),
            generated_at=datetime.fromisoformat(row["generated_at"]),
            batch_id=UUID(row["batch_id"]) if row["batch_id"] else None,
            metadata=json.loads(row["metadata"]),
        )

    async def views(self, output_id: UUID | str) -> list[tuple[str, datetime]]:
        """Who viewed an output, and when."""
        rows = await self._in_thread(
            lambda: self._db.execute(
                "SELECT viewer_id, viewed_at FROM views WHERE output_id = ? ORDER BY id",
                (str(output_id),),
            ).fetchall()
        )
        return [(r["viewer_id"], datetime.fromisoformat(r["viewed_at"])) for r in rows]

    async def count(self) -> int:
        row = await self._in_thread(
            lambda: self._db.execute("SELECT COUNT(*) AS n FROM outputs").fetchone()
        )
        return int(row["n"])
