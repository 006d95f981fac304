"""The OpenAI orchestrator's requests and what it takes from an answer: a topic's message
is built once and shared; an answer too long or too deeply nested is that agent's clear
failure, never the caller's crash; every call streams, a halt stops the server's
generation, and a broken stream is a failure, never a truncated answer.

Through the real SDK and the trio-asyncio bridge against the loopback server in
tests/support/fake_openai.py; nothing here patches the client.
"""

from __future__ import annotations

import gc
import re
import subprocess
import sys
import tracemalloc
import weakref
from typing import Any

import pytest
import trio
import trio.testing

from adapters.llm.bridge import AsyncioOrchestratorBridge
from adapters.llm.openai_chat import (
    DEFAULT_MAX_CONTENT_CHARS,
    OpenAIChatOrchestrator,
    aiohttp_installed,
)
from kernel import (
    MAX_TOPIC_BYTES,
    AgentInvocationError,
    AgentPool,
    ConcurrentDeliberationService,
    ConcurrentResult,
    ContextBundle,
    FailureKind,
    HaltSwitch,
    InvalidRequestError,
)
from tests.support import ROOT
from tests.support.fake_openai import FakeOpenAIServer
from tests.support.helpers import client_bytes, make_context, make_requests, time_halt
from tests.support.hostile_parts import HUGE
from tests.support.url_secrets import SECRET, assert_never_shown
from tests.support.valkey_server import free_port


def orchestrator(server: FakeOpenAIServer, **kwargs: Any) -> OpenAIChatOrchestrator:
    settings: dict[str, Any] = {"timeout_s": 30.0, "max_retries": 0, **kwargs}
    return OpenAIChatOrchestrator(server.base_url, "fake-model", **settings)


async def wait_server(server: FakeOpenAIServer, predicate: Any) -> None:
    ok = await trio.to_thread.run_sync(server.wait_for, predicate, 20.0)
    assert ok, "server never reached the expected state"


def user_message(body: dict[str, Any]) -> str:
    return str(next(m["content"] for m in body["messages"] if m["role"] == "user"))


async def test_agents_on_one_topic_hold_one_copy_of_it_not_one_each(
    llm_server: FakeOpenAIServer,
) -> None:
    # Every in-flight request holds its encoded body (the SDK encodes each request); the
    # user message built from the topic is built once per topic and shared.
    n = 8
    llm_server.default = "hang"
    context = ContextBundle("big", "a" * MAX_TOPIC_BYTES)
    async with AsyncioOrchestratorBridge(orchestrator(llm_server)) as bridge:
        gc.collect()
        tracemalloc.start()
        try:
            before = client_bytes()
            async with trio.open_nursery() as nursery:
                for i in range(n):
                    nursery.start_soon(bridge.invoke, f"archon-{i}", context)
                await wait_server(llm_server, lambda s: s.requests_total >= n)
                held = client_bytes() - before
                nursery.cancel_scope.cancel()
        finally:
            tracemalloc.stop()
    per_agent = held / n / MAX_TOPIC_BYTES
    # One encoded body each (1x), and the shared message (1/n each); was 2x.
    assert per_agent < 1.5, f"{per_agent:.2f} x the topic per agent"


async def test_concurrent_topics_each_reach_their_own_agents(llm_server: FakeOpenAIServer) -> None:
    topics = [ContextBundle(f"t{k}", f"topic number {k}", {"k": str(k)}) for k in range(3)]
    async with (
        AsyncioOrchestratorBridge(orchestrator(llm_server)) as bridge,
        trio.open_nursery() as nursery,
    ):
        for k, context in enumerate(topics):
            for i in range(4):
                nursery.start_soon(bridge.invoke, f"agent-{k}-{i}", context)
    assert len(llm_server.bodies) == 12
    for body, headers in zip(llm_server.bodies, llm_server.headers, strict=True):
        n = headers["x-conclave-agent"].split("-")[1]
        assert user_message(body) == f"Topic t{n}:\n\ntopic number {n}\n\nContext:\n- k: {n}"


async def test_the_orchestrator_keeps_no_topic_alive_after_its_agents(
    llm_server: FakeOpenAIServer,
) -> None:
    context = ContextBundle("t", "a topic to forget")
    gone = weakref.ref(context)
    async with AsyncioOrchestratorBridge(orchestrator(llm_server)) as bridge:
        await bridge.invoke("archon-1", context)
        del context
        gc.collect()
        assert gone() is None


async def run_one(server: FakeOpenAIServer, **settings: object) -> ConcurrentResult:
    orchestrator = OpenAIChatOrchestrator(server.base_url, "fake-model", timeout_s=5, **settings)  # type: ignore[arg-type]
    async with AsyncioOrchestratorBridge(orchestrator) as bridge:
        return await ConcurrentDeliberationService(bridge).invoke_concurrent(make_requests(1))


async def test_a_deeply_nested_json_answer_is_a_malformed_response_naming_the_agent(
    llm_server: FakeOpenAIServer,
) -> None:
    llm_server.default = ("deep_json", 200_000)
    result = await run_one(llm_server)
    (failure,) = result.failures
    assert failure.message == (
        f"agent 'archon-1' (fake-model at {llm_server.base_url}): malformed response "
        "(JSON nested too deeply)"
    )
    assert failure.error_type == "AgentInvocationError"
    assert llm_server.attempts["archon-1"] == 1  # not retried


async def test_an_answer_over_the_content_cap_is_refused_and_the_cap_can_be_raised(
    llm_server: FakeOpenAIServer,
) -> None:
    llm_server.default = ("reply", "a" * 101)
    (failure,) = (await run_one(llm_server, max_content_chars=100)).failures
    assert failure.message.endswith("answer over the 100-character cap (max_content_chars)"), (
        failure.message
    )
    assert failure.message.startswith("agent 'archon-1' ")
    result = await run_one(llm_server, max_content_chars=101)
    assert result.outputs[0].content == "a" * 101


async def test_the_default_caps_take_a_long_answer_and_a_raised_byte_cap_takes_more(
    llm_server: FakeOpenAIServer,
) -> None:
    llm_server.default = ("reply", "a" * DEFAULT_MAX_CONTENT_CHARS)
    assert (await run_one(llm_server)).success_count == 1
    llm_server.default = ("reply", "a" * (9 * 2**20))  # a body over the default 8 MiB
    refused = await run_one(llm_server, max_content_chars=10 * 2**20)
    assert "(max_response_bytes); not retried" in refused.failures[0].message
    taken = await run_one(llm_server, max_content_chars=10 * 2**20, max_response_bytes=16 * 2**20)
    assert len(taken.outputs[0].content) == 9 * 2**20


@pytest.mark.parametrize("name", ["max_response_bytes", "max_content_chars"])
@pytest.mark.parametrize("value", [0, -1, 1.5, "8", True])
def test_a_cap_that_is_not_a_positive_int_is_refused(name: str, value: object) -> None:
    with pytest.raises(InvalidRequestError, match=name):
        OpenAIChatOrchestrator("http://127.0.0.1:1/v1", "m", **{name: value})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "setting", ["timeout_s", "backoff_base_s", "backoff_cap_s", "retry_after_cap_s"]
)
def test_an_orchestrator_setting_too_large_for_a_float_is_invalid(setting: str) -> None:
    """Guards against: ``OverflowError`` out of the constructor."""
    settings: dict[str, Any] = {setting: HUGE}
    with pytest.raises(InvalidRequestError, match=setting):
        OpenAIChatOrchestrator("http://127.0.0.1:9/v1", "m", **settings)


async def test_an_answer_holding_a_lone_surrogate_is_that_agents_failure(
    llm_server: FakeOpenAIServer,
) -> None:
    """Guards against: released as an output whose ``content_hash`` raised ``UnicodeEncodeError``
    (JSON can carry ``"\\ud800"``; the SDK does not refuse it)."""
    llm_server.default = ("content", "bad \ud800 answer")
    inner = OpenAIChatOrchestrator(llm_server.base_url, "m", timeout_s=5.0)
    async with AsyncioOrchestratorBridge(inner) as bridge:
        service = ConcurrentDeliberationService(bridge)
        result = await service.invoke_concurrent(make_requests(2))
    assert result.success_count == 0
    assert {f.kind for f in result.failures} == {FailureKind.ERROR}
    assert all("Unicode" in f.message for f in result.failures)


# ------------------------------------------------------------ streaming


async def halt_72_generating(
    server: FakeOpenAIServer, *, stream: bool, transport: str = "httpx"
) -> list[int]:
    """Halt 72 agents while the server generates for each (200 tokens at 100 a second),
    once all 72 are generating; the tokens generated after each client went away."""
    server.default = ("generate", 200, 100.0)
    halt = HaltSwitch()
    pool = AgentPool()
    settings = {"timeout_s": 600.0, "stream": stream, "transport": transport}
    async with AsyncioOrchestratorBridge(orchestrator(server, **settings)) as bridge:
        service = ConcurrentDeliberationService(bridge, halt, pool)
        err, _ = await time_halt(
            lambda: service.invoke_concurrent(make_requests(72)),
            halt,
            lambda: wait_server(server, lambda s: s.generating == 72),
        )
    assert err.partial is not None
    assert {f.kind for f in err.partial.failures} == {FailureKind.HALTED}
    await wait_server(server, lambda s: s.generating == 0)
    assert all(g.streaming is stream for g in server.generations)
    return [g.after_gone for g in server.generations]


async def test_a_halt_with_72_streams_open_stops_the_servers_generation(
    llm_server: FakeOpenAIServer,
) -> None:
    after = await halt_72_generating(llm_server, stream=True)
    # The server notices each closed stream at its next token at the latest.
    assert max(after) <= 2, after


async def test_without_streaming_the_server_generates_on_after_a_halt(
    llm_server: FakeOpenAIServer,
) -> None:
    # What stream=False costs: the server never sees the client go away and generates to
    # max_tokens.  All 72 were halted well before their 2 s of generation were over.
    after = await halt_72_generating(llm_server, stream=False)
    assert sum(after) > 72 * 50, sum(after)


async def test_a_call_streams_and_reports_usage_and_first_token_latency(
    llm_server: FakeOpenAIServer,
) -> None:
    llm_server.default = ("generate", 40, 100.0)  # 0.4 s of generation
    async with AsyncioOrchestratorBridge(orchestrator(llm_server)) as bridge:
        output = await bridge.invoke("archon-1", make_context())
    body = llm_server.bodies[0]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert output.content == "aye " * 40
    meta = output.metadata
    assert meta["usage"] == "reported" and meta["completion_tokens"] == 40
    assert meta["finish_reason"] == "stop"
    # The first token came as soon as it was generated, the answer at the end.
    assert 0 < float(meta["first_token_ms"]) <= float(meta["latency_ms"]) - 200.0


async def test_stream_false_sends_a_plain_request_and_reads_a_plain_answer(
    llm_server: FakeOpenAIServer,
) -> None:
    async with AsyncioOrchestratorBridge(orchestrator(llm_server, stream=False)) as bridge:
        output = await bridge.invoke("archon-1", make_context())
    assert "stream" not in llm_server.bodies[0]
    assert output.content.startswith("archon-1 votes aye")
    assert output.metadata["usage"] == "reported"
    assert float(output.metadata["first_token_ms"]) <= float(output.metadata["latency_ms"])


async def test_a_server_that_sends_no_usage_gets_an_estimate_marked_as_such(
    llm_server: FakeOpenAIServer,
) -> None:
    llm_server.default = ("stream_no_usage", 8)
    async with AsyncioOrchestratorBridge(orchestrator(llm_server)) as bridge:
        output = await bridge.invoke("archon-1", make_context())
    assert output.content.startswith("word0 word1 ")
    assert output.metadata["usage"] == "estimated"
    # 8 words of 6 bytes = 48 bytes: 12 tokens; the prompt's estimate is not zero.
    assert output.metadata["completion_tokens"] == 12
    assert int(output.metadata["prompt_tokens"]) > 0


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("claimed", [10**30, 10**400], ids=["1e30", "1e400"])
async def test_a_server_claiming_an_impossible_token_count_gets_an_estimate_marked_as_such(
    llm_server: FakeOpenAIServer, stream: bool, claimed: int
) -> None:
    # 10**400 does not fit a float (the budget's settlement raised OverflowError, failing
    # a good answer); 10**30 fits, and made every token counter and cost after it noise.
    llm_server.default = ("lie", {}, claimed)
    async with AsyncioOrchestratorBridge(orchestrator(llm_server, stream=stream)) as bridge:
        output = await bridge.invoke("archon-1", make_context())
    assert "votes aye" in output.content
    assert output.metadata["usage"] == "estimated"
    assert 0 < int(output.metadata["prompt_tokens"]) < 1000
    assert 0 < int(output.metadata["completion_tokens"]) < 1000


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize(
    "claimed",
    ["m\ud800", "m\x1b[2J\n", "m" * 100_000],
    ids=["lone-surrogate", "control-characters", "100k-chars"],
)
async def test_a_model_name_no_model_has_is_reported_as_the_model_asked_for(
    llm_server: FakeOpenAIServer, stream: bool, claimed: str
) -> None:
    # The answer's model name goes into metrics labels, span names, logs and transcripts:
    # a name that UTF-8 cannot encode made every later scrape and push of the process
    # fail; one with control characters or 100k characters is no model's either.
    llm_server.default = ("answer_model", claimed)
    async with AsyncioOrchestratorBridge(orchestrator(llm_server, stream=stream)) as bridge:
        output = await bridge.invoke("archon-1", make_context())
    assert "votes aye" in output.content
    assert output.metadata["model"] == "fake-model"


async def test_the_model_name_the_server_answers_with_is_reported(
    llm_server: FakeOpenAIServer,
) -> None:
    llm_server.default = ("answer_model", "gpt-4o-mini-2024-07-18")
    async with AsyncioOrchestratorBridge(orchestrator(llm_server)) as bridge:
        output = await bridge.invoke("archon-1", make_context())
    assert output.metadata["model"] == "gpt-4o-mini-2024-07-18"


async def test_a_server_that_answers_a_stream_request_whole_is_read_whole(
    llm_server: FakeOpenAIServer,
) -> None:
    # The hostile deep_json answer is plain JSON: the stream request is answered whole,
    # and judged as a whole answer is (here: malformed, as without streaming).
    llm_server.default = ("deep_json", 50)
    async with AsyncioOrchestratorBridge(orchestrator(llm_server)) as bridge:
        with pytest.raises(AgentInvocationError, match="malformed response"):
            await bridge.invoke("archon-1", make_context())


# Each way a stream can break -> the outcome: (fault, then what the server answers next,
# the error's words, the attempts the server saw).  Once a chunk came, the failure is
# final (a retry would pay for the generation again); before, it is retried.
BROKEN_STREAMS = [
    (
        ("stream_reset", 3),
        "the stream broke (RemoteProtocolError) after 4 chunk(s); not retried",
        1,
    ),
    (("stream_error", 3), "error event (the model crashed (injected)) after 4 chunk(s)", 1),
    (("stream_malformed", 3), "malformed response (a chunk that is not JSON)", 1),
    (("stream_no_done", 3), "the stream broke (IncompleteStreamError) after 6 chunk(s)", 1),
    (("stream_stall", 3), "the stream timed out after 4 chunk(s); not retried", 1),
    ("endless_sse", "over the 65536-byte cap on the wire", 1),
    (("stream_cut_short", 3), None, 2),  # cut short: the truncated answer never taken
    (("stream_reset", 0), None, 2),
    (("stream_cut_short", 0), "malformed response (no choices)", 1),
    (("stream_error", 0), None, 2),
    (("stream_stall", 0), None, 2),
]


@pytest.mark.parametrize(("fault", "error", "attempts"), BROKEN_STREAMS)
async def test_a_broken_stream_is_a_failure_never_a_truncated_answer(
    llm_server: FakeOpenAIServer, fault: Any, error: str | None, attempts: int
) -> None:
    llm_server.script("archon-1", fault, "ok")
    settings = {
        "max_retries": 1,
        "backoff_base_s": 0.0,
        "timeout_s": 1.0,
        "max_response_bytes": 64 * 1024,
    }
    async with AsyncioOrchestratorBridge(orchestrator(llm_server, **settings)) as bridge:
        if error is None:  # nothing had come: retried, and the retry's answer taken
            output = await bridge.invoke("archon-1", make_context())
            assert output.content.startswith("archon-1 votes aye")
            assert output.metadata["attempts"] == 2
        else:
            with pytest.raises(AgentInvocationError, match=re.escape(error)):
                await bridge.invoke("archon-1", make_context())
    assert llm_server.attempts["archon-1"] == attempts


@pytest.mark.parametrize(
    ("data", "content"),
    [
        (b'{"choices": [{"delta": {"content": "x"}}]}', "word0 x"),
        (b'{"choices": [{"delta": {"content": "x"}}]} \t ', "word0 x"),
        (b'{"choices": [{"delta": {"content": "x"}}]} x', None),
        (b'{"choices": [{"delta": {"content": "x"}}]}{}', None),
        (b'{"choices": [{"delta": {"content": "\xff"}}]}', None),
        (b' {"choices": [{"delta": {"content": "x"}}]}', "word0 x"),
        (b"[]", None),
    ],
)
async def test_a_chunk_is_taken_only_when_it_is_exactly_one_json_object(
    llm_server: FakeOpenAIServer, data: bytes, content: str | None
) -> None:
    # JSON's whitespace around the object is allowed; anything else after it, a second
    # object, bytes that are not UTF-8 or a value that is not an object are malformed.
    llm_server.script("archon-1", ("stream_event", data))
    async with AsyncioOrchestratorBridge(orchestrator(llm_server, max_retries=0)) as bridge:
        if content is None:
            with pytest.raises(AgentInvocationError, match=r"malformed response \(a chunk"):
                await bridge.invoke("archon-1", make_context())
        else:
            output = await bridge.invoke("archon-1", make_context())
            assert output.content == content


def test_stream_that_is_not_a_bool_is_refused(llm_server: FakeOpenAIServer) -> None:
    with pytest.raises(InvalidRequestError, match="stream must be a bool"):
        orchestrator(llm_server, stream=1)


async def test_an_answer_says_each_attempts_http_status_and_its_model(
    llm_server: FakeOpenAIServer,
) -> None:
    llm_server.script("archon-1", ("429", 0), 503)
    orch = orchestrator(llm_server, max_retries=3, backoff_base_s=0.001, backoff_cap_s=0.01)
    async with AsyncioOrchestratorBridge(orch) as bridge:
        output = await bridge.invoke("archon-1", make_context())
    assert output.metadata["http_statuses"] == "429 503 200"
    assert output.metadata["http_status"] == "200"
    assert output.metadata["model"] == "fake-model"


async def test_a_failed_call_says_what_it_was_in_its_errors_metadata(
    llm_server: FakeOpenAIServer,
) -> None:
    llm_server.script("archon-1", 503, "drop")
    llm_server.script("archon-2", 401)
    orch = orchestrator(llm_server, max_retries=1, backoff_base_s=0.001, backoff_cap_s=0.01)
    async with AsyncioOrchestratorBridge(orch) as bridge:
        with pytest.raises(AgentInvocationError) as gave_up:
            await bridge.invoke("archon-1", make_context())
        with pytest.raises(AgentInvocationError) as refused:
            await bridge.invoke("archon-2", make_context())
    assert gave_up.value.metadata["http_statuses"] == "503 error"
    assert gave_up.value.metadata["http_status"] == "error"
    assert gave_up.value.metadata["attempts"] == 2
    assert gave_up.value.metadata["model"] == "fake-model"
    assert refused.value.metadata["http_statuses"] == "401"


# ------------------------------------------------------------------ the SDK's environment


async def test_without_a_base_url_the_orchestrator_calls_openai_base_url_with_openai_api_key(
    llm_server: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", llm_server.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-the-environment")
    inner = OpenAIChatOrchestrator(None, "fake-model", max_retries=0)
    assert inner.base_url == llm_server.base_url
    async with AsyncioOrchestratorBridge(inner) as bridge:
        output = await bridge.invoke("alpha", make_context())
    assert output.content
    assert llm_server.headers[-1]["authorization"] == "Bearer sk-from-the-environment"


def test_without_a_base_url_or_openai_base_url_the_openai_api_is_meant(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    assert OpenAIChatOrchestrator(None, "m").base_url == "https://api.openai.com/v1"
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    given = OpenAIChatOrchestrator("http://127.0.0.1:8/v1", "m")
    assert given.base_url == "http://127.0.0.1:8/v1"  # the argument wins


def test_a_secret_in_openai_base_url_is_refused_naming_it_without_showing_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", f"http://user:{SECRET}@127.0.0.1:9/v1")
    with pytest.raises(InvalidRequestError, match=r"\$OPENAI_BASE_URL") as caught:
        OpenAIChatOrchestrator(None, "m")
    assert_never_shown(SECRET, [str(caught.value)])


# ------------------------------------------------------------------ the aiohttp transport

#: The transport is an extra (`aiohttp`, in `dev`): `make test` has it; `make test-lowest`
#: (openai at its floor, which has no aiohttp client of the kind the guard wraps) has not.
needs_aiohttp = pytest.mark.skipif(
    not aiohttp_installed(), reason="the aiohttp extra is not installed here"
)


@needs_aiohttp
async def test_on_aiohttp_a_halt_with_72_streams_open_closes_them_all(
    llm_server: FakeOpenAIServer,
) -> None:
    after = await halt_72_generating(llm_server, stream=True, transport="aiohttp")
    assert len(after) == 72 and max(after) <= 2, after
    assert llm_server.disconnects == 72  # every upstream request closed, none answered


@needs_aiohttp
@pytest.mark.parametrize("stream", [True, False])
async def test_on_aiohttp_an_answer_reads_as_on_httpx(
    llm_server: FakeOpenAIServer, stream: bool
) -> None:
    outputs = []
    for transport in ("httpx", "aiohttp"):
        inner = orchestrator(llm_server, stream=stream, transport=transport)
        assert inner.transport == transport
        async with AsyncioOrchestratorBridge(inner) as bridge:
            outputs.append(await bridge.invoke("alpha", make_context()))
    httpx_output, aiohttp_output = outputs
    assert aiohttp_output.content == httpx_output.content == "alpha votes aye (57 chars read)"
    for key in ("model", "finish_reason", "prompt_tokens", "completion_tokens", "usage"):
        assert aiohttp_output.metadata[key] == httpx_output.metadata[key], key


@needs_aiohttp
def test_a_transport_is_checked_and_auto_takes_aiohttp_where_installed() -> None:
    assert OpenAIChatOrchestrator("http://127.0.0.1:9/v1", "m").transport == "httpx"
    assert OpenAIChatOrchestrator("http://127.0.0.1:9/v1", "m", transport="auto").transport == (
        "aiohttp"  # installed here: the dev extra brings it
    )
    with pytest.raises(InvalidRequestError, match="transport must be one of httpx, aiohttp, auto"):
        OpenAIChatOrchestrator("http://127.0.0.1:9/v1", "m", transport="curl")


def test_without_aiohttp_installed_transport_aiohttp_is_refused_naming_the_extra() -> None:
    code = (
        "import sys; sys.modules['aiohttp'] = None\n"
        "from adapters.llm.openai_chat import OpenAIChatOrchestrator\n"
        "from kernel import InvalidRequestError\n"
        "assert OpenAIChatOrchestrator('http://127.0.0.1:9/v1', 'm', transport='auto')"
        ".transport == 'httpx'\n"
        "try:\n"
        "    OpenAIChatOrchestrator('http://127.0.0.1:9/v1', 'm', transport='aiohttp')\n"
        "except InvalidRequestError as exc:\n"
        "    print(exc)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    assert "pip install 'conclave-kernel[aiohttp]'" in proc.stdout


@pytest.mark.parametrize("transport", ["httpx", pytest.param("aiohttp", marks=needs_aiohttp)])
async def test_a_refused_connection_is_unreachable_saying_so_on_either_transport(
    transport: str,
) -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    inner = OpenAIChatOrchestrator(url, "m", transport=transport)
    async with AsyncioOrchestratorBridge(inner) as bridge:
        with pytest.raises(AgentInvocationError) as raised:
            await bridge.run_asyncio(inner.check_reachable, 5.0)
    # Not the SDK's class name, nor a timeout (aiohttp's SDK transport reports a refused
    # connection as a connect timeout).
    assert str(raised.value) == f"cannot reach {url}: connection refused"
