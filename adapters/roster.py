"""Who sits on the council: per-agent identity and LLM settings, from a JSON or TOML file.

File shape (TOML shown; JSON is the same structure)::

    [defaults]                      # optional; any profile field but agent_id
    model = "gpt-4o-mini"
    temperature = 0.7

    [[agents]]
    agent_id = "archon-1"
    display_name = "First Archon"
    system_prompt = "You are the council's skeptic."

    [[agents]]
    agent_id = "archon-2"
    model = "llama3.1:8b"
    base_url = "http://127.0.0.1:11434/v1"
    timeout_s = 90

A profile field left unset falls back to ``[defaults]``, then to the orchestrator's
own defaults.  Errors name the file, the agent and the field.
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs

from kernel import (
    MAX_CONCURRENT_AGENTS,
    AgentNotFoundError,
    AgentRequest,
    ContextBundle,
    InvalidRequestError,
)

__all__ = ["AgentProfile", "Roster", "RosterError"]


class RosterError(InvalidRequestError):
    """A roster file or mapping is missing, unreadable or invalid."""


def _opt_str(name: str) -> Any:
    def check(_i: object, _a: object, v: Any) -> None:
        if v is not None and (not isinstance(v, str) or not v.strip()):
            raise InvalidRequestError(f"field {name!r}: expected a non-empty string, got {v!r}")

    return check


def _opt_positive(name: str, *, integer: bool = False) -> Any:
    def check(_i: object, _a: object, v: Any) -> None:
        if v is None:
            return
        wrong_kind = integer and not isinstance(v, int)
        if isinstance(v, bool) or not isinstance(v, int | float) or wrong_kind:
            what = "an integer" if integer else "a number"
            raise InvalidRequestError(f"field {name!r}: expected {what}, got {v!r}")
        if not math.isfinite(v) or v <= 0:
            raise InvalidRequestError(f"field {name!r}: must be > 0, got {v!r}")

    return check


def _temperature(_i: object, _a: object, v: Any) -> None:
    if v is None:
        return
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise InvalidRequestError(f"field 'temperature': expected a number, got {v!r}")
    if not 0.0 <= v <= 2.0:
        raise InvalidRequestError(f"field 'temperature': must be between 0 and 2, got {v!r}")


def _agent_id(_i: object, _a: object, v: Any) -> None:
    if not isinstance(v, str) or not v.strip():
        raise InvalidRequestError(f"field 'agent_id': expected a non-empty string, got {v!r}")


@attrs.frozen(slots=True)
class AgentProfile:
    """One council member: its id and the LLM settings that differ from the defaults."""

    agent_id: str = attrs.field(validator=_agent_id)
    display_name: str | None = attrs.field(default=None, validator=_opt_str("display_name"))
    model: str | None = attrs.field(default=None, validator=_opt_str("model"))
    base_url: str | None = attrs.field(default=None, validator=_opt_str("base_url"))
    system_prompt: str | None = attrs.field(
        default=None, validator=_opt_str("system_prompt"), repr=False
    )
    temperature: float | None = attrs.field(default=None, validator=_temperature)
    max_tokens: int | None = attrs.field(
        default=None, validator=_opt_positive("max_tokens", integer=True)
    )
    timeout_s: float | None = attrs.field(default=None, validator=_opt_positive("timeout_s"))

    @property
    def name(self) -> str:
        return self.display_name or self.agent_id


def _profiles_tuple(value: Iterable[AgentProfile]) -> tuple[AgentProfile, ...]:
    return tuple(value)


_PROFILE_FIELDS = frozenset(a.name for a in attrs.fields(AgentProfile))
_DEFAULT_FIELDS = _PROFILE_FIELDS - {"agent_id"}


@attrs.frozen(slots=True)
class Roster:
    """An ordered council of :class:`AgentProfile`, unique by ``agent_id``."""

    profiles: tuple[AgentProfile, ...] = attrs.field(converter=_profiles_tuple)
    source: str = attrs.field(default="<roster>", eq=False)
    _index: Mapping[str, AgentProfile] = attrs.field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        index: dict[str, AgentProfile] = {}
        for i, profile in enumerate(self.profiles):
            if not isinstance(profile, AgentProfile):
                raise RosterError(f"{self.source}: agents[{i}]: expected an AgentProfile")
            if profile.agent_id in index:
                raise RosterError(f"{self.source}: agent {profile.agent_id!r}: duplicate agent_id")
            index[profile.agent_id] = profile
        if not index:
            raise RosterError(f"{self.source}: the roster has no agents")
        object.__setattr__(self, "_index", index)

    # ------------------------------------------------------------ building

    @classmethod
    def default(cls, n: int = MAX_CONCURRENT_AGENTS, **settings: Any) -> Roster:
        """``archon-1`` .. ``archon-n``, each with the given settings."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise RosterError(f"<default>: the council needs n >= 1 agents, got {n!r}")
        return cls.from_dict(
            {
                "defaults": settings,
                "agents": [{"agent_id": f"archon-{i}"} for i in range(1, n + 1)],
            },
            source=f"<default {n}>",
        )

    @classmethod
    def load(cls, path: str | Path) -> Roster:
        """Read a ``.json`` or ``.toml`` roster file."""
        p = Path(path)
        try:
            raw = p.read_bytes()
        except FileNotFoundError:
            raise RosterError(f"{p}: roster file not found") from None
        except OSError as exc:
            raise RosterError(f"{p}: cannot read roster file: {exc.strerror}") from None
        suffix = p.suffix.lower()
        try:
            if suffix == ".json":
                data = json.loads(raw)
            elif suffix == ".toml":
                data = tomllib.loads(raw.decode("utf-8"))
            else:
                raise RosterError(f"{p}: roster must be a .json or .toml file")
        except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, TOMLDecodeError
            kind = "JSON" if suffix == ".json" else "TOML"
            raise RosterError(f"{p}: invalid {kind}: {exc}") from None
        return cls.from_dict(data, source=str(p))

    from_file = load  # an alias: the name some callers reach for first

    @classmethod
    def from_dict(cls, data: object, *, source: str = "<roster>") -> Roster:
        if not isinstance(data, Mapping):
            raise RosterError(f"{source}: expected a table with an 'agents' list")
        unknown = set(data) - {"agents", "defaults"}
        if unknown:
            raise RosterError(f"{source}: unknown top-level field(s): {', '.join(sorted(unknown))}")
        defaults = data.get("defaults", {})
        if not isinstance(defaults, Mapping):
            raise RosterError(f"{source}: 'defaults' must be a table")
        bad = set(defaults) - _DEFAULT_FIELDS
        if bad:
            raise RosterError(f"{source}: defaults: unknown field(s): {', '.join(sorted(bad))}")
        agents = data.get("agents")
        if not isinstance(agents, list):
            raise RosterError(f"{source}: 'agents' must be a list of agent tables")
        profiles = []
        for i, entry in enumerate(agents):
            where = f"agents[{i}]"
            if not isinstance(entry, Mapping):
                raise RosterError(f"{source}: {where}: expected a table")
            if isinstance(entry.get("agent_id"), str):
                where = f"agent {entry['agent_id']!r}"
            unknown_fields = set(entry) - _PROFILE_FIELDS
            if unknown_fields:
                raise RosterError(
                    f"{source}: {where}: unknown field(s): {', '.join(sorted(unknown_fields))}"
                )
            merged = {**defaults, **entry}
            try:
                profiles.append(AgentProfile(**merged))
            except TypeError as exc:  # agent_id missing
                raise RosterError(f"{source}: {where}: {exc}") from None
            except InvalidRequestError as exc:
                raise RosterError(f"{source}: {where}: {exc}") from None
        return cls(profiles, source=source)

    # ------------------------------------------------------------ reading

    def __len__(self) -> int:
        return len(self.profiles)

    def __iter__(self) -> Iterator[AgentProfile]:
        return iter(self.profiles)

    def __contains__(self, agent_id: object) -> bool:
        return agent_id in self._index

    @property
    def agent_ids(self) -> tuple[str, ...]:
        return tuple(p.agent_id for p in self.profiles)

    def get(self, agent_id: str) -> AgentProfile:
        try:
            return self._index[agent_id]
        except KeyError:
            raise AgentNotFoundError(f"agent {agent_id!r} is not in roster {self.source}") from None

    def requests(self, context: ContextBundle) -> list[AgentRequest]:
        """One :class:`AgentRequest` per agent, in roster order."""
        return [AgentRequest(agent_id=p.agent_id, context=context) for p in self.profiles]
