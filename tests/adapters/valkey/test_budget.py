"""ValkeyProviderBudget against a real server: several instances stand for several
replicas (in one process here; in several real processes at the end), the provider a
loopback server that enforces its limit per window (its "minute", time-scaled)."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import coredis
import pytest
import trio

from adapters.llm.bridge import AsyncioOrchestratorBridge
from adapters.llm.openai_chat import OpenAIChatOrchestrator
from adapters.llm.provider_budget import (
    ProviderLimits,
    SharedBudgetUnavailableError,
    budget_id,
    cluster_budget,
)
from adapters.valkey import ValkeyCapacity, ValkeyProviderBudget
from kernel import (
    AgentPool,
    ConcurrentDeliberationService,
    ConcurrentResult,
    FailureKind,
    HaltSwitch,
    HedgePolicy,
    InvalidRequestError,
)
from tests.support import ROOT
from tests.support.fake_openai import FakeOpenAIServer
from tests.support.helpers import make_requests, time_halt
from tests.support.valkey_server import ValkeyServer

W = 1.0  # the loopback provider's window: its "minute"
N = 60  # requests it takes per window
RPM = round(N * 60 / W)  # the same limit per minute, as a client configures it
FAST: dict[str, Any] = {"backoff_base_s": 0.01, "backoff_cap_s": 0.2, "timeout_s": 10.0}


@pytest.fixture
def prefix() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def own_server() -> Iterator[ValkeyServer]:
    with ValkeyServer() as server:
        yield server


@asynccontextmanager
async def replicas(
    url: str, prefix: str, count: int, **kwargs: Any
) -> AsyncIterator[list[ValkeyProviderBudget]]:
    async with AsyncExitStack() as stack:
        stores = [
            await stack.enter_async_context(
                ValkeyProviderBudget(url, key_prefix=prefix, replicas=count, **kwargs)
            )
            for _ in range(count)
        ]
        yield stores


async def council(
    orch: OpenAIChatOrchestrator, size: int, batches: int = 1, prefix: str = "archon"
) -> list[ConcurrentResult]:
    async with AsyncioOrchestratorBridge(orch) as bridge:
        service = ConcurrentDeliberationService(bridge, HaltSwitch(), AgentPool())
        return [
            await service.invoke_concurrent(make_requests(size, prefix=prefix))
            for _ in range(batches)
        ]


async def sharing_again(store: ValkeyProviderBudget) -> None:
    with trio.fail_after(5):
        while not store.available:  # noqa: ASYNC110  # its probe runs on its own
            await trio.sleep(0.01)


def admitted(server: FakeOpenAIServer) -> list[float]:
    return sorted(t for t, _, status in server.arrivals if status == 200)


# ---------------------------------------------------------------- bad input


def test_a_replica_count_below_one_is_refused() -> None:
    with pytest.raises(InvalidRequestError, match="replicas"):
        ValkeyProviderBudget("redis://127.0.0.1:1", replicas=0)


def test_provider_limits_refuse_a_shared_store_that_is_not_one() -> None:
    with pytest.raises(InvalidRequestError, match="shared"):
        ProviderLimits(requests_per_minute=10, shared="redis://127.0.0.1")  # type: ignore[arg-type]


def test_a_budget_url_with_a_password_is_never_shown() -> None:
    store = ValkeyProviderBudget("redis://:hunter2@127.0.0.1:1/0")
    assert "hunter2" not in repr(store) and "hunter2" not in repr(ProviderLimits(shared=store))


async def test_a_budget_used_before_it_is_opened_says_so() -> None:
    store = ValkeyProviderBudget("redis://127.0.0.1:1")
    with pytest.raises(RuntimeError, match="async with"):
        await store.reserve("x" * 32, 1.0, 60, None, 30.0)


# ---------------------------------------------------------------- the server's books


async def test_turns_are_handed_out_in_arrival_order_across_replicas(
    valkey_server: ValkeyServer, prefix: str
) -> None:
    async with replicas(valkey_server.url, prefix, 3) as stores:
        bid = budget_id("http://provider/v1", "sk-one")
        grants = [
            await store.reserve(bid, 10.0, 600, None, 30.0)
            for store in itertools.islice(itertools.cycle(stores), 9)
        ]
    gap = 60.0 / (600 * 0.95)  # one turn every 1/pace (the headroom kept)
    assert grants[0].delay_s == pytest.approx(0.0, abs=0.01)
    for earlier, later in itertools.pairwise(grants):
        # Each one turn after the one before, whichever replica asked.
        assert later.turn_s - earlier.turn_s == pytest.approx(gap, abs=1e-5)


async def test_the_key_never_reaches_the_server(valkey_server: ValkeyServer, prefix: str) -> None:
    key = f"sk-secret-{uuid.uuid4().hex}"
    async with replicas(valkey_server.url, prefix, 1) as (store,):
        await store.reserve(budget_id("http://provider/v1", key), 10.0, 600, 6000, 30.0)
        async with coredis.Redis.from_url(valkey_server.url, decode_responses=False) as raw:
            names = [name async for name in raw.scan_iter(match=f"{prefix}:*")]
            stored = [await raw.hgetall(name) for name in names]
    assert len(names) == 1
    everything = repr(names) + repr(stored)
    assert key not in everything and key[3:] not in everything


async def test_usage_settled_by_one_replica_frees_the_lane_for_the_others(
    valkey_server: ValkeyServer, prefix: str
) -> None:
    settled, unsettled = (budget_id("http://provider/v1", k) for k in ("sk-a", "sk-b"))
    async with replicas(valkey_server.url, prefix, 2) as (first, second):
        # 6000 tokens a minute: an estimate of 1000 holds the lane ~10.5 s.
        for bid in (settled, unsettled):
            await first.reserve(bid, 1000.0, None, 6000, 30.0)
        first.settle(settled, tokens=990.0)  # it used 10
        await first.flush()
        held = (await second.reserve(unsettled, 1.0, None, 6000, 30.0)).delay_s
        freed = (await second.reserve(settled, 1.0, None, 6000, 30.0)).delay_s
    assert held > 10.0
    assert freed < 0.2  # only the 10 it used hold the lane


async def test_turns_given_back_by_a_halt_are_handed_out_again(
    valkey_server: ValkeyServer, prefix: str
) -> None:
    bid = budget_id("http://provider/v1", "sk-given-back")
    async with replicas(valkey_server.url, prefix, 2) as (first, second):
        for _ in range(10):  # 60 a minute: the tenth turn ~9.5 s from now
            await first.reserve(bid, 1.0, 60, None, 30.0)
        first.settle(bid, requests=9.0, tokens=9.0)  # nine cancelled while waiting
        await first.flush()
        after = (await second.reserve(bid, 1.0, 60, None, 30.0)).delay_s
    assert after < 1.2  # the second turn, not the eleventh


async def test_a_429_reported_by_one_replica_moves_every_replicas_waiting_turns(
    valkey_server: ValkeyServer, prefix: str
) -> None:
    bid = budget_id("http://provider/v1", "sk-pause")
    async with replicas(valkey_server.url, prefix, 2) as (first, second):
        heard: list[float] = []
        moved = trio.Event()

        def listener(shift: float, _at: float | None) -> None:
            heard.append(shift)
            moved.set()

        first.watch(bid, listener)
        before = (await first.reserve(bid, 1.0, 600, None, 30.0)).delay_s
        second.pause(bid, 0.5)
        with trio.fail_after(5):
            await moved.wait()
        after = (await first.reserve(bid, 1.0, 600, None, 30.0)).delay_s
    assert heard == [pytest.approx(0.5, abs=0.01)]
    assert after >= before + 0.45  # the next turn comes after the pause


async def test_a_server_that_lies_about_its_limit_holds_a_turn_at_most_the_cap(
    valkey_server: ValkeyServer, prefix: str
) -> None:
    bid = budget_id("http://provider/v1", "sk-liar")
    async with replicas(valkey_server.url, prefix, 1) as (store,):
        await store.reserve(bid, 1.0, 6000, None, 0.5)
        store.settle(bid, advertised_rpm=1)  # "one request a minute"
        await store.flush()
        delays = [(await store.reserve(bid, 1.0, 6000, None, 0.5)).delay_s for _ in range(3)]
    assert all(later - earlier <= 0.51 for earlier, later in itertools.pairwise([0.0, *delays]))


# ---------------------------------------------------------------- replicas against a provider


@pytest.mark.slow
async def test_replicas_sharing_a_budget_keep_together_to_one_limit_without_a_429(
    valkey_server: ValkeyServer, prefix: str, llm_server: FakeOpenAIServer
) -> None:
    # A window of 2 s: the headroom (3 turns of 60) covers a loaded machine's jitter.
    llm_server.limit_rate(N, 10**7, 2 * W)
    key = f"sk-{uuid.uuid4().hex}"
    results: list[ConcurrentResult] = []
    async with replicas(valkey_server.url, prefix, 2) as stores:

        async def replica(store: ValkeyProviderBudget, name: str) -> None:
            limits = ProviderLimits(requests_per_minute=RPM // 2, shared=store)
            orch = OpenAIChatOrchestrator(
                llm_server.base_url, "fake-model", api_key=key, limits=limits, **FAST
            )
            results.extend(await council(orch, 36, prefix=name))

        async with trio.open_nursery() as nursery:
            for store, name in zip(stores, ("a", "b"), strict=True):
                nursery.start_soon(replica, store, name)

    assert [r.success_count for r in results] == [36, 36]
    # The two together kept to one limit: each at the full limit meets dozens of 429s;
    # a loaded machine's jitter, a stray one.
    assert llm_server.rate_limited <= 1
    assert len(admitted(llm_server)) == 72
    assert all(store.outages == 0 for store in stores)


async def test_a_halt_while_agents_wait_on_the_shared_budget_ends_them_at_once(
    own_server: ValkeyServer, prefix: str, llm_server: FakeOpenAIServer
) -> None:
    async with replicas(own_server.url, prefix, 1) as (store,):
        limits = ProviderLimits(requests_per_minute=60, shared=store)  # one a second
        orch = OpenAIChatOrchestrator(
            llm_server.base_url, "fake-model", api_key="sk-halt", limits=limits, **FAST
        )
        halt = HaltSwitch()
        async with AsyncioOrchestratorBridge(orch) as bridge:
            service = ConcurrentDeliberationService(bridge, halt, AgentPool())

            async def while_waiting() -> None:
                await trio.to_thread.run_sync(llm_server.wait_for, lambda s: s.answered == 1)
                own_server.pause()  # a hung server: the halt must not wait on it

            try:
                err, took = await time_halt(
                    lambda: service.invoke_concurrent(make_requests(10)), halt, while_waiting
                )
            finally:
                own_server.resume()
    assert took < 0.1  # prompt
    assert err.partial is not None
    assert [f.kind for f in err.partial.failures].count(FailureKind.HALTED) >= 9
    assert llm_server.requests_total == 1


async def test_an_unreachable_server_means_each_replicas_share_then_sharing_again(
    own_server: ValkeyServer,
    prefix: str,
    llm_server: FakeOpenAIServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="adapters")
    llm_server.limit_rate(10**6, 10**7, W)
    key = f"sk-{uuid.uuid4().hex}"
    async with replicas(own_server.url, prefix, 3) as (store, *_):
        limits = ProviderLimits(requests_per_minute=RPM, shared=store)
        orch = OpenAIChatOrchestrator(
            llm_server.base_url, "fake-model", api_key=key, limits=limits, **FAST
        )
        budget = cluster_budget(llm_server.base_url, key, store)
        own_server.stop()
        down = await council(orch, 12)
        fallback_times = admitted(llm_server)
        assert (store.available, store.outages) == (False, 1)
        own_server.restart()
        await sharing_again(store)
        llm_server.reset()
        llm_server.limit_rate(10**6, 10**7, W)
        again = await council(orch, 12)
        turns = await store.lanes()

    assert down[0].success_count == 12 and again[0].success_count == 12
    # Down: this replica's share, a third of the limit (never unlimited).
    share = RPM // 3 * 0.95 / 60.0
    pace = (len(fallback_times) - 1) / (fallback_times[-1] - fallback_times[0])
    assert pace <= share * 1.5  # a connect's jitter moves a few; unlimited is 100x
    assert budget.fallback.requests.configured == pytest.approx(RPM // 3 / 60.0)
    # Back: the server hands out the turns again (all 12 of the second batch).
    assert [lanes.turns for lanes in turns] == [12]
    messages = [r.getMessage() for r in caplog.records]
    assert (
        messages.count(
            "shared provider budget unreachable: each replica paces at its share of the "
            "limits until it is back"
        )
        == 1
    )
    assert messages.count("shared provider budget reachable again: sharing resumed") == 1


async def test_the_shared_budget_composes_with_a_shared_capacity_queue_mode_a_deadline_and_hedges(
    valkey_server: ValkeyServer, prefix: str, llm_server: FakeOpenAIServer
) -> None:
    valkey_server.seed_capacity(prefix)
    key = f"sk-{uuid.uuid4().hex}"
    async with (
        ValkeyCapacity(valkey_server.url, name=prefix, capacity=8) as capacity,
        replicas(valkey_server.url, prefix, 1) as (store,),
    ):
        limits = ProviderLimits(requests_per_minute=600, shared=store)  # 9.5 a second
        orch = OpenAIChatOrchestrator(
            llm_server.base_url, "fake-model", api_key=key, limits=limits, **FAST
        )
        async with AsyncioOrchestratorBridge(orch) as bridge:
            pool = AgentPool(72, shared=capacity)
            service = ConcurrentDeliberationService(bridge, HaltSwitch(), pool)
            result = await service.invoke_concurrent(
                make_requests(30),
                overflow="queue",
                deadline=1.5,
                hedge=HedgePolicy(delay=0.05, budget=0.1),
            )
            await capacity.flush()
            in_use = capacity.in_use()
        # The turns of the agents the deadline cut were given back (folded in here).
        after = (await store.reserve(budget_id(llm_server.base_url, key), 1, 600, None, 30)).delay_s

    assert 5 <= result.success_count < 30  # paced: not all 30 within the deadline
    assert {f.kind for f in result.failures} == {FailureKind.TIMEOUT}
    assert orch.limit_stats().responses_429 == 0
    assert in_use == 0
    assert after < 0.5


async def test_agents_waiting_in_the_fallback_take_their_turns_from_the_server_on_its_return(
    own_server: ValkeyServer, prefix: str, llm_server: FakeOpenAIServer
) -> None:
    key = f"sk-{uuid.uuid4().hex}"
    async with replicas(own_server.url, prefix, 3) as (store, *_):
        # 180 a minute shared (one each 0.35 s); 60 a minute for this replica alone.
        limits = ProviderLimits(requests_per_minute=180, shared=store)
        orch = OpenAIChatOrchestrator(
            llm_server.base_url, "fake-model", api_key=key, limits=limits, **FAST
        )
        own_server.stop()

        async def back_soon() -> None:
            await trio.to_thread.run_sync(llm_server.wait_for, lambda s: s.answered == 1)
            own_server.restart()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(back_soon)
            with trio.fail_after(4):  # at its share alone, the 6th turn is 5.3 s off
                (result,) = await council(orch, 6)
        lanes = await store.lanes()

    assert result.success_count == 6
    assert [lane.turns for lane in lanes] == [5]  # all but the first, from the server


async def test_a_hung_server_holds_an_attempt_no_longer_than_the_timeout(
    own_server: ValkeyServer, prefix: str
) -> None:
    bid = budget_id("http://provider/v1", "sk-hung")
    async with replicas(own_server.url, prefix, 2, timeout=0.2) as (store, _):
        own_server.pause()
        try:
            with trio.fail_after(2):
                with pytest.raises(SharedBudgetUnavailableError):
                    await store.reserve(bid, 1.0, 600, None, 30.0)
            assert not store.available
        finally:
            own_server.resume()


# ---------------------------------------------------------------- several real processes

#: The issue's setting, time-scaled: 3 replicas x 72 agents against 120 requests per
#: "minute" of 2 s.  Ideal: the limit's own even pace, 216 calls at 120 a window.
REPLICAS, AGENTS, LIMIT, WINDOW_S = 3, 72, 120, 2.0
IDEAL_S = REPLICAS * AGENTS / LIMIT * WINDOW_S


def run_replicas(
    llm_server: FakeOpenAIServer,
    valkey: str,
    prefix: str,
    while_running: Callable[[], None] | None = None,
    key: str = "sk-replicas",
    batches: int = 1,
) -> list[dict[str, Any]]:
    """Three worker processes, started together, each ``batches`` batches making
    AGENTS agents in all; their reports."""
    command = [
        sys.executable, "-m", "tests.support.budget_worker", "--base-url", llm_server.base_url,
        "--api-key", key, "--rpm", str(round(LIMIT * 60 / WINDOW_S)),
        "--agents", str(AGENTS // batches), "--batches", str(batches),
        "--key-prefix", prefix, "--replicas", str(REPLICAS), "--valkey", valkey,
    ]  # fmt: skip
    with contextlib.ExitStack() as stack:
        procs = []
        for i in range(REPLICAS):
            proc = subprocess.Popen(
                [*command, "--name", f"r{i}"], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, text=True, cwd=ROOT,
            )  # fmt: skip
            stack.callback(proc.kill)
            procs.append(proc)
        for proc in procs:
            assert proc.stdout is not None
            assert json.loads(proc.stdout.readline()) == {"event": "ready"}
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        if while_running is not None:
            while_running()
        reports = []
        for proc in procs:
            out, _ = proc.communicate(timeout=60)  # nothing hangs
            assert proc.returncode == 0
            reports.append(json.loads(out.splitlines()[-1]))
        return reports


def completion_s(server: FakeOpenAIServer, reports: list[dict[str, Any]]) -> float:
    """From the first request the provider saw to the last answer: how long the budget
    took (the replicas' own start-up, the same with any budget, left out)."""
    wall_minus_monotonic = time.time() - time.monotonic()
    first = min(t for t, _, _ in server.arrivals) + wall_minus_monotonic
    return float(max(r["ended"] for r in reports) - first)


@pytest.mark.slow
def test_three_replicas_sharing_one_budget_meet_no_429_storm_and_keep_the_pace(
    valkey_server: ValkeyServer, prefix: str, llm_server: FakeOpenAIServer
) -> None:
    llm_server.limit_rate(LIMIT, 10**7, WINDOW_S)
    reports = run_replicas(llm_server, valkey_server.url, prefix)

    assert sum(r["failed"] for r in reports) == 0
    assert sum(r["succeeded"] for r in reports) == REPLICAS * AGENTS
    # The goal is <= 1 % (the shared-budget benchmark: 0 %, and each replica with its own
    # budget 23 %); here, room for three processes descheduled at once on a loaded
    # 2-core machine.
    assert llm_server.rate_limited <= 0.05 * llm_server.requests_total
    # At the limit's pace, not a share of it (which would take 3 x): the goal is 1.1 x
    # (the shared-budget benchmark measures it); here, room for three processes
    # descheduled on a loaded 2-core machine.
    assert completion_s(llm_server, reports) <= 2 * IDEAL_S
    assert all(r["outages"] == 0 for r in reports)
    # One call to the server per request (settlements go in the background).
    assert sum(r["reservations"] for r in reports) == llm_server.requests_total


@pytest.mark.slow
def test_replicas_fall_back_when_the_server_is_killed_mid_run_and_share_again_on_its_return(
    own_server: ValkeyServer, prefix: str, llm_server: FakeOpenAIServer
) -> None:
    llm_server.limit_rate(LIMIT, 10**7, WINDOW_S)

    def kill_then_restart() -> None:
        # Three batches of 24 a replica: the first shared, the second (its turns taken
        # while the server is down) at a third of the limit each, the third shared again.
        assert llm_server.wait_for(lambda s: s.answered >= 24, timeout=30)
        own_server.stop()
        assert llm_server.wait_for(lambda s: s.answered >= 150, timeout=30)
        own_server.restart()  # back, without its data: sharing resumes afresh

    key = f"sk-{uuid.uuid4().hex}"
    reports = run_replicas(llm_server, own_server.url, prefix, kill_then_restart, key, 3)

    assert sum(r["failed"] for r in reports) == 0  # nothing lost, nothing hung
    assert all(r["outages"] == 1 and r["available"] for r in reports), reports
    # Never unlimited (a storm: a third or more of the calls refused): a third of the limit
    # each while it was down.  The server returns without its data, so the window it comes
    # back in can be overfilled once: up to 13 of 229 calls answered 429 were seen on a
    # loaded machine.
    assert llm_server.rate_limited <= 0.10 * llm_server.requests_total
    bid = budget_id(llm_server.base_url, key)
    turns = own_server.command("HGET", f"{prefix}:budget:{bid}", "sent")
    assert int(turns.split()[-1]) > 0  # turns handed out by the server after its return


# ---------------------------------------------------------------- tenants and hostile reports


@pytest.mark.parametrize("pattern", ["*", "{short}?", "[t]{tail}", "{prefix}:budget:*"])
async def test_a_prefix_lists_only_its_own_budgets_never_another_tenants(
    valkey_server: ValkeyServer, prefix: str, pattern: str
) -> None:
    bid = budget_id("http://provider/v1", "sk-tenant")
    async with replicas(valkey_server.url, prefix, 1) as (tenant,):
        await tenant.reserve(bid, 1.0, 600, None, 30.0)
        # A prefix that is a glob (or a prefix under which another's keys nest) matches
        # the tenant's keys: it must list none of them.
        other = pattern.format(prefix=prefix, short=prefix[:-1], tail=prefix[1:])
        async with replicas(valkey_server.url, other, 1) as (snoop,):
            seen = await snoop.lanes()
        async with replicas(valkey_server.url, f"{prefix}:budget:{bid}", 1) as (nested,):
            await nested.reserve(bid, 1.0, 600, None, 30.0)
            own = await tenant.lanes()
    assert seen == []
    assert [lanes.budget for lanes in own] == [bid]


async def test_a_limit_too_large_to_count_is_not_reported_as_one(
    valkey_server: ValkeyServer, prefix: str
) -> None:
    bid = budget_id("http://provider/v1", "sk-boastful")
    async with replicas(valkey_server.url, prefix, 1) as (store,):
        await store.reserve(bid, 1.0, None, None, 30.0)
        store.settle(bid, advertised_rpm=10**30, advertised_tpm=10**300)
        await store.flush()
        grant = await store.reserve(bid, 1.0, None, None, 30.0)
        lanes = await store.lanes()
    for limit in (grant.requests_per_minute, grant.tokens_per_minute):
        assert limit is None or 1 <= limit <= 10**15
    assert grant.delay_s < 0.1
    for lane in lanes:
        for limit in (lane.requests_per_minute, lane.tokens_per_minute):
            assert limit is None or 1 <= limit <= 10**15


async def test_replicas_given_different_limits_for_one_key_all_pace_at_the_strictest(
    valkey_server: ValkeyServer, prefix: str
) -> None:
    bid = budget_id("http://provider/v1", "sk-two-minds")
    async with replicas(valkey_server.url, prefix, 2) as (strict, lax):
        await strict.reserve(bid, 1.0, 60, 600, 30.0)  # 60 requests, 600 tokens a minute
        grants = [await lax.reserve(bid, 10.0, 6000, 60000, 30.0) for _ in range(3)]
    gap = 60.0 / (60 * 0.95)
    for earlier, later in itertools.pairwise(grants):
        assert later.turn_s - earlier.turn_s == pytest.approx(gap, abs=1e-3)
    assert {(g.requests_per_minute, g.tokens_per_minute) for g in grants} == {(60, 600)}


@pytest.mark.slow
async def test_a_429_pause_over_before_the_server_is_back_does_not_pause_the_cluster_then(
    own_server: ValkeyServer, prefix: str
) -> None:
    bid = budget_id("http://provider/v1", "sk-stale-pause")
    async with replicas(own_server.url, prefix, 1, timeout=0.2) as (store,):
        await store.reserve(bid, 1.0, 6000, None, 30.0)
        own_server.pause()  # hung: the pause cannot be told
        try:
            asked = time.monotonic()
            store.pause(bid, 1.0)
            store.settle(bid, requests_wait_s=1.0)  # "no requests left for a second"
            with trio.fail_after(5):
                while store.available:  # noqa: ASYNC110  # its flush runs on its own
                    await trio.sleep(0.01)
            # The outage outlasts the pause (and the timeout, and what the clock reading may
            # be off by): the 429's reset has come by the server's return.
            await trio.sleep(max(0.0, asked + 2.5 - time.monotonic()))
        finally:
            own_server.resume()
        await sharing_again(store)
        await store.flush()
        grant = await store.reserve(bid, 1.0, 6000, None, 30.0)
        (lanes,) = await store.lanes()
    assert grant.delay_s < 0.1
    assert lanes.paused_ms == 0.0


@pytest.mark.slow
async def test_one_429_asking_for_a_day_holds_every_replica_no_longer_than_its_cap(
    valkey_server: ValkeyServer, prefix: str, llm_server: FakeOpenAIServer
) -> None:
    llm_server.script_any(("429", 86400.0))  # "come back tomorrow"
    async with replicas(valkey_server.url, prefix, 2) as stores:
        orchs = [
            OpenAIChatOrchestrator(
                llm_server.base_url, "fake-model", api_key="sk-tomorrow",
                limits=ProviderLimits(requests_per_minute=6000, shared=store),
                retry_after_cap_s=0.5, **FAST,
            )
            for store in stores
        ]  # fmt: skip
        with trio.fail_after(10):  # a day's pause would hang here
            async with trio.open_nursery() as nursery:
                results: list[list[ConcurrentResult]] = []

                async def run(orch: OpenAIChatOrchestrator, name: str) -> None:
                    results.append(await council(orch, 5, prefix=name))

                for i, orch in enumerate(orchs):
                    nursery.start_soon(run, orch, f"r{i}-")
        (lanes,) = await stores[0].lanes()
    assert [r.success_count for (r,) in results] == [5, 5]
    assert llm_server.requests_total == 11  # ten answers and the one 429
    assert lanes.paused_ms <= 500.0


class _GrantHandedLate(ValkeyProviderBudget):
    """A replica whose grant, computed by the server, reaches its waiter only after another
    replica's 429 pause (computed after it) has been heard: the worst moment."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.meanwhile: Callable[[], Any] | None = None

    async def reserve(self, *args: Any, **kwargs: Any) -> Any:
        grant = await super().reserve(*args, **kwargs)
        if self.meanwhile is not None:
            await self.meanwhile()
        return grant


async def test_a_turn_granted_just_before_a_pause_heard_before_the_grant_still_waits_for_it(
    valkey_server: ValkeyServer, prefix: str
) -> None:
    import trio_asyncio

    key = f"sk-{uuid.uuid4().hex}"
    bid = budget_id("http://provider/v1", key)
    async with (
        _GrantHandedLate(valkey_server.url, key_prefix=prefix, replicas=2) as late,
        ValkeyProviderBudget(valkey_server.url, key_prefix=prefix, replicas=2) as other,
    ):
        budget = cluster_budget("http://provider/v1", key, late)
        budget.configure(ProviderLimits(requests_per_minute=6000, shared=late))
        heard = trio.Event()
        late.watch(bid, lambda _shift, *_: heard.set())  # after the budget's own listener
        paused: list[float] = []

        async def pause_meanwhile() -> None:
            paused.append(time.monotonic())
            other.pause(bid, 0.5)
            with trio.fail_after(5):
                await heard.wait()

        late.meanwhile = pause_meanwhile
        async with trio_asyncio.open_loop():
            ticket = await trio_asyncio.aio_as_trio(budget.acquire)(1.0)
        went = time.monotonic()
    assert ticket.sent_at is not None
    assert went >= paused[0] + 0.4  # it waited out the pause, not went into it


@pytest.mark.slow
async def test_nothing_sent_to_the_server_or_logged_holds_the_api_key(
    valkey_server: ValkeyServer,
    prefix: str,
    llm_server: FakeOpenAIServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    key = f"sk-monitored-{uuid.uuid4().hex}"
    valkey_server.seed_capacity(prefix)
    llm_server.script_any(("429", 0.05))  # a pause, published too
    seen = bytearray()
    stream = await trio.open_tcp_stream("127.0.0.1", valkey_server.port)
    async with stream:
        await stream.send_all(b"MONITOR\r\n")
        assert (await stream.receive_some(64)).startswith(b"+OK")
        caplog.set_level(logging.DEBUG)
        async with trio.open_nursery() as nursery:

            async def record() -> None:
                while chunk := await stream.receive_some(65536):
                    seen.extend(chunk)

            nursery.start_soon(record)
            async with (
                replicas(valkey_server.url, prefix, 1) as (store,),
                ValkeyCapacity(valkey_server.url, name=prefix, capacity=4) as capacity,
            ):
                orch = OpenAIChatOrchestrator(
                    llm_server.base_url, "fake-model", api_key=key,
                    limits=ProviderLimits(requests_per_minute=6000, tokens_per_minute=10**6,
                                          shared=store),
                    **FAST,
                )  # fmt: skip
                async with AsyncioOrchestratorBridge(orch) as bridge:
                    service = ConcurrentDeliberationService(
                        bridge, HaltSwitch(), AgentPool(4, shared=capacity)
                    )
                    result = await service.invoke_concurrent(make_requests(8), overflow="queue")
                await store.flush()
            with trio.fail_after(5):  # MONITOR lags: the last call's line arrives after it
                while budget_id(llm_server.base_url, key).encode() not in seen:  # noqa: ASYNC110
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert result.success_count == 8
    assert f"{prefix}:leases".encode() in seen  # the capacity's calls were seen too
    logged = "".join(repr(r.__dict__) for r in caplog.records)
    for secret in (key, key[3:]):
        assert secret.encode() not in seen
        assert secret not in logged


async def test_an_advertised_limit_far_below_what_the_cluster_served_is_not_believed(
    valkey_server: ValkeyServer, prefix: str
) -> None:
    bid = budget_id("http://provider/v1", "sk-poisoned")
    async with replicas(valkey_server.url, prefix, 2) as (one, other):
        for _ in range(20):  # served at 6000 a minute: 20 within the last minute
            await one.reserve(bid, 1.0, 6000, None, 30.0)
        one.settle(bid, advertised_rpm=1)  # one poisoned response: "one a minute"
        await one.flush()
        grants = [await other.reserve(bid, 1.0, 6000, None, 30.0) for _ in range(3)]
    for earlier, later in itertools.pairwise(grants):
        assert later.turn_s - earlier.turn_s == pytest.approx(60.0 / (6000 * 0.95), abs=1e-3)
    assert {g.requests_per_minute for g in grants} == {6000}


async def test_a_server_clock_stepped_back_an_hour_does_not_hold_the_cluster_for_it(
    valkey_server: ValkeyServer, prefix: str
) -> None:
    bid = budget_id("http://provider/v1", "sk-time-travel")
    async with replicas(valkey_server.url, prefix, 1) as (store,):
        await store.reserve(bid, 1.0, 600, None, 30.0)
        # What an hour's step back of the server's clock leaves: every time in the budget,
        # and the clock it last read, an hour ahead of the server's now.
        async with coredis.Redis.from_url(valkey_server.url, decode_responses=False) as raw:
            key = f"{prefix}:budget:{bid}"
            fields = await raw.hgetall(key)
            hour = 3_600_000.0
            ahead = {
                name: f"{float(fields[name.encode()]) + hour:.3f}"
                for name in ("rtat", "rown", "last", "wstart", "rcfgat", "clock")
                if name.encode() in fields
            }
            assert "clock" in ahead  # the budget records the clock it read
            await raw.hset(key, ahead)
        grant = await store.reserve(bid, 1.0, 600, None, 30.0)
    assert grant.delay_s < 1.0  # the next turn, not an hour away


def test_a_replica_follows_the_server_clock_stepping_back_at_its_next_reading() -> None:
    from adapters.valkey._budget import _ServerClock

    clock = _ServerClock()
    assert clock.sample(10_000.0, 0.0, 0.001) == pytest.approx(10_000.0 - 0.0005)
    # Two seconds later, a slower call: the server's clock has gone back an hour.
    offset = clock.sample(10_002.0 - 3600.0, 2.0, 2.01)
    assert offset == pytest.approx(10_000.0 - 3600.0 - 0.005)


@pytest.mark.slow
async def test_turns_asked_for_while_the_server_was_stopped_are_not_handed_out_on_its_return(
    own_server: ValkeyServer, prefix: str
) -> None:
    bid = budget_id("http://provider/v1", "sk-stopped")
    async with (
        replicas(own_server.url, prefix, 2, timeout=0.2) as (stuck, _),
        replicas(own_server.url, prefix, 1) as (later,),
    ):
        own_server.pause()  # SIGSTOP: the calls wait in its socket, run on SIGCONT
        try:
            asked = time.monotonic()
            refused: list[bool] = []

            async def reserve() -> None:
                with pytest.raises(SharedBudgetUnavailableError):
                    await stuck.reserve(bid, 1.0, 60, None, 30.0)  # one a second
                refused.append(True)

            async with trio.open_nursery() as nursery:
                for _ in range(10):
                    nursery.start_soon(reserve)
            # Stopped for longer than the callers waited (and the clocks' error): they
            # went on at their share long ago.
            await trio.sleep(max(0.0, asked + 2.0 - time.monotonic()))
        finally:
            own_server.resume()
        grant = await later.reserve(bid, 1.0, 60, None, 30.0)
        (lanes,) = await later.lanes()
    assert refused == [True] * 10
    assert grant.delay_s < 0.5  # the first turn: none went to the callers that gave up
    assert lanes.turns == 1
