"""Run by tests/adapters/llm/crewai in a fresh interpreter: CrewAI's *default* executor, cancelled
mid-request, under plain asyncio; writes a JSON report to OUT (not stdout: CrewAI's
event-bus threads may still be printing their panels there).

What it shows (crewai 1.15): ``Agent.aexecute_task`` runs its LLM call with the
synchronous OpenAI client in a worker thread, so cancelling the asyncio task leaves that
thread in the client and the request open until the client's own timeout.

Usage: python -m tests.adapters.llm.crewai.stock_executor_probe OUT
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from adapters.llm.crewai import disable_telemetry
from tests.support.fake_openai import FakeOpenAIServer


async def cancel_mid_request(server: FakeOpenAIServer) -> dict[str, Any]:
    from crewai import LLM, Agent, Task

    from tests.adapters.llm.crewai.conftest import threads_running_llm_code

    llm = LLM(
        model="fake-model",
        custom_openai=True,
        base_url=server.base_url,
        api_key="sk-no-key-required",
        max_retries=0,
        timeout=1.0,
    )
    agent = Agent(
        role="r", goal="g", backstory="b", llm=llm, max_retry_limit=0, respect_context_window=False
    )
    task = Task(description="Adopt the budget?", expected_output="a position", agent=agent)
    running = asyncio.ensure_future(agent.aexecute_task(task))
    in_flight = await asyncio.to_thread(server.wait_for, lambda s: s.in_flight == 1, 10.0)
    assert in_flight, "the request never reached the server"
    running.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await running
    report: dict[str, Any] = {
        "cancelled": running.cancelled(),
        "threads_in_llm_code_after_cancel": threads_running_llm_code(),
        "in_flight_after_cancel": server.in_flight,
        "disconnects_after_cancel": server.disconnects,
    }
    cancelled_at = time.monotonic()
    await asyncio.to_thread(server.wait_for, lambda s: s.disconnects == 1, 10.0)
    report["seconds_until_closed"] = round(time.monotonic() - cancelled_at, 3)
    return report


def main(out: Path) -> None:
    disable_telemetry()
    server = FakeOpenAIServer().start()
    server.default = "hang"
    try:
        report = asyncio.run(cancel_mid_request(server))
    finally:
        server.stop()
    out.write_text(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
