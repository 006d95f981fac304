"""The HTTP client the LLM adapters give the openai SDK: it bounds what a server can do.

One wrapping transport (:class:`GuardedTransport`) under an ``httpx2.AsyncClient``
enforces, per request, whatever the SDK above it does:

- *A wall-clock deadline.*  The request's timeout (the SDK's ``timeout``; the largest of
  its connect/read/write/pool values) bounds the whole exchange, from waiting for a
  connection to the last byte of the body, not each read: a server that trickles one
  byte (or one ``100 Continue``) per read window cannot keep a request open past it.
  Over the deadline (plus 0.1 s, see :class:`_Deadline`) the request raises
  ``httpx2.ReadTimeout`` (the SDK's ``APITimeoutError``) and its connection is closed.
- *A cap on the body,* ``max_response_bytes``, counted twice: the
  bytes on the wire and, for a gzip or deflate body, the bytes it inflates to.  The
  transport inflates the body itself, never more than the cap plus one byte however
  dense the input (a bomb costs the cap, not its inflated size), and hands the SDK a
  plain body.  Over the cap: :class:`ResponseRefusedError`, the connection closed.
- *No redirects.*  A 3xx is refused (:class:`ResponseRefusedError`, naming the
  ``Location`` as :func:`adapters.urls.redact_url` shows a URL), never followed: following
  would re-send the prompt and the agent header to whatever origin the server names,
  past every check ``base_url`` had.

Streaming responses go through the same stream wrapper, so each stream gets the same
deadline and caps (a stream that stalls runs into the deadline: a timeout).  A stream of
server-sent events (``text/event-stream``) that ends without its ``data: [DONE]`` raises
:class:`IncompleteStreamError`: a truncated stream is never a whole answer, whichever
reader (the SDK's, CrewAI's, ours) sits above.  The per-request cost is one asyncio timer
and a length sum per chunk (~30 us of CPU a call, against ~1.2 ms for the SDK itself); a
plain (identity) body is passed through as it arrives.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import httpx2

from adapters.urls import redact_url

__all__ = [
    "DEFAULT_MAX_RESPONSE_BYTES",
    "GuardedTransport",
    "IncompleteStreamError",
    "ResponseRefusedError",
    "guarded_client",
    "refusal_in",
]

#: 8 MiB: a chat answer is kilobytes; the longest models write (~100k tokens) fit with
#: room to spare, JSON escaping included.
DEFAULT_MAX_RESPONSE_BYTES = 8 * 1024 * 1024

# The SDK's own connection limits (its DEFAULT_CONNECTION_LIMITS), which a client built
# here would otherwise lose.
_CONNECTION_LIMITS = httpx2.Limits(max_connections=1000, max_keepalive_connections=100)

# What the deadline leaves to the connect timeout (the same value, started a moment
# later): a connection never set up must still end as a ConnectTimeout, which callers
# tell apart from a server that connected and then said nothing.
_CONNECT_GRACE_S = 0.1

# The most of a redirect's Location a refusal quotes (after redaction).
_LOCATION_SHOWN = 200

_T = TypeVar("_T")
_ENCODINGS = ("gzip", "x-gzip", "deflate")
_ACCEPT_ENCODING = "gzip, deflate"


class ResponseRefusedError(httpx2.RemoteProtocolError):
    """The server sent what this client does not take: too much, a redirect, an
    encoding it cannot bound.  Not worth a retry; its message says what and why."""


class IncompleteStreamError(httpx2.RemoteProtocolError):
    """An event stream that ended without ``data: [DONE]``: the connection failed, the
    answer is cut short."""


def refusal_in(exc: BaseException) -> ResponseRefusedError | None:
    """The :class:`ResponseRefusedError` behind ``exc`` (the SDK and CrewAI wrap it)."""
    seen: BaseException | None = exc
    for _ in range(8):  # a short chain; bounded all the same
        if seen is None:
            return None
        if isinstance(seen, ResponseRefusedError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def guarded_client(
    timeout_s: float,
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    *,
    client_class: type[httpx2.AsyncClient] = httpx2.AsyncClient,
) -> httpx2.AsyncClient:
    """An ``httpx2.AsyncClient`` for the openai SDK (``http_client=``), every transport
    of it guarded: the direct one and one per proxy of the environment (``HTTPS_PROXY``
    and the like, which the SDK's own client honours too).

    ``client_class``: an ``httpx2.AsyncClient`` of another transport, such as the SDK's
    ``DefaultAioHttpClient`` (aiohttp under httpx2's interface): its transports are
    guarded the same way, since the guard sits between httpx2 and whatever transport."""
    client = client_class(limits=_CONNECTION_LIMITS, timeout=timeout_s, follow_redirects=False)
    # httpx builds the environment's proxy transports only when it builds the direct one
    # too (a client given a transport ignores the environment), so both are wrapped
    # after the fact; ``_mounts`` maps a URL pattern to its proxy's transport, or to
    # None for a host that bypasses the proxies (it then takes ``_transport``).
    client._transport = GuardedTransport(client._transport, max_response_bytes)
    client._mounts = {
        pattern: None if transport is None else GuardedTransport(transport, max_response_bytes)
        for pattern, transport in client._mounts.items()
    }
    return client


class GuardedTransport(httpx2.AsyncBaseTransport):
    """A transport that bounds another: deadline, body caps, no redirects (module
    docstring).  It owns the inner transport: closing it closes that."""

    def __init__(self, inner: httpx2.AsyncBaseTransport, max_response_bytes: int) -> None:
        self._inner = inner
        self._cap = max_response_bytes

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        # Only what the body reader below can inflate within the cap.
        request.headers["Accept-Encoding"] = _ACCEPT_ENCODING
        total_s = _total_timeout(request)
        deadline = _Deadline(request, total_s)
        try:
            response = await deadline.wait(self._inner.handle_async_request(request))
        except Exception as exc:
            deadline.cancel()
            if type(exc).__module__.startswith("aiohttp"):
                raise _refused_by_aiohttp(exc, request) from None
            raise
        except BaseException:
            deadline.cancel()
            raise
        try:
            return self._checked(request, response, deadline)
        except BaseException:
            deadline.cancel()
            await response.aclose()
            raise

    def _checked(
        self,
        request: httpx2.Request,
        response: httpx2.Response,
        deadline: _Deadline,
    ) -> httpx2.Response:
        status = response.status_code
        if 300 <= status < 400:
            location = response.headers.get("Location", "")
            location = redact_url(location, every_query_value=True) or "nowhere"
            if len(location) > _LOCATION_SHOWN:  # a header may be ~100 KB: keep one line
                location = location[: _LOCATION_SHOWN - 3] + "..."
            raise ResponseRefusedError(
                f"HTTP {status} redirect to {location} refused (redirects are not followed: "
                "point base_url at the server that answers)",
                request=request,
            )
        encoding = response.headers.get("Content-Encoding", "").strip().lower()
        if encoding not in ("", "identity", *_ENCODINGS):
            raise ResponseRefusedError(
                f"Content-Encoding {encoding[:40]!r} refused (this client asks for "
                f"{_ACCEPT_ENCODING} only)",
                request=request,
            )
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > self._cap:
            raise ResponseRefusedError(
                f"response body over the {self._cap}-byte cap on the wire (max_response_bytes)",
                request=request,
            )
        inflater = None
        if encoding in _ENCODINGS:
            inflater = _Inflater(encoding, request)
            # The SDK sees the inflated body, as plain.
            del response.headers["Content-Encoding"]
            response.headers.pop("Content-Length", None)
        stream = response.stream
        assert isinstance(stream, httpx2.AsyncByteStream)
        events = response.headers.get("Content-Type", "").startswith("text/event-stream")
        # The same response, its body read through the bounds (no copy of the response).
        response.stream = _BoundedStream(stream, request, self._cap, inflater, deadline, events)
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()


def _refused_by_aiohttp(exc: Exception, request: httpx2.Request) -> ResponseRefusedError:
    """An aiohttp error its httpx2 adapter let through (aiohttp refusing a response head:
    a header line over its 8190-byte limit) as a refusal, which the SDK and the retry
    policy know.  Named by type only: aiohttp's message quotes the offending bytes (a
    Location with a query, say)."""
    return ResponseRefusedError(
        f"response head refused by the HTTP client ({type(exc).__name__}: a header "
        "over its size limits, or a malformed head)",
        request=request,
    )


class _BoundedStream(httpx2.AsyncByteStream):
    """A response body read under the request's deadline and the byte cap."""

    def __init__(
        self,
        inner: httpx2.AsyncByteStream,
        request: httpx2.Request,
        cap: int,
        inflater: _Inflater | None,
        deadline: _Deadline,
        events: bool,
    ) -> None:
        self._events = events
        self._inner = inner
        self._request = request
        self._cap = cap
        self._inflater = inflater
        self._deadline = deadline

    async def __aiter__(self) -> AsyncIterator[bytes]:
        chunks = aiter(self._inner)
        wire = inflated = 0
        cap, inflater, deadline = self._cap, self._inflater, self._deadline
        # The end of the body (an event stream's must be its [DONE]): the last chunk of
        # 16 bytes or more, with the shorter ones after it appended (no copy per chunk).
        tail = b""
        while True:
            # ``deadline.wait`` inlined: a body is read a chunk (a token) at a time, and
            # a coroutine per chunk was most of this reader's cost.
            if deadline._expired:
                raise deadline._timed_out()
            task = asyncio.current_task()  # each time: a caller may read from any task
            assert task is not None
            depth = task.cancelling()
            deadline._waiter = task
            try:
                chunk = await anext(chunks)
            except StopAsyncIteration:
                break
            except asyncio.CancelledError:
                if deadline.timed_out(task, depth):
                    raise deadline._timed_out() from None
                raise
            finally:
                deadline._waiter = None
            wire += len(chunk)
            if wire > cap:
                raise self._over_cap("on the wire")
            if inflater is not None:
                chunk = inflater.inflate(chunk, cap - inflated)
                inflated += len(chunk)
                if inflated > cap:
                    # Let go of the bytes first: the error's traceback holds this frame,
                    # and callers may hold the error for a while.
                    chunk = b""
                    raise self._over_cap("inflated")
            if chunk:
                tail = chunk if len(chunk) >= 16 else tail[-16:] + chunk
                yield chunk
        rest = self._rest(inflated)
        if rest:
            yield rest
        if self._events:
            self._check_done(tail[-16:] + rest)

    def _check_done(self, tail: bytes) -> None:
        """An event stream whose last bytes are ``tail`` must end with ``[DONE]``."""
        if not tail[-16:].rstrip().endswith(b"[DONE]"):
            raise IncompleteStreamError(
                "the event stream ended without [DONE]", request=self._request
            )

    def _rest(self, inflated: int) -> bytes:
        """What the inflater still holds at the end of the body (within the cap)."""
        if self._inflater is None:
            return b""
        rest = self._inflater.finish()
        if inflated + len(rest) > self._cap:
            raise self._over_cap("inflated")
        return rest

    def _over_cap(self, where: str) -> ResponseRefusedError:
        return ResponseRefusedError(
            f"response body over the {self._cap}-byte cap {where} (max_response_bytes)",
            request=self._request,
        )

    async def aclose(self) -> None:
        self._deadline.cancel()
        await self._inner.aclose()


class _Deadline:
    """One request's wall-clock deadline, as one timer: at the deadline it cancels the
    task waiting in :meth:`wait` (or in the body reader, which inlines it), which turns
    that into ``httpx2.ReadTimeout``.

    One timer for the head and every chunk, not a timeout scope each (a scope costs a
    timer of its own).  The timer fires :data:`_CONNECT_GRACE_S` after the connect timeout
    would, so that a connection never set up stays a ``ConnectTimeout``.
    """

    __slots__ = ("_expired", "_handle", "_request", "_total_s", "_waiter")

    def __init__(self, request: httpx2.Request, total_s: float | None) -> None:
        self._request = request
        self._total_s = total_s
        self._expired = False
        self._waiter: asyncio.Task[Any] | None = None
        self._handle: asyncio.TimerHandle | None = None
        if total_s is not None:
            loop = asyncio.get_running_loop()
            self._handle = loop.call_at(loop.time() + total_s + _CONNECT_GRACE_S, self._expire)

    def _expire(self) -> None:
        self._expired = True
        if self._waiter is not None:
            self._waiter.cancel()

    async def wait(self, step: Awaitable[_T]) -> _T:
        """``step``'s result, unless the deadline passes first (then ReadTimeout)."""
        if self.expired():
            close = getattr(step, "close", None)
            if close is not None:
                close()  # never awaited: say so to it, not to the warnings
            raise self._timed_out()
        task = asyncio.current_task()
        assert task is not None
        depth = task.cancelling()
        self._waiter = task
        try:
            return await step
        except asyncio.CancelledError:
            if self.timed_out(task, depth):
                raise self._timed_out() from None
            raise
        finally:
            self._waiter = None

    def timed_out(self, task: asyncio.Task[Any], depth: int) -> bool:
        """Whether the cancellation ``task`` (cancelled ``depth`` times before it
        waited) is in is the deadline's, and so taken back: only if nobody else cancelled
        it too (a halt stays a halt)."""
        return self._expired and task.uncancel() <= depth

    def expired(self) -> bool:
        return self._expired

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()

    def _timed_out(self) -> httpx2.ReadTimeout:
        return httpx2.ReadTimeout(
            f"no complete response within {self._total_s:g} s", request=self._request
        )


class _Inflater:
    """gzip or deflate, never more output per call than asked for (plus one byte)."""

    def __init__(self, encoding: str, request: httpx2.Request) -> None:
        self._request = request
        self._deflate = encoding == "deflate"
        self._first = True
        wbits = zlib.MAX_WBITS if self._deflate else zlib.MAX_WBITS | 16
        self._zlib = zlib.decompressobj(wbits)

    def inflate(self, data: bytes, room: int) -> bytes:
        """Inflate ``data``: at most ``room + 1`` bytes, so more than ``room`` means over
        the cap (zlib keeps the rest of the input unread; it is never inflated).

        Past the end of a stream zlib sets bytes aside unread: another gzip member is
        inflated in turn (RFC 1952: a body may be several); anything else is refused,
        never silently dropped (the answer would not be the body the server sent)."""
        parts = [self._inflate(data, room)]
        size = len(parts[0])
        while self._zlib.eof and self._zlib.unused_data and size <= room:
            rest = self._zlib.unused_data
            if self._deflate or (len(rest) >= 2 and rest[:2] != b"\x1f\x8b"):
                raise self._trailing()
            if len(rest) < 2:
                break  # the next chunk says whether a member begins
            self._zlib = zlib.decompressobj(zlib.MAX_WBITS | 16)
            parts.append(self._inflate(rest, room - size))
            size += len(parts[-1])
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _inflate(self, data: bytes, room: int) -> bytes:
        try:
            out = self._zlib.decompress(data, room + 1)
        except zlib.error as exc:
            if not (self._deflate and self._first):
                raise httpx2.DecodingError(f"body is not valid {self._kind()}") from exc
            # "deflate" is raw deflate on some servers, zlib-wrapped on others.
            self._zlib = zlib.decompressobj(-zlib.MAX_WBITS)
            self._first = False
            return self._inflate(data, room)
        self._first = False
        return out

    def finish(self) -> bytes:
        if self._zlib.eof and self._zlib.unused_data:  # a byte of no member, at the end
            raise self._trailing()
        try:
            return self._zlib.flush()
        except zlib.error as exc:
            raise httpx2.DecodingError(f"body is not valid {self._kind()}") from exc

    def _trailing(self) -> ResponseRefusedError:
        return ResponseRefusedError(
            f"data after the end of the {self._kind()} body", request=self._request
        )

    def _kind(self) -> str:
        return "deflate" if self._deflate else "gzip"


def _total_timeout(request: httpx2.Request) -> float | None:
    """The request's timeout as one wall-clock bound: the largest value it sets."""
    timeouts = request.extensions.get("timeout") or {}
    values = [v for v in timeouts.values() if isinstance(v, int | float)]
    return max(values) if values else None
