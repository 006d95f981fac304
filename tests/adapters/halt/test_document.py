"""The halt document: one codec, one rule set, for the file and the Valkey channel alike.

The specification here (:func:`expected_reading`) is written independently of the codec;
the property runs it against the codec directly, and tests/test_halt_file_fail_closed.py
runs it against the file channel (which reads every byte through the codec).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.halt_doc import (
    SCHEMA,
    CorruptHaltDocument,
    HaltDocument,
    encode_document,
    encode_record,
    parse_document,
    parse_record,
)
from kernel import HaltRecord


def expected_reading(content: bytes) -> str:
    """The rules, written independently of the codec: "clear" or "halted" for a
    well-formed document (strict UTF-8 JSON, no NaN, our schema, right types at every
    level, a halted document with a non-blank reason), else "corrupt"."""

    def no_constant(name: str) -> None:
        raise ValueError(name)

    def is_time(value: object) -> bool:
        try:
            datetime.fromisoformat(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return False
        return True

    def good_record(r: object) -> bool:
        return (
            isinstance(r, dict)
            and r.get("action") in ("halt", "clear")
            and isinstance(r.get("reason"), str)
            and is_time(r.get("at"))
            and isinstance(r.get("approvers", []), list)
            and all(isinstance(a, str) for a in r.get("approvers", []))
        )

    try:
        doc = json.loads(content.decode("utf-8"), parse_constant=no_constant)
    except (ValueError, RecursionError):
        return "corrupt"
    if not (
        isinstance(doc, dict)
        and doc.get("schema") == "conclave.halt/1"
        and isinstance(doc.get("halted"), bool)
        and (doc.get("reason") is None or isinstance(doc.get("reason"), str))
        and isinstance(doc.get("history", []), list)
        and all(good_record(r) for r in doc.get("history", []))
    ):
        return "corrupt"
    if doc["halted"] and not (doc.get("reason") or "").strip():
        return "corrupt"
    return "halted" if doc["halted"] else "clear"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=12,
)
records = st.fixed_dictionaries(
    {},
    optional={
        "action": st.sampled_from(["halt", "clear"]) | json_values,
        "reason": st.text(max_size=6) | json_values,
        "at": st.just("2026-01-01T00:00:00+00:00") | st.just("2026-01-01T00:00:00") | json_values,
        "approvers": st.lists(st.text(max_size=4), max_size=3) | json_values,
    },
)
documents = st.fixed_dictionaries(
    {},
    optional={
        "schema": st.just("conclave.halt/1") | json_values,
        "halted": st.booleans() | json_values,
        "reason": st.none() | st.sampled_from(["", " ", "why"]) | st.text(max_size=6) | json_values,
        "history": st.lists(records, max_size=3) | json_values,
        "updated_at": json_values,
    },
)
#: Any bytes a halt file or key could hold, biased towards nearly-right documents.
contents = (
    st.binary(max_size=300)
    | json_values.map(lambda v: json.dumps(v).encode())
    | documents.map(lambda v: json.dumps(v).encode())
    | documents.map(lambda v: json.dumps({"schema": SCHEMA, **v}).encode())
    | documents.map(lambda v: json.dumps(v, ensure_ascii=False).encode("utf-8"))
    | documents.map(lambda v: json.dumps(v).encode("utf-16"))
    | documents.map(lambda v: b"\xef\xbb\xbf" + json.dumps(v).encode())
)


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
    history = (HaltRecord("halt", "storm", at), HaltRecord("clear", "calm", at, ("a", "b")))
    for indent in (None, 2):
        assert parse_document(encode_document(True, "storm", history, indent=indent)) == (
            HaltDocument(True, "storm", history)
        )
    # The Valkey key carries no history (it is a list beside the key).
    without = json.loads(encode_document(False, "ignored"))
    assert without["reason"] is None and "history" not in without
    assert parse_document(encode_document(False, None)) == HaltDocument(False, None)
    assert parse_record(encode_record(history[1])) == history[1]


@pytest.mark.parametrize(
    "record",
    [b"[]", b'{"action": "resume", "reason": "r", "at": "2026-01-01"}', b"\xff", b""],
)
def test_a_record_that_is_not_one_is_corrupt(record: bytes) -> None:
    with pytest.raises(CorruptHaltDocument):
        parse_record(record)
