"""The connection both Valkey adapters share: URL checks, the client, bounded calls.

One place says what a usable server URL is, how a client is opened (at ``async with``,
never on a batch's first request), and what a failed call means: every call is bounded
by a timeout, and any way it can fail (refused, reset, timed out, a server error, a reply
of the wrong shape) becomes one :class:`StoreError`; a URL in a message is always
:func:`~adapters.urls.redact_url`'s.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from types import TracebackType
from typing import Any, Self, TypeVar
from urllib.parse import urlsplit, urlunsplit

import coredis
import trio
from coredis.retry import ConstantRetryPolicy

from adapters.urls import redact_url
from kernel import ConclaveError, InvalidRequestError
from kernel.validate import check_number, check_text

__all__ = [
    "BackgroundClient",
    "Client",
    "StoreError",
    "ValkeyUnavailableError",
    "backoff",
    "check_name",
    "check_timeout",
    "check_url",
    "describe",
    "open_client",
    "reraise_cancellation",
    "store_call",
    "to_int",
]

log = logging.getLogger("adapters.valkey")

T = TypeVar("T")
Client = coredis.Redis[bytes]

_SCHEMES = {"redis": "redis", "rediss": "rediss", "valkey": "redis", "valkeys": "rediss"}
_MAX_PROBLEM_CHARS = 200


class StoreError(Exception):
    """A call to the server failed: unreachable, too slow, or an answer we cannot use."""


class ValkeyUnavailableError(ConclaveError):
    """The server could not be reached (or did not answer in time) for a write that
    needs it, e.g. raising a halt: nothing was written."""


def check_url(url: object) -> str:
    """A ``redis://``, ``rediss://``, ``valkey://``, ``valkeys://`` or ``unix://`` URL, as
    coredis takes it (``valkey`` schemes become ``redis`` ones)."""
    text = check_text(url, "url")
    try:
        parts = urlsplit(text)
    except ValueError:  # an unbalanced '[' of an IPv6 host
        raise InvalidRequestError(f"url {redact_url(text)!r}: not a valid URL") from None
    scheme = parts.scheme.lower()
    if scheme == "unix":
        if not parts.path:
            raise InvalidRequestError(
                f"url {redact_url(text)!r}: a unix:// URL needs a socket path"
            )
        return text
    if scheme not in _SCHEMES:
        raise InvalidRequestError(
            f"url {redact_url(text)!r}: the scheme must be redis://, rediss://, valkey://, "
            "valkeys:// or unix://"
        )
    try:
        port = parts.port
    except ValueError:
        raise InvalidRequestError(f"url {redact_url(text)!r}: the port is not a number") from None
    if not parts.hostname:
        raise InvalidRequestError(f"url {redact_url(text)!r}: no host")
    del port
    return urlunsplit(parts._replace(scheme=_SCHEMES[scheme]))


def check_name(value: object, name: str) -> str:
    """A key or key prefix: non-empty, at most 200 characters, no whitespace."""
    text = check_text(value, name)
    if len(text) > 200 or any(c.isspace() for c in text):
        raise InvalidRequestError(f"{name} must be at most 200 characters without whitespace")
    return text


def check_timeout(value: object, name: str) -> float:
    return check_number(value, name, above=0)


@asynccontextmanager
async def open_client(url: str, *, connect_timeout: float) -> AsyncIterator[Client]:
    """A client for ``url`` for the duration of the block (bytes in, bytes out).

    Replies are not decoded: a value that is not UTF-8 must reach our parser (which calls
    it corrupt), not break the client's.  A refused connection is retried once after
    10 ms (a pooled connection the server closed is replaced); callers bound every call
    with :func:`store_call`.
    """
    client: Client = coredis.Redis.from_url(
        url,
        decode_responses=False,
        connect_timeout=connect_timeout,
        retry_policy=ConstantRetryPolicy((coredis.exceptions.ConnectionError,), 1, delay=0.01),
    )
    async with client:
        yield client


async def store_call(call: Callable[[], Awaitable[T]], limit: float) -> T:
    """``await call()``, within ``limit`` seconds; any failure is a :class:`StoreError`.

    Cancellation from outside goes through untouched.
    """
    with trio.move_on_after(limit) as scope:
        try:
            return await call()
        except Exception as exc:  # refused, reset, a server error, a group of those...
            raise StoreError(describe(exc)) from exc
    assert scope.cancelled_caught
    raise StoreError(f"no answer within {limit:g} s")


def reraise_cancellation(exc: BaseException) -> None:
    """Re-raise ``exc`` if it is, or holds, a cancellation (anything not an ``Exception``):
    a connection torn down *because* we are being cancelled raises its own error beside
    the cancellation, and that must not turn a clean exit into a crash."""
    if isinstance(exc, BaseExceptionGroup):
        # Leaves only: a group holding a cancellation is not an Exception itself.
        cancelled, _ = exc.split(lambda e: not isinstance(e, Exception | BaseExceptionGroup))
        if cancelled is not None:
            raise cancelled
    elif not isinstance(exc, Exception):
        raise exc


async def exit_stack(
    stack: AsyncExitStack,
    exc_type: type[BaseException] | None,
    exc: BaseException | None,
    tb: TracebackType | None,
) -> bool | None:
    """Exit ``stack`` (which holds a background nursery) after an ``async with`` block.

    An error of the block that only passed through that nursery comes out as itself, not
    wrapped in its ExceptionGroup(s): the caller's ``except SystemHaltedError`` around the
    block must work as it does around any other context manager.
    """
    try:
        return await stack.__aexit__(exc_type, exc, tb)
    except BaseExceptionGroup as group:
        leaf: BaseException = group
        while isinstance(leaf, BaseExceptionGroup) and len(leaf.exceptions) == 1:
            leaf = leaf.exceptions[0]
        if exc is None or leaf is not exc:
            raise
    raise exc  # outside the handler: the group does not become its context


class BackgroundClient:
    """What both Valkey adapters share: a client and a nursery of background tasks,
    opened at ``async with`` and closed at its end.

    A subclass sets ``_url`` and ``timeout`` and gives :meth:`_start` (register its
    scripts, read what it needs, start its tasks in ``self._nursery``) and, if it has
    something to hand back first, :meth:`_before_close` and :meth:`_after_close`.
    Entering twice is refused; a failed start closes what it opened and raises its own
    error; an error of the block comes out as itself (:func:`exit_stack`).
    """

    _url: str
    timeout: float

    def __init__(self) -> None:
        self._client: Client | None = None
        self._stack: AsyncExitStack | None = None
        self._nursery: trio.Nursery | None = None

    async def _start(self, client: Client, stack: AsyncExitStack) -> None:
        raise NotImplementedError

    async def _before_close(self) -> None:
        """Runs first on leaving, while the client and the tasks are still there."""

    def _after_close(self) -> None:
        """Runs last on leaving, once the client is closed."""

    async def __aenter__(self) -> Self:
        if self._stack is not None:
            raise RuntimeError(f"this {type(self).__name__} is already open")
        stack = AsyncExitStack()
        await stack.__aenter__()
        try:
            client = await stack.enter_async_context(
                open_client(self._url, connect_timeout=self.timeout)
            )
            self._client = client
            await self._start(client, stack)
        except BaseException as exc:
            self._client = self._nursery = None
            await stack.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        self._stack = stack
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        stack, self._stack = self._stack, None
        assert stack is not None and self._nursery is not None
        await self._before_close()
        self._nursery.cancel_scope.cancel()
        try:
            return await exit_stack(stack, exc_type, exc, tb)
        finally:
            self._client = self._nursery = None
            self._after_close()


def describe(exc: BaseException) -> str:
    """One line about a failure (the first leaf of a group), cut to a sane length."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    text = str(exc).strip() or type(exc).__name__
    if not text.startswith(type(exc).__name__):
        text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= _MAX_PROBLEM_CHARS else text[: _MAX_PROBLEM_CHARS - 3] + "..."


def to_int(value: Any, what: str) -> int:
    """An integer reply (Lua numbers arrive as ints), or a StoreError."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise StoreError(f"unexpected reply for {what}: {type(value).__name__}")
    return value


def backoff(attempt: int, *, first: float = 0.05, most: float = 1.0) -> float:
    """The wait before reconnect attempt ``attempt`` (0-based): doubling, capped."""
    return min(most, first * math.pow(2, min(attempt, 20)))
