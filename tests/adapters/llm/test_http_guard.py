"""A hostile server cannot hang an agent, exhaust memory, or redirect a prompt elsewhere.

Through the real path: :class:`~adapters.llm.openai_chat.OpenAIChatOrchestrator` (whose
HTTP client :mod:`adapters.llm.http_guard` builds), the openai SDK and the trio-asyncio
bridge, against the loopback server's hostile faults (tests/support/fake_openai.py).  Each
mode must end in one clear failure per agent within ``timeout_s`` plus a margin that
holds on a loaded machine, with the process's memory growth bounded.  Every test runs on
both transports the orchestrator offers (httpx2, the SDK's aiohttp): the guard sits under
either.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import trio

from adapters.llm.bridge import AsyncioOrchestratorBridge
from adapters.llm.http_guard import DEFAULT_MAX_RESPONSE_BYTES
from adapters.llm.openai_chat import OpenAIChatOrchestrator
from kernel import AgentPool, ConcurrentDeliberationService, ConcurrentResult, HaltSwitch
from tests.support.fake_openai import FakeOpenAIServer
from tests.support.helpers import PeakRss, make_requests
from tests.support.url_secrets import SECRET, assert_never_shown

TRANSPORTS = ("httpx", "aiohttp")
TIMEOUT_S = 2.0
MARGIN_S = 5.0  # generous: a loaded 2-core machine
GIB = 2**30
CAP = f"over the {DEFAULT_MAX_RESPONSE_BYTES}-byte cap"


_transport = {"name": "httpx"}


@pytest.fixture(autouse=True, params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> Iterator[str]:
    """The transport each test's orchestrators use (``run_batch``)."""
    _transport["name"] = request.param
    yield request.param
    _transport["name"] = "httpx"


async def run_batch(
    server: FakeOpenAIServer, agents: int, **settings: Any
) -> tuple[ConcurrentResult, float]:
    """One batch of ``agents`` against ``server``; the result and its wall-clock time.
    Fails (rather than hangs) if it runs far past the timeout."""
    defaults: dict[str, Any] = {
        "timeout_s": TIMEOUT_S,
        "backoff_base_s": 0.001,
        "backoff_cap_s": 0.005,
        "transport": _transport["name"],
    }
    orchestrator = OpenAIChatOrchestrator(server.base_url, "fake-model", **defaults | settings)
    started = time.monotonic()
    with trio.fail_after(20):
        async with AsyncioOrchestratorBridge(orchestrator) as bridge:
            service = ConcurrentDeliberationService(bridge, HaltSwitch(), AgentPool())
            result = await service.invoke_concurrent(make_requests(agents))
    return result, time.monotonic() - started


def messages(result: ConcurrentResult) -> list[str]:
    return [f.message for f in result.failures]


@pytest.fixture
def other_server() -> Iterator[FakeOpenAIServer]:
    """A second loopback server: another origin."""
    server = FakeOpenAIServer().start()
    yield server
    server.stop()


async def test_a_trickling_body_times_out_at_timeout_s_not_per_read(
    llm_server: FakeOpenAIServer,
) -> None:
    llm_server.default = ("trickle", 0.5)  # a byte every half second: every read is quick
    result, elapsed = await run_batch(llm_server, 1, max_retries=0)
    assert result.success_count == 0
    assert "timed out after 1 attempt(s)" in messages(result)[0], messages(result)
    assert TIMEOUT_S - 0.5 <= elapsed < TIMEOUT_S + MARGIN_S
    assert llm_server.wait_for(lambda s: s.disconnects == 1)  # its connection closed


async def test_a_100_continue_storm_times_out_at_timeout_s_without_burning_a_core(
    llm_server: FakeOpenAIServer,
) -> None:
    llm_server.default = ("continue_storm", 0.002)  # 500 interim answers a second
    cpu = time.thread_time()  # this thread runs trio, asyncio and the SDK; the server not
    result, elapsed = await run_batch(llm_server, 1, max_retries=0)
    cpu = time.thread_time() - cpu
    assert "timed out after 1 attempt(s)" in messages(result)[0], messages(result)
    assert TIMEOUT_S - 0.5 <= elapsed < TIMEOUT_S + MARGIN_S
    assert cpu < 0.5 * elapsed, f"{cpu:.2f} s of CPU in {elapsed:.2f} s"


@pytest.mark.parametrize(
    ("fault", "where"),
    [
        (("huge_body", 300 * 2**20), "on the wire"),
        (("gzip_bomb", GIB), "inflated"),
        (("deflate_bomb", GIB), "inflated"),
        ("endless_chunked", "on the wire"),
        ("endless_sse", "on the wire"),
    ],
)
async def test_a_body_over_the_cap_is_refused_once_in_bounded_memory(
    llm_server: FakeOpenAIServer, fault: Any, where: str
) -> None:
    llm_server.default = fault
    with PeakRss() as rss:
        result, elapsed = await run_batch(llm_server, 1, max_retries=3)
    assert messages(result) == [
        f"agent 'archon-1' (fake-model at {llm_server.base_url}): response body {CAP} "
        f"{where} (max_response_bytes); not retried"
    ]
    assert llm_server.attempts["archon-1"] == 1
    assert elapsed < TIMEOUT_S + MARGIN_S
    assert rss.growth_mb < 150, f"{rss.growth_mb:.0f} MB"


async def test_72_agents_against_a_gzip_bomb_each_fail_alone_in_bounded_memory(
    llm_server: FakeOpenAIServer,
) -> None:
    llm_server.default = ("gzip_bomb", GIB)  # 72 GiB, were it inflated
    with PeakRss() as rss:
        result, elapsed = await run_batch(llm_server, 72)
    assert len(result.failures) == 72
    assert all(CAP in m for m in messages(result))
    assert elapsed < TIMEOUT_S + MARGIN_S
    assert rss.growth_mb < 400, f"{rss.growth_mb:.0f} MB"


async def test_72_trickled_agents_all_time_out_at_timeout_s(llm_server: FakeOpenAIServer) -> None:
    llm_server.default = ("trickle", 0.5)
    result, elapsed = await run_batch(llm_server, 72, max_retries=0)
    assert len(result.failures) == 72
    assert all("timed out after 1 attempt(s)" in m for m in messages(result))
    assert TIMEOUT_S - 0.5 <= elapsed < TIMEOUT_S + MARGIN_S


async def test_a_redirect_is_refused_naming_its_location_and_never_followed(
    llm_server: FakeOpenAIServer, other_server: FakeOpenAIServer
) -> None:
    elsewhere = f"http://user:pw@127.0.0.1:{other_server.port}/v1/chat/completions?q=s3cret"
    llm_server.default = ("redirect", elsewhere)
    result, _ = await run_batch(llm_server, 1)
    (message,) = messages(result)
    shown = f"http://***@127.0.0.1:{other_server.port}/v1/chat/completions?q=***"
    assert f"HTTP 307 redirect to {shown} refused" in message, message
    assert "not retried" in message
    assert "s3cret" not in message and "pw@" not in message
    assert llm_server.attempts["archon-1"] == 1
    assert other_server.requests_total == 0  # the prompt went nowhere else


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "raw-deflate"])
async def test_a_compressed_answer_is_inflated(llm_server: FakeOpenAIServer, encoding: str) -> None:
    llm_server.default = ("encoded", encoding)
    result, _ = await run_batch(llm_server, 1)
    assert result.success_count == 1, messages(result)
    assert result.outputs[0].content.startswith("archon-1 votes aye")
    assert llm_server.headers[0]["accept-encoding"] == "gzip, deflate"


async def test_an_encoding_the_client_did_not_ask_for_is_refused(
    llm_server: FakeOpenAIServer,
) -> None:
    llm_server.default = ("encoded", "br")
    result, _ = await run_batch(llm_server, 1)
    (message,) = messages(result)
    assert "Content-Encoding 'br' refused (this client asks for gzip, deflate only)" in message
    assert message.endswith("; not retried")


async def test_a_request_through_a_proxy_from_the_environment_is_bounded_too(
    llm_server: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch, transport: str
) -> None:
    """httpx gives each proxy of the environment a transport of its own: guarded too."""
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{llm_server.port}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    llm_server.default = ("gzip_bomb", GIB)
    orchestrator = OpenAIChatOrchestrator(
        "http://llm.invalid/v1", "fake-model", timeout_s=5, transport=transport
    )
    with trio.fail_after(20):
        async with AsyncioOrchestratorBridge(orchestrator) as bridge:
            result = await ConcurrentDeliberationService(bridge).invoke_concurrent(make_requests(1))
    assert llm_server.attempts["archon-1"] == 1  # it did go through the proxy
    assert f"{CAP} inflated" in messages(result)[0], messages(result)


async def test_an_answer_in_several_gzip_members_is_inflated_whole(
    llm_server: FakeOpenAIServer,
) -> None:
    llm_server.default = ("encoded", "gzip-members")
    result, _ = await run_batch(llm_server, 1)
    assert result.success_count == 1, messages(result)
    assert result.outputs[0].content.startswith("archon-1 votes aye")


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_bytes_after_the_end_of_a_compressed_body_are_refused_not_ignored(
    llm_server: FakeOpenAIServer, encoding: str
) -> None:
    llm_server.default = ("encoded", f"{encoding}-trailing")
    result, _ = await run_batch(llm_server, 1, max_retries=0)
    (message,) = messages(result)
    assert f"data after the end of the {encoding} body" in message, message


async def test_a_redirect_to_a_huge_location_is_named_in_a_short_message(
    llm_server: FakeOpenAIServer, transport: str
) -> None:
    llm_server.default = ("redirect", f"http://elsewhere.test/?token={SECRET}" + "a" * 60_000)
    result, _ = await run_batch(llm_server, 1)
    (message,) = messages(result)
    if transport == "httpx":
        assert "HTTP 307 redirect to http://elsewhere.test/?token=***" in message, message[:300]
    else:  # aiohttp refuses a header line over 8190 bytes before the guard sees it
        assert "response head refused by the HTTP client (ClientResponseError" in message
    assert message.endswith("; not retried") and llm_server.attempts["archon-1"] == 1
    assert len(message) < 1_000, len(message)
    assert_never_shown(SECRET, [message])


async def test_a_body_shorter_than_its_content_length_is_a_failure_never_an_answer(
    llm_server: FakeOpenAIServer,
) -> None:
    llm_server.default = ("short_body", 10_000)  # the start of an answer, then closed
    result, elapsed = await run_batch(llm_server, 2, max_retries=1)
    assert result.success_count == 0
    # A connection that broke mid-body: retried (nothing was taken), then given up.
    assert all("connection failed after 2 attempt(s)" in m for m in messages(result)), messages(
        result
    )
    assert elapsed < TIMEOUT_S + MARGIN_S  # the close ends it, not the deadline
