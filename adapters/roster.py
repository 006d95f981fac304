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

    [prices."gpt-4o-mini"]          # optional: USD per 1M tokens, for the cost summary
    prompt = 0.15                   # (adapters.usage; "*" prices every other model)
    completion = 0.60

A profile field left unset falls back to ``[defaults]``, then to the orchestrator's
own defaults.  Errors name the file, the agent and the field.

The Archon 72 roster format (``archons-base.json``) loads too: a JSON object with an
``archons`` list, each item with ``id`` (the agent id), ``name`` (its display name),
``role``, ``goal``, ``backstory`` and ``system_prompt``::

    {"archons": [{"id": "paimon", "name": "Paimon", "role": "King of the West",
                  "goal": "...", "backstory": "...", "system_prompt": "..."}]}

Only ``id`` is required.  Those six fields are read; every other field of an archon, and
every other top-level key, belongs to the application that wrote the file (ranks,
branches, realms, ...) and is ignored.  LLM settings come from the orchestrator.  Errors
name the file, the archon (``archons[i]``, with its ``id`` when that is valid) and the
field by its name in the file (``'id'``, ``'name'``, ...).

What a roster refuses when it is loaded (a :class:`RosterError`, nothing built):

- a file of more than :data:`MAX_ROSTER_BYTES` (:data:`MAX_ROSTER_AGENTS` agents x
  :data:`ROSTER_BYTES_PER_AGENT` bytes), before it is parsed, and more than
  :data:`MAX_ROSTER_AGENTS` agents, before any profile is built;
- a file that is not UTF-8 (a UTF-8 byte-order mark is allowed and skipped), is not valid
  JSON/TOML, or is nested too deeply to parse;
- an ``agent_id`` that is empty, longer than :data:`MAX_AGENT_ID_LENGTH` characters, or
  holds a character that is not printable (``str.isprintable``: control characters such
  as CR, LF, TAB and ESC, format characters such as bidirectional overrides, line
  separators, spaces other than the ASCII space, surrogates): such an id could forge log
  lines or terminal output.  The error names the agent by its index, ``agents[i]``.
  Any other Unicode is fine (``"ārchon-Ω"``);
- a ``base_url`` (in ``[defaults]`` or an agent) that is not an ``http://`` or
  ``https://`` URL with a host, or that carries credentials, a query or a fragment.
"""

from __future__ import annotations

import functools
import json
import os
import reprlib
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs

from adapters.urls import redact_url
from adapters.usage import PriceTable
from kernel import (
    MAX_CONCURRENT_AGENTS,
    AgentNotFoundError,
    AgentRequest,
    ContextBundle,
    InvalidRequestError,
)
from kernel.validate import check_int, check_number, check_text

__all__ = [
    "MAX_AGENT_ID_LENGTH",
    "MAX_ROSTER_AGENTS",
    "MAX_ROSTER_BYTES",
    "ROSTER_BYTES_PER_AGENT",
    "AgentProfile",
    "Roster",
    "RosterError",
    "check_base_url",
]

#: The longest agent id a roster accepts, in characters.  An id travels in an HTTP header
#: (percent-encoded, up to 12 bytes a character); servers refuse headers of more than a
#: few kilobytes, so a longer id would fail every request.
MAX_AGENT_ID_LENGTH = 256

#: The most agents one roster (and one CLI run) may hold.
MAX_ROSTER_AGENTS = 100_000
#: What one agent may take in a roster file, in bytes, for the file's size cap.
ROSTER_BYTES_PER_AGENT = 256
#: The largest roster file read at all; checked before it is parsed.
MAX_ROSTER_BYTES = MAX_ROSTER_AGENTS * ROSTER_BYTES_PER_AGENT

# Values quoted in error messages are cut short (and never recursed into deeply): a
# roster may hold anything, and a message must stay one readable line.
_SHOW = reprlib.Repr()
_SHOW.maxlevel = 2
_SHOW.maxstring = 60
_SHOW.maxother = 60
_SHOW.maxlist = _SHOW.maxdict = 4


class RosterError(InvalidRequestError):
    """A roster file or mapping is missing, unreadable or invalid."""


def _read_capped(path: Path) -> bytes:
    """The file's bytes, refused (:class:`RosterError`) beyond :data:`MAX_ROSTER_BYTES`:
    by its size before a byte is read, and by what a read returns for a file whose size
    says nothing (a device, a pipe, a file still growing)."""
    limit = (
        f"at most {MAX_ROSTER_BYTES:,} ({MAX_ROSTER_AGENTS:,} agents x {ROSTER_BYTES_PER_AGENT})"
    )
    # Opened without blocking, then read blocking: a FIFO nobody writes to would
    # otherwise hang the open itself; this way it reads as empty (and is refused).
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    os.set_blocking(fd, True)
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > MAX_ROSTER_BYTES:
            raise RosterError(f"{path}: roster file of {size:,} bytes; {limit}")
        raw = f.read(MAX_ROSTER_BYTES + 1)
    if len(raw) > MAX_ROSTER_BYTES:
        raise RosterError(f"{path}: roster file of more than {MAX_ROSTER_BYTES:,} bytes; {limit}")
    return raw


def _checked_defaults(defaults: object, source: str) -> Mapping[str, Any]:
    """A roster's ``defaults`` table, checked once, so that an error says "defaults", not
    the first agent."""
    if not isinstance(defaults, Mapping):
        raise RosterError(f"{source}: 'defaults' must be a table")
    bad = set(defaults) - _DEFAULT_FIELDS
    if bad:
        raise RosterError(f"{source}: defaults: unknown field(s): {_names(bad)}")
    try:
        AgentProfile(agent_id="defaults", **defaults)
    except InvalidRequestError as exc:
        raise RosterError(f"{source}: defaults: {exc}") from None
    return defaults


def _agent_profile(entry: object, i: int, defaults: Mapping[str, Any], source: str) -> AgentProfile:
    """The ``agents[i]`` entry over the defaults; errors name the agent by its id if valid."""
    where = f"agents[{i}]"
    if not isinstance(entry, Mapping):
        raise RosterError(f"{source}: {where}: expected a table")
    if _agent_id_problem(entry.get("agent_id")) is None:
        # Only a valid id names the agent; an invalid one is shown quoted, later.
        where = f"agent {entry['agent_id']!r}"
    unknown_fields = set(entry) - _PROFILE_FIELDS
    if unknown_fields:
        raise RosterError(f"{source}: {where}: unknown field(s): {_names(unknown_fields)}")
    try:
        return AgentProfile(**{**defaults, **entry})
    except TypeError as exc:  # agent_id missing
        raise RosterError(f"{source}: {where}: {exc}") from None
    except InvalidRequestError as exc:
        raise RosterError(f"{source}: {where}: {exc}") from None


def _check_count(agents: int, source: str) -> None:
    """Refuse more than :data:`MAX_ROSTER_AGENTS` agents before any profile is built."""
    if agents > MAX_ROSTER_AGENTS:
        raise RosterError(f"{source}: {agents:,} agents; at most {MAX_ROSTER_AGENTS:,} in a roster")


def _show(value: object) -> str:
    return _SHOW.repr(value)


def _names(keys: Iterable[object]) -> str:
    """Field names for a message: as they are if short and printable, else quoted."""
    shown = (
        k if isinstance(k, str) and k.isprintable() and len(k) <= 40 else _show(k) for k in keys
    )
    return ", ".join(sorted(shown))


def _optional(check: Callable[[object, str], object]) -> Any:
    """An attrs validator: ``None``, or a value ``check`` accepts, named as a roster field."""

    def validate(_inst: object, attr: attrs.Attribute[Any], value: object) -> None:
        if value is not None:
            check(value, f"field {attr.name!r}:")

    return validate


_opt_text = _optional(check_text)
_opt_positive = _optional(functools.partial(check_number, above=0))
_opt_count = _optional(functools.partial(check_int, at_least=1))


def _check_temperature(value: object, name: str) -> float:
    temperature = check_number(value, name)
    if not 0.0 <= temperature <= 2.0:
        raise InvalidRequestError(f"{name} must be between 0 and 2, got {_show(value)}")
    return temperature


_opt_temperature = _optional(_check_temperature)


def _agent_id_problem(v: object) -> str | None:
    """Why ``v`` cannot be an agent id, or None if it can."""
    if not isinstance(v, str) or not v.strip():
        return "expected a non-empty string"
    if len(v) > MAX_AGENT_ID_LENGTH:
        return f"longer than {MAX_AGENT_ID_LENGTH} characters ({len(v)})"
    if not v.isprintable():
        bad = next(c for c in v if not c.isprintable())
        return f"holds a non-printable character (U+{ord(bad):04X}; no control characters)"
    return None


def _agent_id(_i: object, _a: object, v: Any) -> None:
    problem = _agent_id_problem(v)
    if problem is not None:
        raise InvalidRequestError(f"field 'agent_id': {problem}, got {_show(v)}")


def check_base_url(value: object, name: str = "base_url") -> str:
    """Return ``value`` if it is an ``http(s)://`` URL with a host; else InvalidRequestError.

    Refused besides: whitespace or control characters, a bad port, credentials
    (``user:password@``, or any raw ``@``: they would be shown wherever the URL is, pass
    an API key instead), a query or a fragment (the SDK appends paths to the URL).  So an
    accepted URL is shown as it is; the refusal shows it through
    :func:`~adapters.urls.redact_url`.
    """
    if not isinstance(value, str) or not value.strip():
        raise InvalidRequestError(
            f"field {name!r}: expected a non-empty string, got {_show(value)}"
        )
    problem = None
    if not value.isprintable() or any(c.isspace() for c in value):
        problem = "holds whitespace or control characters"
    elif "@" in value:
        # Before parsing: a password holding a '/' or '?' would be taken for a port, and
        # the parser's error repeats the port.  A raw '@' is a userinfo's or a mistake.
        problem = "must not carry credentials (user:password@); use the API key"
    else:
        try:
            parts = urlsplit(value)
            _ = parts.port  # raises ValueError for a bad port
        except ValueError as exc:
            problem = f"is not a valid URL ({exc})"
        else:
            if parts.scheme.lower() not in ("http", "https"):
                problem = "must be an http:// or https:// URL"
            elif not parts.hostname:
                problem = "has no host"
            elif parts.query or parts.fragment:
                problem = "must not have a query or a fragment"
    if problem is not None:
        shown = _show(redact_url(value))
        raise InvalidRequestError(f"field {name!r}: {problem}, got {shown}")
    return value


def _base_url(_i: object, _a: object, v: Any) -> None:
    if v is not None:
        check_base_url(v)


@attrs.frozen(slots=True)
class AgentProfile:
    """One council member: its id and the LLM settings that differ from the defaults."""

    agent_id: str = attrs.field(validator=_agent_id)
    display_name: str | None = attrs.field(default=None, validator=_opt_text)
    model: str | None = attrs.field(default=None, validator=_opt_text)
    base_url: str | None = attrs.field(default=None, validator=_base_url)
    system_prompt: str | None = attrs.field(default=None, validator=_opt_text, repr=False)
    temperature: float | None = attrs.field(default=None, validator=_opt_temperature)
    max_tokens: int | None = attrs.field(default=None, validator=_opt_count)
    timeout_s: float | None = attrs.field(default=None, validator=_opt_positive)
    # Who the agent is, for frameworks that build a persona from it (adapters.llm.crewai):
    # CrewAI's role, goal and backstory.  Orchestrators that do not use them ignore them.
    role: str | None = attrs.field(default=None, validator=_opt_text)
    goal: str | None = attrs.field(default=None, validator=_opt_text, repr=False)
    backstory: str | None = attrs.field(default=None, validator=_opt_text, repr=False)

    @property
    def name(self) -> str:
        return self.display_name or self.agent_id


def _profiles_tuple(value: Iterable[AgentProfile]) -> tuple[AgentProfile, ...]:
    return tuple(value)


_PROFILE_FIELDS = frozenset(a.name for a in attrs.fields(AgentProfile))
_DEFAULT_FIELDS = _PROFILE_FIELDS - {"agent_id"}

# The Archon 72 roster format: field in the file -> profile field.
_ARCHON_FIELDS = {
    "id": "agent_id",
    "name": "display_name",
    "role": "role",
    "goal": "goal",
    "backstory": "backstory",
    "system_prompt": "system_prompt",
}


@attrs.frozen(slots=True)
class Roster:
    """An ordered council of :class:`AgentProfile`, unique by ``agent_id``."""

    profiles: tuple[AgentProfile, ...] = attrs.field(converter=_profiles_tuple)
    source: str = attrs.field(default="<roster>", eq=False)
    #: The roster file's ``prices`` table (:mod:`adapters.usage`), if it has one.
    prices: PriceTable | None = attrs.field(default=None, kw_only=True)
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
            raw = _read_capped(p)
        except FileNotFoundError:
            raise RosterError(f"{p}: roster file not found") from None
        except OSError as exc:
            raise RosterError(f"{p}: cannot read roster file: {exc.strerror}") from None
        suffix = p.suffix.lower()
        if suffix not in (".json", ".toml"):
            raise RosterError(f"{p}: roster must be a .json or .toml file")
        kind = "JSON" if suffix == ".json" else "TOML"
        try:
            # utf-8-sig: editors on Windows start UTF-8 files with a byte-order mark.
            text = raw.decode("utf-8-sig")
            data = json.loads(text) if suffix == ".json" else tomllib.loads(text)
        except UnicodeDecodeError as exc:
            raise RosterError(f"{p}: invalid {kind}: not UTF-8 ({exc.reason})") from None
        except ValueError as exc:  # JSONDecodeError, TOMLDecodeError, int too long
            raise RosterError(f"{p}: invalid {kind}: {exc}") from None
        except RecursionError:
            # Both parsers recurse per nesting level: a hostile file must not crash us.
            raise RosterError(f"{p}: invalid {kind}: nested too deeply") from None
        return cls.from_dict(data, source=str(p))

    @classmethod
    def from_dict(cls, data: object, *, source: str = "<roster>") -> Roster:
        if not isinstance(data, Mapping):
            raise RosterError(f"{source}: expected a table with an 'agents' list")
        if "archons" in data and "agents" not in data:
            return cls._from_archons(data["archons"], source=source)
        unknown = set(data) - {"agents", "defaults", "prices"}
        if unknown:
            raise RosterError(f"{source}: unknown top-level field(s): {_names(unknown)}")
        defaults = _checked_defaults(data.get("defaults", {}), source)
        agents = data.get("agents")
        if not isinstance(agents, list):
            raise RosterError(f"{source}: 'agents' must be a list of agent tables")
        _check_count(len(agents), source)
        prices = None
        if "prices" in data:
            try:
                prices = PriceTable.from_mapping(data["prices"], source="prices")
            except InvalidRequestError as exc:
                raise RosterError(f"{source}: {exc}") from None
        profiles = [_agent_profile(entry, i, defaults, source) for i, entry in enumerate(agents)]
        return cls(profiles, source=source, prices=prices)

    @classmethod
    def _from_archons(cls, archons: object, *, source: str) -> Roster:
        """The Archon 72 format (see the module docstring): six fields read, the rest ignored."""
        if not isinstance(archons, list):
            raise RosterError(f"{source}: 'archons' must be a list of archon objects")
        _check_count(len(archons), source)
        profiles: list[AgentProfile] = []
        seen: dict[str, int] = {}
        for i, entry in enumerate(archons):
            where = f"archons[{i}]"
            if not isinstance(entry, Mapping):
                raise RosterError(f"{source}: {where}: expected an object")
            if _agent_id_problem(entry.get("id")) is None:
                where = f"archons[{i}] (id {entry['id']!r})"
            if "id" not in entry:
                raise RosterError(f"{source}: {where}: field 'id' is missing")
            fields = {field: entry[name] for name, field in _ARCHON_FIELDS.items() if name in entry}
            try:
                profile = AgentProfile(**fields)
            except InvalidRequestError as exc:
                # Name the field as the file does ('id', not 'agent_id').
                message = str(exc)
                for name, field in _ARCHON_FIELDS.items():
                    message = message.replace(f"field {field!r}", f"field {name!r}")
                raise RosterError(f"{source}: {where}: {message}") from None
            if profile.agent_id in seen:
                raise RosterError(
                    f"{source}: {where}: duplicate 'id' (also archons[{seen[profile.agent_id]}])"
                )
            seen[profile.agent_id] = i
            profiles.append(profile)
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
