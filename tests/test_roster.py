"""Roster files: good ones load; bad ones say which file, which agent, which field."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapters.roster import AgentProfile, Roster, RosterError
from kernel import AgentNotFoundError, AgentRequest, ContextBundle, InvalidRequestError

DATA = Path(__file__).parent / "data"


def test_load_toml_with_defaults() -> None:
    roster = Roster.load(DATA / "roster_good.toml")
    assert roster.agent_ids == ("archon-1", "archon-2")
    first, second = roster
    assert first.model == "smollm2" and first.temperature == 0.7
    assert first.name == "First Archon"
    assert second.model == "llama3.1:8b" and second.timeout_s == 90 and second.max_tokens == 256
    assert "archon-2" in roster and "archon-9" not in roster


def test_load_json() -> None:
    roster = Roster.load(DATA / "roster_good.json")
    assert len(roster) == 3
    assert roster.get("archon-1").temperature == 0.2
    assert roster.get("archon-3").max_tokens == 128
    assert all(p.model == "gpt-4o-mini" for p in roster)


def test_default_roster_and_requests() -> None:
    roster = Roster.default(72, model="m")
    assert roster.agent_ids[0] == "archon-1" and roster.agent_ids[-1] == "archon-72"
    context = ContextBundle("t", "c")
    requests = roster.requests(context)
    assert len(requests) == 72 and all(isinstance(r, AgentRequest) for r in requests)
    assert {r.context for r in requests} == {context}
    with pytest.raises(AgentNotFoundError, match="archon-73"):
        roster.get("archon-73")
    with pytest.raises(RosterError):
        Roster.default(0)


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        (
            "dup.toml",
            '[[agents]]\nagent_id="a"\n[[agents]]\nagent_id="a"\n',
            "agent 'a': duplicate agent_id",
        ),
        (
            "types.toml",
            '[[agents]]\nagent_id="a"\ntemperature="hot"\n',
            "agent 'a': field 'temperature'",
        ),
        ("range.json", '{"agents": [{"agent_id": "b", "temperature": 3}]}', "between 0 and 2"),
        (
            "timeout.json",
            '{"agents": [{"agent_id": "b", "timeout_s": 0}]}',
            "agent 'b': field 'timeout_s': must be > 0",
        ),
        (
            "tokens.json",
            '{"agents": [{"agent_id": "b", "max_tokens": 1.5}]}',
            "field 'max_tokens': expected an integer",
        ),
        (
            "unknown.toml",
            '[[agents]]\nagent_id="a"\ncolour="red"\n',
            "agent 'a': unknown field(s): colour",
        ),
        ("top.json", '{"agents": [], "council": 1}', "unknown top-level field(s): council"),
        ("empty.json", '{"agents": []}', "no agents"),
        ("noid.json", '{"agents": [{"model": "m"}]}', "agents[0]"),
        ("emptyid.json", '{"agents": [{"agent_id": ""}]}', "field 'agent_id'"),
        ("list.json", '[{"agent_id": "a"}]', "expected a table"),
        (
            "defaults.toml",
            '[defaults]\nagent_id="x"\n[[agents]]\nagent_id="a"\n',
            "defaults: unknown field(s): agent_id",
        ),
        ("broken.json", '{"agents": [', "invalid JSON"),
        ("broken.toml", "[[agents]\n", "invalid TOML"),
        ("roster.yaml", "agents: []", "must be a .json or .toml file"),
    ],
)
def test_bad_rosters_name_file_agent_and_field(
    tmp_path: Path, name: str, text: str, expected: str
) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(RosterError) as info:
        Roster.load(path)
    assert str(path) in str(info.value)
    assert expected in str(info.value)
    assert isinstance(info.value, InvalidRequestError)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RosterError, match="roster file not found"):
        Roster.load(tmp_path / "nope.toml")


def test_profile_validation() -> None:
    with pytest.raises(InvalidRequestError, match="agent_id"):
        AgentProfile("")
    with pytest.raises(InvalidRequestError, match="base_url"):
        AgentProfile("a", base_url="")
    assert "You are" not in repr(AgentProfile("a", system_prompt="You are a"))
