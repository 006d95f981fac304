"""The halt key's document and its history records: strict reading, plain writing.

Only a well-formed document whose ``halted`` is ``false`` reads as "not halted".  A
missing key reads as halted too (a new server, or one that lost its data, must not
silently lift a halt), and so does anything else: another type of key, a value that is
too large, not UTF-8, not JSON, JSON of the wrong shape, a duplicated key, an unknown
schema.

Document (the key)::

    {"schema": "conclave.halt/1", "halted": true, "reason": "...", "updated_at": "...Z"}

History (a list beside it, oldest first, at most :data:`MAX_HISTORY` entries)::

    {"action": "halt" | "clear", "reason": "...", "at": "...", "approvers": [...]}
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any, NoReturn

import attrs

from kernel import HaltRecord, utc_now

__all__ = [
    "MAX_HALT_BYTES",
    "MAX_HISTORY",
    "SCHEMA",
    "Corrupt",
    "HaltDocument",
    "encode_document",
    "encode_record",
    "parse_document",
    "parse_record",
]

SCHEMA = "conclave.halt/1"
#: A halt key larger than this reads as corrupt (halted) without being fetched.
MAX_HALT_BYTES = 64 * 1024
#: The history keeps this many records, dropping the oldest.
MAX_HISTORY = 1000


class Corrupt(Exception):
    """The value is not a halt document (or record); the text says what is wrong."""


@attrs.frozen(slots=True)
class HaltDocument:
    halted: bool
    reason: str | None


def parse_document(raw: bytes) -> HaltDocument:
    """The document in ``raw``, strictly; raises :class:`Corrupt` on anything else."""
    if not raw:
        raise Corrupt("the value is empty")
    try:
        doc = json.loads(
            raw.decode("utf-8"),
            object_pairs_hook=_no_duplicate_keys,
            parse_constant=_no_constant,
        )
    except Corrupt:
        raise
    except Exception as exc:  # not UTF-8, not JSON, nested too deeply, numbers too long...
        raise Corrupt(f"not a JSON document ({type(exc).__name__})") from None
    if not isinstance(doc, dict):
        raise Corrupt(f"top level is {_kind(doc)}, not an object")
    if doc.get("schema") != SCHEMA:
        raise Corrupt(f"the schema is not {SCHEMA!r}")
    halted = doc.get("halted")
    if not isinstance(halted, bool):
        raise Corrupt(f"'halted' is {_kind(halted)}, not true or false")
    reason = doc.get("reason")
    if reason is not None:
        reason = _text(reason, "'reason'")
    if halted and (reason is None or not reason.strip()):
        raise Corrupt("halted without a reason")
    return HaltDocument(halted, reason if halted else None)


def parse_record(raw: bytes) -> HaltRecord:
    """One history record, strictly; raises :class:`Corrupt` on anything else."""
    try:
        rec = json.loads(
            raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constant
        )
    except Corrupt:
        raise
    except Exception as exc:
        raise Corrupt(f"not a JSON record ({type(exc).__name__})") from None
    if not isinstance(rec, dict):
        raise Corrupt(f"a record is {_kind(rec)}, not an object")
    action = rec.get("action")
    if action not in ("halt", "clear"):
        raise Corrupt("a record's action is not 'halt' or 'clear'")
    reason = _text(rec.get("reason"), "a record's reason")
    try:
        at = datetime.fromisoformat(_text(rec.get("at"), "a record's time"))
    except ValueError:
        raise Corrupt("a record's time is not ISO 8601") from None
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    approvers = rec.get("approvers", [])
    if not isinstance(approvers, list):
        raise Corrupt("a record's approvers are not a list")
    names = tuple(_text(a, "an approver") for a in approvers)
    return HaltRecord("halt" if action == "halt" else "clear", reason, at, names)


def encode_document(halted: bool, reason: str | None) -> bytes:
    doc = {
        "schema": SCHEMA,
        "halted": halted,
        "reason": reason if halted else None,
        "updated_at": utc_now().isoformat(),
    }
    return json.dumps(doc).encode()


def encode_record(record: HaltRecord) -> bytes:
    rec = {
        "action": record.action,
        "reason": record.reason,
        "at": record.at.isoformat(),
        "approvers": list(record.approvers),
    }
    return json.dumps(rec).encode()


def _text(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise Corrupt(f"{where} is {_kind(value)}, not a string")
    try:
        value.encode("utf-8")  # JSON can smuggle lone surrogates ("\\ud800"); refuse them
    except UnicodeEncodeError:
        raise Corrupt(f"{where} is not valid Unicode text") from None
    return value


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc = dict(pairs)
    if len(doc) != len(pairs):
        raise Corrupt("a key appears twice in one object")
    return doc


def _no_constant(name: str) -> NoReturn:
    raise Corrupt(f"{name} is not JSON")
