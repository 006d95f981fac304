"""The halt document (schema ``conclave.halt/1``): one codec, one rule set, for every
durable halt channel (the file and the Valkey key).

**Reading is strict.**  A document is exactly what this module writes; anything else is
:class:`CorruptHaltDocument`, which every channel reads as *halted* (fail-closed):

* UTF-8 JSON (no BOM), an object, no key twice, no ``NaN``/``Infinity``;
* ``"schema": "conclave.halt/1"`` -- required: a document without it was not written here;
* ``"halted"``: ``true`` or ``false``;
* ``"reason"``: null or text; a *halted* document needs a non-blank reason (every writer
  gives one: a halt without a reason was not written here, and must not become a halt
  two approvers clear without knowing what it was);
* ``"halt_id"`` (optional): text naming this halt, so a signed approval can name the
  halt it clears; every writer gives each halt a new one.  A halted document without
  one (written before ids existed) is named by a hash of its bytes, which change with
  every write;
* ``"signed_clears"`` (optional): ``{"allowed_signers": path, "revoked": path or null}``,
  the signer files of the first tool with an allowed-signers file that wrote the document;
  every writer keeps it, and every tool then refuses a clear by typed names, and one
  verified against other files (the rule must not depend on the clearing operator's
  choice of flags);
* ``"history"`` (optional: the file keeps its history here, the Valkey channel in a list
  beside the key): a list of records;
* ``"updated_at"`` and any other key: ignored.

A record: ``{"action": "halt" | "clear", "reason": text, "at": ISO 8601 (naive = UTC),
"approvers": [text, ...], "fingerprints": [text, ...], "halt_id": text}`` (the last three
optional).  Text is valid Unicode (JSON can
smuggle lone surrogates: refused).

What is too large to read is each channel's own limit (a file carries its history, a key
does not); so is what a channel does with a corrupt document (keep it aside, refuse to
clear it).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, NoReturn

import attrs

from kernel import HaltRecord, utc_now

__all__ = [
    "SCHEMA",
    "CorruptHaltDocument",
    "HaltDocument",
    "SignedClears",
    "encode_document",
    "encode_record",
    "encode_signed_clears",
    "new_halt_id",
    "parse_document",
    "parse_record",
]

SCHEMA = "conclave.halt/1"


class CorruptHaltDocument(ValueError):
    """The bytes are not a halt document (or record); the text says what is wrong, never
    what the bytes were."""


@attrs.frozen(slots=True)
class HaltDocument:
    """A well-formed document: ``reason`` is None exactly when not halted."""

    halted: bool
    reason: str | None
    history: tuple[HaltRecord, ...] = ()
    halt_id: str | None = None  # None exactly when not halted
    signed_clears: SignedClears | None = None  # clears need approvals checked against these


@attrs.frozen(slots=True)
class SignedClears:
    """The signer files a channel's clears are verified against (absolute paths)."""

    allowed_signers: str
    revoked: str | None = None


def parse_document(raw: bytes) -> HaltDocument:
    """The document in ``raw``; raises :class:`CorruptHaltDocument` on anything else."""
    doc = _load(raw, "document")
    if not isinstance(doc, dict):
        raise CorruptHaltDocument(f"top level is {_kind(doc)}, not an object")
    if doc.get("schema") != SCHEMA:
        raise CorruptHaltDocument(f"the schema is not {SCHEMA!r}")
    halted = doc.get("halted")
    if not isinstance(halted, bool):
        raise CorruptHaltDocument(f"'halted' is {_kind(halted)}, not true or false")
    reason = doc.get("reason")
    if reason is not None:
        reason = _text(reason, "'reason'")
    if halted and (reason is None or not reason.strip()):
        raise CorruptHaltDocument("halted without a reason")
    history = doc.get("history", [])
    if not isinstance(history, list):
        raise CorruptHaltDocument(f"'history' is {_kind(history)}, not a list")
    records = tuple(_record(r, f"history[{i}]") for i, r in enumerate(history))
    halt_id = doc.get("halt_id")
    if halt_id is not None:
        halt_id = _text(halt_id, "'halt_id'")
        if not halt_id.strip():
            raise CorruptHaltDocument("'halt_id' is blank")
    if halted and halt_id is None:
        halt_id = "legacy-" + hashlib.sha256(raw).hexdigest()[:32]
    return HaltDocument(
        halted,
        reason if halted else None,
        records,
        halt_id if halted else None,
        _signed_clears(doc.get("signed_clears")),
    )


def _signed_clears(raw: object) -> SignedClears | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) != {"allowed_signers", "revoked"}:
        raise CorruptHaltDocument("'signed_clears' is not an object of allowed_signers, revoked")
    allowed = _text(raw["allowed_signers"], "'signed_clears.allowed_signers'")
    revoked = raw["revoked"]
    if revoked is not None:
        revoked = _text(revoked, "'signed_clears.revoked'")
    return SignedClears(allowed, revoked)


def new_halt_id() -> str:
    """A new halt's id: never reused, so an approval for one halt clears no other."""
    return uuid.uuid4().hex


def parse_record(raw: bytes) -> HaltRecord:
    """One history record stored on its own; raises :class:`CorruptHaltDocument`."""
    return _record(_load(raw, "record"), "a record")


def encode_document(
    halted: bool,
    reason: str | None,
    history: Sequence[HaltRecord] | None = None,
    *,
    halt_id: str | None = None,
    signed_clears: SignedClears | None = None,
    indent: int | None = None,
) -> bytes:
    """The document; ``history`` None leaves the key out (it is kept elsewhere)."""
    doc: dict[str, object] = {
        "schema": SCHEMA,
        "halted": halted,
        "reason": reason if halted else None,
        "updated_at": utc_now().isoformat(),
    }
    if halted and halt_id is not None:
        doc["halt_id"] = halt_id
    if signed_clears is not None:
        doc["signed_clears"] = encode_signed_clears(signed_clears)
    if history is not None:
        doc["history"] = [_record_dict(r) for r in history]
    text = json.dumps(doc, indent=indent)
    return (text + "\n" if indent is not None else text).encode()


def encode_signed_clears(files: SignedClears) -> dict[str, str | None]:
    return {"allowed_signers": files.allowed_signers, "revoked": files.revoked}


def encode_record(record: HaltRecord) -> bytes:
    return json.dumps(_record_dict(record)).encode()


def _record_dict(record: HaltRecord) -> dict[str, object]:
    entry: dict[str, object] = {
        "action": record.action,
        "reason": record.reason,
        "at": record.at.isoformat(),
        "approvers": list(record.approvers),
    }
    if record.fingerprints:
        entry["fingerprints"] = list(record.fingerprints)
    if record.halt_id is not None:
        entry["halt_id"] = record.halt_id
    return entry


def _load(raw: bytes, what: str) -> object:
    if not raw.strip():
        raise CorruptHaltDocument("the value is empty")
    try:
        return json.loads(
            raw.decode("utf-8"),  # strict: UTF-8, without a BOM
            object_pairs_hook=_no_duplicate_keys,
            parse_constant=_no_constant,
        )
    except CorruptHaltDocument:
        raise
    except Exception as exc:
        # Whatever the parser raised: not UTF-8, not JSON, RecursionError (deep nesting),
        # int-size limits, MemoryError's kin...  Its type only: its text may quote content.
        raise CorruptHaltDocument(f"not a JSON {what} ({type(exc).__name__})") from None


def _record(raw: object, where: str) -> HaltRecord:
    if not isinstance(raw, dict):
        raise CorruptHaltDocument(f"{where} is {_kind(raw)}, not an object")
    action = raw.get("action")
    if action not in ("halt", "clear"):
        raise CorruptHaltDocument(f"{where}.action is not 'halt' or 'clear'")
    reason = _text(raw.get("reason"), f"{where}.reason")
    try:
        at = datetime.fromisoformat(_text(raw.get("at"), f"{where}.at"))
    except ValueError:
        raise CorruptHaltDocument(f"{where}.at is not an ISO 8601 timestamp") from None
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)  # as the kernel does: naive means UTC
    approvers = raw.get("approvers", [])
    if not isinstance(approvers, list):
        raise CorruptHaltDocument(f"{where}.approvers is {_kind(approvers)}, not a list")
    names = tuple(_text(a, f"{where}.approvers[{i}]") for i, a in enumerate(approvers))
    fingerprints = raw.get("fingerprints", [])
    if not isinstance(fingerprints, list):
        raise CorruptHaltDocument(f"{where}.fingerprints is {_kind(fingerprints)}, not a list")
    keys = tuple(_text(f, f"{where}.fingerprints[{i}]") for i, f in enumerate(fingerprints))
    halt_id = raw.get("halt_id")
    if halt_id is not None:
        halt_id = _text(halt_id, f"{where}.halt_id")
    if action == "halt":
        return HaltRecord("halt", reason, at, names, keys, halt_id)
    return HaltRecord("clear", reason, at, names, keys, halt_id)


def _text(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise CorruptHaltDocument(f"{where} is {_kind(value)}, not a string")
    try:
        value.encode("utf-8")  # JSON can smuggle lone surrogates ("\\ud800"); refuse them
    except UnicodeEncodeError:
        raise CorruptHaltDocument(f"{where} is not valid Unicode text") from None
    return value


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc = dict(pairs)
    if len(doc) != len(pairs):
        raise CorruptHaltDocument("a key appears twice in one object")
    return doc


def _no_constant(name: str) -> NoReturn:
    raise CorruptHaltDocument(f"{name} is not JSON")
