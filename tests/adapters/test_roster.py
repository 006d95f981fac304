"""Roster files: good ones load; bad ones say which file, which agent, which field.

Hostile files too: nested too deeply to parse, a byte-order mark, ids that would forge
log lines, endpoints that are not http(s) URLs.
"""

from __future__ import annotations

import json
import os
import threading
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.provisional import urls

from adapters.llm.openai_chat import decode_agent_header, encode_agent_header
from adapters.roster import (
    MAX_AGENT_ID_LENGTH,
    MAX_ROSTER_AGENTS,
    MAX_ROSTER_BYTES,
    ROSTER_BYTES_PER_AGENT,
    AgentProfile,
    Roster,
    RosterError,
    check_base_url,
)
from adapters.urls import redact_url
from adapters.usage import Price
from kernel import AgentNotFoundError, AgentRequest, ContextBundle, InvalidRequestError
from tests.support import ROOT
from tests.support.hostile_parts import HUGE
from tests.support.url_secrets import SECRET_LETTERS, SecretURL, urls_with_a_secret

DATA = ROOT / "tests" / "data"


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
            "field 'max_tokens': must be an int",
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


# ------------------------------------------------------------------ hostile input edges


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("deep.json", '{"agents": ' + "[" * 100_000 + "]" * 100_000 + "}"),
        ("deep.toml", "agents = " + "[" * 100_000 + "]" * 100_000 + "\n"),
        ("deep-table.toml", "defaults = " + "{a = " * 100_000 + "1" + "}" * 100_000 + "\n"),
    ],
)
def test_deeply_nested_file_is_a_roster_error(tmp_path: Path, name: str, text: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(RosterError, match="nested too deeply") as info:
        Roster.load(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("bom.toml", '[defaults]\nmodel = "m"\n[[agents]]\nagent_id = "archon-1"\n'),
        ("bom.json", '{"defaults": {"model": "m"}, "agents": [{"agent_id": "archon-1"}]}'),
    ],
)
def test_utf8_byte_order_mark_is_skipped(tmp_path: Path, name: str, text: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    roster = Roster.load(path)
    assert roster.agent_ids == ("archon-1",)
    assert roster.get("archon-1").model == "m"


def test_a_file_that_is_not_utf8_is_a_roster_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes('[[agents]]\nagent_id = "ārchon"\n'.encode("utf-16"))
    with pytest.raises(RosterError, match="not UTF-8"):
        Roster.load(path)


@pytest.mark.parametrize(
    "bad_id",
    [
        "archon-1\r\nX-Forged: yes",
        "archon\n2",
        "archon\r",
        "archon\t1",
        "\x1b[2Jarchon",  # terminal escape
        "archon\x00",
        "archon\x7f",
        "archon\x85",  # C1 next-line
        "archon\u2028",  # line separator
        "archon\u202e1",  # right-to-left override
        "archon\u200b",  # zero-width space
        "\ud800archon",  # lone surrogate: not even UTF-8 encodable
    ],
)
def test_agent_id_with_a_control_character_is_refused_naming_the_index(
    tmp_path: Path, bad_id: str
) -> None:
    path = tmp_path / "ids.json"
    doc = {"agents": [{"agent_id": "archon-0"}, {"agent_id": bad_id, "model": "m"}]}
    path.write_text(json.dumps(doc))  # ASCII-escaped JSON: the file itself is clean
    with pytest.raises(RosterError) as info:
        Roster.load(path)
    message = str(info.value)
    assert f"{path}: agents[1]: field 'agent_id': holds a non-printable character" in message
    assert message.isprintable()  # the message itself is one clean line


def test_agent_id_longer_than_the_limit_is_refused() -> None:
    Roster.from_dict({"agents": [{"agent_id": "a" * MAX_AGENT_ID_LENGTH}]})
    with pytest.raises(RosterError, match=r"agents\[0\]: field 'agent_id': longer than 256"):
        Roster.from_dict({"agents": [{"agent_id": "a" * (MAX_AGENT_ID_LENGTH + 1)}]})


@pytest.mark.parametrize("good_id", ["ārchon-Ω", "议员-7", "Ñandú 2", "🦉", "a%41b", "x/y?z"])
def test_printable_unicode_agent_ids_load(tmp_path: Path, good_id: str) -> None:
    path = tmp_path / "unicode.toml"
    path.write_text(f'[[agents]]\nagent_id = "{good_id}"\n', encoding="utf-8")
    assert Roster.load(path).agent_ids == (good_id,)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("localhost:8080/v1", "must be an http:// or https:// URL"),
        ("ftp://example.com/v1", "must be an http:// or https:// URL"),
        ("file:///etc/passwd", "must be an http:// or https:// URL"),
        ("http://", "has no host"),
        ("https:///v1", "has no host"),
        ("http://example.com:99999/v1", "is not a valid URL"),
        ("http://example.com:port/v1", "is not a valid URL"),
        ("http://example .com/v1", "holds whitespace or control characters"),
        ("http://example.com/v1\r\nX: y", "holds whitespace or control characters"),
        ("http://example.com/v1?api-version=1", "must not have a query or a fragment"),
        ("http://example.com/v1#top", "must not have a query or a fragment"),
        ("http://user:hunter2@example.com/v1", "must not carry credentials"),
        ("http://user:hun/ter2@example.com/v1", "must not carry credentials"),
        ("http://hunter2@example.com/v1", "must not carry credentials"),
        ("http://example.com/v1?api_key=hunter2", "must not have a query or a fragment"),
        ("http://example.com/v1#access_token=hunter2", "must not have a query or a fragment"),
        ("   ", "expected a non-empty string"),
    ],
)
@pytest.mark.parametrize("where", ["defaults", "agent"])
def test_base_url_that_is_not_an_http_url_with_a_host_is_refused(
    tmp_path: Path, url: str, problem: str, where: str
) -> None:
    doc: dict[str, Any] = {"agents": [{"agent_id": "archon-1"}]}
    if where == "defaults":
        doc["defaults"] = {"base_url": url}
    else:
        doc["agents"][0]["base_url"] = url
    path = tmp_path / "urls.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(RosterError) as info:
        Roster.load(path)
    message = str(info.value)
    label = "defaults" if where == "defaults" else "agent 'archon-1'"
    assert f"{path}: {label}: field 'base_url': {problem}" in message
    assert "hunter2" not in message  # credentials are never repeated


@settings(max_examples=300)
@given(st.booleans().flatmap(lambda raw: urls_with_a_secret(raw=raw)))
def test_a_refused_base_url_never_shows_its_secret(case: SecretURL) -> None:
    """Credentials in a base_url are refused, and the refusal does not repeat them:
    not the userinfo (even a password holding a raw '/' or '?', which the URL parser
    takes for a port and quotes), not a secret query value, not a fragment."""

    def refusal(url: str) -> str:
        with pytest.raises(InvalidRequestError) as refused:
            AgentProfile("a", base_url=url)
        return str(refused.value)

    message = refusal(case.url)
    if case.raw:  # its letters are in no other part of the URL
        assert not set(message) & set(SECRET_LETTERS), message
    else:  # percent-encoded: the message is the same whatever the secret
        assert message == refusal(case.with_secret("decoy"))


@settings(max_examples=300)
@given(urls())
def test_an_accepted_base_url_has_nothing_to_hide(url: str) -> None:
    """What check_base_url lets through is shown as it is everywhere (repr, logs,
    errors): it carries nothing redact_url would hide."""
    try:
        check_base_url(url)
    except InvalidRequestError:
        return
    assert redact_url(url) == url


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:11434/v1", "https://api.openai.com/v1", "HTTP://[::1]:8080/v1/"]
)
def test_http_urls_with_a_host_load(url: str) -> None:
    roster = Roster.from_dict({"defaults": {"base_url": url}, "agents": [{"agent_id": "a"}]})
    assert roster.get("a").base_url == url


def test_error_messages_stay_short_whatever_the_value() -> None:
    nested: Any = "x"
    for _ in range(500):
        nested = [nested]
    for field, value in [
        ("model", nested),
        ("temperature", "m" * 100_000),
        ("timeout_s", {1: nested}),
    ]:
        with pytest.raises(RosterError, match=f"field '{field}'") as info:
            Roster.from_dict({"agents": [{"agent_id": "a", field: value}]})
        assert len(str(info.value)) < 300
    with pytest.raises(RosterError) as info:
        Roster.from_dict({"agents": [{"agent_id": "a", "\x1b[2J" + "k" * 1000: 1}]})
    assert str(info.value).isprintable() and len(str(info.value)) < 300


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=30))
def test_any_agent_id_is_refused_at_load_or_round_trips_through_the_header(agent_id: str) -> None:
    """Every id either fails to load (RosterError) or can be carried by the header.

    The end-to-end half (the real SDK and server) is in tests/adapters/llm/test_bridge.py.
    """
    try:
        roster = Roster.from_dict({"agents": [{"agent_id": agent_id}]})
    except RosterError as exc:
        assert "agents[0]: field 'agent_id'" in str(exc)
        assert not agent_id.strip() or not agent_id.isprintable()
        return
    assert roster.agent_ids == (agent_id,)
    header = encode_agent_header(agent_id)
    assert header.isascii() and header.isprintable() and header == header.strip()
    header.encode("latin-1")  # what HTTP libraries require of a header value
    assert decode_agent_header(header) == agent_id


# ------------------------------------------------------------------ the Archon 72 format

ARCHONS = ROOT / "examples" / "archons-sample.json"


def test_the_archon_sample_loads_with_persona_fields() -> None:
    roster = Roster.load(ARCHONS)
    assert len(roster) == 6
    assert roster.agent_ids[0] == "archon-vessa"
    vessa = roster.get("archon-vessa")
    assert vessa.name == "Vessa"  # display name = name
    assert vessa.role == "Keeper of the Treasury"
    assert vessa.goal is not None and vessa.goal.startswith("Keep the council")
    assert vessa.backstory is not None and "three generations" in vessa.backstory
    assert vessa.system_prompt is not None and vessa.system_prompt.startswith("You are Vessa")
    assert vessa.model is None and vessa.base_url is None  # LLM settings: the orchestrator's
    # every persona field reached every profile
    assert all(p.role and p.goal and p.backstory and p.system_prompt for p in roster)


def test_archon_fields_beyond_the_six_and_other_top_level_keys_are_ignored() -> None:
    roster = Roster.from_dict(
        {
            "version": 3,
            "realms": ["north"],
            "archons": [
                {"id": "a1", "rank": "king", "legions": 66, "model": {"not": "ours"}},
                {"id": "a2", "name": "Second"},
            ],
        }
    )
    assert roster.agent_ids == ("a1", "a2")
    first = roster.get("a1")
    assert first.model is None and first.display_name is None and first.role is None


def test_persona_fields_load_in_the_plain_format_too() -> None:
    roster = Roster.from_dict(
        {"defaults": {"goal": "decide"}, "agents": [{"agent_id": "a", "role": "Skeptic"}]}
    )
    assert roster.get("a").role == "Skeptic" and roster.get("a").goal == "decide"
    with pytest.raises(RosterError, match=r"agent 'a': field 'backstory': must be a non-empty"):
        Roster.from_dict({"agents": [{"agent_id": "a", "backstory": ""}]})


@pytest.mark.parametrize(
    ("archons", "expected"),
    [
        ({"x": 1}, "'archons' must be a list of archon objects"),
        ([], "the roster has no agents"),
        (["paimon"], "archons[0]: expected an object"),
        ([{"name": "Nameless"}], "archons[0]: field 'id' is missing"),
        ([{"id": ""}], "archons[0]: field 'id': expected a non-empty string"),
        ([{"id": "a\x1b[2Jb"}], "archons[0]: field 'id': holds a non-printable character"),
        ([{"id": "ok"}, {"id": 7}], "archons[1]: field 'id': expected a non-empty string"),
        ([{"id": "vessa", "name": 3}], "archons[0] (id 'vessa'): field 'name': must be a str"),
        ([{"id": "vessa", "role": ""}], "archons[0] (id 'vessa'): field 'role'"),
        ([{"id": "vessa", "goal": ["x"]}], "archons[0] (id 'vessa'): field 'goal'"),
        ([{"id": "vessa", "backstory": 0}], "archons[0] (id 'vessa'): field 'backstory'"),
        ([{"id": "v", "system_prompt": " "}], "archons[0] (id 'v'): field 'system_prompt'"),
        ([{"id": "v"}, {"id": "w"}, {"id": "v"}], "archons[2] (id 'v'): duplicate 'id'"),
    ],
)
def test_bad_archon_rosters_name_the_file_the_archon_and_the_field(
    tmp_path: Path, archons: Any, expected: str
) -> None:
    path = tmp_path / "archons-base.json"
    path.write_text(json.dumps({"archons": archons}))
    with pytest.raises(RosterError) as info:
        Roster.load(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert expected in message
    assert "agent_id" not in message and "display_name" not in message  # the file's names


# ---------------------------------------------------------------- file size


def test_the_size_cap_is_the_agent_limit_times_the_per_agent_bound() -> None:
    assert MAX_ROSTER_BYTES == MAX_ROSTER_AGENTS * ROSTER_BYTES_PER_AGENT
    assert MAX_ROSTER_AGENTS == 100_000


def test_a_roster_file_over_the_size_cap_is_refused_without_being_read(tmp_path: Path) -> None:
    path = tmp_path / "huge.json"
    with path.open("wb") as f:
        f.truncate(MAX_ROSTER_BYTES + 1)  # sparse: its size, without writing it
    tracemalloc.start()
    try:
        with pytest.raises(RosterError, match=r"huge\.json: roster file of 25,600,001 bytes"):
            Roster.load(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024, peak  # not read (before: the whole file, then parsed)


def test_a_roster_file_of_exactly_the_size_cap_loads(tmp_path: Path) -> None:
    path = tmp_path / "padded.json"
    doc = b'{"agents": [{"agent_id": "archon-1"}]}'
    path.write_bytes(doc + b" " * (MAX_ROSTER_BYTES - len(doc)))
    assert Roster.load(path).agent_ids == ("archon-1",)


def test_a_roster_path_without_a_size_is_read_only_up_to_the_cap(tmp_path: Path) -> None:
    # A device reports no size and never ends: reading stops one byte past the cap.
    path = tmp_path / "endless.json"
    path.symlink_to("/dev/zero")
    with pytest.raises(RosterError, match=r"endless\.json: roster file of more than 25,600,000"):
        Roster.load(path)


@pytest.mark.parametrize("key", ["agents", "archons"])
def test_more_agents_than_the_limit_are_refused_before_any_is_built(key: str) -> None:
    entries: list[dict[str, Any]] = [{}] * (MAX_ROSTER_AGENTS + 1)  # each would be refused
    with pytest.raises(RosterError, match=r"<roster>: 100,001 agents; at most 100,000"):
        Roster.from_dict({key: entries})


def test_a_roster_of_exactly_the_agent_limit_loads() -> None:
    assert len(Roster.default(MAX_ROSTER_AGENTS)) == MAX_ROSTER_AGENTS


@pytest.mark.parametrize("field", ["timeout_s", "max_tokens"])
def test_a_roster_number_too_large_for_a_float_is_a_roster_error(field: str) -> None:
    """Guards against: ``OverflowError`` out of ``Roster.from_dict`` / ``Roster.load``."""
    with pytest.raises(RosterError, match=f"field '{field}'"):
        Roster.from_dict({"agents": [{"agent_id": "a", field: HUGE}]})


def test_a_fifo_nobody_writes_to_is_refused_not_waited_on(tmp_path: Path) -> None:
    fifo = tmp_path / "council.toml"
    os.mkfifo(fifo)
    outcome: list[BaseException | None] = []

    def load() -> None:
        try:
            Roster.load(fifo)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(20)
    if worker.is_alive():  # unblock the open so the thread can end, then fail
        with open(fifo, "wb"):
            pass
        worker.join(5)
        raise AssertionError("Roster.load waited on a FIFO nobody writes to")
    assert len(outcome) == 1 and isinstance(outcome[0], RosterError), outcome


def test_a_roster_carries_its_prices_table() -> None:
    roster = Roster.from_dict(
        {
            "agents": [{"agent_id": "a", "model": "m"}],
            "prices": {
                "m": {"prompt": 0.15, "completion": 0.6},
                "*": {"prompt": 1, "completion": 2},
            },
        }
    )
    assert roster.prices is not None
    assert roster.prices.for_model("m") == Price(0.15, 0.6)
    assert roster.prices.for_model("other") == Price(1, 2)
    assert Roster.from_dict({"agents": [{"agent_id": "a"}]}).prices is None


@pytest.mark.parametrize("price", [-0.1, float("nan"), "cheap"])
def test_a_roster_with_a_bad_price_is_refused_naming_file_and_model(price: object) -> None:
    with pytest.raises(RosterError, match=r"^council\.toml: prices: model 'm': "):
        Roster.from_dict(
            {"agents": [{"agent_id": "a"}], "prices": {"m": {"prompt": price, "completion": 1}}},
            source="council.toml",
        )
