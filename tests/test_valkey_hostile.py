"""The Valkey adapters as a hostile user meets them: errors raised in the body of their
``async with`` blocks, and absurd settings."""

from __future__ import annotations

import uuid

import pytest

from adapters.valkey import ValkeyCapacity, ValkeyHaltChannel
from kernel import InvalidRequestError, SystemHaltedError
from tests.valkey_server import ValkeyServer


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
