"""`make e2e`'s measure of the server's work after a halt, streamed against not.

For each mode: 72 agents ask for long answers (``--max-tokens``), the council is halted
``--halt-after`` seconds in, and then one 1-token probe request is timed: how long the
server stays busy with the abandoned generations (llama.cpp's server serves one completion
at a time, so the probe waits for whatever it still generates).  Prints one line per mode.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import openai
import trio

from adapters.llm.bridge import AsyncioOrchestratorBridge
from adapters.llm.openai_chat import OpenAIChatOrchestrator
from kernel import (
    AgentPool,
    AgentRequest,
    ConcurrentDeliberationService,
    ContextBundle,
    HaltSwitch,
    SystemHaltedError,
)


async def busy_after_halt(
    base_url: str, model: str, stream: bool, args: argparse.Namespace
) -> float:
    orchestrator = OpenAIChatOrchestrator(
        base_url, model, timeout_s=900, max_tokens=args.max_tokens, stream=stream
    )
    context = ContextBundle("e2e-halt", "Write a long essay on how a council should meet.")
    requests = [AgentRequest(f"archon-{i + 1}", context) for i in range(args.agents)]
    halt = HaltSwitch()
    async with AsyncioOrchestratorBridge(orchestrator) as bridge:
        service = ConcurrentDeliberationService(bridge, halt, AgentPool())
        async with trio.open_nursery() as nursery:

            async def deliberate() -> None:
                with contextlib.suppress(SystemHaltedError):
                    await service.invoke_concurrent(requests)

            nursery.start_soon(deliberate)
            await trio.sleep(args.halt_after)
            halt.halt("e2e: measure the work after a halt")
    halted = time.perf_counter()
    client = openai.OpenAI(base_url=base_url, api_key="sk-no-key-required", timeout=900)
    await trio.to_thread.run_sync(
        lambda: client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=1
        )
    )
    return time.perf_counter() - halted


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--agents", type=int, default=72)
    parser.add_argument("--max-tokens", type=int, default=1024)
    parser.add_argument("--halt-after", type=float, default=2.0)
    args = parser.parse_args()
    for stream in (False, True):
        busy = trio.run(busy_after_halt, args.base_url, args.model, stream, args)
        mode = "streamed" if stream else "stream=False"
        print(f"e2e halt: {mode}: the server was busy {busy:.2f} s after the halt")


if __name__ == "__main__":
    main()
