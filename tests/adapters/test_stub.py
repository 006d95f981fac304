from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing

from adapters.stub import STUB_MODEL, AgentOrchestratorStub
from kernel import AgentInvocationError, AgentOrchestratorProtocol, AgentStatus, InvalidRequestError
from tests.support.helpers import make_context, make_requests


async def test_stub_output_and_counts(autojump_clock: trio.testing.MockClock) -> None:
    stub = AgentOrchestratorStub(latency_ms=20)
    assert isinstance(stub, AgentOrchestratorProtocol)
    ctx = make_context("budget")
    out = await stub.invoke("archon-9", ctx)
    assert out.content.startswith("[DEV MODE] ")
    assert "archon-9" in out.content and "budget" in out.content
    assert trio.current_time() == pytest.approx(0.020)
    assert stub.get_invocation_count() == 1 and stub.get_invocation_count("archon-9") == 1
    other = await stub.invoke("archon-9", ctx)
    assert other.output_id != out.output_id
    stub.reset_stats()
    assert stub.get_invocation_count() == 0


async def test_stub_failures_and_status(autojump_clock: trio.testing.MockClock) -> None:
    stub = AgentOrchestratorStub(latency_ms=1, fail_agents=["a"])
    ctx = make_context()
    assert stub.get_agent_status("a").status is AgentStatus.UNKNOWN
    with pytest.raises(AgentInvocationError, match="simulated failure of agent a"):
        await stub.invoke("a", ctx)
    info = stub.get_agent_status("a")
    assert info.status is AgentStatus.FAILED and info.last_error and info.last_invocation
    stub.remove_fail_agent("a")
    await stub.invoke("a", ctx)
    assert stub.get_agent_status("a").status is AgentStatus.IDLE
    stub.add_fail_agent("b")
    assert stub.fail_agents == {"b"}
    stub.set_fail_agents([])
    assert stub.fail_agents == frozenset()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stub.invoke, "c", ctx)
        await trio.lowlevel.checkpoint()
        await trio.lowlevel.checkpoint()
        assert stub.get_agent_status("c").status is AgentStatus.BUSY
        assert stub.in_flight == 1


async def test_stub_jitter_is_seeded(autojump_clock: trio.testing.MockClock) -> None:
    async def latencies(seed: int) -> list[float]:
        stub = AgentOrchestratorStub(latency_ms=10, jitter_ms=5, seed=seed)
        outs = await stub.invoke_sequential(make_requests(5))
        return [float(o.metadata["latency_ms"]) for o in outs]

    first, again, other = await latencies(1), await latencies(1), await latencies(2)
    assert first == again != other
    assert all(10 <= x <= 15 for x in first)


async def test_invoke_batch_is_concurrent_and_ordered(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stub = AgentOrchestratorStub(latency_ms=10)
    requests = make_requests(8)
    outs = await stub.invoke_batch(requests)
    assert [o.agent_id for o in outs] == [r.agent_id for r in requests]
    assert stub.max_in_flight == 8
    assert trio.current_time() == pytest.approx(0.010)
    stub.add_fail_agent("archon-3")
    with pytest.raises(AgentInvocationError, match="archon-3"):
        await stub.invoke_batch(requests)


@pytest.mark.parametrize(
    "kwargs", [{"latency_ms": -1}, {"latency_ms": "5"}, {"jitter_ms": -2}, {"fail_agents": "abc"}]
)
def test_stub_rejects_bad_settings(kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequestError):
        AgentOrchestratorStub(**kwargs)


def test_latency_model_matches_its_parameters() -> None:
    import random
    import statistics

    from adapters.stub import LatencyModel

    model = LatencyModel()
    rng = random.Random(7)
    samples = [model.sample_ms(rng) for _ in range(20_000)]
    body = sorted(s for s in samples if s != model.stall_ms)
    stalls = len(samples) - len(body)
    assert 0.003 < stalls / len(samples) < 0.007  # 0.5%
    assert statistics.median(body) == pytest.approx(800.0, rel=0.05)
    p95 = body[int(0.95 * len(body))]
    assert p95 / statistics.median(body) == pytest.approx(4.4, rel=0.1)  # exp(1.645 * 0.9)
    scaled = model.with_median(20.0)
    assert (scaled.median_ms, scaled.stall_ms, scaled.sigma) == (20.0, 750.0, 0.9)


def test_latency_model_and_profile_are_validated() -> None:
    from adapters.stub import LatencyModel

    for kwargs in ({"median_ms": 0}, {"sigma": -1}, {"stall_probability": 1.5}):
        with pytest.raises(InvalidRequestError):
            LatencyModel(**kwargs)
    with pytest.raises(InvalidRequestError, match="latency_profile"):
        AgentOrchestratorStub(latency_profile="pareto")  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="time_scale"):
        AgentOrchestratorStub(time_scale=0)


async def test_lognormal_stub_is_seeded_and_time_scaled(
    autojump_clock: trio.testing.MockClock,
) -> None:
    def stub() -> AgentOrchestratorStub:
        return AgentOrchestratorStub(latency_profile="lognormal", seed=11, time_scale=0.01)

    first, second = stub(), stub()
    ctx = make_context()
    a = [float((await first.invoke(f"x{i}", ctx)).metadata["latency_ms"]) for i in range(50)]
    b = [float((await second.invoke(f"x{i}", ctx)).metadata["latency_ms"]) for i in range(50)]
    assert a == b and len(set(a)) == 50
    assert 4.0 < sorted(a)[25] < 16.0  # a median of 800 ms x 0.01
    assert trio.current_time() == pytest.approx(2 * sum(a) / 1000.0)


async def test_stub_answers_report_plausible_token_usage(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stub = AgentOrchestratorStub(latency_ms=1, seed=4)
    short, long = make_context("t"), make_context("x" * 4000)
    first = await stub.invoke("archon-1", short)
    again = await stub.invoke("archon-1", long)
    other = await stub.invoke("archon-2", short)
    assert first.metadata["model"] == STUB_MODEL and first.metadata["usage"] == "estimated"
    # The prompt grows with the topic; the answer's length is the agent's own.
    assert int(again.metadata["prompt_tokens"]) == int(first.metadata["prompt_tokens"]) + 1000
    assert first.metadata["completion_tokens"] == again.metadata["completion_tokens"]
    assert first.metadata["completion_tokens"] != other.metadata["completion_tokens"]
    completions = [
        int((await stub.invoke(f"a{i}", short)).metadata["completion_tokens"]) for i in range(50)
    ]
    assert all(150 <= c < 350 for c in completions) and len(set(completions)) > 10
