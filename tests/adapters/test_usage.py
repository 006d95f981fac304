"""Token totals from a batch's answers, and their cost at per-model prices."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest

from adapters.usage import Price, PriceTable, TokenCount, usage_of, usage_totals
from kernel import AgentFailure, AgentOutput, ConcurrentResult, FailureKind, InvalidRequestError


def _output(agent_id: str, **metadata: Any) -> AgentOutput:
    return AgentOutput(agent_id=agent_id, request_id=uuid4(), content="x", metadata=metadata)


def _result(*outputs: AgentOutput) -> ConcurrentResult:
    now = datetime.now(UTC)
    failure = AgentFailure("broken", uuid4(), FailureKind.ERROR, "E", "boom", 1.0)
    return ConcurrentResult(
        batch_id=uuid4(),
        outputs=list(outputs),
        failures=[failure],
        total_ms=5.0,
        started_at=now,
        completed_at=now,
    )


RESULT = _result(
    _output("a", model="big", prompt_tokens=1000, completion_tokens=500, usage="reported"),
    _output("b", model="small", prompt_tokens=2000, completion_tokens=1000, usage="estimated"),
    _output("c", model="big", prompt_tokens=10, completion_tokens=20),
    _output("d", stub=1),  # reports nothing: counts for nothing
)


def test_totals_add_up_per_agent_per_model_and_overall() -> None:
    totals = usage_totals(RESULT)
    assert [u.agent_id for u in totals.per_agent] == ["a", "b", "c"]
    assert totals.total == TokenCount(3010, 1520) and totals.total.total == 4530
    assert totals.by_model == {"big": TokenCount(1010, 520), "small": TokenCount(2000, 1000)}
    assert totals.estimated_agents == 1


def test_odd_metadata_counts_as_nothing_rather_than_breaking_the_sum() -> None:
    used = usage_of(_output("x", prompt_tokens=-5, completion_tokens="12", model=7))
    assert used is not None
    assert used.tokens == TokenCount(0, 0) and used.model is None
    flagged = usage_of(_output("y", prompt_tokens=True, completion_tokens=3))
    assert flagged is not None and flagged.tokens == TokenCount(0, 3)


def test_cost_uses_each_models_price_and_names_the_unpriced() -> None:
    prices = PriceTable({"big": Price(2.0, 10.0)})
    report = usage_totals(RESULT).cost(prices)
    # a: 1000 x 2 + 500 x 10 = 7000 / 1e6; c: 10 x 2 + 20 x 10 = 220 / 1e6
    assert report.per_agent_usd == pytest.approx({"a": 0.007, "c": 0.00022})
    assert report.total_usd == pytest.approx(0.00722)
    assert report.unpriced_models == ("small",)


def test_a_default_price_covers_every_model_not_named() -> None:
    prices = PriceTable({"big": Price(0, 0)}, default=Price(1.0, 1.0))
    report = usage_totals(RESULT).cost(prices)
    assert report.total_usd == pytest.approx(3000 / 1e6) and report.unpriced_models == ()


def test_as_dict_is_json_ready_with_cost_per_agent() -> None:
    doc = usage_totals(RESULT).as_dict(PriceTable(default=Price(1.0, 1.0)))
    again = json.loads(json.dumps(doc))
    assert again["prompt_tokens"] == 3010 and again["completion_tokens"] == 1520
    assert again["per_agent"]["a"] == {
        "model": "big",
        "prompt_tokens": 1000,
        "completion_tokens": 500,
        "cost_usd": pytest.approx(0.0015),
    }
    assert again["cost_usd"] == pytest.approx(0.00453)
    assert "cost_usd" not in usage_totals(RESULT).as_dict()


@pytest.mark.parametrize(
    "entry",
    [
        {"prompt": -1, "completion": 1},
        {"prompt": float("nan"), "completion": 1},
        {"prompt": float("inf"), "completion": 1},
        {"prompt": "0.15", "completion": 1},
        {"prompt": True, "completion": 1},
        {"prompt": 1},
        {"prompt": 1, "completion": 1, "cached": 1},
        "0.15",
    ],
)
def test_a_bad_price_is_refused_naming_the_model(entry: object) -> None:
    with pytest.raises(InvalidRequestError, match="model 'gpt'"):
        PriceTable.from_mapping({"gpt": entry})


@pytest.mark.parametrize("data", [{}, [], None, {"": {"prompt": 1, "completion": 1}}])
def test_a_price_table_that_is_not_a_table_of_models_is_refused(data: object) -> None:
    with pytest.raises(InvalidRequestError):
        PriceTable.from_mapping(data)


def test_price_files_load_from_json_and_toml(tmp_path: Path) -> None:
    as_json = tmp_path / "p.json"
    as_json.write_text(json.dumps({"prices": {"m": {"prompt": 1, "completion": 2}}}))
    as_toml = tmp_path / "p.toml"
    as_toml.write_text('[prices."*"]\nprompt = 0.5\ncompletion = 1.5\n')
    assert PriceTable.load(as_json).for_model("m") == Price(1, 2)
    assert PriceTable.load(as_json).for_model("other") is None
    assert PriceTable.load(as_toml).for_model("anything") == Price(0.5, 1.5)


@pytest.mark.parametrize(
    ("name", "text", "problem"),
    [
        ("p.json", "{not json", "not valid json"),
        ("p.json", '{"m": {"prompt": 1, "completion": 1}}', "top-level 'prices'"),
        ("p.toml", "[prices.m]\nprompt = -2\ncompletion = 1\n", "must be >= 0"),
        ("missing.json", None, "No such file"),
    ],
)
def test_a_bad_price_file_is_refused_with_its_path(
    tmp_path: Path, name: str, text: str | None, problem: str
) -> None:
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    with pytest.raises(InvalidRequestError, match=problem) as caught:
        PriceTable.load(path)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize("price", [1e308, 1e7])
def test_a_price_beyond_any_models_is_refused(price: float) -> None:
    # 1e308 passed as "finite": the cost of a few hundred tokens was inf ("$inf", and
    # `Infinity`, which is not JSON, in the transcript).
    with pytest.raises(InvalidRequestError, match="<= 1e"):
        Price(price, 1.0)
    with pytest.raises(InvalidRequestError, match="model 'gpt'"):
        PriceTable.from_mapping({"gpt": {"prompt": 1.0, "completion": price}})
    assert Price(1e6, 1e6).cost(TokenCount(1, 1)) == 2.0  # the bound itself is taken


def test_a_token_count_beyond_belief_counts_for_nothing_and_the_cost_stays_finite() -> None:
    # An orchestrator's metadata is any int: 10**400 raised OverflowError out of cost(),
    # 10**30 made every sum after it noise.
    result = _result(
        _output("a", model="m", prompt_tokens=10**400, completion_tokens=5),
        _output("b", model="m", prompt_tokens=10**30, completion_tokens=100_000_000),
    )
    totals = usage_totals(result)
    assert totals.total == TokenCount(0, 100_000_005)
    doc = totals.as_dict(PriceTable(default=Price(1e6, 1e6)))
    json.dumps(doc, allow_nan=False)  # finite: strict JSON
