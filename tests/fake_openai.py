"""A real OpenAI-compatible chat-completions server on 127.0.0.1, with injected faults.

It runs stdlib asyncio in its own thread (its own event loop, independent of the trio
and trio-asyncio loops under test) and speaks HTTP/1.1 with keep-alive, so the openai
SDK talks to it exactly as it talks to a real endpoint.

Faults are scripted per agent (the orchestrator sends ``X-Conclave-Agent``, the agent id
percent-encoded; the server decodes it, so scripts and counters use the real id): each
request of an agent pops the next fault of its script, then falls back to
``default``.  A fault is one of:

    "ok"                       answer at once
    ("latency", seconds)       answer after a delay
    "barrier"                  hold the answer until ``barrier_size`` requests are held
    500 / 503 / 401 / 400      that status with an OpenAI-style error body
    ("429", retry_after_s)     429 with a Retry-After header
    "malformed_json"           200 with a body that is not JSON
    "empty_choices"            200 with ``"choices": []``
    "null_content"             200 with ``"content": null``
    ("content", text)          200 whose answer is ``text`` (any JSON string, even a lone
                               surrogate such as ``"\ud800"``)
    "drop"                     close the connection without answering
    "hang"                     never answer (until the client goes away)

``models_fault``, when set, is the fault for every ``GET .../models`` request (the
reachability probe) instead of the default; ``None`` (the default) leaves it alone.

The server counts requests, what is in flight (and the most ever), and disconnects:
requests whose client went away before an answer.  Tests wait on those counts with
``wait_for`` (a condition variable), never with sleeps.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

Fault = Any

_REASONS = {
    200: "OK",
    408: "Request Timeout",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class FakeOpenAIServer:
    def __init__(self) -> None:
        self.default: Fault = "ok"
        self.models_fault: Fault | None = None
        self.scripts: dict[str, deque[Fault]] = defaultdict(deque)
        self.barrier_size = 0
        self.requests_total = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.disconnects = 0
        self.dropped = 0
        self.answered = 0
        self.attempts: dict[str, int] = defaultdict(int)
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self._cond = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._barrier: asyncio.Event | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    # ------------------------------------------------------------ control (any thread)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def script(self, agent_id: str, *faults: Fault) -> None:
        with self._cond:
            self.scripts[agent_id].extend(faults)

    def wait_for(
        self, predicate: Callable[[FakeOpenAIServer], bool], timeout: float = 10.0
    ) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self), timeout)

    def start(self) -> FakeOpenAIServer:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.SelectorEventLoop()
            self._loop = loop
            self._barrier = asyncio.Event()

            async def serve() -> None:
                self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, backlog=512)
                self.port = self._server.sockets[0].getsockname()[1]
                ready.set()
                await self._server.serve_forever()

            try:
                loop.run_until_complete(serve())
            except asyncio.CancelledError:
                pass
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="fake-openai", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fake OpenAI server did not start")
        return self

    def stop(self) -> None:
        loop = self._loop
        if loop is None or self._server is None:
            return

        def shutdown() -> None:
            assert self._server is not None
            for w in list(self._writers):
                w.close()
            self._server.close()
            for task in asyncio.all_tasks(loop):
                task.cancel()

        loop.call_soon_threadsafe(shutdown)
        if self._thread is not None:
            self._thread.join(10)

    def reset(self) -> None:
        with self._cond:
            self.default = "ok"
            self.models_fault = None
            self.scripts.clear()
            self.barrier_size = 0
            self.requests_total = self.in_flight = self.max_in_flight = 0
            self.disconnects = self.answered = self.dropped = 0
            self.attempts.clear()
            self.bodies.clear()
            self.headers.clear()
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._new_barrier)

    def _new_barrier(self) -> None:
        self._barrier = asyncio.Event()

    # ------------------------------------------------------------ HTTP

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                request = await self._read_request(reader)
                if request is None:
                    return
                headers, body = request
                keep_going = await self._respond(reader, writer, headers, body)
                if not keep_going:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _read_request(
        self, reader: asyncio.StreamReader
    ) -> tuple[dict[str, str], bytes] | None:
        line = await reader.readline()
        if not line:
            return None
        headers: dict[str, str] = {":path": line.split(b" ")[1].decode("latin-1")}
        while True:
            h = await reader.readline()
            if h in (b"\r\n", b"\n", b""):
                break
            name, _, value = h.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        body = await reader.readexactly(length) if length else b""
        return headers, body

    async def _respond(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        headers: dict[str, str],
        body: bytes,
    ) -> bool:
        # The orchestrator percent-encodes the id (RFC 3986): decode it like any server would.
        agent = unquote(headers.get("x-conclave-agent", ""), errors="strict")
        try:
            payload = json.loads(body or b"{}")
        except ValueError:
            payload = {}
        with self._cond:
            self.requests_total += 1
            self.attempts[agent] += 1
            self.bodies.append(payload)
            self.headers.append(headers)
            script = self.scripts.get(agent)
            if self.models_fault is not None and headers[":path"].endswith("/models"):
                fault = self.models_fault
            else:
                fault = script.popleft() if script else self.default
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self._cond.notify_all()
        answered = False
        try:
            answered = await self._apply(reader, writer, fault, payload, agent)
            return answered
        finally:
            with self._cond:
                self.in_flight -= 1
                if answered:
                    self.answered += 1
                elif fault == "drop":
                    self.dropped += 1
                else:
                    self.disconnects += 1
                self._cond.notify_all()

    async def _hold(self, reader: asyncio.StreamReader, waiter: asyncio.Future[Any] | None) -> bool:
        """Wait for ``waiter`` while watching for the client to go away; False if it did."""
        eof = asyncio.ensure_future(reader.read(1))
        pending = {eof} | ({waiter} if waiter is not None else set())
        done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        if eof in done:
            return False
        eof.cancel()
        return True

    async def _apply(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        fault: Fault,
        payload: dict[str, Any],
        agent: str,
    ) -> bool:
        if fault == "hang":
            await self._hold(reader, None)
            return False
        if fault == "drop":
            writer.transport.abort()
            return False
        if fault == "barrier":
            assert self._barrier is not None
            with self._cond:
                held = self.in_flight
            if held >= self.barrier_size:
                self._barrier.set()
            if not await self._hold(reader, asyncio.ensure_future(self._barrier.wait())):
                return False
            fault = "ok"
        if isinstance(fault, tuple) and fault[0] == "latency":
            if not await self._hold(reader, asyncio.ensure_future(asyncio.sleep(fault[1]))):
                return False
            fault = "ok"

        if fault == "ok":
            self._send_json(writer, 200, _completion(payload, agent))
        elif isinstance(fault, tuple) and fault[0] == "429":
            self._send_json(
                writer,
                429,
                _error("rate limited", "rate_limit_exceeded"),
                {"Retry-After": str(fault[1])},
            )
        elif isinstance(fault, int):
            self._send_json(writer, fault, _error(f"injected {fault}", "server_error"))
        elif fault == "malformed_json":
            self._send(writer, 200, b'{"id": "x", "choices": [', "application/json")
        elif fault == "empty_choices":
            doc = _completion(payload, agent)
            doc["choices"] = []
            self._send_json(writer, 200, doc)
        elif fault == "null_content":
            doc = _completion(payload, agent)
            doc["choices"][0]["message"]["content"] = None
            self._send_json(writer, 200, doc)
        elif isinstance(fault, tuple) and fault[0] == "content":
            doc = _completion(payload, agent)
            doc["choices"][0]["message"]["content"] = fault[1]
            self._send_json(writer, 200, doc)  # json.dumps escapes a lone surrogate
        else:
            raise ValueError(f"unknown fault {fault!r}")
        await writer.drain()
        return True

    def _send_json(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        doc: Any,
        extra: dict[str, str] | None = None,
    ) -> None:
        self._send(writer, status, json.dumps(doc).encode(), "application/json", extra)

    def _send(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        body: bytes,
        ctype: str,
        extra: dict[str, str] | None = None,
    ) -> None:
        head = [
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}",
            f"Content-Type: {ctype}",
            f"Content-Length: {len(body)}",
            "Connection: keep-alive",
        ]
        head += [f"{k}: {v}" for k, v in (extra or {}).items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)


def _completion(payload: dict[str, Any], agent: str) -> dict[str, Any]:
    messages = payload.get("messages") or []
    user = next((m.get("content", "") for m in messages if m.get("role") == "user"), "")
    return {
        "id": f"chatcmpl-{agent}-{time.monotonic_ns()}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": payload.get("model", "fake-model"),
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": f"{agent or 'agent'} votes aye ({len(user)} chars read)",
                },
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16},
    }


def _error(message: str, code: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": code, "param": None, "code": code}}


def main() -> None:
    """Serve from a process of its own (benchmarks): prints the port, runs until killed."""
    import argparse

    parser = argparse.ArgumentParser(description="fake OpenAI-compatible server on 127.0.0.1")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each answer")
    parser.add_argument("--hang", action="store_true", help="never answer")
    args = parser.parse_args()
    server = FakeOpenAIServer()
    server.default = ("latency", args.latency) if args.latency else "ok"
    if args.hang:
        server.default = "hang"
    server.start()
    print(server.port, flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
