"""push_metrics against a real Pushgateway, one that is down and one that hangs: the
series arrive under the job and grouping key, and a failure is a bounded warning."""

from __future__ import annotations

import logging

import pytest
import trio
from prometheus_client import CollectorRegistry, Counter

from adapters.pushgateway import JOB, check_gateway_url, push_metrics
from kernel import InvalidRequestError
from tests.support.pushgateway import hanging_gateway, pushgateway, scrape
from tests.support.valkey_server import free_port

#: A generous bound over a 0.5 s timeout: a loaded 2-core machine schedules late.
TIMEOUT_S = 0.5
BOUND_S = TIMEOUT_S + 3.0


def _registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    Counter("conclave_batches", "Batches.", registry=registry).inc(3)
    return registry


def test_pushed_series_appear_on_the_gateway_under_job_and_grouping_key() -> None:
    with pushgateway() as url:
        problem = trio.run(
            lambda: push_metrics(url, _registry(), grouping_key={"instance": "h1", "run": "r1"})
        )
        assert problem is None
        text = scrape(url)
    line = next(x for x in text.splitlines() if x.startswith("conclave_batches_total{"))
    assert f'job="{JOB}"' in line and 'instance="h1"' in line and 'run="r1"' in line
    assert line.endswith(" 3")


def test_two_runs_keep_their_own_groups() -> None:
    with pushgateway() as url:

        async def both() -> None:
            for run in ("r1", "r2"):
                assert await push_metrics(url, _registry(), grouping_key={"run": run}) is None

        trio.run(both)
        text = scrape(url)
    assert 'run="r1"' in text and 'run="r2"' in text


def test_a_gateway_that_is_down_is_a_warning_and_a_reason(caplog: pytest.LogCaptureFixture) -> None:
    url = f"http://127.0.0.1:{free_port()}"

    async def main() -> tuple[str | None, float]:
        start = trio.current_time()
        problem = await push_metrics(url, _registry(), grouping_key={}, timeout_s=TIMEOUT_S)
        return problem, trio.current_time() - start

    with caplog.at_level(logging.WARNING, logger="adapters"):
        problem, elapsed = trio.run(main)
    assert problem is not None and "refused" in problem.lower()
    assert elapsed < BOUND_S
    (record,) = [r for r in caplog.records if r.name == "adapters.pushgateway"]
    assert record.levelno == logging.WARNING
    assert record.__dict__["gateway"] == url and record.__dict__["error"] == problem


def test_a_gateway_that_never_answers_is_given_up_after_the_timeout_without_blocking_trio() -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await trio.sleep(0.01)
            ticks += 1

    async def main(url: str) -> tuple[str | None, float]:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            start = trio.current_time()
            problem = await push_metrics(url, _registry(), grouping_key={}, timeout_s=TIMEOUT_S)
            elapsed = trio.current_time() - start
            nursery.cancel_scope.cancel()
        return problem, elapsed

    with hanging_gateway() as url:
        problem, elapsed = trio.run(main, url)
    assert problem is not None
    assert TIMEOUT_S * 0.9 <= elapsed < BOUND_S
    # The loop went on while the push waited: 0.5 s of 10 ms ticks, a loaded machine's
    # worth of slack left.
    assert ticks >= 5


@pytest.mark.parametrize(
    "url",
    ["", "ftp://gw:9091", "http://user:pw@gw:9091", "http://gw:9091/?x=1", "gw:9091", 9091],
)
def test_a_bad_url_is_refused_before_anything_is_sent(url: object) -> None:
    with pytest.raises(InvalidRequestError):
        check_gateway_url(url)
    with pytest.raises(InvalidRequestError):
        trio.run(lambda: push_metrics(url, _registry(), grouping_key={}))  # type: ignore[arg-type]


@pytest.mark.parametrize("timeout", [0, -1, float("nan"), float("inf"), True])
def test_a_bad_timeout_is_refused(timeout: float) -> None:
    with pytest.raises(InvalidRequestError, match="timeout_s"):
        trio.run(
            lambda: push_metrics(
                "http://127.0.0.1:1", _registry(), grouping_key={}, timeout_s=timeout
            )
        )


def test_a_refusal_hides_credentials() -> None:
    with pytest.raises(InvalidRequestError) as caught:
        check_gateway_url("http://admin:hunter2@gw:9091")
    assert "hunter2" not in str(caught.value)
