"""Domain types: validated at construction, immutable, hashable."""

from __future__ import annotations

import hashlib
import itertools
import pickle
import tracemalloc
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import Any
from uuid import uuid4

import attrs
import pytest

from kernel import (
    MAX_METADATA_BYTES,
    MAX_METADATA_ENTRIES,
    MAX_TOPIC_BYTES,
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


# ---------------------------------------------------------------- size limits


def test_a_topic_of_exactly_the_limit_is_accepted_and_one_byte_more_is_refused() -> None:
    assert len(ContextBundle("t", "a" * MAX_TOPIC_BYTES).topic_content) == MAX_TOPIC_BYTES
    with pytest.raises(InvalidRequestError, match=r"topic_content .* at most 1,048,576 bytes"):
        ContextBundle("t", "a" * (MAX_TOPIC_BYTES + 1))


@pytest.mark.parametrize("char", ["é", "€", "𝄞", "\ud800"])
def test_the_topic_limit_counts_utf8_bytes_not_characters(char: str) -> None:
    width = len(char.encode("utf-8", "surrogatepass"))
    fits = char * (MAX_TOPIC_BYTES // width)
    assert ContextBundle("t", fits).topic_content == fits
    over = char * (MAX_TOPIC_BYTES // width + 1)
    assert len(over) < MAX_TOPIC_BYTES  # under the limit in characters, over it in bytes
    with pytest.raises(InvalidRequestError, match="topic_content"):
        ContextBundle("t", over)


def test_a_huge_topic_is_refused_without_a_copy_of_it() -> None:
    topic = "é" * (8 * MAX_TOPIC_BYTES)  # 8 Mi characters, 16 MiB of UTF-8
    tracemalloc.start()
    try:
        with pytest.raises(InvalidRequestError, match="topic_content"):
            ContextBundle("t", topic)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < MAX_TOPIC_BYTES // 4, peak


def test_metadata_up_to_the_limit_is_accepted_and_beyond_it_refused() -> None:
    # 64 entries of 1 KiB (key and value together): exactly the limit.
    fits = {f"k{i:03d}": "v" * (1024 - 4) for i in range(64)}
    assert sum(len(k) + len(v) for k, v in fits.items()) == MAX_METADATA_BYTES
    assert ContextBundle("t", "c", fits).metadata == fits
    with pytest.raises(InvalidRequestError, match=r"metadata .* at most 65,536 bytes"):
        ContextBundle("t", "c", {**fits, "x": ""})
    with pytest.raises(InvalidRequestError, match="metadata"):
        ContextBundle("t", "c", {"k": "é" * (MAX_METADATA_BYTES // 2)})  # bytes, not chars


def test_metadata_with_too_many_entries_is_refused_before_it_is_read() -> None:
    class Endless(Mapping[str, str]):
        """As many empty entries as it likes; reading one is a test failure."""

        def __len__(self) -> int:
            return 10**9

        def __getitem__(self, key: str) -> str:
            raise AssertionError("read")

        def __iter__(self) -> Iterator[str]:
            raise AssertionError("read")

    with pytest.raises(InvalidRequestError, match=r"metadata .* at most 1,024 entries"):
        ContextBundle("t", "c", Endless())
    many = {str(i): "" for i in range(MAX_METADATA_ENTRIES + 1)}  # no bytes to speak of
    with pytest.raises(InvalidRequestError, match="entries"):
        ContextBundle("t", "c", many)
    del many["0"]
    assert len(ContextBundle("t", "c", many).metadata) == MAX_METADATA_ENTRIES


class _Small(str):
    """A str that says it is one ASCII character, whatever it holds."""

    __slots__ = ()

    def __len__(self) -> int:
        return 1

    def isascii(self) -> bool:
        return True

    def encode(self, *_args: object, **_kwargs: object) -> bytes:
        return b"x"


def test_a_topic_that_lies_about_its_size_is_measured_by_what_it_holds() -> None:
    with pytest.raises(InvalidRequestError, match="topic_content"):
        ContextBundle("t", _Small("a" * (MAX_TOPIC_BYTES + 1)))
    kept = ContextBundle("t", _Small("fits")).topic_content
    assert type(kept) is str and kept == "fits"  # a plain str: no method of the caller's left


def test_metadata_that_lies_about_its_size_is_measured_by_what_it_holds() -> None:
    with pytest.raises(InvalidRequestError, match="metadata"):
        ContextBundle("t", "c", {"k": _Small("v" * (MAX_METADATA_BYTES + 1))})
    with pytest.raises(InvalidRequestError, match="metadata"):
        ContextBundle("t", "c", {_Small("k" * (MAX_METADATA_BYTES + 1)): "v"})
    kept = ContextBundle("t", "c", {_Small("k"): _Small("v")}).metadata
    assert [(type(k), type(v)) for k, v in kept.items()] == [(str, str)]


def test_metadata_is_kept_as_it_was_checked_by_a_mapping_that_changes_when_read_again() -> None:
    class Shifty(Mapping[str, str]):
        """Small the first time it is read, huge every time after."""

        reads = 0

        def __len__(self) -> int:
            return 1

        def __iter__(self) -> Iterator[str]:
            return iter(["k"])

        def __getitem__(self, key: str) -> str:
            Shifty.reads += 1
            return "v" if Shifty.reads == 1 else "v" * (8 * MAX_METADATA_BYTES)

    try:
        kept = ContextBundle("t", "c", Shifty()).metadata
    except InvalidRequestError:
        return  # refused: as good
    assert dict(kept) == {"k": "v"}


def test_metadata_whose_length_lies_is_refused_past_the_entry_limit() -> None:
    class Lying(Mapping[str, str]):
        """Says it has one entry; yields the same empty key (no bytes) over and over."""

        def __len__(self) -> int:
            return 1

        def __iter__(self) -> Iterator[str]:
            return itertools.repeat("", 10**6)  # for ever, as far as a check can tell

        def __getitem__(self, key: str) -> str:
            return ""

    with pytest.raises(InvalidRequestError, match=r"at most 1,024 entries"):
        ContextBundle("t", "c", Lying())


def test_a_frozen_map_subclass_as_metadata_is_kept_as_a_plain_frozen_map() -> None:
    from kernel._frozenmap import FrozenMap

    class Sub(FrozenMap[str]):
        __slots__ = ()

        def __getitem__(self, key: str) -> str:
            return "v" * (8 * MAX_METADATA_BYTES)

    try:
        kept = ContextBundle("t", "c", Sub({"k": "v"})).metadata
    except InvalidRequestError:
        return  # refused: as good
    assert type(kept) is FrozenMap and kept["k"] == "v"
