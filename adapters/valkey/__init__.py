"""Beyond one machine: the halt and the FR10 capacity shared through a Valkey (or Redis)
server, for several service replicas at once.

* :class:`ValkeyHaltChannel` -- a durable, instant halt channel (a key plus
  publish/subscribe) that every process sharing the server obeys; fail-closed.
* :class:`ValkeyCapacity` -- a :class:`~kernel.SharedCapacity`: one capacity (72 by
  default) across every process, for ``AgentPool(..., shared=...)``.
* :class:`ValkeyProviderBudget` -- one provider budget (rpm, tpm) across every process,
  for ``ProviderLimits(..., shared=...)``.

Both are opened with ``async with`` (the connection is made there, not on a batch's first
request) and run natively under trio (coredis, through anyio: no asyncio bridge).
Optional: ``pip install 'conclave-kernel[valkey]'``.  A standalone server (or a primary)
is assumed; Redis Cluster is not supported.
"""

from adapters.valkey._budget import ValkeyProviderBudget
from adapters.valkey._capacity import ValkeyCapacity
from adapters.valkey._connection import ValkeyUnavailableError
from adapters.valkey._halt import HaltChannelState, ValkeyHaltChannel

__all__ = [
    "HaltChannelState",
    "ValkeyCapacity",
    "ValkeyHaltChannel",
    "ValkeyProviderBudget",
    "ValkeyUnavailableError",
]
