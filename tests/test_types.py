"""Domain types: validated at construction, immutable, hashable."""

from __future__ import annotations

import hashlib
import pickle
from datetime import UTC, datetime
from typing import Any
from uuid import uuid4

import attrs
import pytest

from kernel import (
    AgentFailure,
    AgentOutput,
    AgentRequest,
    AgentStatus,
    AgentStatusInfo,
    ConcurrentResult,
    ContextBundle,
    FailureKind,
    InvalidRequestError,
    PoolStatus,
    utc_now,
)


def test_context_bundle_defaults_and_frozen_metadata() -> None:
    meta = {"lang": "en"}
    ctx = ContextBundle("t-1", "content", meta)
    meta["lang"] = "fr"
    assert ctx.metadata == {"lang": "en"}
    with pytest.raises(TypeError):
        ctx.metadata["lang"] = "de"  # type: ignore[index]
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        ctx.topic_id = "other"  # type: ignore[misc]
    assert ctx.created_at.tzinfo is not None
    assert ContextBundle("t", "c").bundle_id != ContextBundle("t", "c").bundle_id
    assert "content" not in repr(ctx)  # prompts stay out of reprs (and so out of logs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"topic_id": ""}, "topic_id"),
        ({"topic_id": "   "}, "topic_id"),
        ({"topic_id": 5}, "topic_id must be a str"),
        ({"topic_content": None}, "topic_content"),
        ({"metadata": {"k": 1}}, "str to str"),
        ({"metadata": [("k", "v")]}, "mapping"),
        ({"bundle_id": "not-a-uuid"}, "UUID"),
        ({"created_at": "2026-01-01"}, "created_at must be a datetime"),
    ],
)
def test_context_bundle_rejects_bad_fields(kwargs: dict[str, Any], match: str) -> None:
    base = {"topic_id": "t", "topic_content": "c"}
    with pytest.raises(InvalidRequestError, match=match):
        ContextBundle(**{**base, **kwargs})


def test_naive_timestamps_are_taken_as_utc() -> None:
    naive = datetime(2026, 1, 1, 12, 0)
    ctx = ContextBundle("t", "c", created_at=naive)
    assert ctx.created_at == naive.replace(tzinfo=UTC)
    out = AgentOutput("a", uuid4(), "x", generated_at=naive)
    assert out.generated_at.tzinfo is UTC


def test_agent_request_validation() -> None:
    ctx = ContextBundle("t", "c")
    with pytest.raises(InvalidRequestError, match="agent_id"):
        AgentRequest("", ctx)
    with pytest.raises(InvalidRequestError, match="context must be ContextBundle"):
        AgentRequest("a", "ctx")  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="request_id"):
        AgentRequest("a", ctx, request_id=123)  # type: ignore[arg-type]


def test_agent_output_hash_and_immutability() -> None:
    out = AgentOutput("a", uuid4(), "héllo", metadata={"tokens": 3, "model": "m", "t": 0.5})
    assert out.content_hash == hashlib.sha256("héllo".encode()).hexdigest()
    assert out.content_type == "text/plain"
    assert out.batch_id is None
    assert hash(out) == hash(attrs.evolve(out))
    assert {out, attrs.evolve(out)} == {out}
    assert "héllo" not in repr(out)
    with pytest.raises(InvalidRequestError, match=r"str \| int \| float"):
        AgentOutput("a", uuid4(), "x", metadata={"bad": [1]})
    with pytest.raises(InvalidRequestError):
        AgentOutput("a", uuid4(), b"bytes")  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError):
        AgentOutput("a", uuid4(), "x", batch_id="b")  # type: ignore[arg-type]


def test_types_are_hashable_and_picklable() -> None:
    ctx = ContextBundle("t", "c", {"a": "b"})
    req = AgentRequest("a", ctx)
    out = AgentOutput("a", req.request_id, "x")
    fail = AgentFailure("b", uuid4(), FailureKind.TIMEOUT, "", "too slow", 12.5)
    now = utc_now()
    result = ConcurrentResult(uuid4(), [out], [fail], now, now, 1.0)
    for value in (ctx, req, out, fail, result, PoolStatus(1, 71, 72)):
        assert hash(value) == hash(pickle.loads(pickle.dumps(value)))
        assert value == pickle.loads(pickle.dumps(value))
    assert result.outputs == (out,)  # lists become tuples


def test_concurrent_result_properties() -> None:
    now = utc_now()
    outs = [AgentOutput(a, uuid4(), a) for a in ("a", "c")]
    fails = [AgentFailure(a, uuid4(), FailureKind.ERROR, "E", "m", 0) for a in ("b", "d")]
    result = ConcurrentResult(uuid4(), outs, fails, now, now, 3.0)
    assert (result.success_count, result.failure_count, result.total_count) == (2, 2, 4)
    assert result.failed_agents == ("b", "d")
    with pytest.raises(InvalidRequestError, match="outputs items must be AgentOutput"):
        ConcurrentResult(uuid4(), fails, [], now, now, 1.0)
    with pytest.raises(InvalidRequestError, match="total_ms"):
        ConcurrentResult(uuid4(), [], [], now, now, -1.0)


def test_failure_validation() -> None:
    with pytest.raises(InvalidRequestError, match="kind"):
        AgentFailure("a", uuid4(), "error", "", "m", 0)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="elapsed_ms"):
        AgentFailure("a", uuid4(), FailureKind.ERROR, "", "m", float("nan"))


def test_status_types() -> None:
    status = PoolStatus(active_count=2, available_count=70, max_concurrent=72)
    assert status.as_dict() == {"active_count": 2, "available_count": 70, "max_concurrent": 72}
    info = AgentStatusInfo("a", AgentStatus.IDLE)
    assert info.last_invocation is None and info.last_error is None
    with pytest.raises(InvalidRequestError):
        AgentStatusInfo("a", "idle")  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError):
        PoolStatus(-1, 0, 72)


def test_stamp_output_equals_evolve() -> None:
    from kernel._types import stamp_output

    out = AgentOutput("a", uuid4(), "text", metadata={"k": 1})
    rid, bid = uuid4(), uuid4()
    stamped = stamp_output(out, rid, bid)
    assert stamped == attrs.evolve(out, request_id=rid, batch_id=bid)
    assert hash(stamped) == hash(attrs.evolve(out, request_id=rid, batch_id=bid))
    assert out.batch_id is None  # the original is untouched
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        stamped.content = "x"  # type: ignore[misc]
