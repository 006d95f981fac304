"""The witness log's hash chain: what a row is, how it is chained, and the read-only audit.

A log is one SQLite table ``outputs``, one row per committed output, with a gap-free
``sequence`` starting at 1 and a ``chain_hash`` = SHA-256 over the previous row's chain
hash (:data:`GENESIS_HASH` before the first row) and :func:`canonical_record` of this row,
which covers every field but the content itself (its ``content_hash`` is covered).
Editing, deleting, reordering or inserting a row breaks the chain, and :func:`verify_log`
says where.  (The same file holds the witness's ``views`` table, which is not chained.)

This module only knows rows: it writes one into an open transaction
(:func:`insert_row`), reads them back with their SQLite types checked
(:func:`decoded_rows`), and audits a file (:func:`verify_log`, whose docstring states
what an audit guarantees).  Transactions and threads belong to
:mod:`adapters.witness._writer`; opening a log for writing to
:class:`adapters.witness.sqlite.SqliteWitness`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sqlite3
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import attrs

from kernel import AgentOutput, ConclaveError, InvalidRequestError

__all__ = [
    "GENESIS_HASH",
    "OUTPUTS_SCHEMA",
    "VerifyReport",
    "WitnessError",
    "canonical_record",
    "chain_hash",
    "chain_tip",
    "check_is_witness_log",
    "decoded_rows",
    "insert_row",
    "open_readonly",
    "output_fields",
    "recorded_output",
    "verify_log",
]

# One logger for the whole witness (its name is what operators filter on).
log = logging.getLogger("adapters.witness.sqlite")

GENESIS_HASH = "0" * 64

OUTPUTS_SCHEMA = """
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
    #: The last record's chain hash when ok (None for an empty log): what a receipt
    #: keeps, to pass back as ``expected_head`` later.
    head: str | None = None

    def __bool__(self) -> bool:
        return self.ok


def canonical_record(row: dict[str, Any]) -> bytes:
    """The bytes a row's chain hash covers: every field but the content itself (whose hash
    is covered) and the chain hash; JSON with sorted keys and no whitespace."""
    fields = {k: row[k] for k in _COLUMNS if k not in ("content", "chain_hash")}
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def chain_hash(prev_hash: str, row: dict[str, Any]) -> str:
    return hashlib.sha256(prev_hash.encode("ascii") + b"\n" + canonical_record(row)).hexdigest()


# ---------------------------------------------------------------- writing a row


def output_fields(out: AgentOutput) -> dict[str, Any]:
    """The fields of ``out``'s row that do not depend on its place in the chain.

    Raises :class:`WitnessError` for a string field SQLite could not store as UTF-8.
    """
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


def chain_tip(db: sqlite3.Connection) -> tuple[int, str]:
    """The last row's sequence and chain hash (``(0, GENESIS_HASH)`` for an empty log)."""
    last = db.execute(
        "SELECT sequence, chain_hash FROM outputs ORDER BY sequence DESC LIMIT 1"
    ).fetchone()
    return (last[0], last[1]) if last else (0, GENESIS_HASH)


def insert_row(
    db: sqlite3.Connection,
    fields: dict[str, Any],
    sequence: int,
    prev_hash: str,
    committed_at: datetime,
) -> str:
    """Insert a row of :func:`output_fields` after the row whose chain hash is
    ``prev_hash``; return its own chain hash.  Raises ``sqlite3.IntegrityError`` (and
    inserts nothing) if its output id is already in the log."""
    row = {
        **fields,
        "sequence": sequence,
        "committed_at": committed_at.isoformat(),
        "prev_hash": prev_hash,
    }
    row["chain_hash"] = chain_hash(prev_hash, row)
    db.execute(
        f"INSERT INTO outputs ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' for _ in _COLUMNS)})",
        [row[c] for c in _COLUMNS],
    )
    return str(row["chain_hash"])


# ---------------------------------------------------------------- reading rows back

# Every column with its SQLite type; text comes back as raw bytes (decoded strictly
# below), so a row holding invalid UTF-8 is a finding, not a decoding exception.
_TYPED_SELECT = "SELECT " + ", ".join(
    f"typeof({c}), CASE typeof({c}) WHEN 'integer' THEN {c} END"
    if c == "sequence"
    else f"typeof({c}), CAST({c} AS BLOB)"
    for c in _COLUMNS
)


def decoded_rows(
    db: sqlite3.Connection, clause: str, params: tuple[Any, ...] = ()
) -> Iterator[tuple[dict[str, Any], str | None]]:
    """The rows ``SELECT ... FROM outputs <clause>`` finds, each as a dict and what is
    wrong with its types (or None).  A wrong-typed value is kept as SQLite returned it."""
    for raw in db.execute(f"{_TYPED_SELECT} FROM outputs {clause}", params):
        yield _decode_row(raw)


def _decode_row(raw: tuple[Any, ...]) -> tuple[dict[str, Any], str | None]:
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


def recorded_output(row: dict[str, Any], type_problem: str | None) -> AgentOutput | None:
    """The output a row from :func:`decoded_rows` records, or None if the row does not
    verify on its own: wrong types, content or chain hash not matching, or fields no
    writer produces (a consistent forgery)."""
    if type_problem is not None or _row_problem(row) is not None:
        return None
    try:
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
    except ValueError:
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
    db = open_readonly(path)
    try:
        check_is_witness_log(db, path)
        try:
            return _walk_chain(db, expected_head)
        except sqlite3.Error as exc:
            raise WitnessError(f"{path}: cannot read the witness log: {exc}") from None
    finally:
        db.close()


def open_readonly(path: Path) -> sqlite3.Connection:
    """A read-only connection to an existing regular file, as :func:`verify_log` opens
    it (``immutable`` when no side file is there).  Raises :class:`WitnessError`."""
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


def check_is_witness_log(db: sqlite3.Connection, path: Path) -> None:
    """Raise :class:`WitnessError` unless ``db`` has an ``outputs`` table with every
    witness column (``path`` is for the message)."""
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


def _walk_chain(db: sqlite3.Connection, expected_head: str | None) -> VerifyReport:
    expected_seq, prev, count = 1, GENESIS_HASH, 0
    head_seen = expected_head is None
    for row, problem in decoded_rows(db, "ORDER BY sequence"):
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
    return VerifyReport(True, count, head=prev if count else None)


def log_head(path: str | os.PathLike[str]) -> tuple[int, str] | None:
    """The last record's sequence number and chain hash, read-only, without walking the
    chain (None for an empty log).  Blocking.  Raises :class:`WitnessError` as
    :func:`verify_log` does for what is not a witness log."""
    path = Path(path)
    db = open_readonly(path)
    try:
        check_is_witness_log(db, path)
        row = db.execute(
            "SELECT sequence, chain_hash FROM outputs ORDER BY sequence DESC LIMIT 1"
        ).fetchone()
    except sqlite3.Error as exc:
        raise WitnessError(f"{path}: cannot read the witness log: {exc}") from None
    finally:
        db.close()
    return None if row is None else (int(row[0]), str(row[1]))
