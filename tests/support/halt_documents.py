"""The halt document's rules written independently of the codec
(:func:`expected_reading`), and hypothesis strategies for documents a channel may hold."""

from __future__ import annotations

import json
from datetime import datetime

from hypothesis import strategies as st

from adapters.halt.document import (
    SCHEMA,
)


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
