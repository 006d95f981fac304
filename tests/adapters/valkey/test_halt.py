"""ValkeyHaltChannel against a real server: durable, instant, fail-closed, two approvers.

Two channels on one key stand for two processes here (each has its own connection and
subscription); test_cluster.py does it with real processes.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import coredis
import pytest
import trio

from adapters.halt.approval import ApprovalRefusedError, SignedStatement
from adapters.stub import AgentOrchestratorStub
from adapters.valkey import ValkeyCapacity, ValkeyHaltChannel, ValkeyUnavailableError
from adapters.valkey._lua import HALT_CLEAR
from kernel import (
    AgentPool,
    ConcurrentDeliberationService,
    DualChannelHaltChecker,
    HaltChecker,
    HaltClearDeniedError,
    HaltNotifier,
    HaltProbe,
    HaltSwitch,
    HaltWaiter,
    InvalidRequestError,
    SystemHaltedError,
)
from tests.support import ROOT
from tests.support.helpers import ScriptedOrchestrator, Step, expect_halt, make_requests
from tests.support.ssh_keys import Keyring
from tests.support.url_secrets import SECRET, assert_never_shown, secret_valkey_urls
from tests.support.valkey_server import ValkeyServer, free_port, unique_name

APPROVERS = ["alice", "bob"]


@pytest.fixture
def key() -> str:
    return f"test:{uuid.uuid4().hex}:halt"


@pytest.fixture
def own_server() -> Iterator[ValkeyServer]:
    """A server of this test's own, to stop, pause and restart."""
    with ValkeyServer() as server:
        yield server


@asynccontextmanager
async def raw(url: str) -> AsyncIterator[coredis.Redis[bytes]]:
    """A plain client: what an operator (or a bug) could do to the keys."""
    async with coredis.Redis.from_url(url, decode_responses=False) as client:
        yield client


@asynccontextmanager
async def cleared(url: str, key: str, **kwargs: Any) -> AsyncIterator[ValkeyHaltChannel]:
    """A channel on a key that two approvers have cleared (a fresh key reads halted)."""
    async with ValkeyHaltChannel(url, key=key, **kwargs) as channel:
        await channel.clear(approvers=APPROVERS, reason="initial clear")
        with trio.fail_after(5):
            await channel.wait_cleared()
        yield channel


def test_it_is_a_halt_channel_the_kernel_can_wait_on_probe_and_listen_to() -> None:
    channel = ValkeyHaltChannel("redis://127.0.0.1:6379")
    for port in (HaltChecker, HaltWaiter, HaltProbe, HaltNotifier):
        assert isinstance(channel, port), port


async def test_a_new_server_reads_halted_until_two_approvers_clear_it(
    valkey_server: ValkeyServer, key: str
) -> None:
    async with ValkeyHaltChannel(valkey_server.url, key=key) as channel:
        state = channel.state
        assert state.halted and state.connected and state.problem == "no halt record"
        assert channel.halted_now() and await channel.is_halted()
        assert "no halt record" in (await channel.get_halt_reason() or "")
        with pytest.raises(HaltClearDeniedError, match="2 distinct approvers"):
            await channel.clear(approvers=["alice", "alice"], reason="x")
        assert channel.halted_now() and await channel.history() == ()
        assert await channel.clear(approvers=APPROVERS, reason="first deployment")
        with trio.fail_after(5):
            await channel.wait_cleared()
        assert not channel.halted_now() and await channel.get_halt_reason() is None
        # Nothing left to clear.
        assert not await channel.clear(approvers=APPROVERS, reason="again")
        [record] = await channel.history()
        assert record.action == "clear" and record.approvers == ("alice", "bob")
        assert record.reason == "first deployment"


async def test_a_halt_reaches_every_process_at_once_and_keeps_its_first_reason(
    valkey_server: ValkeyServer, key: str
) -> None:
    async with cleared(valkey_server.url, key) as one, cleared(valkey_server.url, key) as two:
        heard: list[str] = []
        unregister = two.on_halt(heard.append)
        assert await one.halt("the vote is compromised")
        assert one.halted_now()  # at once, before its own message comes back
        with trio.fail_after(5):
            assert await two.wait_halted() == "the vote is compromised"
        assert two.halted_now() and heard == ["the vote is compromised"]
        assert not await two.halt("a second reason")  # sticky: the first reason stays
        assert await one.get_halt_reason() == "the vote is compromised"
        unregister()
        assert await two.clear(approvers=APPROVERS, reason="investigated")
        with trio.fail_after(5):
            await one.wait_cleared()
            await two.wait_cleared()
        assert [(r.action, r.reason) for r in await one.history()] == [
            ("clear", "initial clear"),  # the second process found nothing to clear
            ("halt", "the vote is compromised"),
            ("clear", "investigated"),
        ]


async def test_a_late_subscriber_reads_the_key_first(valkey_server: ValkeyServer, key: str) -> None:
    async with cleared(valkey_server.url, key) as one:
        await one.halt("raised before the other process started")
    # The message went out when nobody else listened: the key still says so.
    async with ValkeyHaltChannel(valkey_server.url, key=key) as late:
        assert late.state.halted and late.state.problem is None
        assert late.state.reason == "raised before the other process started"


CORRUPT_VALUES = {
    "not json": b"halted? no",
    "not utf-8": b"\xff\xfe{}",
    "empty": b"",
    "a list": b"[]",
    "halted is a string": json.dumps({"schema": "conclave.halt/1", "halted": "no"}).encode(),
    "unknown schema": json.dumps({"schema": "conclave.halt/9", "halted": False}).encode(),
    "no schema": json.dumps({"halted": False}).encode(),
    "halted without a reason": json.dumps({"schema": "conclave.halt/1", "halted": True}).encode(),
    "halted, with a NaN": b'{"schema": "conclave.halt/1", "halted": true, "reason": "r", "n": NaN}',
    "halted, a key twice": b'{"schema": "conclave.halt/1", "halted": true, "halted": true}',
    "duplicate key": b'{"schema": "conclave.halt/1", "halted": true, "halted": false}',
    "NaN": b'{"schema": "conclave.halt/1", "halted": false, "reason": NaN}',
    "lone surrogate": b'{"schema": "conclave.halt/1", "halted": false, "reason": "\\ud800"}',
    "nested too deep": b"[" * 100_000 + b"]" * 100_000,
    "too large": json.dumps(
        {"schema": "conclave.halt/1", "halted": False, "pad": "x" * 70_000}
    ).encode(),
}


@pytest.mark.parametrize("shape", [*CORRUPT_VALUES, "hash", "list", "set", "zset", "stream"])
async def test_a_corrupt_key_of_any_shape_reads_halted_and_halt_repairs_it(
    valkey_server: ValkeyServer, key: str, shape: str
) -> None:
    async with cleared(valkey_server.url, key) as channel, raw(valkey_server.url) as client:
        await client.delete([key])
        if shape in CORRUPT_VALUES:
            await client.set(key, CORRUPT_VALUES[shape])
        elif shape == "hash":
            await client.hset(key, {"halted": "false"})
        elif shape == "list":
            await client.rpush(key, [b"false"])
        elif shape == "set":
            await client.sadd(key, [b"false"])
        elif shape == "zset":
            await client.zadd(key, {"false": 1.0})
        else:
            await client.xadd(key, {"halted": "false"})
        # Written behind the channel's back: garbage on the events channel makes it look.
        await client.publish(f"{key}:events", b"\x00garbage")
        with trio.fail_after(5):
            reason = await channel.wait_halted()
        assert "unreadable" in reason and channel.state.problem is not None
        with pytest.raises(HaltClearDeniedError, match="unreadable"):
            await channel.clear(approvers=APPROVERS, reason="looks fine to me")
        # Halting rewrites it as a readable halt and keeps the bad value for forensics.
        assert await channel.halt("repairing the halt key")
        assert channel.kept_aside is not None
        kept_type = "string" if shape in CORRUPT_VALUES else shape
        assert await client.type(channel.kept_aside) == kept_type.encode()
        assert await channel.clear(approvers=APPROVERS, reason="repaired")
        with trio.fail_after(5):
            await channel.wait_cleared()


async def test_a_lost_connection_is_halted_until_the_key_is_read_again(
    own_server: ValkeyServer, key: str
) -> None:
    async with cleared(own_server.url, key, timeout=0.5, refresh_interval=0.1) as channel:
        own_server.pause()  # hung, not gone: only the refresh's timeout can tell
        with trio.fail_after(5):
            reason = await channel.wait_halted()
        assert "unreachable" in reason and not channel.state.connected
        own_server.resume()  # the key was never changed: reading it again lifts the halt
        with trio.fail_after(5):
            await channel.wait_cleared()

        own_server.stop()
        with trio.fail_after(5):
            assert "unreachable" in await channel.wait_halted()
        with pytest.raises(ValkeyUnavailableError, match="nothing was written"):
            await channel.halt("cannot reach it")
        with pytest.raises(HaltClearDeniedError, match="cannot reach"):
            await channel.clear(approvers=APPROVERS, reason="x")
        # Restarted without its data: no halt record, so still halted...
        own_server.start()
        with trio.fail_after(5):
            await channel.wait_read()  # the watcher reconnects (backing off) and reads
        assert channel.halted_now() and channel.state.problem == "no halt record"
        # ...until two approvers clear it.
        assert await channel.clear(approvers=APPROVERS, reason="server replaced")
        with trio.fail_after(5):
            await channel.wait_cleared()


async def test_outside_its_block_the_channel_reads_halted_and_cannot_write(
    valkey_server: ValkeyServer, key: str
) -> None:
    channel = ValkeyHaltChannel(valkey_server.url, key=key)
    assert channel.halted_now() and "not connected" in (await channel.get_halt_reason() or "")
    with pytest.raises(RuntimeError, match="async with"):
        await channel.halt("x")
    async with cleared(valkey_server.url, key) as other:
        assert not other.halted_now()
    assert other.halted_now() and "closed" in (other.state.reason or "")


@pytest.mark.parametrize(
    ("url", "kwargs", "match"),
    [
        ("http://127.0.0.1:6379", {}, "scheme"),
        ("redis://", {}, "no host"),
        ("redis://127.0.0.1:notaport", {}, "port"),
        ("", {}, "non-empty"),
        ("redis://127.0.0.1:6379", {"key": "has space"}, "whitespace"),
        ("redis://127.0.0.1:6379", {"timeout": 0}, "timeout"),
        ("redis://127.0.0.1:6379", {"refresh_interval": float("nan")}, "refresh_interval"),
    ],
)
def test_bad_settings_are_refused(url: str, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidRequestError, match=match):
        ValkeyHaltChannel(url, **kwargs)


async def test_bad_halt_and_clear_requests_change_nothing(
    valkey_server: ValkeyServer, key: str
) -> None:
    async with cleared(valkey_server.url, key) as channel:
        with pytest.raises(InvalidRequestError, match="non-empty reason"):
            await channel.halt("  ")
        with pytest.raises(HaltClearDeniedError, match="not a string"):
            await channel.clear(approvers="alice,bob", reason="x")
        assert not channel.halted_now() and len(await channel.history()) == 1


@pytest.fixture
def locked_server() -> Iterator[ValkeyServer]:
    """A server of this test's own that only a client with :data:`SECRET` may use."""
    with ValkeyServer(password=SECRET) as server:
        yield server


@pytest.mark.parametrize("form", range(len(secret_valkey_urls(0))))
async def test_a_password_anywhere_in_the_url_never_shows(
    locked_server: ValkeyServer, key: str, form: int, caplog: pytest.LogCaptureFixture
) -> None:
    """Not in ``repr``, ``.url``, the halt reason of a lost server or of a batch refused
    because of it, nor in any log record: whether the server answers, is lost, refuses
    a wrong password or was never there."""
    caplog.set_level(logging.DEBUG)
    url = secret_valkey_urls(locked_server.port)[form]
    shown: list[str | None] = []
    async with cleared(url, key) as channel:  # the password works: it reached the server
        shown += [repr(channel), channel.url]
        locked_server.stop()
        with trio.fail_after(10):
            shown.append(await channel.wait_halted())
        assert "unreachable" in (channel.state.reason or "")
        service = ConcurrentDeliberationService(AgentOrchestratorStub(), channel, AgentPool())
        with pytest.raises(SystemHaltedError) as refused:
            await service.invoke_concurrent(make_requests(2))
        shown += [refused.value.reason, str(refused.value), repr(channel)]
    locked_server.start()
    wrong = secret_valkey_urls(locked_server.port, "Zq7-wrong-pw")[form]
    never = secret_valkey_urls(free_port())[form]
    for other in (wrong, never):
        async with ValkeyHaltChannel(other, key=key, timeout=0.5) as channel:
            assert channel.state.halted and not channel.state.connected
            shown += [repr(channel), channel.url, channel.state.reason, channel.state.problem]
    assert_never_shown(SECRET, shown, caplog.records)
    assert_never_shown("Zq7-wrong-pw", shown, caplog.records)
    assert any(r.levelno == logging.ERROR for r in caplog.records)  # the loss was logged


async def test_clear_is_compare_and_set(valkey_server: ValkeyServer, key: str) -> None:
    """The clear script writes only if the key is still what the approvers saw."""
    async with raw(valkey_server.url) as client:
        await client.set(key, b'{"schema": "conclave.halt/1", "halted": true, "reason": "b"}')
        script = client.register_script(HALT_CLEAR)
        args: list[Any] = [b"what they saw", b"cleared", b"record", f"{key}:events", 10]
        keys = [key, f"{key}:history", f"{key}:history:aside"]
        assert await script(keys=keys, args=args) == 0
        assert b'"reason": "b"' in (await client.get(key) or b"")
        assert await client.exists([f"{key}:history"]) == 0


async def test_a_batch_stops_when_another_process_halts(
    valkey_server: ValkeyServer, key: str
) -> None:
    """The CLI's wiring: the in-process switch and the Valkey channel, either halts."""
    async with cleared(valkey_server.url, key) as mine, cleared(valkey_server.url, key) as theirs:
        switch = HaltSwitch()
        orch = ScriptedOrchestrator(default=Step(latency=60.0))
        service = ConcurrentDeliberationService(
            orch, DualChannelHaltChecker(switch, mine), AgentPool()
        )

        all_in_flight = trio.Event()

        def started(_agent: str) -> None:
            if orch.in_flight == 72:
                all_in_flight.set()

        orch.on_start = started

        async def trigger() -> None:
            await all_in_flight.wait()
            await theirs.halt("stop everything")

        with trio.fail_after(10):
            exc = await expect_halt(lambda: service.invoke_concurrent(make_requests(72)), trigger)
        assert exc.reason == "stop everything"
        assert exc.partial is not None and exc.partial.success_count == 0
        assert len(orch.cancelled) == 72 and not switch.halted


async def test_an_error_in_the_body_of_the_halt_channel_comes_out_as_itself(
    valkey_server: ValkeyServer,
) -> None:
    with pytest.raises(SystemHaltedError):
        async with ValkeyHaltChannel(valkey_server.url, key=unique_name()):
            raise SystemHaltedError("halted")


@pytest.mark.parametrize("shape", ["list", "hash"])
async def test_a_halt_key_of_the_wrong_type_is_a_halt_that_says_corrupt(
    valkey_server: ValkeyServer, shape: str
) -> None:
    key = unique_name()
    async with coredis.Redis.from_url(valkey_server.url, decode_responses=False) as client:
        if shape == "list":
            await client.rpush(key, [b"false"])
        else:
            await client.hset(key, {"halted": "false"})
        async with ValkeyHaltChannel(valkey_server.url, key=key) as channel:
            with trio.fail_after(5):
                reason = await channel.wait_halted()
    assert f"halt key {key} corrupt" in reason and f"it is a {shape}" in reason
    assert "unreachable" not in reason


# ---------------------------------------------------------------- signed approvals


@pytest.fixture
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keyring:
    ring = Keyring(tmp_path_factory.mktemp("keys"))
    ring.trust("alice")
    ring.trust("bob")
    return ring


async def test_two_signed_approvals_clear_the_halt_they_name_and_one_forged_changes_nothing(
    valkey_server: ValkeyServer, key: str, keys: Keyring
) -> None:
    async with (
        ValkeyHaltChannel(valkey_server.url, key=key, allowed_signers=keys.allowed) as channel,
        raw(valkey_server.url) as client,
    ):
        await channel.halt("tool misuse")
        halt_id = channel.state.halt_id
        assert halt_id is not None
        good = keys.approve("alice", halt_id, "tool misuse")
        forged = keys.approve("bob", halt_id, "tool misuse", key_of="mallory")
        before = (await client.get(key), await client.lrange(f"{key}:history", 0, -1))
        with pytest.raises(ApprovalRefusedError, match="'bob' refused"):
            await channel.clear(approvals=[good, forged], reason="trust me")
        with pytest.raises(HaltClearDeniedError, match="requires signed approvals"):
            await channel.clear(approvers=["alice", "bob"], reason="typed names")
        assert (await client.get(key), await client.lrange(f"{key}:history", 0, -1)) == before

        bob = keys.approve("bob", halt_id, "tool misuse")
        assert await channel.clear(approvals=[good, bob], reason="fixed") is True
        with trio.fail_after(5):
            await channel.wait_cleared()
        record = (await channel.history())[-1]
        assert (record.action, record.approvers, record.halt_id) == (
            "clear",
            ("alice", "bob"),
            halt_id,
        )
        assert record.fingerprints == (keys.fingerprint("alice"), keys.fingerprint("bob"))
        # Replayed for the next halt (same reason): refused.
        await channel.halt("tool misuse")
        with pytest.raises(ApprovalRefusedError, match="is for another halt"):
            await channel.clear(approvals=[good, bob], reason="again")
        assert channel.state.halted


async def test_a_key_written_with_allowed_signers_refuses_names_from_every_channel(
    valkey_server: ValkeyServer, key: str, keys: Keyring
) -> None:
    """One operator must not clear alone by leaving out --allowed-signers: once a tool
    with an allowed-signers file has written the key, a channel without one refuses
    names too, and a halt it raises keeps that."""
    async with (
        ValkeyHaltChannel(valkey_server.url, key=key, allowed_signers=keys.allowed) as signed,
        ValkeyHaltChannel(valkey_server.url, key=key) as plain,
        raw(valkey_server.url) as client,
    ):
        await signed.halt("tool misuse")
        before = (await client.get(key), await client.lrange(f"{key}:history", 0, -1))
        with pytest.raises(HaltClearDeniedError, match="requires signed approvals"):
            await plain.clear(approvers=["alice", "bob"], reason="alone")
        assert (await client.get(key), await client.lrange(f"{key}:history", 0, -1)) == before

        halt_id = signed.state.halt_id or ""
        approvals = [keys.approve(p, halt_id, "tool misuse") for p in ("alice", "bob")]
        assert await signed.clear(approvals=approvals, reason="fixed")
        with trio.fail_after(5):
            await plain.wait_cleared()
        assert await plain.halt("again")
        with pytest.raises(HaltClearDeniedError, match="requires signed approvals"):
            await plain.clear(approvers=["alice", "bob"], reason="alone")
        assert plain.state.halted


async def test_approvals_checked_against_other_signer_files_than_the_key_records_change_nothing(
    valkey_server: ValkeyServer, key: str, keys: Keyring, tmp_path: Path
) -> None:
    own = tmp_path / "my_allowed_signers"
    for name, holder in (("alice", "mallory"), ("bob", "mallory-2")):
        public = keys.key(holder).with_suffix(".pub").read_text().split()[:2]
        with own.open("a") as f:
            f.write(f"{name} {' '.join(public)}\n")
    async with (
        ValkeyHaltChannel(valkey_server.url, key=key, allowed_signers=keys.allowed) as signed,
        ValkeyHaltChannel(valkey_server.url, key=key, allowed_signers=own) as mine,
        raw(valkey_server.url) as client,
    ):
        await signed.halt("tool misuse")
        halt_id = signed.state.halt_id or ""
        forged = [
            keys.approve("alice", halt_id, "tool misuse", key_of="mallory"),
            keys.approve("bob", halt_id, "tool misuse", key_of="mallory-2"),
        ]
        before = (await client.get(key), await client.lrange(f"{key}:history", 0, -1))
        with pytest.raises(ApprovalRefusedError, match=r"verifies signatures against .*, not "):
            await mine.clear(approvals=forged, reason="alone")
        assert (await client.get(key), await client.lrange(f"{key}:history", 0, -1)) == before


async def test_a_halt_keeps_the_signer_files_the_key_records_though_this_process_read_none(
    valkey_server: ValkeyServer, key: str
) -> None:
    async with (
        ValkeyHaltChannel(valkey_server.url, key=key, refresh_interval=60) as plain,
        raw(valkey_server.url) as client,
    ):
        assert await plain.clear(approvers=["alice", "bob"], reason="first start")
        with trio.fail_after(5):
            await plain.wait_cleared()
        # Another operator's tool enrolled the key since this process last read it.
        files = {"allowed_signers": "/etc/conclave/allowed_signers", "revoked": None}
        enrolled = {"schema": "conclave.halt/1", "halted": False, "reason": None}
        valkey_server.command("SET", key, json.dumps({**enrolled, "signed_clears": files}))
        assert await plain.halt("storm")
        assert json.loads(await client.get(key) or b"")["signed_clears"] == files
        with pytest.raises(HaltClearDeniedError, match="requires signed approvals"):
            await plain.clear(approvers=["alice", "bob"], reason="alone")


async def test_a_halt_raised_while_approvals_are_verified_is_not_cleared(
    valkey_server: ValkeyServer, key: str, keys: Keyring
) -> None:
    async with (
        ValkeyHaltChannel(valkey_server.url, key=key, allowed_signers=keys.allowed) as channel,
        raw(valkey_server.url) as client,
    ):
        await channel.halt("storm")
        halt_id = channel.state.halt_id
        approvals = [keys.approve(p, halt_id or "", "storm") for p in ("alice", "bob")]
        verify = channel.verifier
        assert verify is not None
        real = verify.verify

        def verify_then_rehalt(signed: SignedStatement) -> Any:
            signer = real(signed)
            # Meanwhile, another operator's tool clears and a new halt is raised.
            valkey_server.command(
                "SET",
                key,
                '{"schema": "conclave.halt/1", "halted": true, '
                '"reason": "second storm", "halt_id": "second"}',
            )
            return signer

        verify.verify = verify_then_rehalt  # type: ignore[method-assign]
        with pytest.raises(ApprovalRefusedError, match="is for another halt"):
            await channel.clear(approvals=approvals, reason="calm")
        assert b"second storm" in (await client.get(key) or b"")


async def test_a_missing_halt_record_is_not_cleared_by_signatures(
    valkey_server: ValkeyServer, key: str, keys: Keyring
) -> None:
    async with ValkeyHaltChannel(valkey_server.url, key=key, allowed_signers=keys.allowed) as ch:
        approvals = [keys.approve(p, "anything", "r") for p in ("alice", "bob")]
        with pytest.raises(ApprovalRefusedError, match="no halt record"):
            await ch.clear(approvals=approvals, reason="first start")
        assert ch.state.halted


async def test_a_signed_halt_on_the_server_says_who_halted(
    valkey_server: ValkeyServer, key: str, keys: Keyring
) -> None:
    async with ValkeyHaltChannel(valkey_server.url, key=key, allowed_signers=keys.allowed) as ch:
        forged = keys.approve("alice", None, "storm", action="halt", key_of="mallory")
        with pytest.raises(InvalidRequestError, match="nothing was written"):
            await ch.halt("storm", signed=forged)
        assert await ch.history() == ()
        assert await ch.halt("storm", signed=keys.approve("alice", None, "storm", action="halt"))
        record = (await ch.history())[-1]
        assert (record.approvers, record.fingerprints) == (("alice",), (keys.fingerprint("alice"),))


# ---------------------------------------------------------------- least privilege


def _acl_users(server: ValkeyServer) -> dict[str, str]:
    """Create the users of deploy/valkey/users.acl on ``server``; their passwords."""
    passwords = {}
    for line in (ROOT / "deploy" / "valkey" / "users.acl").read_text().splitlines():
        if not line.startswith("user "):
            continue
        _, name, *rules = line.split()
        passwords[name] = f"pw-{uuid.uuid4().hex}"
        rules = [f">{passwords[name]}" if r.startswith(">") else r for r in rules]
        assert server.command("ACL", "SETUSER", name, *rules) == b"+OK\r\n"
    return passwords


async def test_a_worker_user_reads_the_halt_and_shares_capacity_but_cannot_clear_or_forge_it(
    own_server: ValkeyServer,
) -> None:
    passwords = _acl_users(own_server)
    own_server.seed_capacity()
    worker = f"redis://worker:{passwords['worker']}@127.0.0.1:{own_server.port}"
    operator = f"redis://operator:{passwords['operator']}@127.0.0.1:{own_server.port}"
    async with ValkeyHaltChannel(operator) as tools:
        assert await tools.halt("storm") is True
    async with ValkeyHaltChannel(worker) as channel, raw(own_server.url) as admin:
        assert channel.state.connected and channel.state.reason == "storm"
        before = (
            await admin.get("conclave:halt"),
            await admin.lrange("conclave:halt:history", 0, -1),
        )
        with pytest.raises(HaltClearDeniedError, match="refused to clear for this user"):
            await channel.clear(approvers=["alice", "bob"], reason="a worker's forgery")
        with pytest.raises(ValkeyUnavailableError, match="refused to raise the halt"):
            await channel.halt("forged")  # already halted: the write is refused anyway
        async with raw(worker) as direct:
            with pytest.raises(coredis.exceptions.AuthorizationError):
                await direct.set("conclave:halt", '{"schema": "conclave.halt/1", "halted": false}')
            with pytest.raises(coredis.exceptions.AuthorizationError):
                await direct.delete(["conclave:halt"])
            # Nor wipe the server, or give itself more rights.
            with pytest.raises(coredis.exceptions.AuthorizationError):
                await direct.flushall()
            with pytest.raises(coredis.exceptions.AuthorizationError):
                await direct.acl_setuser("worker", "~*")
        after = (
            await admin.get("conclave:halt"),
            await admin.lrange("conclave:halt:history", 0, -1),
        )
        assert after == before
        async with ValkeyCapacity(worker, capacity=2) as capacity:
            await capacity.reserve(["a", "b"])
            assert capacity.in_use() == 2
            capacity.release("a")
            capacity.release("b")
            await capacity.flush()
    # The operator's user can clear; every worker resumes.
    async with ValkeyHaltChannel(operator) as tools:
        assert await tools.clear(approvers=["alice", "bob"], reason="checked") is True
