"""examples/fastapi_app.py under a real uvicorn on 127.0.0.1, through a real HTTP client
(the standard library's): deliberations, their server-sent events, halts."""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import pytest
import uvicorn

from examples import fastapi_app
from tests.support.fake_openai import FakeOpenAIServer

Event = tuple[str, dict[str, Any]]


class _Server(uvicorn.Server):
    """uvicorn's server, saying when it is listening."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = threading.Event()

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        self.ready.set()


@contextmanager
def serving() -> Iterator[int]:
    """The example app under uvicorn in a thread (its own asyncio loop); its port."""
    config = uvicorn.Config(
        fastapi_app.app, host="127.0.0.1", port=0, log_level="warning", access_log=False
    )
    server = _Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    try:
        assert server.ready.wait(20), "uvicorn did not start"
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(20)
        assert not thread.is_alive(), "uvicorn did not stop"


def post(port: int, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        payload = json.dumps(body)
        connection.request("POST", path, payload, {"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def open_events(port: int, key: str) -> tuple[http.client.HTTPConnection, Any]:
    """Subscribe to a deliberation's events: answered once it has started."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("GET", f"/deliberations/{key}/events")
    response = connection.getresponse()
    assert response.status == 200, response.read()
    assert response.getheader("content-type", "").startswith("text/event-stream")
    return connection, response


def read_events(subscription: tuple[http.client.HTTPConnection, Any]) -> list[Event]:
    """Every server-sent event of a subscription, until the stream ends (after ``end``)."""
    connection, response = subscription
    found: list[Event] = []
    name = ""
    try:
        while line := response.readline().decode():
            if line.startswith("event: "):
                name = line[len("event: ") :].strip()
            elif line.startswith("data: "):
                found.append((name, json.loads(line[len("data: ") :])))
    finally:
        connection.close()
    return found


def events(port: int, key: str) -> list[Event]:
    return read_events(open_events(port, key))


@pytest.fixture
def clients() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(4) as pool:
        yield pool


def test_a_72_agent_deliberation_streams_its_progress_then_answers(
    monkeypatch: pytest.MonkeyPatch, clients: ThreadPoolExecutor
) -> None:
    monkeypatch.setenv("CONCLAVE_STUB_LATENCY_MS", "50")
    with serving() as port:
        streamed = clients.submit(events, port, "d-1")  # subscribes before it starts
        status, answer = post(
            port, "/deliberations", {"topic": "Adopt?", "agents": 72, "id": "d-1"}
        )
        stream = streamed.result(30)
        late = events(port, "d-1")  # after the end: every event still
    assert status == 200
    assert answer["status"] == "completed" and answer["succeeded"] == 72 and answer["failed"] == 0
    progress = [data for name, data in stream if name == "progress"]
    assert [p["done"] for p in progress] == list(range(1, 73))
    assert {p["status"] for p in progress} == {"completed"}
    assert stream[-1] == ("end", answer)
    assert late == stream


def _post_when_running(
    port: int, clients: ThreadPoolExecutor, key: str, agents: int = 72
) -> Future[tuple[int, dict[str, Any]]]:
    body = {"topic": "Adopt?", "agents": agents, "id": key}
    return clients.submit(post, port, "/deliberations", body)


def test_a_halt_request_stops_the_running_deliberation_and_refuses_later_ones(
    monkeypatch: pytest.MonkeyPatch, clients: ThreadPoolExecutor
) -> None:
    monkeypatch.setenv("CONCLAVE_STUB_LATENCY_MS", "60000")
    with serving() as port:
        running = _post_when_running(port, clients, "d-2")
        subscription = open_events(port, "d-2")  # answered once it has started
        halted = post(port, "/halt", {"reason": "operator stop"})
        status, answer = running.result(30)
        stream = read_events(subscription)
        later = post(port, "/deliberations", {"topic": "Again?", "agents": 3})
    assert halted == (200, {"halted": True, "raised_now": True})
    assert status == 200
    assert answer["status"] == "halted" and answer["halt_reason"] == "operator stop"
    assert answer["succeeded"] == 0 and answer["failed"] == 72  # all 72 were running
    assert stream == [("end", answer)]  # no agent finished
    assert stream[-1] == ("end", answer)
    assert later[1]["status"] == "halted" and later[1]["batch_id"] is None


def test_a_deliberation_while_the_seats_are_taken_is_refused_and_runs_nothing(
    monkeypatch: pytest.MonkeyPatch, clients: ThreadPoolExecutor
) -> None:
    monkeypatch.setenv("CONCLAVE_STUB_LATENCY_MS", "60000")
    with serving() as port:
        running = _post_when_running(port, clients, "d-4")
        read_events_later = open_events(port, "d-4")  # answered once it has started
        refused = post(port, "/deliberations", {"topic": "Meanwhile?", "agents": 5})
        post(port, "/halt", {"reason": "done testing"})
        status, answer = running.result(30)
        read_events(read_events_later)
    assert refused[0] == 409 and "FR10" in refused[1]["detail"]
    assert status == 200 and answer["failed"] == 72  # the first ran on, untouched


def test_through_the_openai_adapter_a_halt_closes_every_upstream_request(
    monkeypatch: pytest.MonkeyPatch, clients: ThreadPoolExecutor, llm_server: FakeOpenAIServer
) -> None:
    llm_server.default = "hang"
    monkeypatch.setenv("CONCLAVE_BASE_URL", llm_server.base_url)
    monkeypatch.setenv("CONCLAVE_MODEL", "fake-model")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    with serving() as port:
        running = _post_when_running(port, clients, "d-3")
        assert llm_server.wait_for(lambda s: s.in_flight >= 72, 20), "72 never in flight"
        started = time.perf_counter()
        assert post(port, "/halt", {"reason": "operator stop"})[0] == 200
        status, answer = running.result(30)
        halt_s = time.perf_counter() - started
        closed = llm_server.wait_for(lambda s: s.disconnects >= 72, 20)
    assert status == 200 and answer["status"] == "halted" and answer["failed"] == 72
    assert closed, f"{llm_server.disconnects} of 72 upstream requests closed"
    assert llm_server.disconnects == 72 and llm_server.in_flight == 0
    # Measured, not asserted tightly (a loaded machine): the README quotes a benchmark.
    assert halt_s < 10


def test_bad_requests_are_refused_and_run_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fastapi_app, "ANNOUNCE_WAIT_S", 0.05)
    with serving() as port:
        for body in (
            {"topic": "", "agents": 3},
            {"topic": "x", "agents": 0},
            {"topic": "x", "agents": 73},
            {"agents": 3},
            {"topic": "x", "id": "a/b"},
        ):
            assert post(port, "/deliberations", body)[0] == 422, body
        assert post(port, "/halt", {"reason": ""})[0] == 422
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("GET", "/deliberations/nobody/events")
        assert connection.getresponse().status == 404
        connection.close()
        status, answer = post(port, "/deliberations", {"topic": "x", "agents": 2, "id": "ok"})
        again = post(port, "/deliberations", {"topic": "x", "agents": 2, "id": "ok"})
        # A batch after it: anything the refused request had started has started by its end.
        after = post(port, "/deliberations", {"topic": "x", "agents": 2, "id": "after"})
        metrics = fastapi_app.app.state.host.service.metrics.snapshot().as_dict()
    assert status == 200 and answer["status"] == "completed" and answer["succeeded"] == 2
    assert again[0] == 409
    assert after[1]["succeeded"] == 2
    assert metrics["agent_invocations_total"] == 4  # the refused request invoked nobody


def test_a_refused_deliberation_ends_its_stream_saying_so_and_its_id_can_be_used_again(
    monkeypatch: pytest.MonkeyPatch, clients: ThreadPoolExecutor
) -> None:
    monkeypatch.setenv("CONCLAVE_STUB_LATENCY_MS", "60000")
    with serving() as port:
        running = _post_when_running(port, clients, "d-6")
        first = open_events(port, "d-6")  # answered once it has started
        streamed = clients.submit(events, port, "d-7")  # subscribes before it is refused
        refused = post(port, "/deliberations", {"topic": "Meanwhile?", "agents": 5, "id": "d-7"})
        stream = streamed.result(30)
        post(port, "/halt", {"reason": "seats free again"})
        running.result(30)
        read_events(first)
        again = post(port, "/deliberations", {"topic": "Again?", "agents": 5, "id": "d-7"})
    assert refused[0] == 409 and "FR10" in refused[1]["detail"]
    assert stream == [("end", {"id": "d-7", "status": "refused", "detail": refused[1]["detail"]})]
    assert again[0] == 200 and again[1]["id"] == "d-7"  # not "exists": nothing ran under it
