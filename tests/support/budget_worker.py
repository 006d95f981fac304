"""One service replica against a rate-limited provider, for the shared budget's
multi-process tests and the ``shared-budget`` benchmark.

    python -m tests.support.budget_worker --base-url URL --api-key KEY --rpm R
        [--valkey URL --replicas N --key-prefix P] [--agents 72] [--batches 1]

With ``--valkey``, its ``ProviderLimits`` share one budget through that server (a
:class:`~adapters.valkey.ValkeyProviderBudget`); without, the budget is its own (each
replica at the full limit: what N replicas did before).  It writes
``{"event": "ready"}`` once set up, waits for a line on stdin (so that every replica
starts together), runs ``--batches`` batches of ``--agents`` agents, one after the
other, through the kernel, the bridge and the openai orchestrator, and writes one JSON
line: ``succeeded``, ``failed``, ``started`` and ``ended`` (``time.time()``),
``responses_429``, ``outages``, ``available`` (the budget server at the end),
``reservations`` and ``round_trips`` (the calls to it that took a turn, and all).
Exit code 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import AsyncExitStack
from typing import Any

import trio

from adapters.llm.bridge import AsyncioOrchestratorBridge
from adapters.llm.openai_chat import OpenAIChatOrchestrator, ProviderLimits
from adapters.valkey import ValkeyProviderBudget
from kernel import AgentPool, ConcurrentDeliberationService, HaltSwitch
from tests.support.helpers import make_requests


async def replica(args: argparse.Namespace) -> dict[str, Any]:
    async with AsyncExitStack() as stack:
        store = None
        if args.valkey:
            store = await stack.enter_async_context(
                ValkeyProviderBudget(
                    args.valkey, key_prefix=args.key_prefix, replicas=args.replicas
                )
            )
        orch = OpenAIChatOrchestrator(
            args.base_url,
            "fake-model",
            api_key=args.api_key,
            limits=ProviderLimits(requests_per_minute=args.rpm, shared=store),
            timeout_s=30.0,
            max_retries=8,
            backoff_base_s=0.05,
            backoff_cap_s=1.0,
        )
        bridge = await stack.enter_async_context(AsyncioOrchestratorBridge(orch))
        service = ConcurrentDeliberationService(bridge, HaltSwitch(), AgentPool())
        print(json.dumps({"event": "ready"}), flush=True)
        await trio.to_thread.run_sync(sys.stdin.readline)
        started = time.time()
        succeeded = failed = 0
        for batch in range(args.batches):
            requests = make_requests(args.agents, prefix=f"{args.name}-{batch}")
            result = await service.invoke_concurrent(requests)
            succeeded += result.success_count
            failed += result.failure_count
        ended = time.time()
        return {
            "event": "done",
            "succeeded": succeeded,
            "failed": failed,
            "started": started,
            "ended": ended,
            "responses_429": orch.limit_stats().responses_429,
            "outages": None if store is None else store.outages,
            "available": None if store is None else store.available,
            "reservations": None if store is None else store.reservations,
            "round_trips": None if store is None else store.round_trips,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--rpm", type=int, required=True)
    parser.add_argument("--valkey", default=None)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--key-prefix", default="conclave")
    parser.add_argument("--agents", type=int, default=72)
    parser.add_argument("--batches", type=int, default=1)
    parser.add_argument("--name", default="archon")
    args = parser.parse_args()
    print(json.dumps(trio.run(replica, args)), flush=True)


if __name__ == "__main__":
    main()
