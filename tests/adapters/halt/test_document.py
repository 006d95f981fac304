"""The halt document: one codec, one rule set, for the file and the Valkey channel alike.

The specification (:func:`tests.support.halt_documents.expected_reading`) is written
independently of the codec; the property runs it against the codec directly, and
test_file.py runs it against the file channel (which reads every byte through the codec).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings

from adapters.halt.document import (
    SCHEMA,
    CorruptHaltDocument,
    HaltDocument,
    SignedClears,
    encode_document,
    encode_record,
    parse_document,
    parse_record,
)
from kernel import HaltRecord
from tests.support.halt_documents import contents, expected_reading


@settings(max_examples=500, deadline=None)
@given(contents)
def test_any_bytes_parse_as_the_rules_say_or_are_refused_as_corrupt(content: bytes) -> None:
    expected = expected_reading(content)
    if expected == "corrupt":
        with pytest.raises(CorruptHaltDocument):  # and never any other exception
            parse_document(content)
        return
    doc = parse_document(content)
    assert doc.halted == (expected == "halted")
    assert (doc.reason is not None) == doc.halted  # a reason exactly when halted
    assert doc.reason is None or doc.reason.strip()
    for record in doc.history:
        assert record.action in ("halt", "clear") and isinstance(record.reason, str)
        assert record.at.tzinfo is not None


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b'{"halted": false}', "schema"),
        (b'{"schema": "conclave.halt/1", "halted": true}', "without a reason"),
        (b'{"schema": "conclave.halt/1", "halted": true, "reason": null}', "without a reason"),
        (b'{"schema": "conclave.halt/1", "halted": true, "reason": "  "}', "without a reason"),
        (b'{"schema": "conclave.halt/1", "halted": false, "halted": false}', "twice"),
        (b'{"schema": "conclave.halt/1", "halted": false, "x": NaN}', "NaN"),
        (b"[" * 100_000 + b"]" * 100_000, "RecursionError"),
        (b" \n", "empty"),
    ],
)
def test_what_no_writer_writes_is_corrupt_and_the_problem_is_named(
    content: bytes, problem: str
) -> None:
    """One rule set for both channels: a document without the schema, or halted without
    a reason, is not one of ours (the file channel read both as valid before)."""
    with pytest.raises(CorruptHaltDocument, match=problem):
        parse_document(content)


def test_what_the_writers_write_reads_back_as_written() -> None:
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    history = (
        HaltRecord("halt", "storm", at, ("carol",), ("SHA256:c",), "h1"),
        HaltRecord("clear", "calm", at, ("a", "b"), ("SHA256:a", "SHA256:b"), "h1"),
        HaltRecord("clear", "typed names", at, ("a", "b")),
    )
    for indent in (None, 2):
        raw = encode_document(True, "storm", history, halt_id="h2", indent=indent)
        assert parse_document(raw) == HaltDocument(True, "storm", history, "h2")
    # The Valkey key carries no history (it is a list beside the key).
    without = json.loads(encode_document(False, "ignored"))
    assert without["reason"] is None and "history" not in without
    assert parse_document(encode_document(False, None)) == HaltDocument(False, None)
    assert all(parse_record(encode_record(record)) == record for record in history)


def test_a_halt_written_without_an_id_is_named_by_its_bytes_so_each_rewrite_is_another_halt() -> (
    None
):
    first = encode_document(True, "storm")
    again = parse_document(first).halt_id
    assert again is not None and again == parse_document(first).halt_id
    rewritten = first.replace(b'"updated_at": "', b'"updated_at": "1')
    assert parse_document(rewritten).halt_id != again
    assert parse_document(encode_document(False, None, halt_id="h1")).halt_id is None


@pytest.mark.parametrize("halt_id", ["", "  ", 7, ["h"]])
def test_a_halt_id_that_is_not_text_is_corrupt(halt_id: object) -> None:
    doc = {"schema": SCHEMA, "halted": True, "reason": "storm", "halt_id": halt_id}
    with pytest.raises(CorruptHaltDocument):
        parse_document(json.dumps(doc).encode())


@pytest.mark.parametrize(
    "record",
    [b"[]", b'{"action": "resume", "reason": "r", "at": "2026-01-01"}', b"\xff", b""],
)
def test_a_record_that_is_not_one_is_corrupt(record: bytes) -> None:
    with pytest.raises(CorruptHaltDocument):
        parse_record(record)


def test_a_document_records_the_signer_files_its_clears_need_or_is_corrupt() -> None:
    files = SignedClears("/etc/conclave/allowed_signers", "/etc/conclave/revoked")
    raw = encode_document(True, "storm", halt_id="h1", signed_clears=files)
    assert parse_document(raw).signed_clears == files
    cleared = encode_document(False, None, signed_clears=SignedClears("/a"))
    assert parse_document(cleared).signed_clears == SignedClears("/a", None)
    assert parse_document(encode_document(False, None)).signed_clears is None
    for value in (True, "/a", {"allowed_signers": "/a"}, {"allowed_signers": 1, "revoked": None}):
        doc = {"schema": SCHEMA, "halted": False, "reason": None, "signed_clears": value}
        with pytest.raises(CorruptHaltDocument, match="'signed_clears"):
            parse_document(json.dumps(doc).encode())
