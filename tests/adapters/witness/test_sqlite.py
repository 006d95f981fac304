"""FR9 commit-before-view: the SQLite witness, its hash chain, and the service using it."""

from __future__ import annotations

import os
import signal
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from uuid import UUID, uuid4

import pytest
import trio
import trio.testing

from adapters.stub import AgentOrchestratorStub
from adapters.witness._chain import insert_row, output_fields
from adapters.witness.sqlite import GENESIS_HASH, SqliteWitness, WitnessError, verify_log
from kernel import (
    AgentOutput,
    AgentPool,
    ConcurrentDeliberationService,
    FailureKind,
    HaltSwitch,
    InvalidRequestError,
    OutputWitness,
    context_fingerprint,
)
from tests.support import ROOT
from tests.support.cli import conclave
from tests.support.helpers import make_requests
from tests.support.witness_helpers import make_log, run_sql, select


async def _deliberate(witness: SqliteWitness, n: int = 72, **stub_kwargs: object) -> object:
    stub = AgentOrchestratorStub(latency_ms=1, **stub_kwargs)  # type: ignore[arg-type]
    service = ConcurrentDeliberationService(stub, witness=witness)
    return await service.invoke_concurrent(make_requests(n))


async def test_72_outputs_committed_in_a_few_group_commits(tmp_path: Path) -> None:
    async with SqliteWitness(tmp_path / "w.db") as witness:
        assert isinstance(witness, OutputWitness)
        result = await _deliberate(witness)
        assert result.success_count == 72  # type: ignore[attr-defined]
        assert await witness.count() == 72
        assert witness.transactions <= 3  # grouped, not one transaction per output
        report = await witness.verify()
        assert report.ok and report.records == 72
        assert report  # a report is truthy when the chain is intact
        # every released output can be viewed, and the view is recorded
        for output in result.outputs:  # type: ignore[attr-defined]
            viewed = await witness.get_for_viewing(output.output_id, "auditor-1")
            assert viewed == output
        first = result.outputs[0]  # type: ignore[attr-defined]
        assert [v for v, _ in await witness.views(first.output_id)] == ["auditor-1"]


async def test_view_refuses_uncommitted_and_tampered_outputs(tmp_path: Path) -> None:
    path = tmp_path / "w.db"
    async with SqliteWitness(path) as witness:
        result = await _deliberate(witness, 3)
        with pytest.raises(WitnessError, match="never committed"):
            await witness.get_for_viewing(uuid4(), "auditor")
        target = result.outputs[1]  # type: ignore[attr-defined]
        run_sql(path, f"UPDATE outputs SET content = 'x' WHERE output_id = '{target.output_id}'")
        with pytest.raises(WitnessError, match="tampered"):
            await witness.get_for_viewing(target.output_id, "auditor")
        assert await witness.views(target.output_id) == []


@pytest.mark.parametrize(
    ("sql", "first_bad", "problem"),
    [
        ("UPDATE outputs SET content = 'edited' WHERE sequence = 4", 4, "content"),
        ("UPDATE outputs SET agent_id = 'archon-99' WHERE sequence = 4", 4, "chain_hash"),
        ("UPDATE outputs SET metadata = '{}' WHERE sequence = 6", 6, "chain_hash"),
        ("DELETE FROM outputs WHERE sequence = 5", 6, "missing"),
        ("DELETE FROM outputs WHERE sequence = 1", 2, "missing"),
        (
            "UPDATE outputs SET sequence = -1 WHERE sequence = 3;"
            "UPDATE outputs SET sequence = 3 WHERE sequence = 4;"
            "UPDATE outputs SET sequence = 4 WHERE sequence = -1;",
            3,
            "prev_hash",
        ),
        (
            "INSERT INTO outputs SELECT 100, 'x', agent_id || '-2', request_id, batch_id, "
            "content_hash, "
            "content_type, generated_at, committed_at, metadata, content, prev_hash, chain_hash "
            "FROM outputs WHERE sequence = 2",
            100,
            "inserted",
        ),
    ],
)
async def test_verify_finds_the_first_broken_record(
    tmp_path: Path, sql: str, first_bad: int, problem: str
) -> None:
    path = tmp_path / "w.db"
    async with SqliteWitness(path) as witness:
        await _deliberate(witness, 8)
        assert (await witness.verify()).ok
    run_sql(path, sql)
    async with SqliteWitness(path) as witness:
        report = await witness.verify()
    assert not report.ok and not report
    assert report.first_bad_sequence == first_bad
    assert report.problem is not None and problem in report.problem


async def test_expected_head_catches_a_truncated_log(tmp_path: Path) -> None:
    path = tmp_path / "w.db"
    async with SqliteWitness(path) as witness:
        await _deliberate(witness, 5)
        head = witness._db.execute("SELECT max(sequence), chain_hash FROM outputs").fetchone()[1]
        assert (await witness.verify(expected_head=head)).ok
    run_sql(path, "DELETE FROM outputs WHERE sequence = 5")  # a clean truncation
    async with SqliteWitness(path) as witness:
        assert (await witness.verify()).ok  # consistent on its own...
        report = await witness.verify(expected_head=head)
        assert not report.ok and "head" in (report.problem or "")  # ...but not where it was


async def test_concurrent_batches_share_one_gap_free_chain(tmp_path: Path) -> None:
    async with SqliteWitness(tmp_path / "w.db") as witness:
        pool = AgentPool()
        services = [
            ConcurrentDeliberationService(
                AgentOrchestratorStub(latency_ms=1, jitter_ms=20, seed=i),
                pool=pool,
                witness=witness,
            )
            for i in range(2)
        ]
        results = []

        async def run(i: int) -> None:
            results.append(await services[i].invoke_concurrent(make_requests(36, prefix=f"s{i}")))

        async with trio.open_nursery() as nursery:
            for i in range(2):
                nursery.start_soon(run, i)
        assert sum(r.success_count for r in results) == 72
        report = await witness.verify()
        assert report.ok and report.records == 72
        sequences = [r[0] for r in witness._db.execute("SELECT sequence FROM outputs")]
        assert sorted(sequences) == list(range(1, 73))


async def test_failed_commit_is_a_witness_failure(tmp_path: Path) -> None:
    path = tmp_path / "w.db"
    async with SqliteWitness(path) as witness:
        run_sql(path, "DROP TABLE outputs")  # the log becomes unwritable
        result = await _deliberate(witness, 4)
        assert result.success_count == 0  # type: ignore[attr-defined]
        kinds = {f.kind for f in result.failures}  # type: ignore[attr-defined]
        assert kinds == {FailureKind.WITNESS}
        assert "witness commit failed" in result.failures[0].message  # type: ignore[attr-defined]


KILL_SCRIPT = """
import sys, trio
sys.path.insert(0, {root!r})
from adapters.witness.sqlite import SqliteWitness
from adapters.stub import AgentOrchestratorStub
from kernel import ConcurrentDeliberationService
from tests.support.helpers import make_requests

async def main():
    witness = SqliteWitness(sys.argv[1])
    stub = AgentOrchestratorStub(latency_ms=10, jitter_ms=3000, seed=5)
    service = ConcurrentDeliberationService(stub, witness=witness)
    def progress(done, total, agent_id, status):
        print("committed", agent_id, flush=True)   # progress comes after the commit
    await service.invoke_concurrent(make_requests(72), on_progress=progress)
    print("finished", flush=True)

trio.run(main)
"""


def test_sigkill_mid_batch_leaves_a_log_that_verifies(tmp_path: Path) -> None:
    path = tmp_path / "w.db"
    seen: list[str] = []
    with subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT.format(root=str(ROOT)), str(path)],
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(line.split()[1])
            if len(seen) == 20:
                proc.send_signal(signal.SIGKILL)  # mid-batch: most agents still deliberating
                break
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    report = verify_log(path)  # a read-only audit reads the crashed writer's WAL too
    assert report.ok, report
    assert 20 <= report.records < 72
    db = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)
    try:
        committed = {r[0] for r in db.execute("SELECT agent_id FROM outputs")}
    finally:
        db.close()
    assert set(seen) <= committed  # every output that was released is in the log


# ---------------------------------------------------------------- the log's files


@pytest.fixture
def open_umask() -> Iterator[None]:
    """The loosest umask: whatever the witness creates keeps the mode it asked for."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


async def test_a_new_log_and_its_wal_and_shm_files_are_private(
    tmp_path: Path, open_umask: None
) -> None:
    path = tmp_path / "w.db"
    async with SqliteWitness(path) as witness:
        await _deliberate(witness, 3)
        side_files = [Path(f"{path}-wal"), Path(f"{path}-shm")]
        assert all(p.exists() for p in side_files)
        assert {p.name: _mode(p) for p in [path, *side_files]} == {
            "w.db": 0o600,
            "w.db-wal": 0o600,
            "w.db-shm": 0o600,
        }


async def test_an_existing_log_keeps_its_mode(tmp_path: Path, open_umask: None) -> None:
    path = tmp_path / "w.db"
    async with SqliteWitness(path) as witness:
        await _deliberate(witness, 1)
    path.chmod(0o640)  # the operator's choice (a group of auditors): not ours to change
    async with SqliteWitness(path) as witness:
        await _deliberate(witness, 1)
        assert _mode(path) == 0o640
        assert _mode(Path(f"{path}-wal")) == 0o640  # SQLite follows the log's mode


@pytest.mark.parametrize("target", ["missing", "file", "witness_log"])
@pytest.mark.parametrize("at", ["", "-wal", "-shm"])
def test_a_symlink_at_the_log_or_its_side_files_is_refused_and_nothing_is_written(
    tmp_path: Path, target: str, at: str
) -> None:
    path = tmp_path / "w.db"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    aim = elsewhere / "target"
    if target == "file":
        aim.write_bytes(b"someone else's data")
        aim.chmod(0o644)
    elif target == "witness_log":
        make_log(aim, 2)
    before = {p.name: (p.read_bytes(), os.lstat(p)) for p in elsewhere.iterdir()}
    Path(f"{path}{at}").symlink_to(aim)

    with pytest.raises(WitnessError, match="symbolic link"):
        SqliteWitness(path)

    after = {p.name: (p.read_bytes(), os.lstat(p)) for p in elsewhere.iterdir()}
    assert after.keys() == before.keys()  # nothing created beside the target
    for name, (data, st) in before.items():
        assert after[name][0] == data
        assert (after[name][1].st_mode, after[name][1].st_mtime_ns) == (st.st_mode, st.st_mtime_ns)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["elsewhere", f"w.db{at}"])


def test_an_in_memory_witness_is_refused_when_opened() -> None:
    """Guards against: accepted; its reader and writer connections are two separate in-memory
    databases, so every commit failed ("no such table": every agent a WITNESS failure,
    ``conclave deliberate --witness-db :memory:`` exit 1) and nothing was ever kept."""
    with pytest.raises(InvalidRequestError, match="memory"):
        SqliteWitness(":memory:")
    proc = conclave("deliberate", "--agents", "2", "--latency-ms", "1", "--witness-db", ":memory:")
    assert proc.returncode == 2, proc.stdout
    assert len(proc.stderr.splitlines()) == 1 and "memory" in proc.stderr


@pytest.mark.parametrize(
    "schema",
    ["CREATE TABLE users (name TEXT)", "CREATE TABLE outputs (id INTEGER, x TEXT)"],
)
def test_the_witness_refuses_a_database_that_is_not_a_witness_log_and_changes_nothing(
    tmp_path: Path, schema: str
) -> None:
    """Guards against: ``--witness-db app.db`` (a slip of the finger) added the witness's tables to
    the application's database and switched it to WAL; with a different ``outputs`` table
    every agent became a ``WITNESS`` failure (exit 1) instead of one clear refusal."""
    db_path = tmp_path / "app.db"
    run_sql(db_path, schema)
    before = db_path.read_bytes()
    with pytest.raises(WitnessError, match="not a witness log"):
        SqliteWitness(db_path)
    proc = conclave(
        "deliberate", "--agents", "2", "--latency-ms", "1", "--witness-db", str(db_path)
    )
    assert proc.returncode == 2, proc.stdout
    assert len(proc.stderr.splitlines()) == 1 and "not a witness log" in proc.stderr
    assert db_path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.db"]  # no -wal, no -shm


async def test_the_witness_still_opens_a_new_file_an_empty_file_and_its_own_log(
    tmp_path: Path,
) -> None:
    for name in ("new.db", "empty.db"):
        path = tmp_path / name
        if name == "empty.db":
            path.touch()
        for _ in range(2):  # made, then reopened as a witness log
            async with SqliteWitness(path) as witness:
                await witness.commit(AgentOutput(agent_id="a", request_id=uuid4(), content="x"))
        assert verify_log(path).records == 2


async def test_the_witness_opens_an_sqlite_file_with_nothing_in_it_yet(tmp_path: Path) -> None:
    """(Another process may have created the file and not yet its tables.)"""
    path = tmp_path / "fresh.db"
    run_sql(path, "PRAGMA journal_mode=WAL")
    assert path.stat().st_size > 0
    async with SqliteWitness(path) as witness:
        await witness.commit(AgentOutput(agent_id="a", request_id=uuid4(), content="x"))
    assert verify_log(path).records == 1


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o757])
def test_a_log_in_a_directory_others_can_rewrite_is_refused_and_nothing_is_created(
    tmp_path: Path, mode: int
) -> None:
    """Anyone who can rename in the directory can swap the log for a link between the
    check and SQLite's open: SQLite would create or convert the link's target."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(mode)
    with pytest.raises(WitnessError, match=r"shared: writable by other users .* not sticky"):
        SqliteWitness(shared / "w.db")
    assert list(shared.iterdir()) == []


async def test_a_log_in_a_sticky_shared_directory_is_opened(tmp_path: Path) -> None:
    """Sticky (like /tmp): others cannot rename or remove what this process created."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    async with SqliteWitness(shared / "w.db") as witness:
        await _deliberate(witness, 1)
    assert _mode(shared / "w.db") == 0o600


# ---------------------------------------------------------------- batches and resume


def _output(agent_id: str, batch_id: UUID | None) -> AgentOutput:
    return AgentOutput(agent_id, uuid4(), f"{agent_id} answers", batch_id=batch_id)


async def test_a_second_output_of_one_agent_in_one_batch_is_refused_by_the_log(
    tmp_path: Path,
) -> None:
    batch = uuid4()
    async with SqliteWitness(tmp_path / "w.db") as witness:
        await witness.commit(_output("archon-1", batch))
        with pytest.raises(WitnessError, match="'archon-1' already has an output"):
            await witness.commit(_output("archon-1", batch))
        await witness.commit(_output("archon-1", uuid4()))  # another batch: its own answer
        await witness.commit(_output("archon-1", None))  # outside any batch: not constrained
        await witness.commit(_output("archon-1", None))
        assert await witness.count() == 4
        assert (await witness.verify()).ok


_OLD_SCHEMA = """
CREATE TABLE outputs (
    sequence INTEGER PRIMARY KEY, output_id TEXT NOT NULL UNIQUE, agent_id TEXT NOT NULL,
    request_id TEXT NOT NULL, batch_id TEXT, content_hash TEXT NOT NULL,
    content_type TEXT NOT NULL, generated_at TEXT NOT NULL, committed_at TEXT NOT NULL,
    metadata TEXT NOT NULL, content TEXT NOT NULL, prev_hash TEXT NOT NULL,
    chain_hash TEXT NOT NULL
);
CREATE TABLE views (
    id INTEGER PRIMARY KEY, output_id TEXT NOT NULL, sequence INTEGER NOT NULL,
    viewer_id TEXT NOT NULL, viewed_at TEXT NOT NULL
);
"""


def _old_log(path: Path, outputs: list[AgentOutput]) -> None:
    """A log as the witness wrote it before batches were recorded: no unique index, no
    batch_runs table, schema version 0."""
    run_sql(path, _OLD_SCHEMA + "PRAGMA journal_mode=WAL;")
    db = sqlite3.connect(path, isolation_level=None)
    try:
        prev = GENESIS_HASH
        for sequence, output in enumerate(outputs, 1):
            prev = insert_row(db, output_fields(output), sequence, prev, output.generated_at)
    finally:
        db.close()


async def test_an_older_log_is_migrated_on_open_and_its_chain_still_verifies(
    tmp_path: Path,
) -> None:
    path, batch = tmp_path / "w.db", uuid4()
    _old_log(path, [_output("archon-1", batch), _output("archon-2", batch)])
    async with SqliteWitness(path) as witness:
        assert (await witness.verify()).ok
        with pytest.raises(WitnessError, match="already has an output"):
            await witness.commit(_output("archon-1", batch))
        recorded = await witness.recorded_batch(batch)
        # Its outputs are there, its request set is not: a resume refuses it.
        assert recorded is not None and recorded.requests is None
        assert sorted(recorded.outputs) == ["archon-1", "archon-2"]
    assert select(path, "PRAGMA user_version") == [(2,)]


async def test_a_batch_of_an_older_log_is_not_resumed(tmp_path: Path) -> None:
    path, batch = tmp_path / "w.db", uuid4()
    _old_log(path, [_output("archon-1", batch)])
    stub = AgentOrchestratorStub(latency_ms=0)
    async with SqliteWitness(path) as witness:
        service = ConcurrentDeliberationService(stub, witness=witness)
        with pytest.raises(InvalidRequestError, match="not its request set"):
            await service.invoke_concurrent(make_requests(2), resume=batch)
    assert stub.get_invocation_count() == 0


def test_a_log_holding_two_outputs_of_one_agent_in_one_batch_is_refused_on_open_naming_them(
    tmp_path: Path,
) -> None:
    path, batch = tmp_path / "w.db", uuid4()
    _old_log(path, [_output("archon-1", batch), _output("archon-1", batch)])
    with pytest.raises(WitnessError, match="two outputs of one agent in one batch") as caught:
        SqliteWitness(path)
    # What to do about it, and where to look: the chain is intact, only new writes are out.
    assert f"agent 'archon-1' of batch {batch}" in str(caught.value)
    assert "new log" in str(caught.value)
    assert verify_log(path).ok
    # Refused, it is left as it was: no table of the new schema, its version unchanged.
    assert select(path, "SELECT name FROM sqlite_master WHERE name = 'batch_runs'") == []
    assert select(path, "PRAGMA user_version") == [(0,)]


def test_a_log_of_a_newer_schema_is_refused_on_open(tmp_path: Path) -> None:
    path = tmp_path / "w.db"
    _old_log(path, [_output("archon-1", uuid4())])
    run_sql(path, "PRAGMA user_version = 3;")
    with pytest.raises(WitnessError, match="schema version 3 is newer"):
        SqliteWitness(path)


async def test_a_run_is_recorded_with_the_first_output_of_its_batch(tmp_path: Path) -> None:
    path = tmp_path / "w.db"
    async with SqliteWitness(path) as witness:
        result = await _deliberate(witness, 3)
        batch = result.batch_id  # type: ignore[attr-defined]
        recorded = await witness.recorded_batch(batch)
        assert recorded is not None and recorded.runs == 1
        context = make_requests(1)[0].context
        assert recorded.requests == dict.fromkeys(
            ("archon-1", "archon-2", "archon-3"), context_fingerprint(context)
        )
        outputs = result.outputs  # type: ignore[attr-defined]
        assert recorded.outputs == {o.agent_id: o for o in outputs}
    assert select(path, "SELECT count(*) FROM batch_runs") == [(1,)]


async def test_a_run_that_commits_nothing_leaves_no_record(tmp_path: Path) -> None:
    path = tmp_path / "w.db"
    stub = AgentOrchestratorStub(latency_ms=0, fail_agents=["archon-1", "archon-2"])
    async with SqliteWitness(path) as witness:
        service = ConcurrentDeliberationService(stub, witness=witness)
        result = await service.invoke_concurrent(make_requests(2))
        assert result.success_count == 0
        assert await witness.recorded_batch(result.batch_id) is None
        # A run ended is forgotten: an output committed later records no run.
        await witness.commit(_output("archon-1", result.batch_id))
        recorded = await witness.recorded_batch(result.batch_id)
        assert recorded is not None and recorded.requests is None
    assert select(path, "SELECT count(*) FROM batch_runs") == [(0,)]


async def test_a_tampered_output_of_a_batch_refuses_its_resume(tmp_path: Path) -> None:
    path = tmp_path / "w.db"
    async with SqliteWitness(path) as witness:
        result = await _deliberate(witness, 2)
        target = result.outputs[1]  # type: ignore[attr-defined]
        run_sql(path, f"UPDATE outputs SET content = 'x' WHERE output_id = '{target.output_id}'")
        with pytest.raises(WitnessError, match="does not verify"):
            await witness.recorded_batch(result.batch_id)  # type: ignore[attr-defined]


async def test_a_batch_with_an_output_deleted_from_the_log_is_not_resumed(
    tmp_path: Path,
) -> None:
    """A deleted row leaves a gap in the chain: resuming would call that agent again and
    extend a broken chain, so the read refuses."""
    path = tmp_path / "w.db"
    async with SqliteWitness(path) as witness:
        result = await _deliberate(witness, 3)
        run_sql(path, "DELETE FROM outputs WHERE sequence = 2")  # one of the batch's three
        with pytest.raises(WitnessError, match="rows are missing"):
            await witness.recorded_batch(result.batch_id)  # type: ignore[attr-defined]


async def test_a_batch_whose_outputs_were_all_deleted_is_not_resumed(tmp_path: Path) -> None:
    """A run is recorded in its first output's transaction: a run with no output left
    means outputs were removed (at the log's end, where no gap shows)."""
    path = tmp_path / "w.db"
    async with SqliteWitness(path) as witness:
        result = await _deliberate(witness, 2)
        batch = result.batch_id  # type: ignore[attr-defined]
        run_sql(path, f"DELETE FROM outputs WHERE batch_id = '{batch}'")
        with pytest.raises(WitnessError, match="none of its outputs"):
            await witness.recorded_batch(batch)


async def test_a_locked_log_does_not_keep_a_resume_from_reading_it(tmp_path: Path) -> None:
    """Another connection holds the write lock (a writer mid-transaction): the resume's
    read goes on (WAL readers do not wait for writers)."""
    path = tmp_path / "w.db"
    async with SqliteWitness(path, busy_timeout_s=0.2) as witness:
        result = await _deliberate(witness, 2)
        db = sqlite3.connect(path, isolation_level=None)
        db.execute("BEGIN IMMEDIATE")
        try:
            with trio.fail_after(5):
                recorded = await witness.recorded_batch(result.batch_id)  # type: ignore[attr-defined]
        finally:
            db.execute("ROLLBACK")
            db.close()
        assert recorded is not None and len(recorded.outputs) == 2


async def test_a_resume_whose_commits_find_the_log_locked_fails_them_after_the_busy_timeout(
    tmp_path: Path,
) -> None:
    path = tmp_path / "w.db"
    async with SqliteWitness(path, busy_timeout_s=0.2) as witness:
        switch = HaltSwitch()
        requests = make_requests(3)
        stub = AgentOrchestratorStub(latency_ms=0, fail_agents=["archon-3"])
        first = await ConcurrentDeliberationService(stub, witness=witness).invoke_concurrent(
            requests
        )
        db = sqlite3.connect(path, isolation_level=None)
        db.execute("BEGIN IMMEDIATE")
        try:
            stub = AgentOrchestratorStub(latency_ms=0)
            service = ConcurrentDeliberationService(stub, switch, witness=witness)
            result = await service.invoke_concurrent(requests, resume=first.batch_id)
        finally:
            db.execute("ROLLBACK")
            db.close()
        assert stub.get_invocation_count() == 1
        assert [f.kind for f in result.failures] == [FailureKind.WITNESS]
        assert "locked" in result.failures[0].message
        assert await witness.count() == 2
