"""The Valkey adapters as a hostile user meets them: errors raised in the body of their
``async with`` blocks, absurd settings, and keys of the wrong type."""

from __future__ import annotations

import logging
import uuid

import coredis
import pytest
import trio

from adapters.valkey import ValkeyCapacity, ValkeyHaltChannel
from kernel import AgentPoolExhaustedError, InvalidRequestError, SystemHaltedError
from tests.support.valkey_server import ValkeyServer


def unique() -> str:
    return f"test-{uuid.uuid4().hex}"


async def test_an_error_in_the_body_of_the_capacity_comes_out_as_itself(
    valkey_server: ValkeyServer,
) -> None:
    # README: "async with ValkeyCapacity(url) as shared: ... deliberate": a halt raised in
    # there must be catchable as SystemHaltedError, as with SqliteWitness, not as an
    # ExceptionGroup from the capacity's own background nursery.
    with pytest.raises(SystemHaltedError):
        async with ValkeyCapacity(valkey_server.url, name=unique()):
            raise SystemHaltedError("halted")


async def test_an_error_in_the_body_of_the_halt_channel_comes_out_as_itself(
    valkey_server: ValkeyServer,
) -> None:
    with pytest.raises(SystemHaltedError):
        async with ValkeyHaltChannel(valkey_server.url, key=unique()):
            raise SystemHaltedError("halted")


@pytest.mark.parametrize("lease_s", [1e306, 86_400.5, 1e20])
def test_a_lease_beyond_a_day_is_refused_when_made_not_at_the_first_acquire(
    lease_s: float,
) -> None:
    # 1e306 s used to be accepted, then every acquire failed with OverflowError (its
    # milliseconds are infinite); a lease of years would keep a dead process's slots.
    with pytest.raises(InvalidRequestError, match="lease_s"):
        ValkeyCapacity("redis://127.0.0.1:1", lease_s=lease_s)
    assert ValkeyCapacity("redis://127.0.0.1:1", lease_s=86_400).lease_s == 86_400


async def test_reserving_a_lease_already_held_is_refused_like_acquiring_it(
    valkey_server: ValkeyServer,
) -> None:
    # It used to be accepted and counted once on the server: the caller then believed
    # it held two slots, and one release gave both back.
    name = unique()
    valkey_server.seed_capacity(name)
    async with ValkeyCapacity(valkey_server.url, name=name, capacity=3) as capacity:
        await capacity.reserve(["a"])
        await capacity.acquire("b")
        for leases in (["a"], ["b", "c"]):
            with pytest.raises(InvalidRequestError, match="already held"):
                await capacity.reserve(leases)
        await capacity.flush()
        assert capacity.held == {"a", "b"}
        assert capacity.in_use() == 2


@pytest.mark.parametrize(("suffix", "shape"), [("leases", "list"), ("ticket", "hash")])
async def test_a_capacity_key_of_the_wrong_type_is_reported_corrupt_not_unreachable(
    valkey_server: ValkeyServer, suffix: str, shape: str, caplog: pytest.LogCaptureFixture
) -> None:
    name = unique()
    key = f"{name}:{suffix}"
    async with coredis.Redis.from_url(valkey_server.url, decode_responses=False) as client:
        if shape == "list":
            await client.rpush(key, [b"not a lease"])
        else:
            await client.hset(key, {"not": "a counter"})
        with caplog.at_level(logging.ERROR, logger="adapters.valkey"):
            async with ValkeyCapacity(valkey_server.url, name=name, lease_s=0.5) as capacity:
                with pytest.raises(AgentPoolExhaustedError) as refused:
                    await capacity.reserve(["a"])
                # Set aside at the first call (entering); then the books start again.
                assert "recovering" in str(refused.value)
                assert "unreachable" not in str(refused.value)
                assert await client.type(f"{key}:corrupt") == shape.encode()
                with trio.fail_after(5):
                    await capacity.acquire("b")  # admitted once the grace is over
        assert "corrupt keys set aside" in caplog.text
        assert f"{key}={shape}" in str([r.__dict__.get("corrupt_keys") for r in caplog.records])


async def test_a_capacity_record_of_the_wrong_type_is_set_aside_and_logged_as_corrupt(
    valkey_server: ValkeyServer, caplog: pytest.LogCaptureFixture
) -> None:
    name = unique()
    async with coredis.Redis.from_url(valkey_server.url, decode_responses=False) as client:
        await client.rpush(f"{name}:capacity", [b"72"])
        with caplog.at_level(logging.ERROR, logger="adapters.valkey"):
            async with ValkeyCapacity(valkey_server.url, name=name, capacity=3):
                pass
        assert await client.get(f"{name}:capacity") == b"3"
        assert await client.type(f"{name}:capacity:corrupt") == b"list"
    assert "corrupt key set aside" in caplog.text and "unreachable" not in caplog.text


@pytest.mark.parametrize("shape", ["list", "hash"])
async def test_a_halt_key_of_the_wrong_type_is_a_halt_that_says_corrupt(
    valkey_server: ValkeyServer, shape: str
) -> None:
    key = unique()
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
