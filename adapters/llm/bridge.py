"""Run an asyncio-native orchestrator under trio, through trio-asyncio.

The LLM ecosystem ships asyncio clients; the kernel is trio.  The bridge makes one the
other's orchestrator without giving up trio's cancellation: when trio cancels a call
(a halt, a timeout, the caller's own cancel scope), the bridge cancels the asyncio task
running it, which cancels the HTTP request it is waiting on, and returns once that task
has finished unwinding -- or after ``unwind_grace_s`` (0.5 s) at the most: a task whose
own clean-up takes longer is left to finish on the loop (logged), so that nothing slow
stands between a halt and the caller.  (An HTTP client closes its request at once; only
an orchestrator with slow clean-up of its own ever reaches the bound.)

A cancellation trio did not ask for is not one: if the asyncio side ends in
``asyncio.CancelledError`` on its own (the client cancelled its own task, or raised it),
while no trio cancel scope around the call has been cancelled, the bridge raises
:class:`AsyncioCancelledError`, an ordinary error, so the kernel records that agent's
``ERROR`` and the rest of the batch goes on.  (trio-asyncio itself turns an asyncio
cancellation into ``trio.Cancelled`` only when trio asked for it, and passes any other
``asyncio.CancelledError``, a ``BaseException``, through unchanged.)

Inside an :class:`~adapters.asyncio_host.AsyncioHost` (trio as a guest of an asyncio
application's loop), the bridge opens no loop of its own: the inner orchestrator runs on
the host loop itself, as tasks of the application's loop, with the same cancellation
rules.  Its clients then belong to that loop, nothing runs on a second one, and
trio-asyncio is not even imported (importing it patches asyncio for the whole process).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import sys
from collections import deque
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any, Protocol, Self, TypeVar

import trio

from adapters.asyncio_host import host_loop
from kernel import AgentInvocationError, AgentOutput, ContextBundle, InvalidRequestError
from kernel.validate import check_number

__all__ = ["AsyncioCancelledError", "AsyncioOrchestrator", "AsyncioOrchestratorBridge"]

log = logging.getLogger("adapters.llm.bridge")


def _rebind_loop_lookups() -> None:
    """Point anyio's asyncio backend at trio-asyncio's ``get_running_loop`` and
    ``current_task``.

    trio-asyncio replaces ``asyncio.get_running_loop`` when it is imported, so that code
    running on its loop finds that loop.  A module that imported the function by name
    before that keeps the original, which finds no loop under trio-asyncio: anyio's
    asyncio backend does (``from asyncio import get_running_loop``), and the SDK's HTTP
    stack (httpcore) connects through it.  An application that made one asyncio call
    through the SDK before importing the bridge then had every agent fail ("no running
    event loop", taken for a connection failure).  The replacement falls back to the
    original outside trio-asyncio, so plain asyncio code is unaffected.
    """
    backend = sys.modules.get("anyio._backends._asyncio")
    if backend is None:
        return
    # get_running_loop, and on Python 3.12+ current_task too (trio-asyncio replaces both;
    # anyio's locks call current_task()).
    for name in ("get_running_loop", "current_task"):
        replacement = getattr(asyncio, name)
        if getattr(backend, name, replacement) is not replacement:
            setattr(backend, name, replacement)


_rebind_loop_lookups()

T = TypeVar("T")


class AsyncioCancelledError(AgentInvocationError):
    """The asyncio side of a call was cancelled by something other than the kernel.

    Raised by the bridge in place of an ``asyncio.CancelledError`` that trio did not
    cause, so that it is the agent's ``ERROR`` rather than a ``BaseException`` that would
    tear down the whole batch.
    """


class AsyncioOrchestrator(Protocol):
    """An orchestrator whose ``invoke`` is an asyncio coroutine.

    Optional, also asyncio coroutines: ``aopen()`` (set-up, run once when the bridge is
    entered: build clients there, not on the first ``invoke``, and keep the event loop
    free by doing the heavy part in a worker thread) and ``aclose()`` (run when the
    bridge is left).
    """

    async def invoke(self, agent_id: str, context: ContextBundle) -> AgentOutput: ...


class AsyncioOrchestratorBridge:
    """A trio :class:`~kernel.AgentOrchestratorProtocol` over an asyncio orchestrator.

    Use it as an async context manager::

        async with AsyncioOrchestratorBridge(OpenAIChatOrchestrator(...)) as orchestrator:
            service = ConcurrentDeliberationService(orchestrator, halt)
            ...

    Entering, in an :class:`~adapters.asyncio_host.AsyncioHost`, uses the host's asyncio
    loop; elsewhere it opens a trio-asyncio loop if none is running in this trio task
    (and reuses the one that is); then runs the inner orchestrator's ``aopen``, if it has one (if it
    fails, the loop is closed again and the error propagates); leaving closes the inner
    orchestrator (its ``aclose``, if it has one, run as asyncio) and then the loop it
    opened.  ``invoke`` outside the ``async with`` raises ``RuntimeError``.  Exceptions
    from the inner orchestrator cross back unchanged in type, except an
    ``asyncio.CancelledError`` trio did not ask for: :class:`AsyncioCancelledError`.
    """

    def __init__(self, inner: AsyncioOrchestrator, *, unwind_grace_s: float = 0.5) -> None:
        if not inspect.iscoroutinefunction(getattr(inner, "invoke", None)):
            raise InvalidRequestError(
                f"inner must have an asyncio coroutine invoke(agent_id, context), "
                f"got {type(inner).__name__}"
            )
        self._inner = inner
        self._grace = check_number(unwind_grace_s, "unwind_grace_s", at_least=0)
        self._loop: Any = None
        self._stack: AsyncExitStack | None = None

    def __repr__(self) -> str:
        return f"<AsyncioOrchestratorBridge over {self._inner!r}>"

    @property
    def inner(self) -> AsyncioOrchestrator:
        return self._inner

    async def __aenter__(self) -> Self:
        if self._stack is not None:
            raise RuntimeError("AsyncioOrchestratorBridge is already open")
        _rebind_loop_lookups()  # anyio may have been imported since (cheap when it was not)
        stack = AsyncExitStack()
        host = host_loop()
        loop: Any = _HostLoop(host) if host is not None else None
        if loop is None:
            # Imported only here: importing trio_asyncio patches asyncio process-wide (its
            # asyncio.new_event_loop makes trio-asyncio loops), which an asyncio
            # application embedding the kernel through a host must not get.
            import trio_asyncio

            _rebind_loop_lookups()  # now that trio_asyncio has replaced the lookup
            loop = trio_asyncio.current_loop.get()
            if loop is None:
                loop = await stack.enter_async_context(trio_asyncio.open_loop())
        aopen = getattr(self._inner, "aopen", None)
        if aopen is not None:
            try:
                await _run(loop, aopen(), "set-up (aopen) of the inner orchestrator")
            except BaseException:
                # Close the loop we opened (nothing runs on it yet), then raise the
                # set-up's own error, not an ExceptionGroup from the loop's nursery.
                await stack.aclose()
                raise
        # Open only now: nothing may invoke before the set-up has finished.
        self._stack = stack
        self._loop = loop
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        stack, loop = self._stack, self._loop
        self._stack = self._loop = None
        assert stack is not None
        async with stack:
            aclose = getattr(self._inner, "aclose", None)
            if aclose is not None:
                try:
                    await _run(loop, aclose(), "closing (aclose) of the inner orchestrator")
                except Exception:
                    log.exception("closing the inner orchestrator failed")

    async def run_asyncio(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run any asyncio coroutine function on the bridge's loop, from trio."""
        loop = self._loop
        if loop is None:
            raise RuntimeError("use 'async with AsyncioOrchestratorBridge(...)' first")
        result: T = await _run(loop, fn(*args), f"asyncio call {_name(fn)}")
        return result

    async def invoke(self, agent_id: str, context: ContextBundle) -> AgentOutput:
        loop = self._loop
        if loop is None:
            raise RuntimeError("use 'async with AsyncioOrchestratorBridge(...)' before invoke()")
        result: AgentOutput = await _run(
            loop, self._inner.invoke(agent_id, context), f"agent {agent_id!r}", self._grace
        )
        return result


class _HostLoop:
    """The asyncio loop a trio guest run lives on, as the bridge runs coroutines on it.

    Coroutines start one per turn of the loop, in order.  The kernel starts a batch's
    agents in one trio turn; 72 asyncio tasks made ready at once would each build their
    request (a few milliseconds of the SDK's CPU) in the same turn of the host loop, which
    would then run nothing else for hundreds of milliseconds.  One start per turn lets the
    application's own tasks run in between (and spreads the answers the same way).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._gates: deque[asyncio.Future[None]] = deque()
        self._opening = False

    def start(self, coro: Awaitable[T], done: trio.Event) -> asyncio.Future[T]:
        """A task of the host loop running ``coro`` (once its turn comes); ``done`` is set
        when it ends.

        Its done callback runs in asyncio, outside the trio run: it wakes trio through
        the run's token, never by touching trio objects directly.
        """
        gate: asyncio.Future[None] = self.loop.create_future()
        self._gates.append(gate)
        if not self._opening:
            self._opening = True
            self.loop.call_soon(self._open_next)
        task = asyncio.ensure_future(_after(gate, coro), loop=self.loop)
        token = trio.lowlevel.current_trio_token()

        def wake(_task: asyncio.Future[T]) -> None:
            with contextlib.suppress(trio.RunFinishedError):  # the run is over: nobody waits
                token.run_sync_soon(done.set)

        task.add_done_callback(wake)
        return task

    def _open_next(self) -> None:
        while self._gates:
            gate = self._gates.popleft()
            if not gate.done():  # else its task was cancelled before its turn
                gate.set_result(None)
                break
        if self._gates:
            self.loop.call_soon(self._open_next)
        else:
            self._opening = False


async def _after(gate: asyncio.Future[None], coro: Awaitable[T]) -> T:
    try:
        await gate
    except BaseException:
        close = getattr(coro, "close", None)
        if close is not None:
            close()  # cancelled before its turn: never started (and no "never awaited")
        raise
    return await coro


def _start(loop: Any, coro: Awaitable[T], done: trio.Event) -> asyncio.Future[T]:
    if isinstance(loop, _HostLoop):
        return loop.start(coro, done)
    task: asyncio.Future[T] = asyncio.ensure_future(coro, loop=loop)
    task.add_done_callback(lambda _task: done.set())  # trio-asyncio: on the trio thread
    return task


async def _run_bounded(loop: Any, coro: Awaitable[T], what: str, grace: float | None) -> T:
    """Run ``coro`` as an asyncio task; cancelled, cancel it and wait for it to end --
    ``grace`` seconds at the most, if given."""
    done = trio.Event()
    task = _start(loop, coro, done)
    try:
        await done.wait()
    except trio.Cancelled:
        task.cancel()  # closes the HTTP request it waits on
        deadline = trio.current_time() + grace if grace is not None else math.inf
        with trio.CancelScope(shield=True, deadline=deadline):
            await done.wait()
        if not task.done():
            log.warning(
                "asyncio task still unwinding after the grace period; left to finish",
                extra={"what": what, "grace_s": grace},
            )
            task.add_done_callback(_forget)
        raise
    return task.result()


def _forget(task: asyncio.Future[Any]) -> None:
    """Retrieve an abandoned task's outcome, so asyncio does not warn about it."""
    if not task.cancelled():
        task.exception()


def _name(fn: object) -> str:
    return str(getattr(fn, "__qualname__", None) or type(fn).__name__)


async def _run(loop: Any, coro: Awaitable[T], what: str, grace: float | None = None) -> T:
    """Run ``coro`` as an asyncio task on ``loop``; an unasked-for cancellation is an error.

    Cancelled from trio, the task is cancelled and waited for -- ``grace`` seconds at the
    most, if given (else until it is done).
    """
    try:
        if grace is None and not isinstance(loop, _HostLoop):
            result: T = await loop.run_aio_coroutine(coro)
        else:
            result = await _run_bounded(loop, coro, what, grace)
    except asyncio.CancelledError as exc:
        # trio-asyncio raises trio.Cancelled when trio cancelled us.  The asyncio task
        # may also have ended cancelled just before a trio cancel reached this task: if
        # one is pending now, this raises trio.Cancelled and the cancel keeps its meaning.
        await trio.lowlevel.checkpoint_if_cancelled()
        log.warning(
            "asyncio task cancelled by something other than the kernel", extra={"what": what}
        )
        raise AsyncioCancelledError(
            f"{what}: its asyncio task was cancelled by something other than the kernel "
            "(asyncio.CancelledError; no halt, timeout or cancel scope asked for it)"
        ) from exc
    return result
