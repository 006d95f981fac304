"""The answer times ``--hedge-after auto`` remembers across runs, per endpoint and model."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from adapters.cli import _latency_history as history
from tests.support.url_secrets import SECRET


def test_too_few_answers_give_no_delay_and_enough_give_their_p95(tmp_path: Path) -> None:
    path = tmp_path / "h.json"
    key = history.history_key("openai", "http://127.0.0.1:1/v1", "m")
    history.remember(key, [0.1] * 19, path)
    assert history.delay(history.load(key, path)) is None
    history.remember(key, [2.0], path)
    assert history.delay(history.load(key, path)) == 0.1  # 19 of 20 at 0.1: p95 is 0.1
    history.remember(key, [2.0] * 5, path)
    assert history.delay(history.load(key, path)) == 2.0


def test_only_the_most_recent_answers_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "h.json"
    history.remember("k", [1.0] * history.KEEP, path)
    history.remember("k", [5.0] * 10, path)
    kept = history.load("k", path)
    assert len(kept) == history.KEEP and kept[-10:] == [5.0] * 10


def test_endpoints_and_models_are_kept_apart_under_digests_never_urls(tmp_path: Path) -> None:
    path = tmp_path / "h.json"
    url = f"https://user:{SECRET}@llm.example/v1"
    a = history.history_key("openai", url, "model-a")
    b = history.history_key("openai", url, "model-b")
    assert a != b
    history.remember(a, [1.0], path)
    history.remember(b, [2.0], path)
    assert history.load(a, path) == [1.0] and history.load(b, path) == [2.0]
    text = path.read_text()
    assert SECRET not in text and "llm.example" not in text and "model-a" not in text


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"k": "x"}', '{"k": [1, "x", -1]}'])
def test_a_corrupt_history_is_an_empty_one_not_a_failed_run(
    tmp_path: Path, content: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "h.json"
    path.write_text(content)
    with caplog.at_level(logging.WARNING):
        assert history.load("other", path) == []
        history.remember("k", [3.0], path)
    assert history.load("k", path)[-1] == 3.0
    assert json.loads(path.read_text())  # rewritten whole


def test_an_unwritable_history_is_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with caplog.at_level(logging.WARNING, logger="adapters"):
        history.remember("k", [1.0], blocker / "sub" / "h.json")  # a file where a dir must be
    assert "latency history not written" in caplog.text


def test_the_history_lives_under_xdg_state_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert history.history_path() == tmp_path / "conclave" / "latency-history.json"
