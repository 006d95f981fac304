"""Bad input gets a clear error and nothing else: fuzzing the boundaries with hypothesis."""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path
from typing import Any
from uuid import uuid4

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.halt.file import FileHaltChannel
from adapters.roster import Roster, RosterError
from kernel import (
    AgentFailure,
    AgentOutput,
    AgentRequest,
    ContextBundle,
    FailureKind,
    InvalidRequestError,
)

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8), st.binary(max_size=4)
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
profile_keys = st.sampled_from(
    [
        "agent_id",
        "model",
        "base_url",
        "system_prompt",
        "temperature",
        "max_tokens",
        "timeout_s",
        "display_name",
        "colour",
    ]
)


@FUZZ
@given(
    st.one_of(
        values,
        st.fixed_dictionaries(
            {"agents": st.lists(st.dictionaries(profile_keys, values, max_size=4), max_size=4)},
            optional={"defaults": st.dictionaries(profile_keys, values, max_size=3)},
        ),
    )
)
def test_roster_from_anything_is_a_roster_or_a_roster_error(data: Any) -> None:
    try:
        roster = Roster.from_dict(data, source="fuzz.json")
    except RosterError as exc:
        assert str(exc).startswith("fuzz.json")
        return
    assert len(roster) >= 1
    assert len(set(roster.agent_ids)) == len(roster)


history_records = st.fixed_dictionaries(
    {
        "action": st.sampled_from(["halt", "clear", "resume"]),
        "reason": values,
        "at": st.just("2026-01-01T00:00:00+00:00") | values,
    },
    optional={"approvers": values},
)


@FUZZ
@given(
    st.binary(max_size=200)
    | st.one_of(
        values,
        st.fixed_dictionaries(
            {"schema": st.just("conclave.halt/1") | values, "halted": st.booleans() | values},
            optional={
                "reason": st.none() | st.text(max_size=8) | values,
                "history": st.lists(history_records, max_size=3) | values,
            },
        ),
    ).map(lambda v: json.dumps(v, default=repr).encode())
)
def test_halt_file_with_any_content_reads_without_raising(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "halt.json"
        path.write_bytes(content)
        state = FileHaltChannel(path).read_state()
    assert isinstance(state.halted, bool)
    if state.error is not None:
        assert state.halted  # unreadable means halted (fail-safe)
    assert state.halted or state.reason is None


@FUZZ
@given(topic_id=values, content=values, metadata=values, agent_id=values)
def test_domain_types_accept_or_refuse_with_invalid_request_error(
    topic_id: Any, content: Any, metadata: Any, agent_id: Any
) -> None:
    try:
        ctx = ContextBundle(topic_id, content, metadata if metadata is not None else {})
    except InvalidRequestError:
        ctx = ContextBundle("t", "c")
    with contextlib.suppress(InvalidRequestError):
        AgentRequest(agent_id, ctx)
    with contextlib.suppress(InvalidRequestError):
        AgentOutput(agent_id, uuid4(), content, metadata=metadata if metadata is not None else {})
    with contextlib.suppress(InvalidRequestError):
        AgentFailure(agent_id, uuid4(), FailureKind.ERROR, "", "m", content)
