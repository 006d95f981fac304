"""ValkeyCapacity against a real server: the Lua scripts' edge cases, then the
SharedCapacity contract (as
tests/support/model_capacity.py's in-memory model has it) with
several instances standing for several processes, then AgentPool on top.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import coredis
import pytest
import trio
import trio.testing

from adapters.valkey import ValkeyCapacity
from adapters.valkey._lua import ACQUIRE, ACQUIRE_BATCH, RESERVE, SYNC
from kernel import (
    AgentPool,
    AgentPoolExhaustedError,
    ConcurrentDeliberationService,
    FailureKind,
    HaltSwitch,
    HedgePolicy,
    InvalidRequestError,
    SharedCapacity,
    SystemHaltedError,
)
from tests.support.helpers import ScriptedOrchestrator, Step, expect_halt, make_requests
from tests.support.url_secrets import SECRET, assert_never_shown, secret_valkey_urls
from tests.support.valkey_server import ValkeyServer, free_port, unique_name

Raw = coredis.Redis[bytes]


@pytest.fixture
def name(valkey_server: ValkeyServer) -> str:
    """A capacity name in service (no recovery grace) on the session's server."""
    fresh = f"test-{uuid.uuid4().hex}"
    valkey_server.seed_capacity(fresh)
    return fresh


@pytest.fixture
def fresh_name() -> str:
    """A capacity name nobody has used: its first use begins the recovery grace."""
    return f"test-{uuid.uuid4().hex}"


@pytest.fixture
def own_server(name: str) -> Iterator[ValkeyServer]:
    with ValkeyServer() as server:
        server.seed_capacity(name)
        yield server


@asynccontextmanager
async def raw(url: str) -> AsyncIterator[Raw]:
    async with coredis.Redis.from_url(url, decode_responses=False) as client:
        yield client


async def wait_until(check: Callable[[], Awaitable[bool]], seconds: float = 5.0) -> None:
    """Wait for a condition on the server (no event crosses the process boundary)."""
    with trio.fail_after(seconds):
        while not await check():  # noqa: ASYNC110  # a condition in another process
            await trio.sleep(0.005)


class Scripts:
    """The capacity scripts called directly, as one process would, with lease times in ms."""

    def __init__(self, client: Raw, name: str, capacity: int) -> None:
        self.client = client
        books = [f"{name}:{k}" for k in ("leases", "queue", "waiting", "ticket", "epoch")]
        self.keys = [*books, *(f"{key}:corrupt" for key in books)]
        self.grants = f"{name}:grants"
        self.capacity = capacity
        #: Where the books stood after the last call: [epoch, grace left (ms), corrupt keys].
        self.books: list[Any] = []
        self._reserve = client.register_script(RESERVE)
        self._acquire = client.register_script(ACQUIRE)
        self._acquire_batch = client.register_script(ACQUIRE_BATCH)
        self._sync = client.register_script(SYNC)

    def _args(self, lease_ms: int, *rest: Any) -> list[Any]:
        return [self.capacity, lease_ms, self.grants, *rest]

    def _split(self, reply: Any) -> list[Any]:
        self.books = list(reply[:3])
        return list(reply[3:])

    async def reserve(self, *leases: str, lease_ms: int = 60_000) -> list[Any]:
        return self._split(await self._reserve(keys=self.keys, args=self._args(lease_ms, *leases)))

    async def acquire(self, lease: str, lease_ms: int = 60_000) -> list[Any]:
        return self._split(await self._acquire(keys=self.keys, args=self._args(lease_ms, lease)))

    async def acquire_batch(self, *leases: str, lease_ms: int = 60_000) -> list[Any]:
        args = self._args(lease_ms, *leases)
        return self._split(await self._acquire_batch(keys=self.keys, args=args))

    async def sync(
        self,
        releases: list[str] = [],  # noqa: B006  # never mutated
        held: list[str] = [],  # noqa: B006
        waiting: list[str] = [],  # noqa: B006
        lease_ms: int = 60_000,
    ) -> list[Any]:
        args = self._args(lease_ms, len(releases), len(held), *releases, *held, *waiting)
        return self._split(await self._sync(keys=self.keys, args=args))

    async def held(self) -> set[str]:
        return {m.decode() for m in await self.client.zrange(self.keys[0], 0, -1)}

    async def queue(self) -> list[str]:
        return [m.decode() for m in await self.client.zrange(self.keys[1], 0, -1)]


# ---------------------------------------------------------------- the Lua scripts


async def test_reserve_is_all_or_nothing_and_a_retry_counts_once(
    valkey_server: ValkeyServer, name: str
) -> None:
    async with raw(valkey_server.url) as client:
        s = Scripts(client, name, capacity=5)
        assert await s.reserve("a", "b", "c") == [1, 3, 0]
        assert await s.reserve("d", "e", "f") == [0, 3, 0]  # 3 + 3 > 5: none taken
        assert await s.held() == {"a", "b", "c"}
        assert await s.reserve("c", "d", "e") == [1, 5, 0]  # c is already held: counts once
        assert await s.held() == {"a", "b", "c", "d", "e"}


async def test_expired_leases_and_departed_waiters_are_reclaimed(
    valkey_server: ValkeyServer, name: str
) -> None:
    async with raw(valkey_server.url) as client:
        s = Scripts(client, name, capacity=2)
        assert await s.reserve("alive", "dead") == [1, 2, 0]
        await client.zadd(s.keys[0], {"dead": 1.0})  # its process stopped renewing long ago
        assert await s.acquire("w-gone") == [1, 2, 0]  # the dead slot is reclaimed at once
        assert await s.acquire("w1") == [0, 2, 1]
        assert await s.acquire("w2") == [0, 2, 2]
        await client.zadd(s.keys[2], {"w1": 1.0})  # w1's process died while queued
        [in_use, queued, *_] = await s.sync(releases=["alive"])
        # The freed slot skips the departed waiter and goes to the next one.
        assert (in_use, queued) == (2, 0)
        assert await s.held() == {"w-gone", "w2"} and await s.queue() == []


async def test_release_is_idempotent_and_ignores_strangers(
    valkey_server: ValkeyServer, name: str
) -> None:
    async with raw(valkey_server.url) as client:
        s = Scripts(client, name, capacity=3)
        await s.reserve("a", "b")
        assert (await s.sync(releases=["a", "a", "never-held"]))[:2] == [1, 0]
        assert (await s.sync(releases=["a"]))[:2] == [1, 0]
        assert await s.held() == {"b"}


async def test_slots_go_to_waiters_in_fifo_order_and_each_grant_is_published(
    valkey_server: ValkeyServer, name: str
) -> None:
    async with raw(valkey_server.url) as client, raw(valkey_server.url) as listener:
        s = Scripts(client, name, capacity=1)
        async with listener.pubsub(channels=[s.grants], ignore_subscribe_messages=True) as sub:
            assert (await s.acquire("holder"))[0] == 1
            for i, waiter in enumerate(["w1", "w2", "w3"], start=1):
                assert await s.acquire(waiter) == [0, 1, i]
            assert await s.acquire("w2") == [0, 1, 2]  # asked again: keeps its place
            grants = []
            for leaving in ("holder", "w1", "w2"):
                await s.sync(releases=[leaving])
                message = None
                with trio.fail_after(5):
                    while message is None:  # None: a subscription message, filtered out
                        message = await sub.get_message()
                grants.append(message["data"])
        assert grants == [b"w1", b"w2", b"w3"]
        assert await s.held() == {"w3"} and await s.queue() == []


async def test_a_batch_is_granted_in_order_while_slots_are_free_and_the_rest_queue_behind(
    valkey_server: ValkeyServer, name: str
) -> None:
    async with raw(valkey_server.url) as client, raw(valkey_server.url) as listener:
        s = Scripts(client, name, capacity=3)
        async with listener.pubsub(channels=[s.grants], ignore_subscribe_messages=True) as sub:
            await s.reserve("holder")
            assert await s.acquire_batch("a", "b", "c", "d") == [3, 2, b"g", b"g", b"w", b"w"]
            assert await s.held() == {"holder", "a", "b"} and await s.queue() == ["c", "d"]
            # Asked again (a retried call): each keeps what it has, nothing is taken twice.
            assert await s.acquire_batch("b", "d", "c") == [3, 2, b"g", b"w", b"w"]
            assert await s.queue() == ["c", "d"]
            # Someone waits: a newcomer's batch is queued whole behind, even with a free slot.
            await client.zrem(s.keys[0], ["holder"])  # freed without a script handing it on
            assert await s.acquire_batch("e", "f") == [3, 3, b"w", b"w"]
            assert await s.held() == {"a", "b", "c"} and await s.queue() == ["d", "e", "f"]
            # The grant the batch's pump made was published; its own grants never are.
            message = None
            with trio.fail_after(5):
                while message is None:
                    message = await sub.get_message()
            assert message["data"] == b"c"
            assert await sub.get_message(timeout=0.05) is None


async def test_reserve_never_jumps_the_queue(valkey_server: ValkeyServer, name: str) -> None:
    async with raw(valkey_server.url) as client:
        s = Scripts(client, name, capacity=2)
        await s.reserve("a", "b")
        assert await s.acquire("waiter") == [0, 2, 1]
        await client.zrem(s.keys[0], ["a"])  # a slot frees without a script handing it on
        # The reserve hands it to the waiter first, then finds the capacity full.
        assert await s.reserve("jumper") == [0, 2, 0]
        assert await s.held() == {"b", "waiter"}
        assert await s.acquire("w2") == [0, 2, 1]
        assert await s.reserve("jumper") == [0, 2, 1]  # refused: someone is queued


async def test_sync_renews_re_adds_a_lost_lease_only_if_there_is_room_and_re_queues_waiters(
    valkey_server: ValkeyServer, name: str
) -> None:
    async with raw(valkey_server.url) as client:
        s = Scripts(client, name, capacity=3)
        await s.reserve("kept", "lost")
        await client.zrem(s.keys[0], ["lost"])  # gone from the books, its agent still runs
        # There is room: the store counts it again.
        assert await s.sync(held=["kept", "lost"]) == [2, 0, b"h", b"r"]
        await client.zrem(s.keys[0], ["lost"])
        assert (await s.acquire("newcomer"))[0] == 1
        assert (await s.acquire("third"))[0] == 1  # the room is taken
        # No room for it now: it is lost (its holder stops its agent), never counted over.
        assert await s.sync(held=["kept", "lost"]) == [3, 0, b"h", b"l"]
        assert await s.held() == {"kept", "newcomer", "third"}
        assert (await s.acquire("waiter"))[0] == 0
        await client.zrem(s.keys[1], ["waiter"])
        assert await s.sync(waiting=["waiter"]) == [3, 1, b"q"]
        assert await s.queue() == ["waiter"]


async def test_new_books_admit_nothing_for_one_lease_but_take_back_what_holders_re_assert(
    valkey_server: ValkeyServer, fresh_name: str
) -> None:
    async with raw(valkey_server.url) as client:
        s = Scripts(client, fresh_name, capacity=2)
        lease_ms = 1000
        assert await s.reserve("new", lease_ms=lease_ms) == [0, 0, 0]  # refused: the grace
        epoch, grace, corrupt = s.books
        assert 0 < grace <= lease_ms and corrupt == b""
        assert await s.acquire("waiter", lease_ms=lease_ms) == [0, 0, 1]  # queued, not granted
        # A holder from before the loss re-asserts its lease during the grace.
        assert await s.sync(held=["running"], lease_ms=lease_ms) == [1, 1, b"r"]
        assert await s.held() == {"running"}
        await trio.sleep(0.4)
        assert await s.sync(held=["running"], lease_ms=lease_ms) == [1, 1, b"h"]
        assert s.books[1] > 0  # still in the grace: the waiter waits
        await trio.sleep(0.7)  # the time under test: the grace runs out
        reply = await s.sync(held=["running"], waiting=["waiter"], lease_ms=lease_ms)
        assert reply == [2, 0, b"h", b"g"]  # granted by the first call after the grace
        assert s.books[0] == epoch and s.books[1] == 0


async def test_flushed_books_begin_a_new_epoch_and_grace(
    valkey_server: ValkeyServer, name: str
) -> None:
    async with raw(valkey_server.url) as client:
        s = Scripts(client, name, capacity=2)
        assert await s.reserve("a") == [1, 1, 0]
        epoch, grace, _ = s.books
        assert grace == 0
        await client.delete([s.keys[0], s.keys[4]])  # what FLUSHALL does to this name
        assert await s.reserve("b") == [0, 0, 0]
        assert s.books[0] != epoch and s.books[1] > 0


WRONG_SHAPES: dict[str, Callable[[Raw, str], Awaitable[object]]] = {
    "list": lambda c, k: c.rpush(k, [b"x"]),
    "hash": lambda c, k: c.hset(k, {"x": "1"}),
    "text": lambda c, k: c.set(k, b"not a number"),
    "huge number": lambda c, k: c.set(k, b"1" * 40),
    "float": lambda c, k: c.set(k, b"1e300"),
}


@pytest.mark.parametrize("key", ["leases", "queue", "waiting", "ticket", "epoch"])
@pytest.mark.parametrize("shape", list(WRONG_SHAPES))
async def test_a_corrupt_key_is_set_aside_and_the_books_start_again_with_a_grace(
    valkey_server: ValkeyServer, name: str, key: str, shape: str
) -> None:
    async with raw(valkey_server.url) as client:
        s = Scripts(client, name, capacity=2)
        await s.reserve("a")
        index = ["leases", "queue", "waiting", "ticket", "epoch"].index(key)
        await client.delete([s.keys[index]])
        await WRONG_SHAPES[shape](client, s.keys[index])
        # Never a WRONGTYPE error (which read as "unreachable"): the key is set aside.
        assert (await s.acquire("b"))[0] == 0  # the grace: nothing new admitted
        found = "string" if shape in ("text", "huge number", "float") else shape
        assert s.books[2] == f"{s.keys[index]}={found}".encode()
        assert await client.type(s.keys[index + 5]) == found.encode()
        assert s.books[1] > 0
        assert (await s.sync(held=["a"]))[:1] == [1]  # the holder re-asserts; all readable


@pytest.mark.parametrize("score", [float("inf"), 1e300, 4e12])
@pytest.mark.parametrize("key", ["leases", "waiting"])
async def test_an_absurd_expiry_is_cut_to_one_lease_and_never_holds_a_slot_forever(
    valkey_server: ValkeyServer, name: str, score: float, key: str
) -> None:
    async with raw(valkey_server.url) as client:
        s = Scripts(client, name, capacity=1)
        if key == "leases":
            await client.zadd(s.keys[0], {"forever": score})
        else:
            assert (await s.acquire("holder"))[0] == 1
            assert (await s.acquire("forever"))[0] == 0
            await client.zadd(s.keys[2], {"forever": score})
            await s.sync(releases=["holder"])  # "forever" is granted, from a deadline of...
        await s.sync(lease_ms=200)  # any call cuts what no process could have written
        expiry = await client.zscore(s.keys[0], "forever")
        assert expiry is not None and expiry < 4e12  # ...at most a day off, not forever
        await client.zadd(s.keys[0], {"forever": score})
        await s.sync(lease_ms=200)
        await trio.sleep(0.3)  # nobody renews it: it expires like any other lease
        assert (await s.acquire("next", lease_ms=200))[0] == 1
        assert await s.held() == {"next"}


async def test_a_negative_or_nan_expiry_holds_no_slot(
    valkey_server: ValkeyServer, name: str
) -> None:
    async with raw(valkey_server.url) as client:
        s = Scripts(client, name, capacity=1)
        await client.zadd(s.keys[0], {"past": float("-inf")})
        await client.zadd(s.keys[0], {"negative": -5.0})
        with pytest.raises(coredis.exceptions.ResponseError):
            await client.zadd(s.keys[0], {"nan": float("nan")})  # the server refuses NaN
        assert (await s.acquire("a"))[0] == 1
        assert await s.held() == {"a"}


# ---------------------------------------------------------------- the SharedCapacity contract


@asynccontextmanager
async def capacities(
    url: str, name: str, n: int, **kwargs: Any
) -> AsyncIterator[list[ValkeyCapacity]]:
    """``n`` capacities on one name: as ``n`` processes would have."""
    opened: list[ValkeyCapacity] = []
    try:
        for _ in range(n):
            opened.append(await ValkeyCapacity(url, name=name, **kwargs).__aenter__())
        yield opened
    finally:
        for capacity in reversed(opened):
            await capacity.__aexit__(None, None, None)


async def test_it_is_a_shared_capacity(valkey_server: ValkeyServer, name: str) -> None:
    assert isinstance(ValkeyCapacity(valkey_server.url, name=name), SharedCapacity)


async def test_reserve_across_processes_is_all_or_nothing(
    valkey_server: ValkeyServer, name: str
) -> None:
    async with (
        capacities(valkey_server.url, name, 2, capacity=5) as (one, two),
        raw(valkey_server.url) as client,
    ):
        await one.reserve(["a1", "a2", "a3"])
        refused = r"exhausted: 3 in use \+ 3 requested > 5"
        with pytest.raises(AgentPoolExhaustedError, match=refused):
            await two.reserve(["b1", "b2", "b3"])
        assert two.held == frozenset() and two.in_use() == 3
        await two.reserve(["b1", "b2"])
        assert one.held == {"a1", "a2", "a3"} and two.held == {"b1", "b2"}
        one.release("a1")
        one.release("a1")  # idempotent
        two.release("never-mine")
        await wait_until(lambda: _count(client, f"{name}:leases", 4))


async def test_acquire_waits_fifo_across_processes_without_polling(
    valkey_server: ValkeyServer, name: str
) -> None:
    async with (
        capacities(valkey_server.url, name, 3, capacity=1) as (one, two, three),
        raw(valkey_server.url) as client,
    ):
        queue = f"{name}:queue"
        order: list[str] = []
        await one.acquire("first")

        async def take(capacity: ValkeyCapacity, lease: str) -> None:
            await capacity.acquire(lease)
            order.append(lease)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(take, two, "second")
            await wait_until(lambda: _count(client, queue, 1))
            nursery.start_soon(take, three, "third")
            await wait_until(lambda: _count(client, queue, 2))
            one.release("first")
            await wait_until(lambda: _async(order == ["second"]))
            assert three.waiting == {"third"}
            two.release("second")
        assert order == ["second", "third"] and three.held == {"third"}


async def _count(client: Raw, queue: str, n: int) -> bool:
    return await client.zcard(queue) == n


async def _async(value: bool) -> bool:
    await trio.lowlevel.checkpoint()
    return value


async def test_a_cancelled_acquire_holds_nothing(valkey_server: ValkeyServer, name: str) -> None:
    async with (
        capacities(valkey_server.url, name, 2, capacity=1) as (one, two),
        raw(valkey_server.url) as client,
    ):
        await one.acquire("holder")
        with trio.move_on_after(0.2) as scope:
            await two.acquire("impatient")
        assert scope.cancelled_caught
        assert two.held == frozenset() and two.waiting == frozenset()
        await wait_until(lambda: _count(client, f"{name}:queue", 0))
        one.release("holder")
        await wait_until(lambda: _count(client, f"{name}:leases", 0))


async def test_leases_are_renewed_while_held_and_expire_after_their_holder_is_gone(
    valkey_server: ValkeyServer, name: str
) -> None:
    async with (
        capacities(valkey_server.url, name, 1, capacity=1, lease_s=0.2) as (survivor,),
        raw(valkey_server.url) as client,
    ):
        await survivor.reserve(["long-runner"])
        await trio.sleep(0.7)  # the time under test: more than three lease periods
        assert await client.zcard(f"{name}:leases") == 1  # renewed all along
        survivor.release("long-runner")
        await wait_until(lambda: _count(client, f"{name}:leases", 0))

        # A process that dies holding a lease (it never renews): the lease is reclaimed.
        dead = Scripts(client, name, capacity=1)
        assert (await dead.reserve("orphan", lease_ms=300))[0] == 1
        start = trio.current_time()
        with trio.fail_after(3):
            await survivor.acquire("next")  # granted when a renewal's pump reclaims it
        assert trio.current_time() - start >= 0.25


async def test_an_unreachable_server_refuses_admission_and_takes_nothing(
    own_server: ValkeyServer, name: str
) -> None:
    async with capacities(own_server.url, name, 2, capacity=3, lease_s=0.5) as (one, two):
        await one.reserve(["running"])
        await one.acquire("also-running")
        await one.acquire("queued-a")

        async def queued() -> None:
            with pytest.raises(AgentPoolExhaustedError, match="unreachable"):
                await two.acquire("queued-b")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(queued)
            async with raw(own_server.url) as client:
                await wait_until(lambda: _count(client, f"{name}:queue", 1))
            own_server.stop()  # a waiter already queued gives up after lease_s of outage
        assert two.waiting == frozenset() and two.in_use() is None
        unreachable = "FR10: shared capacity unreachable"
        with pytest.raises(AgentPoolExhaustedError, match=unreachable):
            await one.reserve(["x"])
        with pytest.raises(AgentPoolExhaustedError, match=unreachable):
            await two.acquire("y")
        # Not renewed within lease_s: the holder let its leases go (see the lost-lease test).
        await wait_until(lambda: _async(one.held == frozenset()))
        pool = AgentPool(shared=two)
        assert pool.status().shared_in_use is None and pool.status().shared_capacity == 3
        # Back, without its data: nothing new is admitted for one lease period.
        own_server.start()
        with trio.fail_after(5):
            while True:
                try:
                    await two.reserve(["z"])
                    break
                except AgentPoolExhaustedError as exc:
                    assert "unreachable" in str(exc) or "recovering" in str(exc), exc
                    await trio.sleep(0.05)


async def _run_through_a_loss(
    server: ValkeyServer, name: str, lose: Callable[[], Awaitable[None]], lease_s: float
) -> None:
    """Two processes share a capacity of 3; one runs 2 long agents; the server loses its
    data; the other then asks for 2 more, in reject mode and in queue mode."""
    async with capacities(server.url, name, 2, capacity=3, lease_s=lease_s) as (one, two):
        quick = Step(latency=0.05)
        orch = ScriptedOrchestrator({"b-1": quick, "b-2": quick}, Step(latency=2 * lease_s))
        started: dict[str, float] = {}

        def on_start(agent: str) -> None:
            # The count both processes share, checked at every start (no sampling gap).
            assert orch.in_flight <= 3, f"{orch.in_flight} in flight > 3"
            started[agent] = trio.current_time()

        orch.on_start = on_start
        first = ConcurrentDeliberationService(orch, pool=AgentPool(72, shared=one))
        second = ConcurrentDeliberationService(orch, pool=AgentPool(72, shared=two))
        results: list[Any] = []

        async def run_first() -> None:
            results.append(await first.invoke_concurrent(make_requests(2, prefix="a")))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_first)
            await wait_until(lambda: _async(orch.in_flight == 2))
            await lose()
            lost_at = trio.current_time()
            # Reject mode: refused whole while the holders re-assert (or the server is back).
            with pytest.raises(AgentPoolExhaustedError, match=r"recovering|unreachable"):
                await second.invoke_concurrent(make_requests(1, prefix="r"))
            queued = await second.invoke_concurrent(make_requests(2, prefix="b"), overflow="queue")
            assert orch.in_flight == 2  # b-1 then b-2 ran beside the two a's, never on top
        # One slot was free all along; the grace kept it from the newcomer until the
        # holder had had one lease period to re-assert its two.
        assert queued.success_count == 2 and results[0].success_count == 2
        assert started["b-1"] - lost_at >= 0.9 * lease_s
        assert orch.max_in_flight == 3
        assert one.held == two.held == frozenset()


async def test_after_a_flushall_two_processes_never_exceed_the_capacity_and_admit_after_the_grace(
    own_server: ValkeyServer, name: str
) -> None:
    async def flushall() -> None:
        async with raw(own_server.url) as client:
            await client.flushall()

    await _run_through_a_loss(own_server, name, flushall, lease_s=1.0)


async def test_after_a_restart_without_persistence_two_processes_never_exceed_the_capacity(
    own_server: ValkeyServer, name: str
) -> None:
    async def restart() -> None:
        own_server.restart()

    await _run_through_a_loss(own_server, name, restart, lease_s=3.0)


async def test_a_holder_cut_off_past_its_lease_fails_its_agents_with_lease_lost(
    own_server: ValkeyServer, name: str
) -> None:
    # A long timeout: the renewal sent to the hung server is still out when the leases end.
    async with capacities(own_server.url, name, 1, capacity=3, lease_s=0.5, timeout=5.0) as (
        capacity,
    ):
        orch = ScriptedOrchestrator(default=Step(latency=30.0))
        pool = AgentPool(72, shared=capacity)
        service = ConcurrentDeliberationService(orch, pool=pool)

        async def cut_off() -> None:
            await wait_until(lambda: _async(orch.in_flight == 3))
            own_server.pause()  # hung: every call times out

        async with trio.open_nursery() as nursery:
            nursery.start_soon(cut_off)
            with trio.fail_after(20):  # not the agents' 30 s
                result = await service.invoke_concurrent(make_requests(3))
        own_server.resume()
    assert result.total_count == 3 and result.success_count == 0
    assert {f.kind for f in result.failures} == {FailureKind.ERROR}
    assert all(
        f.message.startswith("shared capacity lease lost: not renewed within lease_s (0.5 s)")
        for f in result.failures
    ), result.failures
    assert sorted(orch.cancelled) == ["archon-1", "archon-2", "archon-3"]
    # Stopped when the leases ended (0.5 s after the last renewal), not when the hung call
    # gave up (5 s): the margin is for a loaded machine.
    assert all(f.elapsed_ms < 2500 for f in result.failures), result.failures
    assert pool.active_count == 0 and pool.available_count == 72 and capacity.held == frozenset()


async def test_release_never_blocks_or_raises(valkey_server: ValkeyServer, name: str) -> None:
    capacity = ValkeyCapacity(valkey_server.url, name=name)
    capacity.release("never-opened")
    capacity.release(None)  # type: ignore[arg-type]
    with pytest.raises(AgentPoolExhaustedError, match="not open"):
        await capacity.reserve(["a"])
    async with capacity:
        for bad in (["a b"], [""], ["x" * 200], ["a", "a"], "ab"):
            with pytest.raises(InvalidRequestError):
                await capacity.reserve(bad)
        assert capacity.held == frozenset() and capacity.in_use() == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"capacity": 0}, "capacity"),
        ({"capacity": True}, "capacity"),
        ({"lease_s": 0.01}, "lease_s"),
        ({"lease_s": float("inf")}, "lease_s"),
        ({"name": "a b"}, "whitespace"),
        ({"timeout": -1}, "timeout"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidRequestError, match=match):
        ValkeyCapacity("redis://127.0.0.1:6379", **kwargs)


@pytest.mark.parametrize("form", range(len(secret_valkey_urls(0))))
async def test_a_password_anywhere_in_the_url_never_shows(
    name: str, form: int, caplog: pytest.LogCaptureFixture
) -> None:
    """Not in ``repr``, ``.url``, the FR10 errors of a full or a lost server (from the
    capacity and from a pool on it), of a wrong password or no server, nor any log
    record."""
    caplog.set_level(logging.DEBUG)
    shown: list[str | None] = []
    with ValkeyServer(password=SECRET) as server:
        server.seed_capacity(name)
        url = secret_valkey_urls(server.port)[form]
        async with ValkeyCapacity(url, name=name, capacity=2, lease_s=0.5) as capacity:
            shown += [repr(capacity), capacity.url]
            pool = AgentPool(shared=capacity)
            service = ConcurrentDeliberationService(ScriptedOrchestrator(), HaltSwitch(), pool)
            with pytest.raises(AgentPoolExhaustedError, match="exhausted") as full:
                await service.invoke_concurrent(make_requests(3))
            shown.append(str(full.value))
            server.stop()
            with pytest.raises(AgentPoolExhaustedError, match="unreachable") as lost:
                await service.invoke_concurrent(make_requests(1))
            shown += [str(lost.value), repr(capacity)]
        server.start()
        wrong = secret_valkey_urls(server.port, "Zq7-wrong-pw")[form]
        never = secret_valkey_urls(free_port())[form]
        for other in (wrong, never):
            async with ValkeyCapacity(other, name=name, timeout=0.5) as capacity:
                with pytest.raises(AgentPoolExhaustedError, match="unreachable") as refused:
                    await capacity.reserve(["a"])
                shown += [str(refused.value), repr(capacity), capacity.url]
    assert_never_shown(SECRET, shown, caplog.records)
    assert_never_shown("Zq7-wrong-pw", shown, caplog.records)


async def test_a_different_capacity_elsewhere_is_warned_about(
    valkey_server: ValkeyServer, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with capacities(valkey_server.url, name, 1, capacity=72):
        with caplog.at_level(logging.WARNING, logger="adapters.valkey"):
            async with capacities(valkey_server.url, name, 1, capacity=10):
                pass
    assert "configured differently" in caplog.text


# ---------------------------------------------------------------- batch admission


async def _evalsha_calls(client: Raw) -> int:
    """Scripts run on the server since its statistics were last reset."""
    stats = await client.info("commandstats")
    return sum(
        int(value["calls"])
        for key, value in stats.items()
        if key in ("cmdstat_evalsha", "cmdstat_eval") and isinstance(value, dict)
    )


async def test_a_72_agent_queue_batch_is_admitted_in_one_call_to_the_server(
    own_server: ValkeyServer, name: str
) -> None:
    async with (
        capacities(own_server.url, name, 1, capacity=72) as (capacity,),
        raw(own_server.url) as client,
    ):
        pool = AgentPool(72, shared=capacity)
        ids = [f"agent-{i}" for i in range(72)]
        async with pool.admit(["warm-up"], queue=True) as admission:  # the script loaded
            await admission.take_ahead(["warm-up"])
        await capacity.flush()
        await client.config_resetstat()
        async with pool.admit(ids, queue=True) as admission:
            assert await admission.take_ahead(ids) == 72
            slots = [await admission.take_slot(agent) for agent in ids]
            assert await _evalsha_calls(client) == 1  # one round trip for all 72
            assert len(capacity.held) == 72 and capacity.in_use() == 72
            assert {slot.lease for slot in slots} == capacity.held
        await capacity.flush()
        assert capacity.held == frozenset() and capacity.in_use() == 0


async def test_a_batch_partly_granted_runs_the_granted_and_the_rest_fifo_as_slots_free(
    valkey_server: ValkeyServer, name: str
) -> None:
    async with (
        capacities(valkey_server.url, name, 2, capacity=3) as (one, two),
        raw(valkey_server.url) as client,
    ):
        await one.reserve(["elsewhere"])
        await two.acquire_batch(["a", "b", "c", "d"])
        assert two.held == {"a", "b"} and two.waiting == {"c", "d"}
        await two.acquire("a")  # granted by the batch call: returns at once
        await two.acquire("b")
        order: list[str] = []

        async def claim(lease: str) -> None:
            await two.acquire(lease)
            order.append(lease)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(claim, "d")
            nursery.start_soon(claim, "c")
            await trio.testing.wait_all_tasks_blocked()
            one.release("elsewhere")  # the freed slot goes to the head of the queue: c
            await wait_until(lambda: _async(order == ["c"]))
            assert two.waiting == {"d"}
            two.release("a")
        assert order == ["c", "d"] and two.held == {"b", "c", "d"}
        for lease in ("b", "c", "d"):
            two.release(lease)
        await wait_until(lambda: _count(client, f"{name}:leases", 0))


async def test_a_batch_behind_another_process_s_waiters_queues_whole_behind_them(
    valkey_server: ValkeyServer, name: str
) -> None:
    async with capacities(valkey_server.url, name, 2, capacity=2) as (one, two):
        await one.acquire_batch(["a1", "a2", "a3"])  # a3 queued
        await two.acquire_batch(["b1", "b2"])  # behind a3: FIFO across processes
        assert one.held == {"a1", "a2"} and one.waiting == {"a3"}
        assert two.held == frozenset() and two.waiting == {"b1", "b2"}
        order: list[str] = []

        async def claim(capacity: ValkeyCapacity, lease: str) -> None:
            await capacity.acquire(lease)
            order.append(lease)

        async with trio.open_nursery() as nursery:
            for capacity, lease in ((one, "a3"), (two, "b1"), (two, "b2")):
                nursery.start_soon(claim, capacity, lease)
            for n, leaving in enumerate(("a1", "a2", "a3"), start=1):
                one.release(leaving)  # each freed slot goes to the head of the queue
                with trio.fail_after(5):
                    while len(order) < n:  # noqa: ASYNC110  # granted in another task
                        await trio.sleep(0.005)
        assert order == ["a3", "b1", "b2"]


async def test_a_halt_mid_admission_never_waits_on_the_server_and_leaves_nothing_held(
    own_server: ValkeyServer, name: str
) -> None:
    # The server hangs while the batch's call is out; the halt must not wait for the
    # call's 10 s timeout, and what the call may yet take is given back (or, should the
    # call land after its release, expires unrenewed within lease_s).
    async with capacities(own_server.url, name, 1, capacity=72, lease_s=1.0, timeout=10.0) as (
        capacity,
    ):
        switch = HaltSwitch()
        pool = AgentPool(72, shared=capacity)
        orch = ScriptedOrchestrator()
        service = ConcurrentDeliberationService(orch, switch, pool)

        async def halt_while_the_call_is_out() -> None:
            await wait_until(lambda: _async(len(capacity.waiting) == 5))
            switch.halt("operator: stop")

        own_server.pause()
        try:
            with trio.fail_after(5):
                exc = await expect_halt(
                    lambda: service.invoke_concurrent(make_requests(5), overflow="queue"),
                    halt_while_the_call_is_out,
                )
        finally:
            own_server.resume()
        assert exc.reason == "operator: stop" and orch.invoked == []
        assert capacity.held == capacity.waiting == frozenset()
        assert pool.active_count == 0 and pool.available_count == 72 and not pool.queued_agents
        async with raw(own_server.url) as client:
            await wait_until(lambda: _count(client, f"{name}:leases", 0))
            assert await client.zcard(f"{name}:queue") == 0


async def test_the_server_dying_mid_admission_refuses_the_batch_and_takes_nothing(
    own_server: ValkeyServer, name: str
) -> None:
    async with capacities(own_server.url, name, 1, capacity=72, timeout=10.0) as (capacity,):
        pool = AgentPool(72, shared=capacity)
        orch = ScriptedOrchestrator()
        service = ConcurrentDeliberationService(orch, HaltSwitch(), pool)

        async def kill_while_the_call_is_out() -> None:
            await wait_until(lambda: _async(len(capacity.waiting) == 5))
            own_server.stop()

        own_server.pause()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(kill_while_the_call_is_out)
            with pytest.raises(AgentPoolExhaustedError, match="unreachable"), trio.fail_after(5):
                await service.invoke_concurrent(make_requests(5), overflow="queue")
        assert orch.invoked == []
        assert capacity.held == capacity.waiting == frozenset()
        assert pool.active_count == 0 and pool.available_count == 72 and not pool.queued_agents


async def test_a_lease_lost_after_a_batch_grant_stops_its_agent(
    own_server: ValkeyServer, name: str
) -> None:
    async with capacities(own_server.url, name, 1, capacity=3, lease_s=0.5, timeout=5.0) as (
        capacity,
    ):
        orch = ScriptedOrchestrator(default=Step(latency=30.0))
        pool = AgentPool(72, shared=capacity)
        service = ConcurrentDeliberationService(orch, pool=pool)

        async def cut_off() -> None:
            await wait_until(lambda: _async(orch.in_flight == 3))
            own_server.pause()  # hung: the renewals time out

        async with trio.open_nursery() as nursery:
            nursery.start_soon(cut_off)
            with trio.fail_after(20):  # not the agents' 30 s
                result = await service.invoke_concurrent(make_requests(5), overflow="queue")
        own_server.resume()
    # Three ran on the batch's grants and lost them; two waited in the queue and were
    # refused once the server had been unreachable for lease_s.
    assert result.total_count == 5 and result.success_count == 0
    lost = [f for f in result.failures if "lease lost" in f.message]
    assert sorted(f.agent_id for f in lost) == ["archon-1", "archon-2", "archon-3"]
    assert all(
        f.message.startswith("shared capacity lease lost: not renewed within lease_s (0.5 s)")
        for f in lost
    ), lost
    assert sorted(orch.cancelled) == ["archon-1", "archon-2", "archon-3"]
    assert pool.active_count == 0 and pool.available_count == 72 and capacity.held == frozenset()


async def test_hedges_due_together_take_their_leases_in_one_call_each_granted_or_refused_alone(
    own_server: ValkeyServer, name: str
) -> None:
    async with (
        capacities(own_server.url, name, 1, capacity=15) as (capacity,),
        raw(own_server.url) as client,
    ):
        orch = ScriptedOrchestrator(default=Step(latency=10.0))
        pool = AgentPool(72, shared=capacity)
        service = ConcurrentDeliberationService(orch, pool=pool)
        hedge = HedgePolicy(delay=1.0, budget=1.0)
        calls: list[int] = []
        await capacity.reserve(["warm-up"])  # the script loaded
        capacity.release("warm-up")
        await capacity.flush()

        async def count_at_the_hedges() -> None:
            await wait_until(lambda: _async(orch.in_flight == 10))
            await client.config_resetstat()  # the batch is in: count from here
            await wait_until(lambda: _async(orch.in_flight == 15))
            calls.append(await _evalsha_calls(client))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(count_at_the_hedges)
            with trio.fail_after(30):
                result = await service.invoke_concurrent(
                    make_requests(10), overflow="queue", hedge=hedge
                )
        # Ten hedges fell due together: one call for those of each scheduler tick (one
        # call, unless a loaded machine spread the agents' starts over a few ticks), not
        # one call per hedge; five had room, five not.
        assert 1 <= calls[0] <= 3, calls
        assert len(result.hedged_agents) == 5 and result.success_count == 10
        assert orch.max_in_flight == 15
        await capacity.flush()
        assert capacity.held == frozenset() and capacity.in_use() == 0


async def test_a_cancelled_hedge_reserve_holds_nothing(
    valkey_server: ValkeyServer, name: str
) -> None:
    async with (
        capacities(valkey_server.url, name, 1, capacity=5) as (capacity,),
        raw(valkey_server.url) as client,
    ):
        with trio.CancelScope() as scope:
            scope.cancel()  # cancelled at once: the joint call is made without it
            await capacity.reserve(["gone"])
        await capacity.reserve(["kept"])
        assert capacity.held == {"kept"}
        await wait_until(lambda: _count(client, f"{name}:leases", 1))
        capacity.release("kept")
        await wait_until(lambda: _count(client, f"{name}:leases", 0))


# ---------------------------------------------------------------- AgentPool on top


async def test_pools_in_reject_mode_share_the_capacity_all_or_nothing(
    valkey_server: ValkeyServer, name: str
) -> None:
    async with capacities(valkey_server.url, name, 2, capacity=5) as (one, two):
        first, second = AgentPool(5, shared=one), AgentPool(5, shared=two)
        orch = ScriptedOrchestrator(default=Step(latency=0.3))
        results = []

        async def run_first() -> None:
            service = ConcurrentDeliberationService(orch, pool=first)
            results.append(await service.invoke_concurrent(make_requests(3, prefix="a")))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_first)
            await wait_until(lambda: _async(orch.in_flight == 3))
            status = first.status()
            assert (status.shared_capacity, status.shared_in_use) == (5, 3)
            service = ConcurrentDeliberationService(orch, pool=second)
            with pytest.raises(AgentPoolExhaustedError, match="shared capacity exhausted"):
                await service.invoke_concurrent(make_requests(3, prefix="b"))
            assert second.active_count == 0 and two.held == frozenset()
        assert results[0].success_count == 3
        assert [a for a in orch.invoked if a.startswith("b")] == []


async def test_pools_in_queue_mode_drain_everything_within_the_shared_bound(
    valkey_server: ValkeyServer, name: str
) -> None:
    async with capacities(valkey_server.url, name, 3, capacity=4) as shared:
        orch = ScriptedOrchestrator(default=Step(latency=0.02))
        results = []

        async def run(capacity: ValkeyCapacity, prefix: str) -> None:
            service = ConcurrentDeliberationService(orch, pool=AgentPool(72, shared=capacity))
            requests = make_requests(8, prefix=prefix)
            results.append(await service.invoke_concurrent(requests, overflow="queue"))

        async with trio.open_nursery() as nursery:
            for i, capacity in enumerate(shared):
                nursery.start_soon(run, capacity, f"p{i}")
        assert [r.success_count for r in results] == [8, 8, 8]
        assert orch.max_in_flight == 4
        assert all(c.held == frozenset() and c.waiting == frozenset() for c in shared)


async def test_an_error_in_the_body_of_the_capacity_comes_out_as_itself(
    valkey_server: ValkeyServer,
) -> None:
    # README: "async with ValkeyCapacity(url) as shared: ... deliberate": a halt raised in
    # there must be catchable as SystemHaltedError, as with SqliteWitness, not as an
    # ExceptionGroup from the capacity's own background nursery.
    with pytest.raises(SystemHaltedError):
        async with ValkeyCapacity(valkey_server.url, name=unique_name()):
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
    name = unique_name()
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
    name = unique_name()
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
    name = unique_name()
    async with coredis.Redis.from_url(valkey_server.url, decode_responses=False) as client:
        await client.rpush(f"{name}:capacity", [b"72"])
        with caplog.at_level(logging.ERROR, logger="adapters.valkey"):
            async with ValkeyCapacity(valkey_server.url, name=name, capacity=3):
                pass
        assert await client.get(f"{name}:capacity") == b"3"
        assert await client.type(f"{name}:capacity:corrupt") == b"list"
    assert "corrupt key set aside" in caplog.text and "unreachable" not in caplog.text
