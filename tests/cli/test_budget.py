"""``--rpm/--tpm`` with ``--valkey URL`` (one budget for every replica), ``--replicas``,
and ``conclave status --valkey URL``'s cluster section (adapters.cli._budget)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from adapters.cli._budget import summary_line
from adapters.valkey import ValkeyProviderBudget
from tests.support.cli import conclave
from tests.support.fake_openai import FakeOpenAIServer
from tests.support.valkey_server import ValkeyServer, free_port


@pytest.fixture
def url() -> Iterator[str]:
    """A new server, its halt cleared by two approvers (a new server is halted)."""
    with ValkeyServer() as server:
        server.seed_capacity()
        both = ["--approver", "alice", "--approver", "bob"]
        cleared = conclave("clear", "--valkey", server.url, *both, "--reason", "set up")
        assert cleared.returncode == 0, cleared.stderr
        yield server.url


def openai(llm_server: FakeOpenAIServer, *extra: str) -> list[str]:
    return [
        "deliberate",
        "--backend",
        "openai",
        "--base-url",
        llm_server.base_url,
        "--model",
        "fake-model",
        "--quiet",
        *extra,
    ]


def test_rpm_with_valkey_shares_the_budget_and_status_shows_its_lanes(
    url: str, llm_server: FakeOpenAIServer
) -> None:
    run = conclave(*openai(llm_server, "--agents", "5", "--rpm", "600"), "--valkey", url,
                   "--replicas", "2")  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "5/5 succeeded" in run.stdout
    assert f"shared budget on {url}: shared by every replica" in run.stdout
    assert "warning" not in run.stderr

    status = conclave("status", "--valkey", url)
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert "cluster: 0 agent(s) in flight, 0 queued" in lines
    (lane,) = [line for line in lines if line.startswith("  budget ")]
    assert "600 requests/min" in lane and "5 turns handed out" in lane


def test_rpm_with_valkey_and_no_replicas_warns_that_a_fallback_would_be_the_full_limit(
    url: str, llm_server: FakeOpenAIServer
) -> None:
    run = conclave(*openai(llm_server, "--agents", "2", "--rpm", "600"), "--valkey", url)
    assert run.returncode == 0, run.stderr
    assert "--rpm/--tpm with --valkey and no --replicas" in run.stderr


@pytest.mark.parametrize(
    "extra",
    [
        ["--replicas", "3"],  # no --valkey
        ["--replicas", "3", "--valkey", "redis://127.0.0.1:1"],  # no --rpm/--tpm
        ["--replicas", "0", "--rpm", "60", "--valkey", "redis://127.0.0.1:1"],
    ],
)
def test_replicas_without_a_shared_budget_are_refused_before_running(
    llm_server: FakeOpenAIServer, extra: list[str]
) -> None:
    run = conclave(*openai(llm_server, "--agents", "2"), *extra)
    assert run.returncode == 2
    assert "--replicas" in run.stderr
    assert llm_server.requests_total == 0


def test_status_of_an_empty_cluster_says_no_budget_is_in_use(url: str) -> None:
    status = conclave("status", "--valkey", url)
    assert "  no shared provider budget in use" in status.stdout.splitlines()


async def test_the_summary_says_when_a_replica_paced_at_its_share() -> None:
    dead = f"redis://127.0.0.1:{free_port()}"
    async with ValkeyProviderBudget(dead, replicas=3, timeout=0.2) as budget:
        line = summary_line(budget)
    assert line is not None
    assert line.startswith(f"shared budget on {dead}: unreachable 1 time(s), ")
    assert line.endswith("at this replica's share (1/3 of the limits); still unreachable")
    assert summary_line(None) is None
