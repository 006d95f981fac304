"""A real OpenAI-compatible chat-completions server on 127.0.0.1, with injected faults.

It runs stdlib asyncio in its own thread (its own event loop, independent of the trio
and trio-asyncio loops under test) and speaks HTTP/1.1 with keep-alive, so the openai
SDK talks to it exactly as it talks to a real endpoint.

Faults are scripted per agent (the orchestrator sends ``X-Conclave-Agent``, the agent id
percent-encoded; the server decodes it, so scripts and counters use the real id): each
request of an agent pops the next fault of its script, then falls back to
``default``.  ``script_any`` scripts the next requests whoever sends them (before the
agents' own scripts).  A fault is one of:

    "ok"                       answer at once
    ("reply", text)            answer at once with ``text`` as the content
    ("latency", seconds)       answer after a delay
    "barrier"                  hold the answer until ``barrier_size`` requests are held
    500 / 503 / 401 / 400      that status with an OpenAI-style error body
    ("429", retry_after_s)     429 with a Retry-After header
    ("quota", retry_after_s)   429 as OpenAI answers an account out of quota
                               (``insufficient_quota``), with a Retry-After header
    ("lie", headers, total)    200 with these extra headers (a lying server's
                               ``x-ratelimit-*``) and, unless None, ``total`` as its
                               usage's ``total_tokens``
    "malformed_json"           200 with a body that is not JSON
    "empty_choices"            200 with ``"choices": []``
    "null_content"             200 with ``"content": null``
    ("content", text)          200 whose answer is ``text`` (any JSON string, even a lone
                               surrogate such as ``"\\ud800"``)
    ("answer_model", name)     200 whose ``model`` (every chunk's, streamed) is ``name``
                               (any JSON string: what a server claims answered)
    ("encoded", encoding)      answer at once, compressed: "gzip", "deflate" (zlib) or
                               "raw-deflate" (sent as ``deflate``); any other name is
                               only the header (``br``: a body that is not brotli);
                               "gzip-members": two gzip members; "gzip-trailing" or
                               "deflate-trailing": the stream, then bytes after its end
    "drop"                     close the connection without answering
    "hang"                     never answer (until the client goes away)

Streaming: a request with ``"stream": true`` gets each answer above as server-sent
events (``text/event-stream``): a role chunk, the content in word chunks, a finish chunk,
a usage chunk if it asked for one (``stream_options.include_usage``), then ``[DONE]``.
Broken streams, after a role chunk and ``n`` content chunks (``n`` = 0: no chunk at all):

    ("stream_reset", n)        the connection reset (no terminating chunk)
    ("stream_error", n)        an error event (``data: {"error": ...}``), then [DONE]
    ("stream_malformed", n)    a chunk that is not JSON
    ("stream_no_done", n)      finish and usage chunks, then the body ends without [DONE]
    ("stream_stall", n)        nothing more (until the client goes away)
    ("stream_no_usage", n)     a whole stream without a usage chunk
    ("stream_cut_short", n)    then [DONE] with no finish_reason: what llama-cpp-python's
                               server sends when a new request interrupts a stream
    ("stream_event", data)     one content chunk, an event whose data is ``data`` (bytes,
                               verbatim), then the stream's end as usual

Generation (as llama.cpp's server generates): ``("generate", tokens, rate)`` produces
``tokens`` tokens at ``rate`` per second.  A streaming request gets each token as it is
generated (chunked), and generation stops at the first token after the client went away;
a non-streaming request gets the whole answer at the end, and generation goes on to the
last token whether or not anyone is still there.  ``generations`` records per request
(:class:`Generation`) how many tokens were generated, and how many of them after the
client went away; ``generating`` counts the generations still running.

Hostile faults (a server that tries to hang its client or exhaust its memory; each
runs until the client goes away, the connection then closed):

    ("trickle", interval_s)    200 headers at once, then the body one byte per interval
    ("continue_storm", interval_s)
                               ``100 Continue`` after ``100 Continue``, one per interval
                               (0: as fast as the socket takes them), never a final answer
    ("huge_body", size)        200 with a ``size``-byte body (Content-Length), sent as
                               fast as the client reads it
    ("gzip_bomb", size)        200 ``Content-Encoding: gzip``: ~1 KiB per MiB on the wire,
                               ``size`` bytes once inflated
    ("deflate_bomb", size)     the same as zlib-wrapped deflate
    "endless_chunked"          200, chunked, chunks for ever
    "endless_sse"              200 ``text/event-stream``, events for ever (to a request
                               that did not ask for a stream)
    ("redirect", location)     307 to ``location`` (which sees a request if followed)
    ("deep_json", depth)       200 with a JSON body nested ``depth`` arrays deep
    ("short_body", length)     200 whose Content-Length says ``length`` bytes, a shorter
                               body (the start of an answer), then the connection closed

``models_fault``, when set, is the fault for every ``GET .../models`` request (the
reachability probe) instead of the default; ``None`` (the default) leaves it alone.

As OpenAI checks a request (both off by default): ``api_key``, when set, is the only key
taken: any other (or none) is answered 401 with OpenAI's ``invalid_api_key`` error, which
quotes the key's first and last characters as OpenAI's does; ``models``, when set, are the
models served: ``GET .../models`` lists them (OpenAI's ``{"object": "list", "data":
[...]}``) and a chat completion for any other model is answered 404 with OpenAI's
``model_not_found`` error.  ``models_fault`` still wins for the listing.

The server counts requests, what is in flight (and the most ever), and disconnects:
requests whose client went away before an answer; ``arrived`` holds each request's
monotonic arrival time and agent.  Tests wait on those counts with
``wait_for`` (a condition variable), never with sleeps.

Rate-limited mode (:meth:`FakeOpenAIServer.limit_rate`, off by default): per API key
(the ``Authorization`` header), at most ``requests`` chat completions and ``tokens``
tokens in any sliding window of ``window_s`` seconds (time-scaled: a window of 1 s is a
"minute" 60 times faster).  A request's tokens are its messages' characters / 4 plus its
completion (5 tokens, or ``max_tokens`` if smaller), charged when it arrives and
reported as its ``usage``.  One that would exceed either limit is answered 429 with
``Retry-After`` (whole seconds, rounded up), ``retry-after-ms`` (exact) and consumes
nothing.  Every chat completion answer then carries OpenAI's headers:
``x-ratelimit-limit-requests/-tokens`` (per minute: the window's limits scaled by
60 / ``window_s``, so a client reads a fast server's rate), ``x-ratelimit-remaining-*``
(what is left in the window) and ``x-ratelimit-reset-*`` (until the window is empty,
Go-style durations such as ``"843ms"``).  ``arrivals`` records each chat completion's
monotonic arrival time, key and status; ``rate_limited`` counts the 429s.
``GET .../stats`` answers the counters as JSON (for a server in another process), and
``first_arrival`` (wall clock) once a rate-limited request came.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gzip
import json
import math
import struct
import threading
import time
import zlib
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
        self.api_key: str | None = None
        self.models: list[str] | None = None
        self.scripts: dict[str, deque[Fault]] = defaultdict(deque)
        self.next_faults: deque[Fault] = deque()
        self.barrier_size = 0
        self.requests_total = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self._epoch = 0  # reset() starts a new one: requests of an earlier one don't count
        self.disconnects = 0
        self.dropped = 0
        self.answered = 0
        self.attempts: dict[str, int] = defaultdict(int)
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.limits: RateLimits | None = None
        self.arrivals: list[tuple[float, str, int]] = []
        self.arrived: list[tuple[float, str]] = []
        self.rate_limited = 0
        self.generations: list[Generation] = []
        self.generating = 0
        self._windows: dict[str, deque[tuple[float, int]]] = defaultdict(deque)
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

    def unscript(self) -> None:
        """Drop the faults scripted and not used yet (a client killed before some of its
        agents asked)."""
        with self._cond:
            self.scripts.clear()
            self.next_faults.clear()

    def script_any(self, *faults: Fault) -> None:
        with self._cond:
            self.next_faults.extend(faults)

    def limit_rate(self, requests: int, tokens: int, window_s: float) -> None:
        """Enforce rate limits from now on (see the module docstring)."""
        with self._cond:
            self.limits = RateLimits(requests, tokens, window_s)
            self._windows.clear()

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
            self._epoch += 1
            self.default = "ok"
            self.models_fault = None
            self.api_key = None
            self.models = None
            self.scripts.clear()
            self.next_faults.clear()
            self.barrier_size = 0
            self.requests_total = self.in_flight = self.max_in_flight = 0
            self.disconnects = self.answered = self.dropped = 0
            self.attempts.clear()
            self.bodies.clear()
            self.headers.clear()
            self.limits = None
            self.arrivals.clear()
            self.arrived.clear()
            self.rate_limited = 0
            self.generations.clear()
            self.generating = 0
            self._windows.clear()
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
        if headers[":path"].endswith("/stats"):
            self._send_json(writer, 200, {**self.stats(), **self.first_arrival()})
            await writer.drain()
            return True
        try:
            payload = json.loads(body or b"{}")
        except ValueError:
            payload = {}
        extra: dict[str, str] = {}
        usage: tuple[int, int] | None = None
        with self._cond:
            self.requests_total += 1
            self.arrived.append((time.monotonic(), agent))
            self.attempts[agent] += 1
            self.bodies.append(payload)
            self.headers.append(headers)
            script = self.scripts.get(agent)
            listing = headers[":path"].endswith("/models")
            if self.models_fault is not None and listing:
                fault = self.models_fault
            elif self.api_key is not None and headers.get("authorization") != (
                f"Bearer {self.api_key}"
            ):
                fault = ("bad_key", headers.get("authorization", "").removeprefix("Bearer "))
            elif self.models is not None and listing:
                fault = ("models", list(self.models))
            elif self.models is not None and payload.get("model") not in self.models:
                fault = ("no_model", str(payload.get("model")))
            elif self.next_faults:
                fault = self.next_faults.popleft()
            else:
                fault = script.popleft() if script else self.default
            if self.limits is not None and headers[":path"].endswith("/chat/completions"):
                usage = _usage(payload)
                admitted, extra = self._admit(headers.get("authorization", ""), sum(usage))
                if not admitted:
                    fault = "rate_limited"
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            epoch = self._epoch
            self._cond.notify_all()
        answered = False
        try:
            answered = await self._apply(reader, writer, fault, payload, agent, extra, usage)
            return answered
        finally:
            with self._cond:
                # A request of an earlier test that ends after reset() must not count in
                # this one's (in flight would drift below zero, and a barrier of N would
                # then need N + drift requests).
                if epoch == self._epoch:
                    self._count_end(answered, fault)

    def _count_end(self, answered: bool, fault: Fault) -> None:
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
        # Let the read unwind before the connection reads its next request: a keep-alive
        # connection must not have two readers waiting at once.
        await asyncio.wait({eof})
        return True

    async def _apply(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        fault: Fault,
        payload: dict[str, Any],
        agent: str,
        extra: dict[str, str],
        usage: tuple[int, int] | None,
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

        if _is_hostile(fault):
            await _hostile(writer, fault)
            return False
        if isinstance(fault, tuple) and fault[0] == "generate":
            return await self._generate(reader, writer, payload, agent, fault[1], fault[2])
        if isinstance(fault, tuple) and fault[0] in _BROKEN_STREAMS:
            return await self._broken_stream(reader, writer, payload, agent, fault)
        if fault == "ok":
            self._send_answer(writer, _completion(payload, agent, usage), payload, extra)
        elif isinstance(fault, tuple) and fault[0] == "reply":
            doc = _completion(payload, agent, usage)
            doc["choices"][0]["message"]["content"] = fault[1]
            self._send_answer(writer, doc, payload, extra)
        elif isinstance(fault, tuple) and fault[0] == "models":
            listing = [
                {"id": m, "object": "model", "created": 0, "owned_by": "fake"} for m in fault[1]
            ]
            self._send_json(writer, 200, {"object": "list", "data": listing})
        elif isinstance(fault, tuple) and fault[0] == "no_model":
            message = f"The model `{fault[1]}` does not exist or you do not have access to it."
            self._send_json(
                writer, 404, _error(message, "model_not_found", "invalid_request_error")
            )
        elif isinstance(fault, tuple) and fault[0] == "bad_key":
            key = fault[1]
            message = (
                f"Incorrect API key provided: {key[:3]}***{key[-4:]}. You can find your API "
                "key at https://platform.openai.com/account/api-keys."
            )
            self._send_json(
                writer, 401, _error(message, "invalid_api_key", "invalid_request_error")
            )
        elif fault == "rate_limited":
            error = _error("Rate limit reached (fake server)", "rate_limit_exceeded")
            self._send_json(writer, 429, error, extra)
        elif isinstance(fault, tuple) and fault[0] == "429":
            self._send_json(
                writer,
                429,
                _error("rate limited", "rate_limit_exceeded"),
                {**extra, "Retry-After": str(fault[1])},
            )
        elif isinstance(fault, tuple) and fault[0] == "quota":
            message = "You exceeded your current quota, please check your plan and billing details."
            self._send_json(
                writer,
                429,
                _error(message, "insufficient_quota"),
                {**extra, "Retry-After": str(fault[1])},
            )
        elif isinstance(fault, tuple) and fault[0] == "lie":
            _, headers, total = fault
            doc = _completion(payload, agent, usage)
            if total is not None:
                doc["usage"] = {
                    "prompt_tokens": total,
                    "completion_tokens": 0,
                    "total_tokens": total,
                }
            self._send_answer(writer, doc, payload, {**extra, **headers})
        elif isinstance(fault, int):
            error = _error(f"injected {fault}", "server_error")
            self._send_json(writer, fault, error, extra)
        elif fault == "malformed_json":
            if _streams(payload):
                self._send(writer, 200, b'data: {"id": "x", "choices": [\n\n', _SSE)
            else:
                self._send(writer, 200, b'{"id": "x", "choices": [', "application/json")
        elif fault == "empty_choices":
            doc = _completion(payload, agent)
            doc["choices"] = []
            self._send_answer(writer, doc, payload)
        elif fault == "null_content":
            doc = _completion(payload, agent)
            doc["choices"][0]["message"]["content"] = None
            self._send_answer(writer, doc, payload)
        elif isinstance(fault, tuple) and fault[0] == "encoded":
            body, ctype = _body(_completion(payload, agent, usage), payload)
            if fault[1] in ("gzip", "deflate", "raw-deflate"):
                wbits = {"gzip": 31, "deflate": 15, "raw-deflate": -15}[fault[1]]
                packer = zlib.compressobj(6, zlib.DEFLATED, wbits)
                packed = packer.compress(body) + packer.flush()
                encoding = "gzip" if fault[1] == "gzip" else "deflate"
            elif fault[1] == "gzip-members":  # two gzip members, one after the other
                half = len(body) // 2
                packed, encoding = gzip.compress(body[:half]) + gzip.compress(body[half:]), "gzip"
            elif fault[1] in ("gzip-trailing", "deflate-trailing"):  # then bytes of no stream
                encoding = fault[1].partition("-")[0]
                packed = (gzip.compress(body) if encoding == "gzip" else zlib.compress(body)) + (
                    b"\x00" * 64
                )
            else:  # an encoding the client did not ask for: the plain body, mislabelled
                packed, encoding = body, fault[1]
            extra = {**extra, "Content-Encoding": encoding}
            self._send(writer, 200, packed, ctype, extra)
        elif isinstance(fault, tuple) and fault[0] == "content":
            doc = _completion(payload, agent)
            doc["choices"][0]["message"]["content"] = fault[1]
            self._send_answer(writer, doc, payload)  # json.dumps escapes a lone surrogate
        elif isinstance(fault, tuple) and fault[0] == "answer_model":
            doc = _completion(payload, agent, usage)
            doc["model"] = fault[1]
            self._send_answer(writer, doc, payload)
        else:
            raise ValueError(f"unknown fault {fault!r}")
        await writer.drain()
        return True

    async def _generate(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        payload: dict[str, Any],
        agent: str,
        tokens: int,
        rate: float,
    ) -> bool:
        """Generate ``tokens`` tokens at ``rate`` a second (module docstring): streamed
        as they come, or answered at the end; True if the client got the whole answer."""
        streaming = _streams(payload)
        record = Generation(agent, streaming)
        gone = asyncio.ensure_future(reader.read(1))  # b"" (or an error): the client left

        def left(_: asyncio.Future[bytes]) -> None:
            record.gone_at = record.generated

        gone.add_done_callback(left)
        with self._cond:
            self.generations.append(record)
            self.generating += 1
        loop = asyncio.get_running_loop()
        chunk = _chunk_frame(_sse_event(_delta(payload, agent, {"content": "aye "})))
        due = loop.time()
        try:
            if streaming:
                writer.write(_chunked_head(_SSE))
            for _ in range(tokens):
                if streaming and gone.done():
                    break  # a streaming server notices the closed socket and stops
                due += 1.0 / rate
                await asyncio.sleep(max(0.0, due - loop.time()))
                record.generated += 1
                if streaming and not gone.done():
                    writer.write(chunk)
                    await writer.drain()
            if gone.done():
                return False
            doc = _completion(payload, agent, (11, tokens))
            doc["choices"][0]["message"]["content"] = "aye " * tokens
            if streaming:
                writer.write(_chunk_frame(_sse_tail(doc, payload)) + b"0\r\n\r\n")
            else:
                self._send_json(writer, 200, doc)
            await writer.drain()
            return True
        except ConnectionError:
            return False
        finally:
            gone.remove_done_callback(left)
            if not gone.done():
                gone.cancel()
                with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                    await gone
            with self._cond:
                self.generating -= 1
                self._cond.notify_all()

    async def _broken_stream(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        payload: dict[str, Any],
        agent: str,
        fault: Fault,
    ) -> bool:
        """A stream that goes wrong after ``n`` content chunks (module docstring)."""
        name, arg = fault
        n = 1 if name == "stream_event" else arg
        doc = _completion(payload, agent)
        head = _sse_event(_delta(payload, agent, {"role": "assistant", "content": ""}))
        words = b"".join(
            _sse_event(_delta(payload, agent, {"content": f"word{i} "})) for i in range(n)
        )
        # n = 0: not even the role chunk (a stream that breaks before anything came).
        writer.write(_chunked_head(_SSE) + (_chunk_frame(head + words) if n else b""))
        await writer.drain()
        if name == "stream_reset":
            writer.transport.abort()
            return False
        if name == "stream_stall":
            await self._hold(reader, None)
            return False
        if name == "stream_error":
            error = _error("the model crashed (injected)", "server_error")
            rest = _sse_event(error) + b"data: [DONE]\n\n"
        elif name == "stream_malformed":
            rest = b'data: {"id": "x", "choices": [{"delta": \n\n'
        elif name == "stream_no_done":
            rest = _sse_tail(doc, payload).removesuffix(b"data: [DONE]\n\n")
        elif name == "stream_event":
            rest = b"data: " + arg + b"\n\n" + _sse_tail(doc, payload)
        elif name == "stream_cut_short":
            rest = b"data: [DONE]\n\n"
        else:  # stream_no_usage
            rest = _sse_tail(doc, {})
        writer.write(_chunk_frame(rest) + b"0\r\n\r\n")
        await writer.drain()
        return True

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {
                "requests_total": self.requests_total,
                "answered": self.answered,
                "rate_limited": self.rate_limited,
                "disconnects": self.disconnects,
                "in_flight": self.in_flight,
            }

    def first_arrival(self) -> dict[str, float]:
        """When the first rate-limited request arrived, wall clock (``time.time()``), for
        a client in another process; empty before one did (or without rate limits)."""
        with self._cond:
            if not self.arrivals:
                return {}
            return {"first_arrival": self.arrivals[0][0] + time.time() - time.monotonic()}

    def _admit(self, key: str, tokens: int) -> tuple[bool, dict[str, str]]:
        """Count a chat completion against ``key``'s window (under ``_cond``): whether it
        is admitted, and the headers of its answer."""
        limits = self.limits
        assert limits is not None
        now = time.monotonic()
        window = self._windows[key]
        while window and window[0][0] <= now - limits.window_s:
            window.popleft()
        used = sum(t for _, t in window)
        admitted = len(window) + 1 <= limits.requests and used + tokens <= limits.tokens
        extra: dict[str, str] = {}
        if admitted:
            window.append((now, tokens))
            used += tokens
        else:
            self.rate_limited += 1
            wait = limits.wait_s(window, tokens, now)
            extra["Retry-After"] = str(math.ceil(wait))
            extra["retry-after-ms"] = str(math.ceil(wait * 1000))
        self.arrivals.append((now, key, 200 if admitted else 429))
        # Back to the initial state once the newest request in the window has left it.
        reset = window[-1][0] + limits.window_s - now if window else 0.0
        scale = 60.0 / limits.window_s
        extra |= {
            "x-ratelimit-limit-requests": str(round(limits.requests * scale)),
            "x-ratelimit-limit-tokens": str(round(limits.tokens * scale)),
            "x-ratelimit-remaining-requests": str(limits.requests - len(window)),
            "x-ratelimit-remaining-tokens": str(max(0, limits.tokens - used)),
            "x-ratelimit-reset-requests": go_duration(reset),
            "x-ratelimit-reset-tokens": go_duration(reset),
        }
        return admitted, extra

    def _send_answer(
        self,
        writer: asyncio.StreamWriter,
        doc: dict[str, Any],
        payload: dict[str, Any],
        extra: dict[str, str] | None = None,
    ) -> None:
        """A 200 answer: ``doc`` as JSON, or as a stream if the request asked for one."""
        body, ctype = _body(doc, payload)
        self._send(writer, 200, body, ctype, extra)

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


class Generation:
    """One generation's record: ``generated`` tokens in all, ``gone_at`` how many had been
    generated when the client went away (None: it stayed)."""

    __slots__ = ("agent", "generated", "gone_at", "streaming")

    def __init__(self, agent: str, streaming: bool) -> None:
        self.agent = agent
        self.streaming = streaming
        self.generated = 0
        self.gone_at: int | None = None

    @property
    def after_gone(self) -> int:
        """Tokens generated after the client went away."""
        return 0 if self.gone_at is None else self.generated - self.gone_at


_SSE = "text/event-stream"
_BROKEN_STREAMS = frozenset(
    {
        "stream_reset",
        "stream_error",
        "stream_malformed",
        "stream_no_done",
        "stream_stall",
        "stream_no_usage",
        "stream_cut_short",
        "stream_event",
    }
)


def _streams(payload: dict[str, Any]) -> bool:
    return payload.get("stream") is True


def _body(doc: dict[str, Any], payload: dict[str, Any]) -> tuple[bytes, str]:
    """A completion's body and content type: JSON, or events if the request streams."""
    if not _streams(payload):
        return json.dumps(doc).encode(), "application/json"
    choices = doc.get("choices") or []
    message = choices[0]["message"] if choices else {}
    content = message.get("content")
    head = {"role": "assistant", "content": "" if content is not None else None}
    events = [_sse_event(_chunk_of(doc, [_choice(head)] if choices else []))]
    if isinstance(content, str):
        events += [
            _sse_event(_chunk_of(doc, [_choice({"content": word})])) for word in _words(content)
        ]
    return b"".join(events) + _sse_tail(doc, payload), _SSE


def _sse_tail(doc: dict[str, Any], payload: dict[str, Any]) -> bytes:
    """A stream's end: the finish chunk, the usage chunk if asked for, ``[DONE]``."""
    choices = doc.get("choices") or []
    tail = b""
    if choices:
        finish = _choice({}, choices[0].get("finish_reason") or "stop")
        tail += _sse_event(_chunk_of(doc, [finish]))
    options = payload.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        tail += _sse_event({**_chunk_of(doc, []), "usage": doc.get("usage")})
    return tail + b"data: [DONE]\n\n"


def _words(content: str) -> list[str]:
    """``content`` in pieces of a word and its trailing space (joined: ``content``)."""
    pieces = content.split(" ")
    return [p + " " for p in pieces[:-1]] + ([pieces[-1]] if pieces[-1] else [])


def _chunk_of(doc: dict[str, Any], choices: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": doc.get("id", "chatcmpl-x"),
        "object": "chat.completion.chunk",
        "created": doc.get("created", 0),
        "model": doc.get("model", "fake-model"),
        "choices": choices,
    }


def _choice(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
    return {"index": 0, "delta": delta, "finish_reason": finish_reason}


def _delta(payload: dict[str, Any], agent: str, delta: dict[str, Any]) -> dict[str, Any]:
    return _chunk_of(_completion(payload, agent), [_choice(delta)])


def _sse_event(doc: Any) -> bytes:
    return b"data: " + json.dumps(doc).encode() + b"\n\n"


def _chunked_head(ctype: str) -> bytes:
    return (
        f"HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\nTransfer-Encoding: chunked\r\n"
        "Connection: keep-alive\r\n\r\n"
    ).encode()


def _chunk_frame(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


_HOSTILE = frozenset(
    {
        "trickle",
        "continue_storm",
        "huge_body",
        "gzip_bomb",
        "deflate_bomb",
        "endless_chunked",
        "endless_sse",
        "redirect",
        "deep_json",
        "short_body",
    }
)
_CHUNK = 64 * 1024


def _is_hostile(fault: Fault) -> bool:
    name = fault[0] if isinstance(fault, tuple) else fault
    return isinstance(name, str) and name in _HOSTILE


async def _hostile(writer: asyncio.StreamWriter, fault: Fault) -> None:
    """Play a hostile fault until it is done or the client goes away; the caller then
    closes the connection (whatever was written is still delivered)."""
    name, arg = fault if isinstance(fault, tuple) else (fault, None)
    head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    try:
        if name == "trickle":
            writer.write(f"{head}Content-Length: 1000000\r\n\r\n".encode())
            while True:
                writer.write(b" ")
                await writer.drain()
                await asyncio.sleep(arg)
        elif name == "continue_storm":
            while True:
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                await writer.drain()
                await asyncio.sleep(arg)
        elif name == "huge_body":
            writer.write(f"{head}Content-Length: {arg}\r\n\r\n".encode())
            await _pour(writer, arg, b"a" * _CHUNK)
        elif name in ("gzip_bomb", "deflate_bomb"):
            body = bomb(name == "gzip_bomb", arg)
            encoding = "gzip" if name == "gzip_bomb" else "deflate"
            head += f"Content-Encoding: {encoding}\r\nContent-Length: {len(body)}\r\n\r\n"
            writer.write(head.encode() + body)
            await writer.drain()
        elif name in ("endless_chunked", "endless_sse"):
            ctype = "text/event-stream" if name == "endless_sse" else "application/json"
            writer.write(
                f"HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\n"
                "Transfer-Encoding: chunked\r\n\r\n".encode()
            )
            event = b'data: {"choices": [{"delta": {"content": "aye "}}]}\n\n'
            data = event * (_CHUNK // len(event)) if name == "endless_sse" else b"[" * _CHUNK
            chunk = f"{len(data):x}\r\n".encode() + data + b"\r\n"
            await _pour(writer, None, chunk)
        elif name == "redirect":
            writer.write(
                f"HTTP/1.1 307 Temporary Redirect\r\nLocation: {arg}\r\n"
                "Content-Length: 0\r\n\r\n".encode()
            )
            await writer.drain()
        elif name == "short_body":  # a Content-Length the body never reaches
            body = b'{"id": "x", "choices": [{"index": 0, "message": {"content": "aye"'
            writer.write(f"{head}Content-Length: {arg}\r\n\r\n".encode() + body)
            await writer.drain()
        elif name == "deep_json":
            body = b'{"id": "x", "choices": ' + b"[" * arg + b"]" * arg + b"}"
            writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
            await writer.drain()
    except ConnectionError:
        return


async def _pour(writer: asyncio.StreamWriter, size: int | None, chunk: bytes) -> None:
    """Write ``chunk`` again and again (``size`` bytes of it, or for ever), as fast as the
    client reads."""
    sent = 0
    while size is None or sent < size:
        part = chunk if size is None else chunk[: size - sent]
        writer.write(part)
        sent += len(part)
        await writer.drain()


@functools.cache
def bomb(gzip: bool, size: int) -> bytes:
    """``size`` zero bytes (a whole number of MiB), compressed (gzip or zlib deflate):
    about 1 KiB per MiB.

    Built in well under a second: one MiB of zeros is deflated once, ending in a full
    flush (which resets the compressor, so every further MiB compresses to the same
    bytes), and repeated.
    """
    mib = 1024 * 1024
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    block = packer.compress(bytes(mib)) + packer.flush(zlib.Z_FULL_FLUSH)
    deflated = block * (size // mib) + packer.flush()
    if not gzip:  # zlib: header, deflate, Adler-32 (of n zeros: a = 1, b = n mod 65521)
        return b"\x78\xda" + deflated + struct.pack(">HH", size % 65521, 1)
    crc, zeros = 0, bytes(mib)
    for _ in range(size // mib):
        crc = zlib.crc32(zeros, crc)
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
    return header + deflated + struct.pack("<II", crc, size % 2**32)


class RateLimits:
    """The rate-limited mode's limits: per API key, in any window of ``window_s``."""

    def __init__(self, requests: int, tokens: int, window_s: float) -> None:
        self.requests = requests
        self.tokens = tokens
        self.window_s = window_s

    def wait_s(self, window: deque[tuple[float, int]], tokens: int, now: float) -> float:
        """How long until a request of ``tokens`` would be admitted."""
        times = [t for t, _ in window]
        wait = 0.0
        excess = len(window) + 1 - self.requests
        if excess > 0:  # the excess oldest must leave the window first
            wait = times[excess - 1] + self.window_s - now
        over = sum(t for _, t in window) + tokens - self.tokens
        for when, used in window:  # the oldest leave first
            if over <= 0:
                break
            over -= used
            wait = max(wait, when + self.window_s - now)
        return max(0.0, wait)


def go_duration(seconds: float) -> str:
    """A duration as OpenAI writes it: ``"843ms"``, ``"1.5s"``, ``"6m0s"`` (rounded up
    to the millisecond, so that waiting for it is always long enough)."""
    ms = math.ceil(max(0.0, seconds) * 1000)
    if ms < 1000:
        return f"{ms}ms"
    minutes, ms = divmod(ms, 60_000)
    text = f"{ms / 1000:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{minutes}m{text}" if minutes else text


def _usage(payload: dict[str, Any]) -> tuple[int, int]:
    """A request's prompt and completion tokens in rate-limited mode."""
    messages = payload.get("messages") or []
    chars = sum(len(str(m.get("content") or "")) for m in messages if isinstance(m, dict))
    max_tokens = payload.get("max_tokens")
    completion = min(5, max_tokens) if isinstance(max_tokens, int) and max_tokens > 0 else 5
    return math.ceil(chars / 4), completion


def _completion(
    payload: dict[str, Any], agent: str, usage: tuple[int, int] | None = None
) -> dict[str, Any]:
    prompt_tokens, completion_tokens = usage or (11, 5)
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
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def _error(message: str, code: str, kind: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind or code, "param": None, "code": code}}


def main() -> None:
    """Serve from a process of its own (benchmarks): prints the port, runs until killed."""
    import argparse

    parser = argparse.ArgumentParser(description="fake OpenAI-compatible server on 127.0.0.1")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each answer")
    parser.add_argument("--hang", action="store_true", help="never answer")
    parser.add_argument(
        "--generate",
        metavar="TOKENS:RATE",
        help='generation mode: e.g. 256:512 (256 tokens at 512 a second; see "generate")',
    )
    parser.add_argument(
        "--rate-limit",
        metavar="REQUESTS:TOKENS:WINDOW_S",
        help="rate-limited mode: e.g. 120:100000:1 (120 requests, 100000 tokens per 1 s)",
    )
    args = parser.parse_args()
    server = FakeOpenAIServer()
    server.default = ("latency", args.latency) if args.latency else "ok"
    if args.hang:
        server.default = "hang"
    if args.generate:
        tokens, rate = args.generate.split(":")
        server.default = ("generate", int(tokens), float(rate))
    server.start()
    if args.rate_limit:
        requests, tokens, window = args.rate_limit.split(":")
        server.limit_rate(int(requests), int(tokens), float(window))
    print(server.port, flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
