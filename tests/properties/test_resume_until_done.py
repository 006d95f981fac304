"""Stop a deliberation at random (SIGKILL of its process, or a halt), resume it until it
is done: every agent's answer is committed exactly once, the chain holds, the final
result is one outcome per request, and the provider is called once more only for the
agents without a committed answer when the run began."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.witness.sqlite import SqliteWitness, verify_log
from kernel import (
    ConcurrentDeliberationService,
    ConcurrentResult,
    HaltSwitch,
    SystemHaltedError,
)
from tests.cli.test_resume import wait_until_committed
from tests.support.cli import (
    CONCLAVE,
    announced_batch,
    conclave,
    halt_from_cli,
    wait_deliberating,
)
from tests.support.fake_openai import FakeOpenAIServer
from tests.support.helpers import (
    ScriptedOrchestrator,
    Step,
    assert_one_outcome_per_request_in_order,
    make_requests,
)
from tests.support.witness_helpers import select

#: Subprocess examples cost seconds each; CONCLAVE_RESUME_EXAMPLES runs more of them.
CRASH_EXAMPLES = int(os.environ.get("CONCLAVE_RESUME_EXAMPLES", "3"))

# One stop: ("kill" | "halt", how many of the agents still to answer answer in this run
# (the others hang), how many commits of this run to wait for before stopping).
stops = st.tuples(st.sampled_from(["kill", "halt"]), st.integers(0, 5), st.integers(0, 5))


def _per_agent(db: Path) -> dict[str, int]:
    """How many outputs each agent has in the log (none: no log yet)."""
    if not db.exists():
        return {}
    return dict(select(db, "SELECT agent_id, count(*) FROM outputs GROUP BY agent_id"))


class Deliberation:
    """``conclave deliberate`` runs of one council against the loopback server, each
    stopped (SIGKILL or a halt then a clear) or let finish."""

    def __init__(self, server: FakeOpenAIServer, workdir: Path, agents: list[str]) -> None:
        self.server, self.agents = server, agents
        self.db, self.halt_file = workdir / "w.db", workdir / "halt.json"
        self.roster = workdir / "council.toml"
        self.roster.write_text("".join(f'[[agents]]\nagent_id = "{a}"\n' for a in agents))
        self.transcript = workdir / "t.json"
        self.batch: str | None = None

    def args(self) -> list[str]:
        resume = ["--resume", self.batch] if self.batch is not None else []
        return [
            "deliberate", "--backend", "openai", "--base-url", self.server.base_url,
            "--model", "m", "--roster", str(self.roster), "--witness-db", str(self.db),
            "--halt-file", str(self.halt_file), "--json", str(self.transcript), *resume,
        ]  # fmt: skip

    def calls(self) -> dict[str, int]:
        """Provider calls so far, by agent (the reachability probe is nobody's)."""
        return {a: self.server.attempts.get(a, 0) for a in self.agents}

    def committed(self) -> set[str]:
        return set(_per_agent(self.db))

    def stopped_run(self, how: str, answering: int, wait_for: int) -> None:
        """One run in which ``answering`` of the agents still to answer answer (the rest
        hang), stopped once ``wait_for`` of its answers are committed."""
        before = self.committed()
        remaining = [a for a in self.agents if a not in before]
        answering = min(answering, len(remaining) - 1)  # one hangs: the run cannot finish
        for agent in remaining[answering:]:
            self.server.script(agent, "hang")
        with subprocess.Popen(
            [*CONCLAVE, *self.args()], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
        ) as proc:
            try:
                assert proc.stderr is not None
                wait_deliberating(proc)
                batch = announced_batch(proc)
                assert self.batch in (None, batch)
                wait_until_committed(self.db, len(before) + min(wait_for, answering))
                if how == "kill":
                    proc.send_signal(signal.SIGKILL)
                else:
                    halt_from_cli(self.halt_file, "operator stop")
                proc.communicate(timeout=30)
            finally:
                proc.kill()
        self.server.unscript()
        if how == "halt":
            cleared = conclave(
                "clear", "--halt-file", str(self.halt_file), "--approver", "alice",
                "--approver", "bob", "--reason", "checked",
            )  # fmt: skip
            assert cleared.returncode == 0, cleared.stderr
        if self.committed():
            self.batch = batch
        elif self.batch is None:
            # Nothing committed: nothing of the batch is in the log, so it cannot be
            # resumed (refused, nobody called); the operator runs it again.
            calls = self.calls()
            refused = conclave(*self.args(), "--resume", batch)
            assert refused.returncode == 2 and "nothing of batch" in refused.stderr
            assert self.calls() == calls

    def final_run(self) -> dict[str, object]:
        proc = conclave(*self.args())
        assert proc.returncode == 0, proc.stderr
        doc: dict[str, object] = json.loads(self.transcript.read_text())
        return doc


@pytest.mark.slow
@pytest.mark.timeout(60 + 60 * CRASH_EXAMPLES)  # each example runs several processes
@settings(
    max_examples=CRASH_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(size=st.integers(2, 5), rounds=st.lists(stops, min_size=1, max_size=2))
def test_killed_or_halted_at_random_then_resumed_until_done_pays_for_nothing_twice(
    llm_server: FakeOpenAIServer, size: int, rounds: list[tuple[str, int, int]]
) -> None:
    server = llm_server
    server.reset()  # once per example: the fixture resets it once per test
    agents = [f"agent-{i}" for i in range(size)]
    with tempfile.TemporaryDirectory() as workdir:
        run = Deliberation(server, Path(workdir), agents)
        for how, answering, wait_for in rounds:
            calls_before, committed_before = run.calls(), run.committed()
            run.stopped_run(how, answering, wait_for)
            for agent in committed_before:  # a committed agent is never called again
                assert run.calls()[agent] == calls_before[agent]
        calls_before, committed_before = run.calls(), run.committed()
        doc = run.final_run()
        called = {a: run.calls()[a] - calls_before[a] for a in agents}
        assert called == {a: 0 if a in committed_before else 1 for a in agents}
        outcomes = doc["outcomes"]
        assert isinstance(outcomes, list)
        assert [o["agent_id"] for o in outcomes] == agents
        assert all(o["status"] == "completed" for o in outcomes)
        assert {o["agent_id"] for o in outcomes if o["resumed"]} == committed_before
        assert _per_agent(run.db) == dict.fromkeys(agents, 1)
        assert select(run.db, "SELECT DISTINCT batch_id FROM outputs") == [(doc["batch_id"],)]
        assert verify_log(run.db).ok


# ---------------------------------------------------------------- in process, many halts


def _halt_after(switch: HaltSwitch, done: int) -> Callable[[int, int, str, str], None]:
    """An on_progress that halts once ``done`` agents of the batch have an outcome."""

    def progress(reported: int, _total: int, _agent: str, _status: str) -> None:
        if reported >= done:
            switch.halt("stop")

    return progress


def _halt_now(switch: HaltSwitch) -> Callable[[str], None]:
    def halt(_agent: str) -> None:
        switch.halt("stop")

    return halt


@pytest.mark.slow
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    size=st.integers(1, 12),
    rounds=st.lists(st.tuples(st.integers(0, 12), st.integers(0, 12)), max_size=3),
    quorum=st.none() | st.integers(1, 12),
)
def test_halted_at_random_and_resumed_until_done_each_agent_answers_once(
    size: int, rounds: list[tuple[int, int]], quorum: int | None
) -> None:
    """Each round: some of the agents still to answer answer, the rest hang; a halt comes
    after a random number of answers; it is cleared and the batch resumed.  A quorum on
    the final run counts the resumed answers."""
    quorum = None if quorum is None else min(quorum, size)
    requests = make_requests(size)
    agents = [r.agent_id for r in requests]

    async def main(db: Path) -> None:
        switch = HaltSwitch()
        batch = None
        async with SqliteWitness(db) as witness:
            for answering, halt_after in rounds:
                committed = set(_per_agent(db))
                remaining = [a for a in agents if a not in committed]
                hang = remaining[min(answering, len(remaining)) :]
                orchestrator = ScriptedOrchestrator({a: Step(action="forever") for a in hang})
                stop_at = min(halt_after, len(remaining) - len(hang))
                progress = _halt_after(switch, len(committed) + stop_at)
                if stop_at == 0 and hang:
                    orchestrator.on_start = _halt_now(switch)
                service = ConcurrentDeliberationService(orchestrator, switch, witness=witness)
                try:
                    result = await service.invoke_concurrent(
                        requests, on_progress=progress, resume=batch
                    )
                except SystemHaltedError as exc:
                    assert exc.partial is not None
                    result = exc.partial
                # Called: only the agents without a committed answer when the run began.
                assert set(orchestrator.invoked) <= set(remaining)
                if _per_agent(db):
                    batch = result.batch_id
                if switch.halted:
                    switch.clear(approvers=("alice", "bob"), reason="checked")
            committed = set(_per_agent(db))
            orchestrator = ScriptedOrchestrator()
            service = ConcurrentDeliberationService(orchestrator, switch, witness=witness)
            final: ConcurrentResult = await service.invoke_concurrent(
                requests, resume=batch if committed else None, quorum=quorum
            )
        assert_one_outcome_per_request_in_order(requests, final)
        invoked = set(orchestrator.invoked)
        if quorum is None:
            assert invoked == set(agents) - committed
        else:  # a quorum the resumed answers reach calls nobody
            assert invoked <= set(agents) - committed
            assert not invoked or len(committed) < quorum
        resumed = {o.agent_id for o in final.outputs if o.metadata.get("resumed") is True}
        assert resumed == committed
        if quorum is None:
            assert final.success_count == size
        assert set(_per_agent(db).values()) <= {1}
        assert verify_log(db).ok

    with tempfile.TemporaryDirectory() as workdir:
        trio.run(main, Path(workdir) / "w.db")
