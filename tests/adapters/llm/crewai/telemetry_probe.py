"""Run by tests/adapters/llm/crewai in a fresh interpreter: one deliberation with a default
CrewAIOrchestrator against ``base_url``; writes a JSON report to OUT: what CrewAI's
telemetry did, what reached beyond 127.0.0.1, and which modules the first batch imported
on the event loop (set-up belongs to the entry).  It prints nothing itself: whatever is on
its stdout, CrewAI printed.

Usage: python -m tests.adapters.llm.crewai.telemetry_probe BASE_URL OUT [--telemetry]
"""

from __future__ import annotations

import ipaddress
import json
import os
import sys
import threading
from pathlib import Path
from typing import Any

OFF_MACHINE: list[str] = []


def _guard(event: str, args: tuple[Any, ...]) -> None:
    if event == "socket.getaddrinfo":
        host = args[0]
    elif event == "socket.connect" and isinstance(args[1], tuple):
        host = args[1][0]
    else:
        return
    if host in (None, "", b"", "localhost"):
        return
    try:
        if ipaddress.ip_address(str(host)).is_loopback:
            return
    except ValueError:
        pass
    OFF_MACHINE.append(f"{event} {host!r}")
    raise OSError("off-machine network refused by the probe")


def main(base_url: str, out: Path, telemetry: bool) -> None:
    sys.addaudithook(_guard)
    import trio

    from adapters.llm.bridge import AsyncioOrchestratorBridge
    from adapters.llm.crewai import TELEMETRY_OFF, CrewAIOrchestrator
    from adapters.roster import Roster
    from kernel import ConcurrentDeliberationService, ContextBundle

    report: dict[str, Any] = {}
    roster = Roster.default(3)
    orchestrator = CrewAIOrchestrator(
        roster, base_url=base_url, model="fake-model", telemetry=telemetry
    )
    assert "crewai" not in sys.modules, "crewai imported before the orchestrator was opened"
    report["env_before_import"] = {k: os.environ.get(k) for k in TELEMETRY_OFF}

    async def deliberate() -> int:
        async with AsyncioOrchestratorBridge(orchestrator) as bridge:
            before = set(sys.modules)
            result = await ConcurrentDeliberationService(bridge).invoke_concurrent(
                roster.requests(ContextBundle("t", "Adopt the budget?"))
            )
            report["modules_imported_in_first_batch"] = sorted(set(sys.modules) - before)
            report["crewai_threads"] = [
                t.name for t in threading.enumerate() if t.name.startswith("CrewAI")
            ]
            return result.success_count

    report["success_count"] = trio.run(deliberate)
    from crewai.telemetry import Telemetry

    report["telemetry_ready"] = Telemetry().ready
    report["litellm_loaded"] = "litellm" in sys.modules
    report["off_machine"] = OFF_MACHINE
    out.write_text(json.dumps(report))


if __name__ == "__main__":
    telemetry = "--telemetry" in sys.argv[3:]
    main(sys.argv[1], Path(sys.argv[2]), telemetry)
    if telemetry:
        # Opted in, CrewAI's telemetry exports its spans at exit, retrying for ~10 s
        # against the audit hook's refusals: the report is written, skip the exit hooks.
        os._exit(0)
