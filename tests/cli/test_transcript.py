"""The ``--json`` transcript (adapters.cli.transcript): its schema, hashes not content
unless asked, refused before the run when it cannot be written, and the summary kept
when it is lost after."""

from __future__ import annotations

import json
import re
from pathlib import Path
from uuid import uuid4

import attrs
import pytest

from adapters.cli import transcript
from kernel import (
    RESUMED,
    AgentFailure,
    AgentOutput,
    AgentRequest,
    ConcurrentResult,
    ContextBundle,
    FailureKind,
    PoolStatus,
    utc_now,
)
from tests.support.cli import conclave, deliberating, halt_from_cli


@pytest.mark.parametrize(
    "where",
    [
        "/proc/conclave-run.json",  # exists, is a directory, but nothing can be created in it
        "{tmp}/a-file/run.json",  # the "directory" is a regular file
        "{tmp}",  # a directory
    ],
)
def test_unwritable_transcript_is_refused_before_the_run(tmp_path: Path, where: str) -> None:
    (tmp_path / "a-file").write_text("")
    proc = conclave("deliberate", "--latency-ms", "1", "--json", where.format(tmp=tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.startswith("conclave: --json ")
    assert len(proc.stderr.splitlines()) == 1  # nothing ran: no "deliberating" line
    assert proc.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def _transcript_lost(stderr: str, path: Path) -> None:
    lines = [line for line in stderr.splitlines() if "transcript" in line]
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"conclave: transcript not written: --json {path}: ")
    assert "Traceback" not in stderr


def test_transcript_lost_after_a_completed_run_keeps_the_summary(tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    transcript = out_dir / "run.json"
    # The agents take 3 s; the directory goes as soon as the batch has started.
    with deliberating("--latency-ms", "3000", "--json", str(transcript)) as proc:
        out_dir.rmdir()
        stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 4  # 0 (every agent succeeded) + 4 (transcript not written)
    assert re.search(r"status\s+completed", stdout)
    assert re.search(r"succeeded\s+72\b", stdout)
    _transcript_lost(stderr, transcript)


def test_transcript_lost_after_a_halt_keeps_the_summary(tmp_path: Path) -> None:
    halt_file = tmp_path / "halt.json"
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    transcript = out_dir / "run.json"
    with deliberating(
        "--latency-ms", "600000", "--halt-file", str(halt_file), "--json", str(transcript)
    ) as proc:
        out_dir.rmdir()
        halt_from_cli(halt_file, "stop")
        stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 7  # 3 (halted) + 4 (transcript not written)
    assert re.search(r"status\s+HALTED: stop", stdout)
    assert re.search(r"pool after\s+0 active, 72/72 free", stdout)
    _transcript_lost(stderr, transcript)


def test_halted_before_start_still_writes_the_transcript(tmp_path: Path) -> None:
    halt_file = tmp_path / "halt.json"
    transcript = tmp_path / "run.json"
    halt_from_cli(halt_file, "audit")
    proc = conclave(
        "deliberate", "--halt-file", str(halt_file), "--json", str(transcript), "--topic", "T"
    )
    assert proc.returncode == 3
    assert "halted before starting: audit" in proc.stderr
    doc = json.loads(transcript.read_text())
    assert doc["schema"] == "conclave.transcript/1"
    assert doc["status"] == "halted" and doc["halt_reason"] == "audit"
    assert doc["outcomes"] == []
    assert doc["batch_id"] is None and doc["started_at"] is None and doc["total_ms"] is None
    assert doc["counts"] == {"total": 0, "succeeded": 0, "failed": 0, "by_kind": {}, "resumed": 0}
    assert doc["pool_after"] == {"active_count": 0, "available_count": 72, "max_concurrent": 72}
    assert doc["topic"]["topic_id"] == "cli-topic" and len(doc["topic"]["content_sha256"]) == 64
    assert doc["backend"] == "stub" and doc["model"] is None


def test_failures_exit_1_and_transcript_schema(tmp_path: Path) -> None:
    transcript = tmp_path / "run.json"
    proc = conclave(
        "deliberate",
        "--latency-ms",
        "5",
        "--fail-rate",
        "0.25",
        "--seed",
        "3",
        "--json",
        str(transcript),
        "--include-content",
    )
    assert proc.returncode == 1, proc.stderr
    assert re.search(r"failed\s+18 \(error 18\)", proc.stdout)
    doc = json.loads(transcript.read_text())
    assert doc["schema"] == "conclave.transcript/1"
    assert doc["status"] == "completed" and doc["halt_reason"] is None
    assert doc["counts"] == {
        "total": 72,
        "succeeded": 54,
        "failed": 18,
        "by_kind": {"error": 18},
        "resumed": 0,
    }
    assert doc["pool_after"] == {"active_count": 0, "available_count": 72, "max_concurrent": 72}
    outcomes = doc["outcomes"]
    assert [o["agent_id"] for o in outcomes] == [f"archon-{i}" for i in range(1, 73)]
    for o in outcomes:
        assert o["status"] in ("completed", "failed") and o["request_id"]
        if o["status"] == "completed":
            assert len(o["content_hash"]) == 64 and o["content"].startswith("[DEV MODE]")
            assert o["output_id"] and o["generated_at"]
        else:
            assert o["kind"] == "error" and o["error_type"] and o["message"]
            assert o["elapsed_ms"] >= 0
    assert len(doc["topic"]["content_sha256"]) == 64


def test_transcript_holds_hashes_not_content_by_default(tmp_path: Path) -> None:
    transcript = tmp_path / "run.json"
    proc = conclave("deliberate", "--agents", "3", "--latency-ms", "1", "--json", str(transcript))
    assert proc.returncode == 0
    assert "[DEV MODE]" not in transcript.read_text()


def test_transcript_records_tokens_per_agent_and_their_cost(tmp_path: Path) -> None:
    path = tmp_path / "run.json"
    proc = conclave(
        *("deliberate", "--agents", "3", "--latency-ms", "1", "--fail-rate", "0.34", "--seed", "2"),
        *("--json", str(path), "--quiet", "--price-prompt", "1", "--price-completion", "1"),
    )
    assert proc.returncode == 1, proc.stderr
    doc = json.loads(path.read_text())
    usage = doc["usage"]
    answered = [o["agent_id"] for o in doc["outcomes"] if o["status"] == "completed"]
    assert sorted(usage["per_agent"]) == sorted(answered) and len(answered) == 2
    for agent, one in usage["per_agent"].items():
        outcome = next(o for o in doc["outcomes"] if o["agent_id"] == agent)
        assert one["prompt_tokens"] == outcome["metadata"]["prompt_tokens"]
        assert one["cost_usd"] == pytest.approx(
            (one["prompt_tokens"] + one["completion_tokens"]) / 1e6
        )
    assert usage["total_tokens"] == sum(
        o["prompt_tokens"] + o["completion_tokens"] for o in usage["per_agent"].values()
    )
    assert usage["by_model"].keys() == {"stub"} and usage["unpriced_models"] == []


def test_a_run_halted_before_its_batch_has_no_usage(tmp_path: Path) -> None:
    halt_file = tmp_path / "halt.json"
    raised = conclave("halt", "--halt-file", str(halt_file), "--create", "--reason", "maintenance")
    assert raised.returncode == 0, raised.stderr
    path = tmp_path / "run.json"
    proc = conclave("deliberate", "--halt-file", str(halt_file), "--json", str(path))
    assert proc.returncode == 3, proc.stderr
    assert json.loads(path.read_text())["usage"] is None


def test_the_transcript_says_which_outcomes_were_resumed_and_which_ran_now() -> None:
    context = ContextBundle(topic_id="t", topic_content="Adopt it?")
    requests = [AgentRequest(agent_id=a, context=context) for a in ("a1", "a2", "a3")]
    batch = uuid4()
    committed = AgentOutput("a1", uuid4(), "yes", batch_id=batch, metadata={"model": "m"})
    ran_now = AgentOutput("a2", requests[1].request_id, "no", batch_id=batch)
    failed = AgentFailure("a3", requests[2].request_id, FailureKind.ERROR, "E", "boom", 1.0)
    resumed = attrs.evolve(committed, metadata={**committed.metadata, RESUMED: True})
    now = utc_now()
    result = ConcurrentResult(batch, (resumed, ran_now), (failed,), now, now, 1.0)
    doc = transcript.document(
        context=context, requests=requests, result=result, halt_reason=None,
        interrupted=False, backend="stub", model=None, pool_after=PoolStatus(0, 72, 72),
    )  # fmt: skip
    assert [o["resumed"] for o in doc["outcomes"]] == [True, False, False]
    assert doc["counts"]["resumed"] == 1
    assert json.loads(json.dumps(doc))["outcomes"][0]["metadata"] == {"model": "m", "resumed": True}
