"""A FastAPI application that deliberates: the kernel embedded in asyncio, no trio in sight.

    pip install 'conclave-kernel[asgi,llm]'
    uvicorn examples.fastapi_app:app            # 72 agents on the built-in stub
    CONCLAVE_BASE_URL=http://127.0.0.1:11434/v1 CONCLAVE_MODEL=llama3.1:8b \\
        uvicorn examples.fastapi_app:app        # or any OpenAI-compatible endpoint

Endpoints:

* ``POST /deliberations`` ``{"topic": str, "agents": int = 72, "id": str?}`` runs a
  deliberation and answers, once it has ended, ``{"id", "batch_id", "status", "succeeded",
  "failed", "halt_reason"}``; ``status`` is ``"completed"`` or ``"halted"``.  Give an ``id``
  of your own to follow its progress while it runs (else one is made up).  While the
  council's seats are taken by another deliberation, it answers 409 and runs nothing.
* ``GET /deliberations/{id}/events`` streams its progress as server-sent events: one
  ``progress`` event per agent outcome (``{"done", "total", "agent_id", "status"}``), every
  one from the first, then one ``end`` event (the POST's answer; ``{"id", "status":
  "refused", "detail"}`` for a deliberation answered 409, whose id is then free again).
  It waits up to 10 s for a deliberation of that id to start.
* ``POST /halt`` ``{"reason": str}`` halts: the running deliberation stops at once (its
  POST answers ``"halted"``, every in-flight HTTP request to the LLM closed), and later
  ones are refused (``"halted"``, nothing run) until the process restarts.

The kernel runs in an :class:`~adapters.asyncio_host.AsyncioHost` opened by the app's
lifespan: one trio guest run on uvicorn's own event loop, the LLM client on that loop too.
One process is one council: under ``uvicorn --workers N`` each worker has its own 72
seats, its own deliberations and its own in-process halt, so ``POST /halt`` stops only
the worker that answers it.  Run one worker (or share the halt and the capacity through
Valkey: ``ValkeyHaltChannel``, ``ValkeyCapacity``).
Settings (environment): ``CONCLAVE_BASE_URL`` (else ``OPENAI_BASE_URL``; neither: the
stub), ``CONCLAVE_MODEL`` (default ``gpt-4o-mini``), ``OPENAI_API_KEY``,
``CONCLAVE_STUB_LATENCY_MS`` (default 100).
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from adapters.asyncio_host import AsyncioHost, Deliberation
from adapters.stub import AgentOrchestratorStub
from kernel import (
    MAX_CONCURRENT_AGENTS,
    AgentPoolExhaustedError,
    AgentRequest,
    ConcurrentResult,
    ContextBundle,
    HaltSwitch,
    SystemHaltedError,
)

#: Finished deliberations kept for late subscribers to their events.
KEPT = 64
#: How long a subscriber waits for a deliberation of its id to start.
ANNOUNCE_WAIT_S = 10.0


class DeliberationIn(BaseModel):
    topic: str = Field(min_length=1, max_length=100_000)
    agents: int = Field(default=MAX_CONCURRENT_AGENTS, ge=1, le=MAX_CONCURRENT_AGENTS)
    id: str | None = Field(default=None, min_length=1, max_length=100, pattern=r"^[\w.-]+$")


class HaltIn(BaseModel):
    reason: str = Field(min_length=1, max_length=1000)


class Deliberations:
    """The app's deliberations by id: the running ones and the last :data:`KEPT` ended."""

    def __init__(self) -> None:
        self._known: OrderedDict[str, Deliberation] = OrderedDict()
        self._announced: dict[str, asyncio.Event] = {}

    def check_new(self, key: str) -> None:
        if key in self._known:
            raise HTTPException(409, f"deliberation {key!r} exists")

    def forget(self, key: str) -> None:
        """A deliberation refused before it ran: its id is free again."""
        self._known.pop(key, None)
        self._announced.pop(key, None)

    def add(self, key: str, deliberation: Deliberation) -> None:
        self._known[key] = deliberation
        self._announcement(key).set()
        while len(self._known) > KEPT and next(iter(self._known.values())).done():
            old, _ = self._known.popitem(last=False)
            self._announced.pop(old, None)

    async def wait(self, key: str) -> Deliberation:
        """The deliberation of that id, once it has started (404 after
        :data:`ANNOUNCE_WAIT_S`)."""
        try:
            async with asyncio.timeout(ANNOUNCE_WAIT_S):
                await self._announcement(key).wait()
        except TimeoutError:
            self._announced.pop(key, None)
            raise HTTPException(404, f"no deliberation {key!r}") from None
        return self._known[key]

    def _announcement(self, key: str) -> asyncio.Event:
        return self._announced.setdefault(key, asyncio.Event())


def _orchestrator() -> Any:
    base_url = os.environ.get("CONCLAVE_BASE_URL") or os.environ.get("OPENAI_BASE_URL")
    if not base_url:
        latency = float(os.environ.get("CONCLAVE_STUB_LATENCY_MS", "100"))
        return AgentOrchestratorStub(latency_ms=latency, jitter_ms=latency / 4)
    # The asyncio client runs on uvicorn's loop (the bridge sees the host).
    from adapters.llm.bridge import AsyncioOrchestratorBridge
    from adapters.llm.openai_chat import OpenAIChatOrchestrator

    model = os.environ.get("CONCLAVE_MODEL", "gpt-4o-mini")
    return AsyncioOrchestratorBridge(OpenAIChatOrchestrator(base_url, model, timeout_s=120))


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with AsyncioHost(_orchestrator(), HaltSwitch(), agent_timeout=300) as host:
        app.state.host = host
        app.state.deliberations = Deliberations()
        yield


app = FastAPI(title="conclave-kernel deliberations", lifespan=lifespan)


@app.post("/deliberations")
async def deliberate(body: DeliberationIn, request: Request) -> dict[str, Any]:
    host: AsyncioHost = request.app.state.host
    registry: Deliberations = request.app.state.deliberations
    key = body.id or uuid.uuid4().hex
    registry.check_new(key)  # before anything starts
    topic = ContextBundle(topic_id=key, topic_content=body.topic)
    batch = [AgentRequest(f"archon-{i}", topic) for i in range(1, body.agents + 1)]
    deliberation = host.start(batch)
    registry.add(key, deliberation)
    # A client that goes away cancels this handler, and so the deliberation.
    try:
        return await _conclude(key, deliberation)
    except HTTPException:
        registry.forget(key)  # refused, nothing ran: a retry may use the id
        raise


async def _conclude(key: str, deliberation: Deliberation) -> dict[str, Any]:
    try:
        return _answer(key, await deliberation.result(), "completed", None)
    except SystemHaltedError as exc:
        return _answer(key, exc.partial, "halted", exc.reason)
    except AgentPoolExhaustedError as exc:  # the council's seats are taken: nothing ran
        raise HTTPException(409, str(exc)) from None


def _answer(
    key: str, result: ConcurrentResult | None, status: str, reason: str | None
) -> dict[str, Any]:
    return {
        "id": key,
        "batch_id": str(result.batch_id) if result else None,
        "status": status,
        "succeeded": result.success_count if result else 0,
        "failed": result.failure_count if result else 0,
        "halt_reason": reason,
    }


@app.get("/deliberations/{key}/events")
async def events(key: str, request: Request) -> StreamingResponse:
    registry: Deliberations = request.app.state.deliberations
    deliberation = await registry.wait(key)

    async def stream() -> AsyncIterator[str]:
        async for event in deliberation.events():
            doc = {"done": event.done, "total": event.total, "agent_id": event.agent_id}
            yield _sse("progress", {**doc, "status": event.status})
        if deliberation.cancelled():  # its POST's client went away
            yield _sse("end", {"id": key, "status": "cancelled"})
            return
        try:  # ended: this does not wait
            end = await _conclude(key, deliberation)
        except HTTPException as exc:  # the stream has begun: said as its end, not a 409
            end = {"id": key, "status": "refused", "detail": exc.detail}
        yield _sse("end", end)

    return StreamingResponse(stream(), media_type="text/event-stream")


def _sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


@app.post("/halt")
async def halt(body: HaltIn, request: Request) -> dict[str, Any]:
    host: AsyncioHost = request.app.state.host
    raised = await host.ahalt(body.reason)
    return {"halted": True, "raised_now": raised}
