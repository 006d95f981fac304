"""One service replica, for the multi-process tests and the ``cluster`` benchmark.

    python -m tests.support.valkey_worker --valkey URL --base-url URL [--agents 72] [--prefix w1]
        [--overflow queue|reject] [--shared-capacity 72] [--lease-s 30] [--rounds 1]
        [--name conclave] [--key conclave:halt]

It is wired as ``conclave deliberate --backend openai --valkey URL --shared-capacity N``
is (the in-process switch and the Valkey channel, either halts; a pool admitted against
the shared capacity), then runs ``--rounds`` batches of ``--agents`` agents, each once
the halt is clear (a replica that stays up resumes after two approvers clear a halt);
after a batch that was not halted, the next waits for a halt and a clear (each batch
starts on a fresh clear, so a test decides when).

It writes JSON lines on stdout: ``{"event": "ready"}`` once connected and probed;
``{"event": "state", ...}`` whenever what it knows of the halt changes; one
``{"event": "round", ...}`` per batch, with the wall-clock times (``time.time()``) at
which it first saw a halt and at which its batch had stopped.  Exit code: 3 if its last
batch was halted, 2 if refused, 1 if some agents failed, else 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import trio

from adapters.cli._backend import openai_orchestrator
from adapters.cli._valkey import ValkeyCluster
from adapters.valkey import ValkeyCapacity, ValkeyHaltChannel
from kernel import (
    AgentPoolExhaustedError,
    ConcurrentDeliberationService,
    HaltSwitch,
    SystemHaltedError,
)
from tests.support.helpers import make_requests


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


async def follow_state(channel: ValkeyHaltChannel) -> None:
    """Report each change of (halted, connected, problem) once the key has been read."""
    last: tuple[object, ...] | None = None
    while True:
        state = channel.state
        now = (state.halted, state.connected, state.problem)
        if now != last:
            emit(
                event="state", halted=state.halted, connected=state.connected, problem=state.problem
            )
            last = now
        with trio.move_on_after(0.5):  # a lost connection changes the state without a read
            await channel.wait_read()


async def run(args: argparse.Namespace) -> int:
    seen: list[float] = []
    code = 0
    async with (
        ValkeyHaltChannel(args.valkey, key=args.key) as channel,
        ValkeyCapacity(
            args.valkey, name=args.name, capacity=args.shared_capacity, lease_s=args.lease_s
        ) as capacity,
        openai_orchestrator(
            args.base_url, "fake-model", roster=None, max_tokens=None, timeout_s=None
        ) as orchestrator,
        trio.open_nursery() as nursery,
    ):
        cluster = ValkeyCluster(channel, capacity)
        checker = cluster.halt_checker(HaltSwitch(), None)
        channel.on_halt(lambda _reason: seen.append(time.time()))
        service = ConcurrentDeliberationService(orchestrator, checker, cluster.pool(args.agents))
        requests = make_requests(args.agents, prefix=args.prefix)
        nursery.start_soon(follow_state, channel)
        emit(event="ready")
        for round_ in range(args.rounds):
            await channel.wait_cleared()
            seen.clear()
            try:
                result = await service.invoke_concurrent(requests, overflow=args.overflow)
            except SystemHaltedError as exc:
                stopped = time.time()
                done = exc.partial.success_count if exc.partial is not None else 0
                emit(
                    event="round",
                    round=round_,
                    halted=exc.reason,
                    seen_at=seen[0] if seen else None,
                    stopped_at=stopped,
                    succeeded=done,
                )
                code = 3
                continue
            except AgentPoolExhaustedError as exc:
                emit(event="round", round=round_, refused=str(exc))
                code = 2
                continue
            emit(event="round", round=round_, succeeded=result.success_count)
            code = 0 if result.failure_count == 0 else 1
            if round_ < args.rounds - 1:
                await channel.wait_halted()  # each round starts on a fresh clear
        nursery.cancel_scope.cancel()
    return code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--valkey", required=True)
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--agents", type=int, default=72)
    parser.add_argument("--prefix", default="w")
    parser.add_argument("--overflow", choices=("queue", "reject"), default="queue")
    parser.add_argument("--shared-capacity", type=int, default=72)
    parser.add_argument("--lease-s", type=float, default=30.0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--name", default="conclave")
    parser.add_argument("--key", default="conclave:halt")
    sys.exit(trio.run(run, parser.parse_args()))


if __name__ == "__main__":
    main()
