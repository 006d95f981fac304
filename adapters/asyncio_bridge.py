"""Run an asyncio-native orchestrator under trio, through trio-asyncio.

The LLM ecosystem ships asyncio clients; the kernel is trio.  The bridge makes one the
other's orchestrator without giving up trio's cancellation: when trio cancels a call
(a halt, a timeout, the caller's own cancel scope), the bridge cancels the asyncio task
running it, which cancels the HTTP request it is waiting on, and returns only once that
task has finished unwinding.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any, Protocol, Self, TypeVar

import trio_asyncio

from kernel import AgentOutput, ContextBundle, InvalidRequestError

__all__ = ["AsyncioOrchestrator", "AsyncioOrchestratorBridge"]

log = logging.getLogger("adapters.asyncio_bridge")

T = TypeVar("T")


class AsyncioOrchestrator(Protocol):
    """An orchestrator whose ``invoke`` is an asyncio coroutine (``aclose`` optional)."""

    async def invoke(self, agent_id: str, context: ContextBundle) -> AgentOutput: ...


class AsyncioOrchestratorBridge:
    """A trio :class:`~kernel.AgentOrchestratorProtocol` over an asyncio orchestrator.

    Use it as an async context manager::

        async with AsyncioOrchestratorBridge(OpenAIChatOrchestrator(...)) as orchestrator:
            service = ConcurrentDeliberationService(orchestrator, halt)
            ...

    Entering opens a trio-asyncio loop if none is running in this trio task (and reuses
    the one that is); leaving closes the inner orchestrator (its ``aclose``, if it has
    one, run as asyncio) and then the loop it opened.  ``invoke`` outside the ``async
    with`` raises ``RuntimeError``.  Exceptions from the inner orchestrator cross back
    unchanged in type.
    """

    def __init__(self, inner: AsyncioOrchestrator) -> None:
        if not inspect.iscoroutinefunction(getattr(inner, "invoke", None)):
            raise InvalidRequestError(
                f"inner must have an asyncio coroutine invoke(agent_id, context), "
                f"got {type(inner).__name__}"
            )
        self._inner = inner
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
        stack = AsyncExitStack()
        loop = trio_asyncio.current_loop.get()
        if loop is None:
            loop = await stack.enter_async_context(trio_asyncio.open_loop())
        self._loop = loop
        self._stack = stack
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
                    await loop.run_aio_coroutine(aclose())
                except Exception:
                    log.exception("closing the inner orchestrator failed")

    async def run_asyncio(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run any asyncio coroutine function on the bridge's loop, from trio."""
        loop = self._loop
        if loop is None:
            raise RuntimeError("use 'async with AsyncioOrchestratorBridge(...)' first")
        result: T = await loop.run_aio_coroutine(fn(*args))
        return result

    async def invoke(self, agent_id: str, context: ContextBundle) -> AgentOutput:
        loop = self._loop
        if loop is None:
            raise RuntimeError("use 'async with AsyncioOrchestratorBridge(...)' before invoke()")
        result: AgentOutput = await loop.run_aio_coroutine(self._inner.invoke(agent_id, context))
        return result
