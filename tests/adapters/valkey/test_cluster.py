"""Several processes, one Valkey server, one loopback OpenAI-compatible server.

Workers are real processes: ``conclave deliberate`` itself, or tests/support/valkey_worker.py
(wired the same way, but it stays up for several batches and reports timings).  The
loopback server runs in this process and counts what is in flight; its counters are the
ground truth for FR10 across processes.  This process is also "a fourth process" that
raises and clears the halt.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from adapters.valkey import ValkeyCapacity, ValkeyHaltChannel
from kernel import AgentPoolExhaustedError
from tests.support import ROOT
from tests.support.fake_openai import FakeOpenAIServer
from tests.support.valkey_server import ValkeyServer

pytestmark = pytest.mark.slow

APPROVERS = ["alice", "bob"]


class Worker:
    """One worker process and the JSON lines it writes."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    async def next(self, event: str) -> dict[str, Any]:
        """The worker's next line of this event (others are skipped)."""
        assert self.proc.stdout is not None
        with trio.fail_after(20):
            while True:
                line = await trio.to_thread.run_sync(
                    self.proc.stdout.readline, abandon_on_cancel=True
                )
                if not line:
                    err = self.proc.stderr.read() if self.proc.stderr else ""
                    raise AssertionError(
                        f"worker exited ({self.proc.poll()}) before {event}:\n{err}"
                    )
                doc: dict[str, Any] = json.loads(line)
                if doc.get("event") == event:
                    return doc

    async def exit_code(self) -> int:
        with trio.fail_after(20):
            return await trio.to_thread.run_sync(self.proc.wait, abandon_on_cancel=True)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def spawn() -> Iterator[Callable[[list[str]], Worker]]:
    workers: list[Worker] = []

    def start(argv: list[str]) -> Worker:
        workers.append(Worker(argv))
        return workers[-1]

    yield start
    for worker in workers:
        worker.kill()


def worker_argv(url: str, base_url: str, prefix: str, **options: object) -> list[str]:
    argv = [
        sys.executable,
        "-m",
        "tests.support.valkey_worker",
        "--valkey",
        url,
        "--base-url",
        base_url,
    ]
    argv += ["--prefix", prefix]
    for option, value in options.items():
        argv += [f"--{option.replace('_', '-')}", str(value)]
    return argv


def conclave_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "adapters.cli", *args]


async def until(server: FakeOpenAIServer, predicate: Callable[[FakeOpenAIServer], bool]) -> None:
    """Wait (in a thread: the server signals a condition variable) for ``predicate``."""
    ok = await trio.to_thread.run_sync(server.wait_for, predicate, 20.0)
    seen = f"{server.requests_total} requests, {server.in_flight} in flight"
    assert ok, f"the loopback server never got there ({seen})"


@asynccontextmanager
async def halt_channel(url: str, key: str = "conclave:halt") -> AsyncIterator[ValkeyHaltChannel]:
    """This process's own channel, cleared by two approvers."""
    async with ValkeyHaltChannel(url, key=key) as channel:
        await channel.clear(approvers=APPROVERS, reason="test start")
        yield channel


@pytest.fixture
def names(valkey_server: ValkeyServer) -> dict[str, str]:
    """A capacity name in service (no recovery grace) and a halt key."""
    tag = uuid.uuid4().hex[:8]
    valkey_server.seed_capacity(f"cap-{tag}")
    return {"name": f"cap-{tag}", "key": f"halt-{tag}"}


# ---------------------------------------------------------------- FR10 across processes


async def test_three_workers_in_reject_mode_one_is_admitted_whole_two_refused_whole(
    valkey_server: ValkeyServer,
    llm_server: FakeOpenAIServer,
    spawn: Callable[[list[str]], Worker],
    names: dict[str, str],
) -> None:
    llm_server.default = ("latency", 0.3)  # the first batch still runs when the others ask
    async with halt_channel(valkey_server.url, names["key"]) as channel:
        await channel.halt("hold until every worker is ready")
        workers = [
            spawn(
                worker_argv(
                    valkey_server.url, llm_server.base_url, f"r{i}", overflow="reject", **names
                )
            )
            for i in range(3)
        ]
        for worker in workers:
            await worker.next("ready")
        probes = llm_server.requests_total
        await channel.clear(approvers=APPROVERS, reason="go")
        rounds = [await worker.next("round") for worker in workers]
    admitted = [r for r in rounds if r.get("succeeded") == 72]
    refused = [r for r in rounds if "refused" in r]
    assert len(admitted) == 1 and len(refused) == 2, rounds
    assert all(
        "shared capacity exhausted: 72 in use + 72 requested > 72" in r["refused"] for r in refused
    )
    assert llm_server.requests_total - probes == 72  # the refused took nothing, sent nothing
    assert llm_server.max_in_flight <= 72
    assert sorted([await w.exit_code() for w in workers]) == [0, 2, 2]


async def test_three_workers_queue_batches_at_once_and_never_exceed_a_smaller_shared_capacity(
    valkey_server: ValkeyServer,
    llm_server: FakeOpenAIServer,
    spawn: Callable[[list[str]], Worker],
    names: dict[str, str],
) -> None:
    """Each worker's 24-agent batch asks for its 24 leases in one call, all three at once,
    on a capacity of 10: the first answers are held until 10 requests are open (the cluster
    fills its capacity), and never more are open at once; every agent is served."""
    llm_server.barrier_size = 10
    llm_server.default = "barrier"
    llm_server.models_fault = "ok"
    async with halt_channel(valkey_server.url, names["key"]) as channel:
        await channel.halt("hold until every worker is ready")
        workers = [
            spawn(
                worker_argv(
                    valkey_server.url,
                    llm_server.base_url,
                    f"q{i}",
                    agents=24,
                    shared_capacity=10,
                    **names,
                )
            )
            for i in range(3)
        ]
        for worker in workers:
            await worker.next("ready")
        probes = llm_server.requests_total
        await channel.clear(approvers=APPROVERS, reason="go")
        rounds = [await worker.next("round") for worker in workers]
    assert [r.get("succeeded") for r in rounds] == [24, 24, 24], rounds
    assert llm_server.requests_total - probes == 72
    assert llm_server.max_in_flight == 10
    assert [await w.exit_code() for w in workers] == [0, 0, 0]
    async with ValkeyCapacity(valkey_server.url, name=names["name"], capacity=10) as capacity:
        await capacity.flush()
        assert capacity.in_use() == 0  # every slot came back


async def test_conclave_deliberate_refuses_whole_when_the_cluster_is_full(
    valkey_server: ValkeyServer, llm_server: FakeOpenAIServer, tmp_path: Path
) -> None:
    """The CLI path: another process holds one slot of 72; 72 agents are refused whole."""
    common = ["deliberate", "--backend", "openai", "--base-url", llm_server.base_url]
    common += ["--model", "m", "--valkey", valkey_server.url, "--shared-capacity", "72"]
    async with (
        halt_channel(valkey_server.url),
        ValkeyCapacity(valkey_server.url, capacity=72) as elsewhere,
    ):
        await elsewhere.reserve(["held-by-another-replica"])
        proc = await trio.run_process(
            conclave_argv(*common, "--quiet"),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            cwd=ROOT,
        )
        assert proc.returncode == 2, proc.stderr
        assert b"FR10: shared capacity exhausted: 1 in use + 72 requested > 72" in proc.stderr
        assert llm_server.requests_total == 2  # the reachability probe, the model listing: no agent
        elsewhere.release("held-by-another-replica")
        await elsewhere.flush()
        transcript = tmp_path / "run.json"
        proc = await trio.run_process(
            conclave_argv(*common, "--quiet", "--json", str(transcript)),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            cwd=ROOT,
        )
    assert proc.returncode == 0, proc.stderr
    assert b"cluster 0/72 in use" in proc.stdout
    doc = json.loads(transcript.read_text())
    assert doc["pool_after"]["shared_capacity"] == 72 and doc["pool_after"]["shared_in_use"] == 0


# ---------------------------------------------------------------- halt across processes


async def test_a_halt_from_a_fourth_process_stops_three_conclave_runs(
    valkey_server: ValkeyServer, llm_server: FakeOpenAIServer
) -> None:
    llm_server.default = "hang"
    llm_server.models_fault = "ok"  # the reachability probe is answered
    url = valkey_server.url
    args = ["deliberate", "--backend", "openai", "--base-url", llm_server.base_url, "--model"]
    args += ["m", "--valkey", url, "--shared-capacity", "72", "--agents", "24", "--quiet"]
    async with halt_channel(url):
        runs = [Worker(conclave_argv(*args)) for _ in range(3)]
        try:
            # 3 probes and 3 model listings answered, then 3 x 24 agents hanging: the
            # cluster is full.
            await until(llm_server, lambda s: s.requests_total == 78 and s.in_flight == 72)
            halt = await trio.run_process(
                conclave_argv("halt", "--valkey", url, "--reason", "stop the council"),
                capture_stdout=True,
                check=False,
                cwd=ROOT,
            )
            assert halt.returncode == 0 and halt.stdout.startswith(b"halted: stop the council")
            codes = [await run.exit_code() for run in runs]
            outs = [run.proc.stdout.read() if run.proc.stdout else "" for run in runs]
        finally:
            for run in runs:
                run.kill()
    assert codes == [3, 3, 3]
    assert all("HALTED" in out for out in outs), outs
    await until(llm_server, lambda s: s.in_flight == 0 and s.disconnects == 72)
    status = await trio.run_process(
        conclave_argv("status", "--valkey", url), capture_stdout=True, check=False, cwd=ROOT
    )
    assert status.returncode == 3 and b"HALTED: stop the council" in status.stdout


async def test_three_workers_drain_everything_then_a_halt_stops_every_worker_s_batch(
    valkey_server: ValkeyServer,
    llm_server: FakeOpenAIServer,
    spawn: Callable[[list[str]], Worker],
    names: dict[str, str],
) -> None:
    """Three workers, 72-agent batches in queue mode on one capacity of 72.  First every
    agent of every worker is served, exactly 72 at once at the peak (the server holds the
    first answers until 72 requests are open: the cluster fills its capacity and never
    exceeds it).  Then, batch after batch with every request hanging, this process halts:
    each worker's batch stops (every request cancelled), and each worker ends with exit
    code 3.  How fast is measured by the ``cluster`` benchmark, not here: the bound below
    only says the halt, not a timeout, ended requests that would otherwise hang forever."""
    trials = 5
    llm_server.barrier_size = 72
    llm_server.default = "barrier"
    llm_server.models_fault = "ok"  # the reachability probe is answered
    async with halt_channel(valkey_server.url, names["key"]) as channel:
        await channel.halt("hold until every worker is ready")
        workers = [
            spawn(
                worker_argv(
                    valkey_server.url, llm_server.base_url, f"h{i}", rounds=1 + trials, **names
                )
            )
            for i in range(3)
        ]
        for worker in workers:
            await worker.next("ready")
        probes = llm_server.requests_total
        await channel.clear(approvers=APPROVERS, reason="go")
        rounds = [await worker.next("round") for worker in workers]
        assert [r.get("succeeded") for r in rounds] == [72, 72, 72]
        assert llm_server.requests_total - probes == 216
        assert llm_server.max_in_flight == 72

        llm_server.default = "hang"
        await channel.halt("between rounds")
        worst = []
        for trial in range(trials):
            await channel.clear(approvers=APPROVERS, reason=f"trial {trial}")
            await until(llm_server, lambda s: s.in_flight == 72)
            t0 = time.time()
            await channel.halt(f"trial {trial}")
            rounds = [await worker.next("round") for worker in workers]
            assert all(r["halted"] == f"trial {trial}" for r in rounds), rounds
            worst.append(max(r["stopped_at"] for r in rounds) - t0)
            await until(llm_server, lambda s: s.in_flight == 0)
    assert [await w.exit_code() for w in workers] == [3, 3, 3]
    assert llm_server.max_in_flight <= 72
    assert max(worst) < 10.0, worst


# ---------------------------------------------------------------- failures


async def test_a_killed_worker_s_slots_come_back_after_lease_s_and_nothing_is_over_admitted(
    valkey_server: ValkeyServer,
    llm_server: FakeOpenAIServer,
    spawn: Callable[[list[str]], Worker],
    names: dict[str, str],
) -> None:
    lease_s = 1.0
    llm_server.default = "hang"
    llm_server.models_fault = "ok"  # the reachability probe is answered
    async with halt_channel(valkey_server.url, names["key"]) as channel:
        await channel.halt("hold until every worker is ready")
        workers = {
            prefix: spawn(
                worker_argv(
                    valkey_server.url, llm_server.base_url, prefix, lease_s=lease_s, **names
                )
            )
            for prefix in ("k0", "k1", "k2")
        }
        for worker in workers.values():
            await worker.next("ready")
        await channel.clear(approvers=APPROVERS, reason="go")
        await until(llm_server, lambda s: s.in_flight == 72)
        started = {
            p: sum(n for agent, n in llm_server.attempts.items() if agent.startswith(f"{p}-"))
            for p in workers
        }
        victim = max(started, key=lambda p: started[p])
        held = started[victim]
        os.kill(workers[victim].proc.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        await until(llm_server, lambda s: s.in_flight == 72 - held)  # its sockets closed
        # Its leases are still counted: the others wait until they expire, then take them.
        await until(llm_server, lambda s: s.in_flight == 72)
        recovery = time.monotonic() - killed_at
        await channel.halt("end of test")
        survivors = [w for p, w in workers.items() if p != victim]
        assert [await w.exit_code() for w in survivors] == [3, 3]
    assert llm_server.max_in_flight <= 72
    # Renewed every lease_s / 3, so expired between 2/3 and 1 lease_s after the kill,
    # then handed on by the next renewal's pump (at most lease_s / 3 later).
    assert 0.6 * lease_s <= recovery <= 2.5 * lease_s, recovery


async def test_server_stopped_mid_batch_halts_refuses_and_resumes_only_after_a_clear(
    llm_server: FakeOpenAIServer,
    spawn: Callable[[list[str]], Worker],
    names: dict[str, str],
) -> None:
    llm_server.default = "hang"
    llm_server.models_fault = "ok"  # the reachability probe is answered
    with ValkeyServer() as server:
        async with halt_channel(server.url, names["key"]) as channel:
            workers = [
                spawn(
                    worker_argv(
                        server.url,
                        llm_server.base_url,
                        f"s{i}",
                        agents=24,
                        rounds=2,
                        lease_s=1.0,  # the books are lost: one lease of grace after the clear
                        **names,
                    )
                )
                for i in range(3)
            ]
            for worker in workers:
                await worker.next("ready")
            await until(llm_server, lambda s: s.in_flight == 72)
            server.stop()
            rounds = [await worker.next("round") for worker in workers]
            assert all("unreachable" in r["halted"] for r in rounds), rounds
            await until(llm_server, lambda s: s.in_flight == 0)
            # New admissions are refused, with a clear error.
            async with ValkeyCapacity(server.url, name=names["name"]) as capacity:
                with pytest.raises(AgentPoolExhaustedError, match="shared capacity unreachable"):
                    await capacity.reserve(["new"])
            # Back, without its data: every worker reads "no halt record", and waits.
            llm_server.default = "ok"
            sent = llm_server.requests_total
            server.start()
            for worker in workers:
                while (await worker.next("state"))["problem"] != "no halt record":
                    pass
            assert llm_server.requests_total == sent
            await channel.clear(approvers=APPROVERS, reason="server replaced, checked")
            rounds = [await worker.next("round") for worker in workers]
    assert [r.get("succeeded") for r in rounds] == [24, 24, 24]
    assert [await w.exit_code() for w in workers] == [0, 0, 0]
