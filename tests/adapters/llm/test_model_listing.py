"""Looking a council's models up in the server's listing: a model not listed is known
before anything runs; a server that lists nothing (or not in time) holds nothing up.

Through the real openai SDK and the bridge against the loopback server.
"""

from __future__ import annotations

import pytest
import trio

from adapters.llm.bridge import AsyncioOrchestratorBridge
from adapters.llm.model_listing import ModelListing
from adapters.llm.openai_chat import OpenAIChatOrchestrator
from adapters.roster import AgentProfile, Roster
from tests.support.fake_openai import FakeOpenAIServer


async def listings(inner: OpenAIChatOrchestrator, timeout_s: float = 5.0) -> list[ModelListing]:
    async with AsyncioOrchestratorBridge(inner) as bridge:
        return await bridge.run_asyncio(inner.list_models, timeout_s)


async def test_a_model_the_server_lists_is_found_and_one_it_does_not_is_missing(
    llm_server: FakeOpenAIServer,
) -> None:
    llm_server.models = ["fake-model", "llama3.1:latest"]
    (listing,) = await listings(OpenAIChatOrchestrator(llm_server.base_url, "fake-model"))
    assert listing.models == ("fake-model", "llama3.1:latest")
    assert listing.missing(["fake-model", "llama3.1", "gpt-x", "gpt-x"]) == ["gpt-x"]
    assert listing.refusal("gpt-x") == (
        f"model 'gpt-x' not found at {llm_server.base_url} (it lists: fake-model, llama3.1:latest)"
    )
    assert llm_server.requests_total == 1  # one GET, no chat completion


async def test_every_endpoint_of_a_roster_is_asked_for_its_own_models(
    llm_server: FakeOpenAIServer,
) -> None:
    other = llm_server.base_url.replace("127.0.0.1", "localhost")
    roster = Roster(
        [
            AgentProfile(agent_id="a"),
            AgentProfile(agent_id="b", model="m2"),
            AgentProfile(agent_id="c", model="m3", base_url=other),
        ]
    )
    inner = OpenAIChatOrchestrator(llm_server.base_url, "m1", roster=roster)
    assert inner.models_by_endpoint() == {llm_server.base_url: ["m1", "m2"], other: ["m3"]}
    llm_server.models = ["m1", "m3"]
    found = await listings(inner)
    assert [(x.base_url, x.missing(inner.models_by_endpoint()[x.base_url])) for x in found] == [
        (llm_server.base_url, ["m2"]),
        (other, []),
    ]


@pytest.mark.parametrize(
    ("fault", "why"),
    [
        (404, "HTTP 404"),  # no /models at all
        (401, "HTTP 401"),
        ("ok", "not a model listing"),  # a server that answers every path with a completion
        ("malformed_json", "not JSON"),
    ],
)
async def test_a_server_that_lists_no_models_is_not_checked(
    llm_server: FakeOpenAIServer, fault: object, why: str
) -> None:
    llm_server.models_fault = fault
    (listing,) = await listings(OpenAIChatOrchestrator(llm_server.base_url, "anything"))
    assert (listing.models, listing.why) == (None, why)
    assert listing.has("anything") and listing.missing(["anything"]) == []


async def test_a_listing_that_does_not_come_in_time_holds_nothing_up(
    llm_server: FakeOpenAIServer,
) -> None:
    llm_server.models_fault = "hang"
    with trio.fail_after(20):  # the bound is the listing's own 0.2 s; this only stops a hang
        (listing,) = await listings(OpenAIChatOrchestrator(llm_server.base_url, "m"), 0.2)
    assert listing.models is None and listing.why == "no answer within 0.2 s"
    assert await trio.to_thread.run_sync(llm_server.wait_for, lambda s: s.disconnects == 1)


def test_a_refusal_quotes_a_listings_names_bounded_whatever_their_length() -> None:
    listing = ModelListing("http://127.0.0.1:1/v1", ("x" * 1_000_000, "fake-model", "y" * 500))
    refusal = listing.refusal("gpt-x")
    assert len(refusal) < 1000, len(refusal)
    assert refusal.startswith("model 'gpt-x' not found at http://127.0.0.1:1/v1 (it lists: xxx")
    assert ", fake-model, yyy" in refusal
