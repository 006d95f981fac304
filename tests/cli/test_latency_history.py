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


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "[1, 2]",
        '{"k": "x"}',
        '{"k": [1, "x", -1]}',
        '{"k": [' + "9" * 400 + "]}",  # an int no float holds
        "[" * 100_000 + "]" * 100_000,  # deeper than the parser recurses
    ],
)
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


def test_true_and_false_are_not_remembered_as_answer_times(tmp_path: Path) -> None:
    path = tmp_path / "h.json"
    path.write_text('{"k": [true, false, 0.5]}')
    assert history.load("k", path) == [0.5]


def test_a_history_file_too_big_to_be_ours_is_not_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "h.json"
    entry = json.dumps({"k": [0.5]})
    path.write_text(entry[:-1] + " " * history.MAX_FILE_BYTES + "}")
    with caplog.at_level(logging.WARNING, logger="adapters"):
        assert history.load("k", path) == []
    assert "latency history unreadable" in caplog.text


def test_the_largest_history_written_is_read_back(tmp_path: Path) -> None:
    path = tmp_path / "h.json"
    keys = [f"{i:032x}" for i in range(history.MAX_KEYS)]
    for key in keys:
        history.remember(key, [123456.789012345678 + i for i in range(history.KEEP)], path)
    assert path.stat().st_size <= history.MAX_FILE_BYTES
    assert len(history.load(keys[0], path)) == history.KEEP


def test_a_symlinked_history_is_replaced_never_written_through(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.txt"
    target.write_text("not ours")
    path = tmp_path / "h.json"
    path.symlink_to(target)
    history.remember("k", [1.0], path)
    assert target.read_text() == "not ours"
    assert not path.is_symlink() and history.load("k", path) == [1.0]
