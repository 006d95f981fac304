"""Whether an endpoint has the models a council will ask it for, before anything runs.

Where a server lists its models (``GET /models``: OpenAI, vLLM, Ollama, LiteLLM, llama.cpp),
a model it does not list would fail every agent with a 404; asking first turns 72
failures into one clear refusal.  Where it does not (no such path, an error, no answer in
time, an answer that is no listing), nothing is known and nothing is refused: the check
never stands between a working server and its batch.

One rule beyond an exact match: Ollama lists ``llama3.1:latest`` and serves it as
``llama3.1`` too, so a name without a tag matches its ``:latest``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import attrs
import openai

__all__ = ["ModelListing", "list_models"]

#: The longest the listing is waited for: it is one small answer, and a server busy
#: generating (llama.cpp answers between generations) must not hold the run up.
LISTING_TIMEOUT_S = 5.0

# How many of a listing's models a refusal names (OpenAI lists ~100), and how much of
# each name: the server's words, any length (real ones stay well under it).
_SHOWN = 8
_NAME_CHARS = 80


@attrs.frozen(slots=True)
class ModelListing:
    """What one endpoint said about its models: ``models`` as listed, or None when it did
    not list them (``why``: how it answered instead)."""

    base_url: str
    models: tuple[str, ...] | None
    why: str = ""

    def has(self, model: str) -> bool:
        """Whether ``model`` is served, as far as the listing says (no listing: True)."""
        if self.models is None:
            return True
        return model in self.models or (":" not in model and f"{model}:latest" in self.models)

    def missing(self, models: Iterable[str]) -> list[str]:
        """Those of ``models`` the listing does not have, in order, once each."""
        return [m for m in dict.fromkeys(models) if not self.has(m)]

    def refusal(self, model: str) -> str:
        """One line: ``model`` is not served here, and what is."""
        assert self.models is not None
        listed = ", ".join(_clipped(m) for m in self.models[:_SHOWN]) or "none"
        more = f" and {len(self.models) - _SHOWN} more" if len(self.models) > _SHOWN else ""
        return f"model {model!r} not found at {self.base_url} (it lists: {listed}{more})"


async def list_models(
    client: openai.AsyncOpenAI, base_url: str, timeout_s: float = LISTING_TIMEOUT_S
) -> ModelListing:
    """Ask ``client`` (at ``base_url``) for its models, waiting ``timeout_s`` at most;
    any answer but a listing is "not listed", never an error."""
    try:
        raw = await client.models.with_raw_response.list(timeout=timeout_s)
        doc = json.loads(raw.http_response.content)
    except openai.APIStatusError as exc:
        return ModelListing(base_url, None, f"HTTP {exc.status_code}")
    except openai.APITimeoutError:
        return ModelListing(base_url, None, f"no answer within {timeout_s:g} s")
    except openai.APIConnectionError as exc:
        return ModelListing(base_url, None, type(exc).__name__)
    except (ValueError, RecursionError):
        return ModelListing(base_url, None, "not JSON")
    models = _ids(doc)
    if models is None:
        return ModelListing(base_url, None, "not a model listing")
    return ModelListing(base_url, models)


def _clipped(name: str) -> str:
    return name if len(name) <= _NAME_CHARS else name[:_NAME_CHARS] + "..."


def _ids(doc: Any) -> tuple[str, ...] | None:
    """The model ids of an OpenAI listing (``{"data": [{"id": ...}, ...]}``), else None."""
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(data, list):
        return None
    ids = [entry.get("id") if isinstance(entry, dict) else None for entry in data]
    named = [i for i in ids if isinstance(i, str)]
    return tuple(named) if len(named) == len(data) else None
