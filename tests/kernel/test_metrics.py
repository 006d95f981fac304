"""ServiceMetrics and its snapshot, and the one nearest-rank quantile."""

from __future__ import annotations

import math

import pytest
import trio
import trio.testing

from adapters.stub import AgentOrchestratorStub
from kernel import (
    AgentPoolExhaustedError,
    ConcurrentDeliberationService,
    InvalidRequestError,
    ServiceMetrics,
    nearest_rank,
)
from tests.support.helpers import make_requests


async def test_metrics_snapshot(autojump_clock: trio.testing.MockClock) -> None:
    stub = AgentOrchestratorStub(latency_ms=10, fail_agents={"archon-1"})
    service = ConcurrentDeliberationService(stub)
    await service.invoke_concurrent(make_requests(10))
    stub.set_latency(30)
    await service.invoke_concurrent(make_requests(10))
    with pytest.raises(AgentPoolExhaustedError):
        await service.invoke_concurrent(make_requests(80))
    snap = service.metrics.snapshot()
    assert snap.batches_total == 2
    assert snap.agent_invocations_total == 20
    assert snap.agent_failure_count == 2
    assert snap.pool_exhaustion_errors == 1
    assert snap.halted_batches == 0
    assert snap.pool_active_count == 0
    assert snap.concurrent_invocation_total_ms == pytest.approx(30.0)
    assert snap.p50_ms == pytest.approx(10.0)
    assert snap.p99_ms == pytest.approx(30.0)
    assert service.get_pool_status().as_dict() == {
        "active_count": 0,
        "available_count": 72,
        "max_concurrent": 72,
    }
    assert service.available_capacity == 72 and service.active_count == 0


def test_nearest_rank_is_always_one_of_the_values() -> None:
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert nearest_rank(values, 0.5) == 3.0
    assert nearest_rank(values, 0.95) == 5.0
    assert nearest_rank(values, 0.2) == 1.0  # 0.2 x 5 = 1: the first, not the second
    assert nearest_rank([7.0], 0.01) == 7.0
    for bad in (0, 1.5, math.nan):
        with pytest.raises(InvalidRequestError):
            nearest_rank(values, bad)
    with pytest.raises(InvalidRequestError):
        nearest_rank([], 0.5)


def test_reading_a_snapshot_as_a_mapping_still_works_but_warns() -> None:
    snapshot = ServiceMetrics(lambda: 0).snapshot()
    with pytest.warns(DeprecationWarning, match="snapshot.halted_batches"):
        assert snapshot["halted_batches"] == 0
    with pytest.warns(DeprecationWarning, match="no_such_field"), pytest.raises(KeyError):
        snapshot["no_such_field"]
