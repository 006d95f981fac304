"""Embed the kernel in an asyncio application: a trio guest run on the host's event loop.

An asyncio program (FastAPI under uvicorn, a plain ``asyncio.run``) cannot ``await`` trio
code, and should not have to become a trio program to deliberate.  :class:`AsyncioHost`
starts one trio run as a *guest* of the running asyncio loop
(:func:`trio.lowlevel.start_guest_run`): trio's tasks run in the host loop's callbacks, on
its thread, and trio's I/O wait sits in a worker thread, so neither loop blocks the other.
The service lives in that run; asyncio code awaits its batches, streams their progress and
raises halts through the host.  Asyncio orchestrators (the OpenAI adapter's client), put
behind :class:`~adapters.llm.bridge.AsyncioOrchestratorBridge`, then run on the host loop
itself: the bridge sees :func:`host_loop` and schedules their coroutines there, so their
HTTP clients belong to the application's own loop.

Crossing between the two: asyncio asks trio through the run's
:class:`~trio.lowlevel.TrioToken` (``run_sync_soon``, which wakes the guest run: trio's
API is never called from asyncio code directly), and trio answers through asyncio futures,
which it may set directly, being on the host loop's thread.

Whoever awaits a batch owns it: cancelling the asyncio task that awaits
:meth:`Deliberation.result` (or :meth:`AsyncioHost.invoke_concurrent`) cancels the batch,
and the ``asyncio.CancelledError`` is raised once the batch has unwound (every slot back).
Leaving the host's ``async with`` cancels whatever still runs in it; its awaiters get
:class:`HostClosedError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

import attrs
import trio

from kernel import (
    AgentPool,
    AgentRequest,
    ConclaveError,
    ConcurrentDeliberationService,
    ConcurrentResult,
    HaltChecker,
    HaltControl,
    HaltSwitch,
    InvalidRequestError,
    check_halt_reason,
)

__all__ = ["AsyncioHost", "Deliberation", "HostClosedError", "ProgressEvent", "host_loop"]

log = logging.getLogger("adapters.asyncio_host")

T = TypeVar("T")

_HOST_LOOP: contextvars.ContextVar[asyncio.AbstractEventLoop | None] = contextvars.ContextVar(
    "conclave_host_loop", default=None
)


def host_loop() -> asyncio.AbstractEventLoop | None:
    """The asyncio loop the current trio task runs as a guest of, if it runs in an
    :class:`AsyncioHost` (else None)."""
    return _HOST_LOOP.get()


class HostClosedError(ConclaveError, RuntimeError):
    """The :class:`AsyncioHost` was left (or its trio run ended) while this call ran: it
    was cancelled, its slots released."""


@attrs.frozen
class ProgressEvent:
    """One agent's outcome in a batch, as the kernel's ``on_progress`` reports it:
    ``done`` of ``total`` agents have an outcome; ``status`` is ``"completed"`` or
    ``"failed"``."""

    done: int
    total: int
    agent_id: str
    status: str


class _Call(Generic[T]):
    """One trio call made from asyncio: its asyncio future and its trio cancel scope.

    Owns the crossing of a cancellation from asyncio to trio (before or after the trio
    task started) and of the outcome back; not what is called.
    """

    def __init__(self, host: AsyncioHost) -> None:
        self._host = host
        self.future: asyncio.Future[T] = host.loop.create_future()
        self._scope: trio.CancelScope | None = None
        self._cancel_asked = False

    def cancel(self) -> None:
        """Ask the trio side to cancel (from asyncio)."""
        if self._cancel_asked or self.future.done():
            return
        self._cancel_asked = True
        if self._scope is not None:
            with contextlib.suppress(HostClosedError):  # the run is over: nothing runs
                self._host._soon(self._scope.cancel)

    async def run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> None:
        """Run ``fn(*args)`` in trio and settle the future (the trio task's body)."""
        _HOST_LOOP.set(self._host.loop)
        if self._cancel_asked:  # cancelled before it began: call nothing
            self._settle(None, cancelled=True)
            return
        try:
            with trio.CancelScope() as scope:
                self._scope = scope
                value = await fn(*args)
        except Exception as exc:
            self._settle(exc)
        except BaseException:
            # The host closing (or a KeyboardInterrupt): the awaiter hears why, the
            # run ends as trio means it to.
            self._settle(HostClosedError("the AsyncioHost closed while this call ran"))
            raise
        else:
            if scope.cancelled_caught:
                self._settle(None, cancelled=True)
            else:
                self._settle(value)

    def refuse(self) -> None:
        """The run would not take the call (it is ending)."""
        self._settle(HostClosedError("the AsyncioHost closed before this call began"))

    def _settle(self, value: Any, *, cancelled: bool = False) -> None:
        future = self.future
        if future.done():
            return
        if cancelled:
            future.cancel()
        elif isinstance(value, BaseException):
            future.set_exception(value)
            if isinstance(value, HostClosedError):
                # Whoever left the host knows: no "exception never retrieved" for a call
                # nobody awaits any more.
                future.exception()
        else:
            future.set_result(value)

    async def wait(self) -> T:
        """Await the outcome from asyncio; cancelled, cancel the trio side and wait for it
        to unwind before raising ``asyncio.CancelledError``."""
        try:
            return await asyncio.shield(self.future)
        except asyncio.CancelledError:
            if self.future.done() and not self.future.cancelled():
                raise  # our awaiter was cancelled as the call ended: nothing to unwind
            self.cancel()
            await _until_done(self.future)
            raise


async def _until_done(future: asyncio.Future[Any]) -> None:
    """Wait until ``future`` is done, whatever cancels the waiting task meanwhile (a trio
    call cancelled from asyncio unwinds at once; its slots must be back before the
    ``CancelledError`` goes on), and retrieve its outcome so asyncio does not warn."""
    while not future.done():
        try:
            await asyncio.wait({future})
        except asyncio.CancelledError:
            continue
    if not future.cancelled():
        future.exception()


class Deliberation:
    """One batch started through an :class:`AsyncioHost`, seen from asyncio: its progress
    (:meth:`events`) and its outcome (:meth:`result`).  Not the batch itself, which runs
    in the host's trio run."""

    def __init__(self, call: _Call[ConcurrentResult], total: int) -> None:
        self._call = call
        self.total = total
        self._events: list[ProgressEvent] = []
        self._changed = asyncio.Event()
        call.future.add_done_callback(lambda _future: self._changed.set())

    def __repr__(self) -> str:
        state = "done" if self.done() else "running"
        return f"<Deliberation {len(self._events)}/{self.total} agents, {state}>"

    def done(self) -> bool:
        return self._call.future.done()

    def cancelled(self) -> bool:
        """Ended by :meth:`cancel` (or its awaiter's cancellation): :meth:`result` would
        raise ``asyncio.CancelledError``."""
        return self._call.future.cancelled()

    def cancel(self) -> None:
        """Cancel the batch: an outer cancellation for the kernel (every slot released,
        no result); the awaiters of :meth:`result` get ``asyncio.CancelledError``."""
        self._call.cancel()

    async def result(self) -> ConcurrentResult:
        """The batch's result, or its error (:class:`~kernel.SystemHaltedError` with the
        partial result, ...).  Cancelling the task that awaits this cancels the batch."""
        return await self._call.wait()

    async def events(self) -> AsyncIterator[ProgressEvent]:
        """Every progress event of the batch, from its first (a late subscriber misses
        none), until the batch has ended.  Any number of subscribers."""
        seen = 0
        while True:
            while seen < len(self._events):
                yield self._events[seen]
                seen += 1
            if self.done():
                return
            changed = self._changed
            await changed.wait()

    def _record(self, done: int, total: int, agent_id: str, status: str) -> None:
        """The kernel's ``on_progress`` (on the host loop's thread, in the trio run)."""
        self._events.append(ProgressEvent(done, total, agent_id, status))
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()


class AsyncioHost:
    """A :class:`~kernel.ConcurrentDeliberationService` in a trio guest run on the running
    asyncio loop.  Use it as an async context manager, in asyncio::

        async with AsyncioHost(AgentOrchestratorStub(latency_ms=50)) as host:
            result = await host.invoke_concurrent(requests, deadline=30)

    The arguments are the service's.  ``orchestrator`` is trio-native; an asyncio one
    goes behind :class:`~adapters.llm.bridge.AsyncioOrchestratorBridge` (which then runs
    it on this loop).  The parts that are async context managers (the halt channel, the
    pool's shared capacity, the witness, the orchestrator) are entered in the trio run,
    in that order, when the host is, and left when it is: hand them over unopened.
    ``halt_checker`` defaults to a new :class:`~kernel.HaltSwitch`; :meth:`halt` and
    :meth:`ahalt` need one that is a :class:`~kernel.HaltControl`.  One trio run per
    host; several hosts on one loop are several runs.  Call it from the loop's thread,
    but :meth:`halt`, which any thread may call.
    """

    def __init__(
        self,
        orchestrator: Any,
        halt_checker: HaltChecker | None = None,
        pool: AgentPool | None = None,
        **service_options: Any,
    ) -> None:
        self._halt = HaltSwitch() if halt_checker is None else halt_checker
        # Built here, so that bad settings are refused before any loop is touched.
        self._service = ConcurrentDeliberationService(
            orchestrator, self._halt, pool, **service_options
        )
        self._orchestrator = orchestrator
        parts: tuple[Any, ...] = (
            self._halt,
            pool.shared if pool is not None else None,
            service_options.get("witness"),
            orchestrator,
        )
        # Entered in the trio run, in this order (left in the reverse): each opens what it
        # needs there (clients, background tasks), which asyncio code cannot do for it.
        self._parts: tuple[AbstractAsyncContextManager[Any], ...] = tuple(
            {id(p): p for p in parts if p is not None and hasattr(p, "__aenter__")}.values()
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._ended: asyncio.Future[Any] | None = None  # the run's outcome.Outcome

    def __repr__(self) -> str:
        return f"<AsyncioHost {'open' if self._nursery else 'closed'} over {self._orchestrator!r}>"

    @property
    def service(self) -> ConcurrentDeliberationService:
        """The service (read its statistics from anywhere; run its coroutines with
        :meth:`run`)."""
        return self._service

    @property
    def halt_checker(self) -> HaltChecker:
        return self._halt

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("use 'async with AsyncioHost(...)' first")
        return self._loop

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Self:
        if self._loop is not None:
            raise RuntimeError("AsyncioHost is already open")
        loop = asyncio.get_running_loop()
        if _inside_trio():
            raise RuntimeError(
                "this asyncio loop already runs inside trio (a trio-asyncio loop: importing "
                "trio_asyncio makes asyncio.run use one); use the service from trio directly, "
                "or run the application on a plain asyncio loop "
                "(asyncio.Runner(loop_factory=asyncio.SelectorEventLoop))"
            )
        self._loop = loop
        ready = loop.create_future()
        ended: asyncio.Future[Any] = loop.create_future()
        self._ended = ended
        trio.lowlevel.start_guest_run(
            self._guest_main,
            ready,
            run_sync_soon_threadsafe=loop.call_soon_threadsafe,
            done_callback=ended.set_result,
            # asyncio owns the signal wake-up fd (trio must not take it over).
            host_uses_signal_set_wakeup_fd=True,
        )
        await asyncio.wait({ready, ended}, return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():  # the run ended before it was ready: entering failed
            self._loop = self._ended = None
            ended.result().unwrap()
            raise RuntimeError("the AsyncioHost's trio run ended before it was ready")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        ended = self._ended
        assert ended is not None
        nursery = self._nursery
        if nursery is not None and not ended.done():
            self._soon(nursery.cancel_scope.cancel)
        await _until_done(ended)
        self._loop = self._ended = self._token = self._nursery = None
        ended.result().unwrap()

    async def _guest_main(self, ready: asyncio.Future[None]) -> None:
        _HOST_LOOP.set(self._loop)
        async with AsyncExitStack() as stack:
            for part in self._parts:
                await stack.enter_async_context(part)
            async with trio.open_nursery() as nursery:
                self._token = trio.lowlevel.current_trio_token()
                self._nursery = nursery
                ready.set_result(None)
                await trio.sleep_forever()

    def _soon(self, fn: Callable[..., object], *args: Any) -> None:
        """Have the trio run call ``fn(*args)`` soon (thread-safe; ``fn`` must not raise)."""
        token = self._token
        if token is None:
            raise RuntimeError("use 'async with AsyncioHost(...)' first")
        try:
            token.run_sync_soon(fn, *args)
        except trio.RunFinishedError:
            raise HostClosedError("the AsyncioHost's trio run has ended") from None

    def _start_soon(
        self,
        fn: Callable[..., Awaitable[object]],
        *args: Any,
        refused: Callable[[], object],
    ) -> None:
        """Start ``fn(*args)`` as a task of the run, soon (thread-safe); ``refused()`` is
        called instead if the run is ending by then."""
        nursery = self._nursery
        if nursery is None:
            raise RuntimeError("use 'async with AsyncioHost(...)' first")

        def start() -> None:
            # A callback of run_sync_soon must not raise (trio would crash).
            try:
                nursery.start_soon(fn, *args)
            except RuntimeError:  # "closed to new arrivals": the run is ending
                refused()

        self._soon(start)

    def _new_call(self) -> _Call[Any]:
        if self._nursery is None:
            raise RuntimeError("use 'async with AsyncioHost(...)' first")
        # Checked before anything is scheduled: from another loop, the call's future
        # could not be awaited, and its batch would run with nobody owning it.
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not self._loop:
            raise RuntimeError(
                "call the AsyncioHost from the thread of the loop it was opened in "
                "(halt() is the one call any thread may make)"
            )
        return _Call(self)

    def _spawn(self, call: _Call[T], fn: Callable[..., Awaitable[T]], *args: Any) -> None:
        self._start_soon(call.run, fn, *args, refused=call.refuse)

    # ------------------------------------------------------------------ calls from asyncio

    async def run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Await the trio coroutine function ``fn(*args)``, run in the host's trio run.
        Cancelling the awaiting task cancels it (and waits for it to unwind)."""
        call: _Call[T] = self._new_call()
        self._spawn(call, fn, *args)
        return await call.wait()

    def start(self, requests: Sequence[AgentRequest], **options: Any) -> Deliberation:
        """Start a batch (``invoke_concurrent``'s arguments, but ``on_progress``: use
        :meth:`Deliberation.events`) and return its handle at once."""
        if "on_progress" in options:
            raise InvalidRequestError(
                "on_progress runs in the trio run: through the host, read Deliberation.events()"
            )
        requests = tuple(requests)
        call: _Call[ConcurrentResult] = self._new_call()
        deliberation = Deliberation(call, len(requests))
        self._spawn(
            call,
            functools.partial(
                self._service.invoke_concurrent,
                requests,
                on_progress=deliberation._record,
                **options,
            ),
        )
        return deliberation

    async def invoke_concurrent(
        self, requests: Sequence[AgentRequest], **options: Any
    ) -> ConcurrentResult:
        """``invoke_concurrent`` from asyncio: the result, or the kernel's error.
        Cancelling the awaiting task cancels the batch."""
        return await self.start(requests, **options).result()

    async def ahalt(self, reason: str) -> bool:
        """Raise the halt (every running batch is cancelled, nothing new starts); True if
        this call raised it.  Returns once the halt channel has it."""
        control = self._control()
        check_halt_reason(reason)
        return await self.run(control.ahalt, reason)

    def halt(self, reason: str) -> None:
        """Raise the halt without waiting: from any asyncio task, a callback, or another
        thread.  The trio run raises it at its next turn (microseconds); errors of the
        channel are logged."""
        control = self._control()
        check_halt_reason(reason)
        self._start_soon(_halt_logged, control, reason, refused=_halt_refused)

    def _control(self) -> HaltControl:
        if not isinstance(self._halt, HaltControl):
            raise InvalidRequestError(
                f"this host's halt checker ({type(self._halt).__name__}) cannot be raised "
                "from here: raise it through its own channel"
            )
        return self._halt


def _inside_trio() -> bool:
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return False
    return True


def _halt_refused() -> None:
    log.error("halt not raised: the AsyncioHost's trio run was ending")


#: How long :meth:`AsyncioHost.halt` waits for its channel, shielded: a halt raised as the
#: host closes (the run being cancelled) must still reach its channel (a file or a Valkey
#: halt outlives this process), and a stuck channel must not hang the close.
_HALT_WAIT_S = 10.0


async def _halt_logged(control: HaltControl, reason: str) -> None:
    channel = type(control).__name__
    try:
        with trio.move_on_after(_HALT_WAIT_S, shield=True) as bounded:
            await control.ahalt(reason)
    except Exception:
        log.exception("raising the halt failed", extra={"halt_channel": channel})
        return
    if bounded.cancelled_caught:
        log.error(
            "halt not raised: its channel did not take it in time",
            extra={"halt_channel": channel, "timeout_s": _HALT_WAIT_S},
        )
