"""LLM backends and what every LLM call goes through.

* :mod:`adapters.llm.bridge` -- an asyncio orchestrator run from trio (trio-asyncio).
* :mod:`adapters.llm.openai_chat` -- any OpenAI-compatible chat endpoint.
* :mod:`adapters.llm.crewai` -- real CrewAI agents (the ``crewai`` extra, its own
  environment); :mod:`adapters.llm._crewai_agents` builds them.
* :mod:`adapters.llm.policy` -- the one LLM-call policy both orchestrators follow: retry
  classification, backoff, Retry-After, failure messages, prompts.
* :mod:`adapters.llm.http_guard` -- the HTTP client every request goes through (bounds).
* :mod:`adapters.llm.provider_budget`, :mod:`adapters.llm.ratelimit_headers` -- a
  provider's rate limits, shared by every agent of an endpoint.

Nothing is imported here: each module pulls its own optional dependencies.
"""
