"""Tokens a batch used, per agent, per model and in total, and what they cost.

    totals = usage_totals(result)              # from the outputs' metadata
    totals.total.prompt, totals.total.completion
    report = totals.cost(PriceTable.load("prices.toml"))   # or PriceTable(default=Price(...))
    report.total_usd, report.unpriced_models

The numbers come from each :class:`~kernel.AgentOutput`'s ``metadata``: ``prompt_tokens``
and ``completion_tokens`` (the openai and crewai adapters report them, the stub makes up
plausible ones) and ``model``; an output without them counts for nothing.  A failed agent
has no output, so the tokens its call may have cost are not known here.  ``usage`` =
``"estimated"`` (a server that sent no usage) is counted, and the estimated answers are
counted apart so a reader knows.

Prices are in USD per million tokens, prompt and completion apart, per model (a
:class:`PriceTable`, with an optional default for every other model).  A price file, or a
roster's ``prices`` table, reads::

    [prices."gpt-4o-mini"]       # TOML; JSON: {"prices": {"gpt-4o-mini": {...}}}
    prompt = 0.15
    completion = 0.60
    [prices."*"]                 # any other model
    prompt = 0
    completion = 0

A price that is negative, above :data:`MAX_PRICE_PER_1M`, not finite or not a number is refused
(:class:`~kernel.InvalidRequestError`), before anything runs.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

import attrs

from kernel import AgentOutput, ConcurrentResult, InvalidRequestError
from kernel.validate import number

__all__ = [
    "DEFAULT_MODEL",
    "MAX_CALL_TOKENS",
    "MAX_PRICE_PER_1M",
    "AgentUsage",
    "CostReport",
    "Price",
    "PriceTable",
    "TokenCount",
    "token_count",
    "UsageTotals",
    "usage_of",
    "usage_totals",
]

#: A price table's key for every model it does not name.
DEFAULT_MODEL = "*"
#: The highest price taken, USD per million tokens: a thousand times the dearest model's;
#: above it a price is a mistake (1e308 made a few hundred tokens cost inf).
MAX_PRICE_PER_1M = 1e6
#: The most tokens one answer is believed to report (prompt or completion): far beyond
#: any model's context window.  A count above it is a lie and counts for nothing (the
#: OpenAI adapter estimates such an answer's usage instead).
MAX_CALL_TOKENS = 100_000_000
#: The largest price file read (a price table is a few lines; this is far beyond it).
MAX_PRICE_FILE_BYTES = 1_000_000


def token_count(value: object) -> int | None:
    """A token count from metadata: an int from 0 to :data:`MAX_CALL_TOKENS`, else None
    (not a count, or one past belief).  Metrics and traces read counts through it too."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_CALL_TOKENS:
        return None
    return value


def _count(value: object) -> int:
    return token_count(value) or 0  # nothing known: counts for nothing


@attrs.frozen(slots=True)
class TokenCount:
    """Prompt and completion tokens."""

    prompt: int = 0
    completion: int = 0

    @property
    def total(self) -> int:
        return self.prompt + self.completion

    def __add__(self, other: TokenCount) -> TokenCount:
        return TokenCount(self.prompt + other.prompt, self.completion + other.completion)


@attrs.frozen(slots=True)
class Price:
    """USD per million prompt tokens and per million completion tokens (0 to
    :data:`MAX_PRICE_PER_1M`)."""

    prompt_per_1m: float = attrs.field(validator=number(at_least=0, at_most=MAX_PRICE_PER_1M))
    completion_per_1m: float = attrs.field(validator=number(at_least=0, at_most=MAX_PRICE_PER_1M))

    def cost(self, tokens: TokenCount) -> float:
        return (
            tokens.prompt * self.prompt_per_1m + tokens.completion * self.completion_per_1m
        ) / 1e6


def _models(value: Mapping[str, Price]) -> Mapping[str, Price]:
    return MappingProxyType(dict(value))


@attrs.frozen(slots=True)
class PriceTable:
    """Prices by model name; ``default`` for a model not named (None: unpriced)."""

    by_model: Mapping[str, Price] = attrs.field(factory=dict, converter=_models)
    default: Price | None = None

    def for_model(self, model: str | None) -> Price | None:
        if model is not None and model in self.by_model:
            return self.by_model[model]
        return self.default

    @classmethod
    def from_mapping(cls, data: object, *, source: str = "prices") -> PriceTable:
        """``{model: {"prompt": p, "completion": c}}``; ``"*"`` is the default."""
        if not isinstance(data, Mapping) or not data:
            raise InvalidRequestError(f"{source}: expected a table of models, got {data!r:.80}")
        prices: dict[str, Price] = {}
        for model, entry in data.items():
            where = f"{source}: model {model!r}"
            if not isinstance(model, str) or not model:
                raise InvalidRequestError(f"{source}: a model name must be a non-empty string")
            if not isinstance(entry, Mapping) or set(entry) != {"prompt", "completion"}:
                raise InvalidRequestError(f"{where}: expected exactly 'prompt' and 'completion'")
            try:
                prices[model] = Price(entry["prompt"], entry["completion"])
            except InvalidRequestError as exc:
                raise InvalidRequestError(f"{where}: {exc}") from None
        default = prices.pop(DEFAULT_MODEL, None)
        return cls(prices, default)

    @classmethod
    def load(cls, path: str | Path) -> PriceTable:
        """A JSON or TOML file whose ``prices`` table is read by :meth:`from_mapping`.
        Blocking: call it from a worker thread."""
        path = Path(path)
        try:
            with path.open("rb") as f:
                raw = f.read(MAX_PRICE_FILE_BYTES + 1)
        except OSError as exc:
            raise InvalidRequestError(f"{path}: {exc.strerror or exc}") from None
        if len(raw) > MAX_PRICE_FILE_BYTES:
            raise InvalidRequestError(f"{path}: larger than {MAX_PRICE_FILE_BYTES} bytes")
        try:
            text = raw.decode("utf-8-sig")
            doc = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except (UnicodeDecodeError, ValueError) as exc:
            raise InvalidRequestError(
                f"{path}: not valid {path.suffix[1:] or 'JSON'}: {exc}"
            ) from None
        if not isinstance(doc, dict) or set(doc) != {"prices"}:
            raise InvalidRequestError(f"{path}: expected one top-level 'prices' table")
        return cls.from_mapping(doc["prices"], source=str(path))


@attrs.frozen(slots=True)
class AgentUsage:
    """One answer's tokens, the model that answered and whether the count is estimated."""

    agent_id: str
    model: str | None
    tokens: TokenCount
    estimated: bool = False


def usage_of(output: AgentOutput) -> AgentUsage | None:
    """``output``'s token usage from its metadata, or None if it reports none."""
    meta = output.metadata
    if "prompt_tokens" not in meta and "completion_tokens" not in meta:
        return None
    model = meta.get("model")
    return AgentUsage(
        agent_id=output.agent_id,
        model=model if isinstance(model, str) and model else None,
        tokens=TokenCount(_count(meta.get("prompt_tokens")), _count(meta.get("completion_tokens"))),
        estimated=meta.get("usage") == "estimated",
    )


@attrs.frozen(slots=True)
class CostReport:
    """What a batch's tokens cost at a :class:`PriceTable`, in USD.

    ``unpriced_models``: models that answered but have no price (their tokens are in no
    sum here); ``None`` stands for answers that named no model."""

    total_usd: float
    per_agent_usd: Mapping[str, float]
    unpriced_models: tuple[str | None, ...]


@attrs.frozen(slots=True)
class UsageTotals:
    """A batch's tokens: per answering agent (request order), per model and in total."""

    per_agent: tuple[AgentUsage, ...]

    @property
    def total(self) -> TokenCount:
        return sum((a.tokens for a in self.per_agent), TokenCount())

    @property
    def by_model(self) -> Mapping[str | None, TokenCount]:
        found: dict[str | None, TokenCount] = {}
        for a in self.per_agent:
            found[a.model] = found.get(a.model, TokenCount()) + a.tokens
        return found

    @property
    def estimated_agents(self) -> int:
        """How many answers' counts are estimates (the server reported no usage)."""
        return sum(a.estimated for a in self.per_agent)

    def cost(self, prices: PriceTable) -> CostReport:
        per_agent: dict[str, float] = {}
        unpriced: list[str | None] = []
        for a in self.per_agent:
            price = prices.for_model(a.model)
            if price is None:
                if a.model not in unpriced:
                    unpriced.append(a.model)
                continue
            per_agent[a.agent_id] = price.cost(a.tokens)
        return CostReport(sum(per_agent.values()), per_agent, tuple(unpriced))

    def as_dict(self, prices: PriceTable | None = None) -> dict[str, object]:
        """JSON-ready: totals, per model and per agent, and the cost when ``prices``."""
        report = self.cost(prices) if prices is not None else None
        doc: dict[str, object] = {
            "prompt_tokens": self.total.prompt,
            "completion_tokens": self.total.completion,
            "total_tokens": self.total.total,
            "estimated_agents": self.estimated_agents,
            "by_model": {
                str(m): {"prompt_tokens": t.prompt, "completion_tokens": t.completion}
                for m, t in self.by_model.items()
            },
            "per_agent": {
                a.agent_id: {
                    "model": a.model,
                    "prompt_tokens": a.tokens.prompt,
                    "completion_tokens": a.tokens.completion,
                    **({"cost_usd": report.per_agent_usd.get(a.agent_id)} if report else {}),
                }
                for a in self.per_agent
            },
        }
        if report is not None:
            doc["cost_usd"] = report.total_usd
            doc["unpriced_models"] = list(report.unpriced_models)
        return doc


def usage_totals(result: ConcurrentResult) -> UsageTotals:
    """The tokens ``result``'s answers report (:func:`usage_of`), in request order."""
    found = (usage_of(o) for o in result.outputs)
    return UsageTotals(tuple(u for u in found if u is not None))
