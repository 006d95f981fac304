"""Hypothesis: every feature of the service at once, on a small cluster.

Two replicas (each its own pool and service) share one in-process model of a shared
capacity, one halt switch, one witness and one real :class:`~kernel.RateLimit`.  Each
draws its own batch: agents with random latencies that succeed, fail, hang, swallow their
cancellation or return garbage; either overflow mode; any mix of deadline, quorum, hedge,
agent timeout; a sync or an ``async`` ``on_progress``; and a halt lands at a random
virtual time, or never.  Whatever happens, for every batch:

* one outcome per request, in request order;
* at most the hedge budget of agents hedged, and every counted hedge reached the
  orchestrator (duplicate calls == hedged agents == hedges launched);
* calls in flight never exceed a replica's pool, nor the cluster's shared capacity;
* nothing starts and nothing is released after the halt;
* the witness holds exactly the released outputs, and every released output was
  reported ``completed`` to ``on_progress`` (sync or async);
* every pool slot and every shared lease is back at the end;
* what the observers saw agrees with the result: the kernel's events (every started agent
  ends once, with its outcome), the Prometheus families (a duration per agent, one
  failures-per-batch sample) and the traces (a span per batch, per agent call and per
  hedge, each call's span the batch's child).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from uuid import uuid4

import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from adapters.prometheus import export_service_metrics
from adapters.tracing import DeliberationTracer
from kernel import (
    AgentOutput,
    AgentPool,
    ConcurrentDeliberationService,
    ConcurrentResult,
    ContextBundle,
    FailureKind,
    HaltSwitch,
    HedgePolicy,
    RateLimit,
    SystemHaltedError,
)
from kernel.events import (
    AgentEnded,
    BatchEnded,
)
from tests.support.helpers import assert_one_outcome_per_request_in_order, make_requests
from tests.support.hostile_parts import Ledger
from tests.support.model_capacity import BatchModelCapacity, ModelCapacity
from tests.support.observers import Recorder, assert_events_agree_with

BEHAVIOURS = ["ok", "ok", "ok", "error", "hang", "swallow", "garbage"]


@dataclass
class Replica:
    """One replica's batch and settings."""

    agents: list[tuple[str, int]]  # per agent: (behaviour, latency ms)
    capacity: int
    overflow: str
    deadline_ms: float | None
    quorum: int | None
    hedge: HedgePolicy | None
    timeout_ms: float | None
    async_progress: bool
    start_ms: int


@dataclass
class Scenario:
    replicas: list[Replica]
    shared_capacity: int
    batch_admission: bool  # the shared capacity takes a queue batch's leases in one call
    rate_per_s: float | None
    commit_ms: int | None
    halt_at_ms: float | None


@st.composite
def replicas(draw: st.DrawFn) -> Replica:
    agent = st.tuples(st.sampled_from(BEHAVIOURS), st.integers(0, 2000))
    agents = draw(st.lists(agent, min_size=1, max_size=12))
    overflow = draw(st.sampled_from(["reject", "queue"]))
    return Replica(
        agents=agents,
        capacity=draw(st.integers(len(agents), 16) if overflow == "reject" else st.integers(1, 8)),
        overflow=overflow,
        deadline_ms=draw(st.none() | st.integers(1, 3000).map(lambda ms: ms + 0.5)),
        quorum=draw(st.none() | st.integers(1, len(agents))),
        hedge=draw(
            st.none()
            | st.builds(
                HedgePolicy,
                delay=st.integers(1, 1500).map(lambda ms: ms / 1000.0 + 0.0001),
                budget=st.sampled_from([0.0, 0.1, 0.3, 1.0]),
            )
        ),
        timeout_ms=draw(st.none() | st.integers(1, 2500).map(lambda ms: ms + 0.25)),
        async_progress=draw(st.booleans()),
        start_ms=draw(st.integers(0, 50)),
    )


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    reps = draw(st.lists(replicas(), min_size=1, max_size=2))
    halt_at_ms = draw(st.none() | st.integers(0, 3000).map(lambda ms: ms + 0.75))
    hangs = any(b == "hang" for r in reps for b, _ in r.agents)
    if hangs and halt_at_ms is None:
        halt_at_ms = 5000.75  # something must end an agent that hangs without a timeout
    return Scenario(
        replicas=reps,
        # Reject mode needs the whole batch to fit one pool, not the cluster: a batch that
        # does not fit the cluster is refused whole, which is a valid outcome too.
        shared_capacity=draw(st.integers(1, 24)),
        batch_admission=draw(st.booleans()),
        rate_per_s=draw(st.none() | st.sampled_from([5.0, 50.0, 1000.0])),
        commit_ms=draw(st.none() | st.integers(0, 30)),
        halt_at_ms=halt_at_ms,
    )


@dataclass
class Cluster:
    """What every replica's orchestrator saw: calls in flight, per replica and in all."""

    switch: HaltSwitch
    in_flight: int = 0
    max_in_flight: int = 0
    starts_after_halt: list[str] = field(default_factory=list)


@dataclass
class Orchestrator:
    plan: dict[str, tuple[str, int]]
    cluster: Cluster
    in_flight: int = 0
    max_in_flight: int = 0
    calls: dict[str, int] = field(default_factory=dict)

    async def invoke(self, agent_id: str, context: ContextBundle) -> AgentOutput:
        behaviour, latency_ms = self.plan[agent_id]
        self.calls[agent_id] = self.calls.get(agent_id, 0) + 1
        if self.cluster.switch.halted:
            self.cluster.starts_after_halt.append(agent_id)
        self.in_flight += 1
        self.cluster.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self.cluster.max_in_flight = max(self.cluster.max_in_flight, self.cluster.in_flight)
        try:
            output = AgentOutput(agent_id=agent_id, request_id=uuid4(), content="answer")
            if behaviour == "hang":
                await trio.sleep_forever()
            if behaviour == "swallow":
                try:
                    await trio.sleep(latency_ms / 1000.0)
                except trio.Cancelled:
                    return output
            await trio.sleep(latency_ms / 1000.0)
            if behaviour == "error":
                raise RuntimeError("scripted failure")
            if behaviour == "garbage":
                return {"not": "an output"}  # type: ignore[return-value]
            return output
        finally:
            self.in_flight -= 1
            self.cluster.in_flight -= 1


@dataclass
class Run:
    """One replica's batch: its parts, what on_progress saw, and how it ended."""

    spec: Replica
    orchestrator: Orchestrator
    pool: AgentPool
    service: ConcurrentDeliberationService
    requests: list = field(default_factory=list)  # type: ignore[type-arg]
    reported: list[tuple[str, str, bool]] = field(default_factory=list)
    result: ConcurrentResult | None = None
    halted: bool = False
    refused: bool = False
    events: Recorder = field(default_factory=Recorder)
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    spans: InMemorySpanExporter = field(default_factory=InMemorySpanExporter)

    def observe(self) -> None:
        """Watch the service as an operator would: events, Prometheus, traces."""
        self.service.metrics.add_observer(self.events)
        export_service_metrics(self.service, self.registry)
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(self.spans))
        self.service.metrics.add_observer(DeliberationTracer(provider))


def build(scenario: Scenario) -> tuple[Cluster, ModelCapacity, Ledger | None, list[Run]]:
    switch = HaltSwitch()
    cluster = Cluster(switch)
    model = BatchModelCapacity if scenario.batch_admission else ModelCapacity
    shared = model(scenario.shared_capacity)
    ledger = Ledger(scenario.commit_ms) if scenario.commit_ms is not None else None
    rate = RateLimit(scenario.rate_per_s, burst=4) if scenario.rate_per_s else None
    runs = []
    for index, spec in enumerate(scenario.replicas):
        requests = make_requests(len(spec.agents), prefix=f"r{index}-agent")
        orch = Orchestrator(
            {r.agent_id: a for r, a in zip(requests, spec.agents, strict=True)}, cluster
        )
        pool = AgentPool(spec.capacity, shared=shared)
        service = ConcurrentDeliberationService(
            orch,
            switch,
            pool,
            agent_timeout=None if spec.timeout_ms is None else spec.timeout_ms / 1000.0,
            witness=ledger,
            rate_limit=rate,
        )
        run = Run(spec, orch, pool, service, requests)
        run.observe()
        runs.append(run)
    return cluster, shared, ledger, runs


async def run_batch(run: Run) -> None:
    spec = run.spec
    switch = run.orchestrator.cluster.switch

    def record(agent_id: str, status: str) -> None:
        run.reported.append((agent_id, status, switch.halted))

    def sync_progress(done: int, total: int, agent_id: str, status: str) -> None:
        record(agent_id, status)

    async def async_progress(done: int, total: int, agent_id: str, status: str) -> None:
        record(agent_id, status)  # the report is made; a halt may cut the rest short
        await trio.sleep(0.001)

    await trio.sleep(spec.start_ms / 1000.0)
    try:
        run.result = await run.service.invoke_concurrent(
            run.requests,
            overflow="queue" if spec.overflow == "queue" else "reject",
            on_progress=async_progress if spec.async_progress else sync_progress,
            deadline=None if spec.deadline_ms is None else spec.deadline_ms / 1000.0,
            quorum=spec.quorum,
            hedge=spec.hedge,
        )
    except SystemHaltedError as exc:
        run.halted = True
        run.result = exc.partial  # None: halted before the batch started
    except Exception as exc:  # refused whole: the cluster had no room (reject mode)
        assert "FR10" in str(exc), exc
        run.refused = True


def play(scenario: Scenario) -> tuple[Cluster, ModelCapacity, Ledger | None, list[Run]]:
    cluster, shared, ledger, runs = build(scenario)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            if scenario.halt_at_ms is not None:

                async def halter() -> None:
                    assert scenario.halt_at_ms is not None
                    await trio.sleep(scenario.halt_at_ms / 1000.0)
                    cluster.switch.halt("halt at a random time")

                nursery.start_soon(halter)
            async with trio.open_nursery() as batches:
                for run in runs:
                    batches.start_soon(run_batch, run)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return cluster, shared, ledger, runs


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_every_promise_holds_with_every_feature_at_once(scenario: Scenario) -> None:
    cluster, shared, ledger, runs = play(scenario)

    released_ids = set()
    for run in runs:
        orch, spec = run.orchestrator, run.spec
        if run.refused or run.result is None:
            assert sum(orch.calls.values()) == 0  # refused or halted before: nothing ran
            continue
        result = run.result
        assert_one_outcome_per_request_in_order(run.requests, result)

        # The hedge budget holds, and every counted hedge was a call that was made.
        budget = spec.hedge.max_hedged(len(run.requests)) if spec.hedge else 0
        assert len(result.hedged_agents) <= budget
        duplicates = sum(orch.calls.values()) - len(orch.calls)
        assert duplicates == len(result.hedged_agents)
        assert run.service.metrics.snapshot().hedges_launched == duplicates

        # Capacity: a replica's pool.
        assert orch.max_in_flight <= spec.capacity

        # Nothing released after the halt; every released output reported ``completed``.
        completed = [agent for agent, status, _ in run.reported if status == "completed"]
        assert sorted(completed) == sorted(o.agent_id for o in result.outputs)
        assert not any(s == "completed" and halted for _, s, halted in run.reported)
        released_ids |= {o.output_id for o in result.outputs}

        # Every slot is back.
        assert run.pool.active_count == 0 and not run.pool.queued_agents

        check_observers(run, result)

    # The cluster: never over its shared capacity; nothing started after the halt;
    # every lease back; the witness holds exactly what was released.
    assert cluster.max_in_flight <= scenario.shared_capacity
    assert shared.max_held <= scenario.shared_capacity
    assert cluster.starts_after_halt == []
    assert not shared.held and not shared.waiting
    if ledger is not None:
        assert {o.output_id for o in ledger.log} == released_ids


def check_observers(run: Run, result: ConcurrentResult) -> None:
    """The events, the Prometheus samples and the spans of a batch that ran."""
    assert_events_agree_with(run.events.events, result)
    ended = run.events.of(AgentEnded)
    [end] = run.events.of(BatchEnded)
    if run.halted:
        # Nothing slow between the halt and the caller: stopped in the same instant.
        assert end.halt_stop_s == 0.0
    sample = run.registry.get_sample_value
    durations = sum(
        sample("conclave_agent_duration_seconds_count", {"outcome": o}) or 0.0
        for o in ("ok", *(k.value for k in FailureKind))
    )
    assert durations == len(ended)
    assert sample("conclave_batch_failures_count") == 1
    # The agents' own failures: a quorum's cancellations and a halt's stops are not.
    own = [f for f in result.failures if f.kind.value not in ("cancelled", "halted")]
    assert sample("conclave_batch_failures_sum") == len(own)
    spans = run.spans.get_finished_spans()
    assert len(spans) == 1 + len(ended) + len(result.hedged_agents)
    [batch] = [s for s in spans if s.name == "conclave.deliberation"]
    for span in spans:
        assert span.context.trace_id == batch.context.trace_id
        if span is not batch and not (span.attributes or {}).get("conclave.hedge"):
            assert span.parent is not None and span.parent.span_id == batch.context.span_id
