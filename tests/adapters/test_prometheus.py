"""The Prometheus endpoint, scraped over HTTP after batches with failures."""

from __future__ import annotations

import urllib.request

import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from adapters.prometheus import export_service_metrics, serve_metrics
from adapters.stub import AgentOrchestratorStub
from kernel import AgentPoolExhaustedError, ConcurrentDeliberationService, InvalidRequestError
from tests.support.helpers import make_requests


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_endpoint_shows_the_right_values_after_a_batch_with_failures() -> None:
    registry = CollectorRegistry()
    stub = AgentOrchestratorStub(latency_ms=2, fail_agents={"archon-1", "archon-2", "archon-3"})
    service = ConcurrentDeliberationService(stub)
    export_service_metrics(service, registry)
    server, _thread = serve_metrics(0, registry=registry)
    try:
        await service.invoke_concurrent(make_requests(10))
        with pytest.raises(AgentPoolExhaustedError):
            await service.invoke_concurrent(make_requests(80))
        m = await trio.to_thread.run_sync(_scrape, server.server_port)
    finally:
        server.shutdown()
        server.server_close()
    assert m[("conclave_batches_total", ())] == 1
    assert m[("conclave_agent_invocations_total", ())] == 10
    assert m[("conclave_agent_failures_total", (("kind", "error"),))] == 3
    assert m[("conclave_agent_failures_total", (("kind", "timeout"),))] == 0
    assert m[("conclave_pool_exhaustion_errors_total", ())] == 1
    assert m[("conclave_halted_batches_total", ())] == 0
    assert m[("conclave_pool_active_agents", ())] == 0
    assert m[("conclave_pool_available_slots", ())] == 72
    assert m[("conclave_pool_capacity", ())] == 72
    assert m[("conclave_batch_duration_seconds_count", ())] == 1
    assert 0.002 <= m[("conclave_batch_duration_seconds_sum", ())] < 5
    assert m[("conclave_batch_duration_seconds_bucket", (("le", "+Inf"),))] == 1


async def test_gauges_are_read_at_scrape_time(autojump_clock: trio.testing.MockClock) -> None:
    registry = CollectorRegistry()
    service = ConcurrentDeliberationService(AgentOrchestratorStub(latency_ms=1000))
    collector = export_service_metrics(service, registry)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(service.invoke_concurrent, make_requests(30))
        await trio.sleep(0.5)
        active = {m.name: m.samples[0].value for m in collector.collect()}
        assert active["conclave_pool_active_agents"] == 30
        assert active["conclave_pool_available_slots"] == 42


def test_bad_arguments() -> None:
    with pytest.raises(InvalidRequestError):
        export_service_metrics(object(), CollectorRegistry())  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError):
        serve_metrics(70000)
