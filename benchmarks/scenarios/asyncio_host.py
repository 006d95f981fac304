"""Embedded in an asyncio application (adapters.asyncio_host): how long the host loop is
held during 72-agent LLM batches, against the plain SDK on the same loop; how soon a halt
ends a batch with 72 HTTP requests open, and how many of them the server sees closed; and
the same halt through examples/fastapi_app.py under uvicorn, from the halt request to the
deliberation's answer."""

from __future__ import annotations

import asyncio
import gc
import http.client
import json
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

from benchmarks.processes import fake_server
from benchmarks.results import Results, Row, Settings
from benchmarks.workloads import requests_for
from kernel import SystemHaltedError

__all__ = ["asyncio_host"]


def asyncio_host(s: Settings, results: Results) -> None:
    batches = 5 if s.quick else 15
    trials = 5 if s.quick else 15
    name = "asyncio host (72 via openai)"
    metric = "max heartbeat gap per batch"
    stub_gaps = _plain_loop(_stub_gaps, batches)
    note = "the kernel alone: AgentOrchestratorStub @50 ms, no HTTP"
    results.add(Row(name, "kernel in AsyncioHost, stub", metric, "ms", stub_gaps, note=note))
    with fake_server("--latency", "0.05") as base_url:
        host_gaps = _plain_loop(_host_gaps, base_url, batches)
        sdk_gaps = _plain_loop(_sdk_gaps, base_url, batches)
    note = f"1 ms asyncio heartbeat, {batches} batches @50 ms, gc.freeze() after set-up"
    results.add(Row(name, "kernel in AsyncioHost", metric, "ms", host_gaps, "< 40 ms", note))
    note = "the same calls under asyncio.gather, no kernel"
    results.add(Row(name, "asyncio.gather + openai", metric, "ms", sdk_gaps, note=note))
    with fake_server("--hang") as base_url:
        spans, closed = _plain_loop(_host_halts, base_url, trials)
        results.add(Row(name, "kernel in AsyncioHost", "halt -> SystemHaltedError", "ms", spans))
        note = "of 72 open requests, seen closed by the server"
        metric = "upstream disconnects"
        results.add(Row(name, "kernel in AsyncioHost", metric, "", closed, "72", note))
        spans, closed = _fastapi_halts(base_url, trials)
    variant = "examples/fastapi_app.py, uvicorn"
    metric = "POST /halt sent -> deliberation answered"
    results.add(Row(name, variant, metric, "ms", spans, note="stdlib HTTP client"))
    results.add(Row(name, variant, "upstream disconnects", "", closed, "72"))


def _plain_loop(main: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> Any:
    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        return runner.run(main(*args))


class _Heartbeat:
    """An asyncio task that wakes every millisecond and keeps the largest gap it saw."""

    def __init__(self) -> None:
        self.max_gap_s = 0.0
        self._last = time.perf_counter()

    def reset(self) -> None:
        self.max_gap_s, self._last = 0.0, time.perf_counter()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            self.max_gap_s = max(self.max_gap_s, now - self._last)
            self._last = now


async def _measured(batch: Callable[[], Awaitable[object]], batches: int) -> list[float]:
    await batch()  # warm up: imports, connections
    gc.collect()
    gc.freeze()
    beat = _Heartbeat()
    task = asyncio.create_task(beat.run())
    gaps = []
    try:
        for _ in range(batches):
            beat.reset()
            await batch()
            gaps.append(beat.max_gap_s * 1e3)
    finally:
        task.cancel()
        gc.unfreeze()
    return gaps


async def _host_gaps(base_url: str, batches: int) -> list[float]:
    from adapters.asyncio_host import AsyncioHost
    from adapters.llm.bridge import AsyncioOrchestratorBridge
    from adapters.llm.openai_chat import OpenAIChatOrchestrator

    llm = OpenAIChatOrchestrator(base_url, "fake-model", timeout_s=60)
    async with AsyncioHost(AsyncioOrchestratorBridge(llm)) as host:
        return await _measured(lambda: host.invoke_concurrent(requests_for(72)), batches)


async def _stub_gaps(batches: int) -> list[float]:
    from adapters.asyncio_host import AsyncioHost
    from adapters.stub import AgentOrchestratorStub

    async with AsyncioHost(AgentOrchestratorStub(latency_ms=50)) as host:
        return await _measured(lambda: host.invoke_concurrent(requests_for(72)), batches)


async def _sdk_gaps(base_url: str, batches: int) -> list[float]:
    import openai

    async with openai.AsyncOpenAI(base_url=base_url, api_key="sk-bench") as client:

        async def one(i: int) -> object:
            return await client.chat.completions.create(
                model="fake-model", messages=[{"role": "user", "content": f"topic {i}"}]
            )

        async def batch() -> object:
            return await asyncio.gather(*(one(i) for i in range(72)))

        return await _measured(batch, batches)


def _stats(base_url: str) -> dict[str, int]:
    with urllib.request.urlopen(f"{base_url}/stats", timeout=10) as answer:
        stats: dict[str, int] = json.loads(answer.read())
    return stats


def _until(base_url: str, predicate: Callable[[dict[str, int]], bool]) -> dict[str, int]:
    """Poll the server process's counters (another process: no condition to wait on)."""
    deadline = time.monotonic() + 30
    while not predicate(stats := _stats(base_url)):
        if time.monotonic() > deadline:
            raise RuntimeError(f"server never reached the state: {stats}")
        time.sleep(0.002)
    return stats


async def _host_halts(base_url: str, trials: int) -> tuple[list[float], list[float]]:
    from adapters.asyncio_host import AsyncioHost
    from adapters.llm.bridge import AsyncioOrchestratorBridge
    from adapters.llm.openai_chat import OpenAIChatOrchestrator
    from kernel import HaltSwitch

    spans: list[float] = []
    closed: list[float] = []
    for _ in range(trials):
        llm = OpenAIChatOrchestrator(base_url, "fake-model", timeout_s=600)
        async with AsyncioHost(AsyncioOrchestratorBridge(llm), HaltSwitch()) as host:
            before = await asyncio.to_thread(_stats, base_url)
            deliberation = host.start(requests_for(72))
            await asyncio.to_thread(_until, base_url, lambda s: s["in_flight"] >= 72)
            started = time.perf_counter()
            host.halt("benchmark")
            try:
                await deliberation.result()
            except SystemHaltedError:
                spans.append((time.perf_counter() - started) * 1e3)
            after = await asyncio.to_thread(_until, base_url, lambda s: s["in_flight"] == 0)
            closed.append(after["disconnects"] - before["disconnects"])
    return spans, closed


@contextmanager
def _uvicorn(app: Any) -> Iterator[int]:
    import uvicorn

    class Server(uvicorn.Server):
        ready = threading.Event()

        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            self.ready.set()

    server = Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        if not server.ready.wait(30):
            raise RuntimeError("uvicorn did not start")
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(30)


def _post(port: int, path: str, body: dict[str, Any]) -> dict[str, Any]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        answer: dict[str, Any] = json.loads(connection.getresponse().read())
        return answer
    finally:
        connection.close()


def _fastapi_halts(base_url: str, trials: int) -> tuple[list[float], list[float]]:
    import os

    from examples import fastapi_app

    spans: list[float] = []
    closed: list[float] = []
    saved = {k: os.environ.get(k) for k in ("CONCLAVE_BASE_URL", "CONCLAVE_MODEL")}
    os.environ.update(CONCLAVE_BASE_URL=base_url, CONCLAVE_MODEL="fake-model")
    clients = ThreadPoolExecutor(1)
    try:
        for _ in range(trials):
            # A new app process each time in spirit: the halt is sticky for the app.
            with _uvicorn(fastapi_app.app) as port:
                before = _stats(base_url)
                body = {"topic": "Adopt?", "agents": 72}
                answer = clients.submit(_post, port, "/deliberations", body)
                _until(base_url, lambda s: s["in_flight"] >= 72)
                started = time.perf_counter()
                _post(port, "/halt", {"reason": "benchmark"})
                status = answer.result(60)["status"]
                spans.append((time.perf_counter() - started) * 1e3)
                if status != "halted":
                    raise RuntimeError(f"not halted: {status}")
                after = _until(base_url, lambda s: s["in_flight"] == 0)
                closed.append(after["disconnects"] - before["disconnects"])
    finally:
        clients.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return spans, closed
