"""The kernel's domain types: immutable, validated at construction, hashable.

Every type here is an attrs frozen, slotted class.  Validation happens at the boundary,
when an instance is built, so the rest of the kernel can trust what it holds: an empty
id, a wrong type or a naive timestamp raises :class:`InvalidRequestError` and no
instance exists.  Mappings are copied into a :class:`FrozenMap`, so a caller that
mutates the dict it passed in changes nothing.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final, cast
from uuid import UUID, uuid4

import attrs

from kernel._errors import InvalidRequestError
from kernel._frozenmap import FrozenMap
from kernel.validate import check_utf8_size, integer, number, text, utf8_size

__all__ = [
    "scalar_map",
    "MAX_CONCURRENT_AGENTS",
    "MAX_METADATA_BYTES",
    "MAX_METADATA_ENTRIES",
    "MAX_TOPIC_BYTES",
    "utc_now",
    "AgentFailure",
    "AgentOutput",
    "AgentRequest",
    "AgentStatus",
    "AgentStatusInfo",
    "ContextBundle",
    "ConcurrentResult",
    "FailureKind",
    "PoolStatistics",
    "PoolStatus",
]

#: FR10: the size of the council, and the most agents ever in flight at once.
MAX_CONCURRENT_AGENTS: Final = 72

#: The largest ``ContextBundle.topic_content``, in bytes of UTF-8 (1 MiB).  Every agent's
#: request carries the topic: a bound on it is a bound on what a batch holds in memory
#: and sends (72 agents x 1 MiB), and 1 MiB is already far more text than a chat model's
#: context holds.
MAX_TOPIC_BYTES: Final = 1 << 20
#: The largest ``ContextBundle.metadata``: its keys and values together, in bytes of
#: UTF-8 (64 KiB), in at most :data:`MAX_METADATA_ENTRIES` entries.
MAX_METADATA_BYTES: Final = 64 << 10
MAX_METADATA_ENTRIES: Final = 1024


def utc_now() -> datetime:
    """Now, timezone-aware, in UTC: the only clock domain types are stamped with."""
    return datetime.now(UTC)


# ---------------------------------------------------------------- validators
# attrs' own validators raise TypeError/ValueError; the contract promises
# InvalidRequestError (itself a ValueError), so these raise that instead.


def _str(_inst: object, attr: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, str):
        raise InvalidRequestError(f"{attr.name} must be a str, got {type(value).__name__}")


def _unicode(_inst: object, attr: attrs.Attribute[Any], value: object) -> None:
    """A str that is valid Unicode: one that UTF-8 can encode (no lone surrogates, which
    a JSON ``"\\ud800"`` produces); an output's ``content_hash`` depends on it."""
    if value.__class__ is not str:
        _str(_inst, attr, value)
    if value.isascii():  # type: ignore[attr-defined]
        return  # the common case, checked in C without a copy
    try:
        value.encode("utf-8")  # type: ignore[attr-defined]
    except UnicodeEncodeError as exc:
        raise InvalidRequestError(
            f"{attr.name} must be valid Unicode text (a lone surrogate at {exc.start})"
        ) from None


def _plain_str(value: Any) -> Any:
    """A str subclass as a plain str (anything else unchanged): a subclass can override
    ``__len__``, ``isascii`` or ``encode`` to pass a size check with more than it says,
    and would then carry its own methods into every agent's request."""
    return str.__str__(value) if isinstance(value, str) and value.__class__ is not str else value


def _topic(_inst: object, attr: attrs.Attribute[Any], value: object) -> None:
    _str(_inst, attr, value)
    check_utf8_size(cast(str, value), attr.name, MAX_TOPIC_BYTES, what="MAX_TOPIC_BYTES")


def _uuid(_inst: object, attr: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, UUID):
        raise InvalidRequestError(f"{attr.name} must be a UUID, got {type(value).__name__}")


def _optional_uuid(inst: object, attr: attrs.Attribute[Any], value: object) -> None:
    if value is not None:
        _uuid(inst, attr, value)


def _aware_datetime(_inst: object, attr: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, datetime):
        raise InvalidRequestError(f"{attr.name} must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidRequestError(f"{attr.name} must be timezone-aware (UTC)")


def _as_utc(value: Any) -> Any:
    """A naive datetime is taken to be UTC (what ``datetime.utcnow()`` returns): the
    kernel's own timestamps are UTC, and a stored timestamp is always timezone-aware."""
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def _instance_of(cls: type | tuple[type, ...]) -> Any:
    def check(_inst: object, attr: attrs.Attribute[Any], value: object) -> None:
        if not isinstance(value, cls):
            expected = (
                cls.__name__ if isinstance(cls, type) else " | ".join(c.__name__ for c in cls)
            )
            raise InvalidRequestError(f"{attr.name} must be {expected}, got {type(value).__name__}")

    return check


def _tuple_of(cls: type) -> Any:
    def check(_inst: object, attr: attrs.Attribute[Any], value: tuple[object, ...]) -> None:
        for item in value:
            if not isinstance(item, cls):
                raise InvalidRequestError(
                    f"{attr.name} items must be {cls.__name__}, got {type(item).__name__}"
                )

    return check


def _to_tuple(value: object) -> tuple[object, ...]:
    if isinstance(value, tuple):
        return value
    if isinstance(value, str | bytes) or not hasattr(value, "__iter__"):
        raise InvalidRequestError(f"expected a sequence, got {type(value).__name__}")
    return tuple(value)  # type: ignore[call-overload,unused-ignore]


def _str_map(value: object) -> FrozenMap[str]:
    """Freeze a ``Mapping[str, str]`` (ContextBundle.metadata), within its size limits.

    The mapping is read once, into the copy that is kept: what was checked is what is
    held, however the caller's mapping answers a second read (or its ``len``).
    """
    if not isinstance(value, Mapping):
        raise InvalidRequestError(f"metadata must be a mapping, got {type(value).__name__}")
    entries = len(value)  # before reading any: a huge mapping is refused cheaply
    if entries > MAX_METADATA_ENTRIES:
        raise _too_many_entries(f"{entries:,}")
    copy: dict[str, str] = {}
    size = 0
    for read, (key, val) in enumerate(value.items(), 1):
        if read > MAX_METADATA_ENTRIES:  # its len() said otherwise
            raise _too_many_entries(f"more than {MAX_METADATA_ENTRIES:,}")
        if not isinstance(key, str) or not isinstance(val, str):
            raise InvalidRequestError(
                f"metadata must map str to str, got {type(key).__name__} -> {type(val).__name__}"
            )
        key, val = _plain_str(key), _plain_str(val)
        size += utf8_size(key, beyond=MAX_METADATA_BYTES) + utf8_size(
            val, beyond=MAX_METADATA_BYTES
        )
        if size > MAX_METADATA_BYTES:
            raise InvalidRequestError(
                f"metadata must be at most {MAX_METADATA_BYTES:,} bytes of UTF-8 "
                "(MAX_METADATA_BYTES; keys and values together)"
            )
        copy[key] = val
    return FrozenMap(copy)


def _too_many_entries(got: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"metadata must have at most {MAX_METADATA_ENTRIES:,} entries (MAX_METADATA_ENTRIES), "
        f"got {got}"
    )


def scalar_map(value: object) -> FrozenMap[str | int | float]:
    """Freeze a ``Mapping[str, str | int | float]`` (AgentOutput.metadata)."""
    if not isinstance(value, Mapping):
        raise InvalidRequestError(f"metadata must be a mapping, got {type(value).__name__}")
    for key, val in value.items():
        if not isinstance(key, str) or not isinstance(val, str | int | float):
            raise InvalidRequestError(
                "metadata must map str to str | int | float, "
                f"got {type(key).__name__} -> {type(val).__name__}"
            )
    return value if isinstance(value, FrozenMap) else FrozenMap(value)


# ---------------------------------------------------------------- requests


@attrs.frozen(slots=True)
class ContextBundle:
    """What the council deliberates on: one topic, shared by every agent of a batch.

    ``topic_content`` is at most :data:`MAX_TOPIC_BYTES` (1 MiB) of UTF-8, ``metadata``
    at most :data:`MAX_METADATA_ENTRIES` entries and :data:`MAX_METADATA_BYTES` (64 KiB)
    of keys and values; more is an :class:`InvalidRequestError`.
    """

    topic_id: str = attrs.field(validator=text())
    topic_content: str = attrs.field(converter=_plain_str, validator=_topic, repr=False)
    metadata: Mapping[str, str] = attrs.field(factory=FrozenMap, converter=_str_map)
    bundle_id: UUID = attrs.field(factory=uuid4, validator=_uuid)
    created_at: datetime = attrs.field(
        factory=utc_now, converter=_as_utc, validator=_aware_datetime
    )


@attrs.frozen(slots=True)
class AgentRequest:
    """One agent asked to deliberate on one context; ``request_id`` names this ask."""

    agent_id: str = attrs.field(validator=text())
    context: ContextBundle = attrs.field(validator=_instance_of(ContextBundle))
    request_id: UUID = attrs.field(factory=uuid4, validator=_uuid)


# ---------------------------------------------------------------- outcomes


@attrs.frozen(slots=True)
class AgentOutput:
    """What an agent said.  The kernel stamps ``request_id`` and ``batch_id``.

    ``content_hash`` is the SHA-256 (hex) of ``content`` encoded as UTF-8; it is how an
    output is referred to in logs and witness records, which never hold the content.
    """

    agent_id: str = attrs.field(validator=text())
    request_id: UUID = attrs.field(validator=_uuid)
    content: str = attrs.field(validator=_unicode, repr=False)
    content_type: str = attrs.field(default="text/plain", validator=text())
    output_id: UUID = attrs.field(factory=uuid4, validator=_uuid)
    generated_at: datetime = attrs.field(
        factory=utc_now, converter=_as_utc, validator=_aware_datetime
    )
    batch_id: UUID | None = attrs.field(default=None, validator=_optional_uuid)
    metadata: Mapping[str, str | int | float] = attrs.field(factory=FrozenMap, converter=scalar_map)

    @property
    def content_hash(self) -> str:
        """SHA-256 hex digest of ``content`` (UTF-8)."""
        return hashlib.sha256(self.content.encode("utf-8")).hexdigest()


_OUTPUT_FIELDS = tuple(a.name for a in attrs.fields(AgentOutput))


def stamp_output(output: AgentOutput, request_id: UUID, batch_id: UUID) -> AgentOutput:
    """A copy of ``output`` carrying the kernel's ``request_id`` and ``batch_id``.

    Equivalent to ``attrs.evolve(output, request_id=..., batch_id=...)`` without running
    every validator again: ``output`` was validated when it was built, and the two ids
    come from the kernel's own validated request and batch.  This is on the hot path of
    every agent, and re-validation was a large share of the kernel's per-agent cost.
    """
    if type(output) is not AgentOutput:  # a subclass may have its own invariants
        return attrs.evolve(output, request_id=request_id, batch_id=batch_id)
    stamped = object.__new__(AgentOutput)
    for name in _OUTPUT_FIELDS:
        object.__setattr__(stamped, name, getattr(output, name))
    object.__setattr__(stamped, "request_id", request_id)
    object.__setattr__(stamped, "batch_id", batch_id)
    return stamped


class FailureKind(enum.Enum):
    """Why an agent produced no output."""

    ERROR = "error"  #: the orchestrator raised an ``Exception``
    TIMEOUT = "timeout"  #: it exceeded the agent timeout
    HALTED = "halted"  #: a halt cancelled it, or it never started because of one
    INVALID_OUTPUT = "invalid_output"  #: it returned something that is not its own AgentOutput
    WITNESS = "witness"  #: its output could not be committed to the witness
    CANCELLED = "cancelled"  #: not needed: the batch's quorum was reached first


@attrs.frozen(slots=True)
class AgentFailure:
    """The one failure of one request.  ``error_type`` is the exception class name or ``""``."""

    agent_id: str = attrs.field(validator=text())
    request_id: UUID = attrs.field(validator=_uuid)
    kind: FailureKind = attrs.field(validator=_instance_of(FailureKind))
    error_type: str = attrs.field(validator=_str)
    message: str = attrs.field(validator=_str)
    elapsed_ms: float = attrs.field(validator=number(at_least=0))


@attrs.frozen(slots=True)
class ConcurrentResult:
    """Every outcome of one batch: outputs and failures, each in request order."""

    batch_id: UUID = attrs.field(validator=_uuid)
    outputs: tuple[AgentOutput, ...] = attrs.field(
        converter=_to_tuple, validator=_tuple_of(AgentOutput)
    )
    failures: tuple[AgentFailure, ...] = attrs.field(
        converter=_to_tuple, validator=_tuple_of(AgentFailure)
    )
    started_at: datetime = attrs.field(converter=_as_utc, validator=_aware_datetime)
    completed_at: datetime = attrs.field(converter=_as_utc, validator=_aware_datetime)
    total_ms: float = attrs.field(validator=number(at_least=0))
    #: Agents that got a duplicate (hedge) call, in request order.
    hedged_agents: tuple[str, ...] = attrs.field(
        default=(), converter=_to_tuple, validator=_tuple_of(str)
    )

    @property
    def success_count(self) -> int:
        return len(self.outputs)

    @property
    def failure_count(self) -> int:
        return len(self.failures)

    @property
    def total_count(self) -> int:
        return len(self.outputs) + len(self.failures)

    @property
    def failed_agents(self) -> tuple[str, ...]:
        """Ids of the agents that failed, in request order."""
        return tuple(f.agent_id for f in self.failures)


# ---------------------------------------------------------------- status


@attrs.frozen(slots=True)
class PoolStatus:
    """A snapshot of an :class:`AgentPool`: its own counts, and (a pool with a shared
    capacity) the shared capacity and how much of it was last known to be in use."""

    active_count: int = attrs.field(validator=integer(at_least=0))
    available_count: int = attrs.field(validator=integer(at_least=0))
    max_concurrent: int = attrs.field(validator=integer(at_least=0))
    shared_capacity: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(integer(at_least=0))
    )
    shared_in_use: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(integer(at_least=0))
    )

    def as_dict(self) -> dict[str, int]:
        """The counts by name (the shared ones only for a pool with a shared capacity)."""
        return attrs.asdict(self, filter=lambda _attr, value: value is not None)


class AgentStatus(enum.Enum):
    IDLE = "idle"
    BUSY = "busy"
    FAILED = "failed"
    UNKNOWN = "unknown"


@attrs.frozen(slots=True)
class AgentStatusInfo:
    agent_id: str = attrs.field(validator=text())
    status: AgentStatus = attrs.field(validator=_instance_of(AgentStatus))
    last_invocation: datetime | None = attrs.field(
        default=None,
        converter=_as_utc,
        validator=attrs.validators.optional(_aware_datetime),
    )
    last_error: str | None = attrs.field(
        default=None,
        validator=attrs.validators.optional(_str),
    )


@attrs.frozen(slots=True)
class PoolStatistics:
    """An :class:`AgentPool` at one instant (:meth:`AgentPool.statistics`).

    Attributes:
        max_concurrent: the pool's bound on calls running at once (FR10).
        active_count: agents holding a slot (each counted once, hedged or not).
        hedge_calls: extra slots held by hedge calls of agents already active.
        available_count: slots free now (``max_concurrent`` minus every slot held,
            including limiter tokens borrowed outside the pool).
        queued_count: agents claimed by queueing batches, still waiting for a slot.
        tasks_waiting: tasks waiting in the pool's limiter for a slot now.
        leases: slots holding a lease of the pool's shared capacity (0 without one).
    """

    max_concurrent: int
    active_count: int
    hedge_calls: int
    available_count: int
    queued_count: int
    tasks_waiting: int
    leases: int
