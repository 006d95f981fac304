"""The witness never delays a halt, and the log equals what the callers got.

Real SQLite and real threads, so these run on the real clock; a second sqlite3
connection holding ``BEGIN IMMEDIATE`` plays the other process holding the write lock.
"""

from __future__ import annotations

import math
import random
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from uuid import uuid4

import pytest
import trio

from adapters.stub import AgentOrchestratorStub
from adapters.witness.sqlite import SqliteWitness, WitnessError, verify_log
from kernel import (
    AgentOutput,
    CommitReceipt,
    ConcurrentDeliberationService,
    HaltSwitch,
    InvalidRequestError,
    SystemHaltedError,
)
from tests.support.helpers import make_requests, time_halt
from tests.support.witness_helpers import select


def _output(i: int) -> AgentOutput:
    return AgentOutput(f"archon-{i}", uuid4(), f"answer {i}", batch_id=uuid4())


class WriteLock:
    """Another connection holding the database's write lock until released."""

    def __init__(self, path: Path) -> None:
        self._db: sqlite3.Connection | None = sqlite3.connect(path, isolation_level=None)
        self._db.execute("BEGIN IMMEDIATE")

    def release(self) -> None:
        if self._db is not None:
            self._db.execute("ROLLBACK")
            self._db.close()
            self._db = None


def _logged(path: Path) -> dict[str, tuple[int, str]]:
    """output_id -> (sequence, chain_hash) of every row in the log."""
    rows = select(path, "SELECT output_id, sequence, chain_hash FROM outputs")
    return {r[0]: (r[1], r[2]) for r in rows}


async def _until(predicate: Callable[[], bool]) -> None:
    """Wait until the writer thread reaches a state the test can observe."""
    with trio.fail_after(10):
        # The state belongs to the writer thread: there is no trio event to wait on.
        while not predicate():  # noqa: ASYNC110
            await trio.sleep(0.001)


async def test_cancelled_commit_returns_at_once_while_locked_and_is_never_written(
    tmp_path: Path,
) -> None:
    path = tmp_path / "w.db"
    async with SqliteWitness(path) as witness:
        first = await witness.commit(_output(0))
        withdrawn = _output(1)
        lock = WriteLock(path)
        scope = trio.CancelScope()
        returned_after: list[float] = []
        cancelled_at = math.nan

        async def commit() -> None:
            with scope:
                await witness.commit(withdrawn)
            returned_after.append(time.perf_counter() - cancelled_at)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(commit)
            # The writer is stuck on the lock, retrying (not merely queued).
            await _until(lambda: witness.statistics().lock_waits >= 2)
            cancelled_at = time.perf_counter()
            scope.cancel()
        assert scope.cancelled_caught  # Cancelled propagated: no receipt
        print(f"\ncancelled commit returned {returned_after[0] * 1e3:.3f} ms after the cancel")
        assert returned_after[0] < 1.0  # a generous bound; measured well under 1 ms
        assert witness.statistics().queued == 0  # withdrawn at once, by the waiter
        lock.release()
        later = await witness.commit(_output(2))
    logged = _logged(path)
    assert str(withdrawn.output_id) not in logged
    assert sorted(seq for seq, _ in logged.values()) == [1, 2]  # gap-free
    assert (first.sequence, later.sequence) == (1, 2)
    report = verify_log(path, expected_head=later.chain_hash)
    assert report.ok and report.records == 2


async def test_aclose_does_not_wait_for_a_lock_nobody_needs_any_more(tmp_path: Path) -> None:
    path = tmp_path / "w.db"
    witness = SqliteWitness(path)
    await witness.commit(_output(0))
    lock = WriteLock(path)
    try:
        with trio.move_on_after(0.05) as scope:
            await witness.commit(_output(1))
        assert scope.cancelled_caught
        started = time.perf_counter()
        await witness.aclose()  # the lock is still held, but nothing is left to write
        assert time.perf_counter() - started < 10.0  # not the 30 s busy timeout
    finally:
        lock.release()
    assert len(_logged(path)) == 1
    with pytest.raises(WitnessError, match="closed"):
        await witness.commit(_output(2))


async def _commit_behind_a_lock(
    witness: SqliteWitness,
    outputs: list[AgentOutput],
    while_queued: Callable[[list[trio.CancelScope]], Awaitable[None]] | None = None,
) -> dict[int, CommitReceipt]:
    """Commit ``outputs`` concurrently while another connection holds the write lock;
    once all are queued, run ``while_queued`` (given each commit's cancel scope), then
    release the lock.  Returns the receipts by index (a cancelled commit has none)."""
    receipts: dict[int, CommitReceipt] = {}
    scopes = [trio.CancelScope() for _ in outputs]

    async def commit(i: int) -> None:
        with scopes[i]:
            receipts[i] = await witness.commit(outputs[i])

    lock = WriteLock(witness.path)
    try:
        async with trio.open_nursery() as nursery:
            for i in range(len(outputs)):
                nursery.start_soon(commit, i)
            await _until(lambda: witness.statistics().queued == len(outputs))
            if while_queued is not None:
                await while_queued(scopes)
            lock.release()
    finally:
        lock.release()
    return receipts


async def test_cancelling_one_commit_keeps_the_others_of_its_group(tmp_path: Path) -> None:
    path = tmp_path / "w.db"
    outputs = [_output(i) for i in range(4)]

    async with SqliteWitness(path) as witness:

        async def cancel_the_second(scopes: list[trio.CancelScope]) -> None:
            scopes[1].cancel()
            await _until(lambda: witness.statistics().queued == 3)

        receipts = await _commit_behind_a_lock(witness, outputs, cancel_the_second)
        assert witness.transactions == 1  # the other three went in one transaction
    assert sorted(receipts) == [0, 2, 3]
    assert set(_logged(path)) == {str(outputs[i].output_id) for i in (0, 2, 3)}
    assert verify_log(path).ok


async def test_72_commits_queued_behind_a_lock_cost_one_transaction(tmp_path: Path) -> None:
    path = tmp_path / "w.db"
    async with SqliteWitness(path) as witness:
        receipts = await _commit_behind_a_lock(witness, [_output(i) for i in range(72)])
        assert witness.transactions == 1
    assert sorted(r.sequence for r in receipts.values()) == list(range(1, 73))
    assert verify_log(path).records == 72


async def test_a_commit_not_cancelled_fails_after_busy_timeout(tmp_path: Path) -> None:
    path = tmp_path / "w.db"
    async with SqliteWitness(path, busy_timeout_s=0.2) as witness:
        lock = WriteLock(path)
        started = time.perf_counter()
        with pytest.raises(WitnessError, match=r"locked for more than 0\.2 s"):
            await witness.commit(_output(0))
        waited = time.perf_counter() - started
        lock.release()
        assert 0.2 <= waited < 10.0  # its own 0.2 s, not the default 30 s
        receipt = await witness.commit(_output(1))
    assert receipt.sequence == 1  # the failed one took no sequence number
    assert list(_logged(path)) == [str(receipt.output_id)]


@pytest.mark.parametrize("bad", [0, -1, math.nan, "30", True, None])
def test_busy_timeout_is_validated(tmp_path: Path, bad: object) -> None:
    with pytest.raises(InvalidRequestError, match="busy_timeout_s"):
        SqliteWitness(tmp_path / "w.db", busy_timeout_s=bad)  # type: ignore[arg-type]
    assert not (tmp_path / "w.db").exists()  # refused before anything was created


@pytest.mark.parametrize("seed", range(12))
async def test_random_cancellations_log_equals_receipts(tmp_path: Path, seed: int) -> None:
    """72 concurrent commits, a random subset cancelled at random moments, with the
    database locked by another connection for a random while: the log holds exactly the
    outputs whose commit returned a receipt, with the receipts' sequence and hash."""
    rng = random.Random(seed)
    path = tmp_path / "w.db"
    outputs = [_output(i) for i in range(72)]
    scopes = [trio.CancelScope() for _ in outputs]
    receipts: dict[str, CommitReceipt] = {}
    raised: set[str] = set()
    late = 0  # cancelled, yet returned a receipt (cancel came past the point of no return)

    async def commit(witness: SqliteWitness, i: int) -> None:
        nonlocal late
        await trio.sleep(rng.uniform(0, 0.01))
        with scopes[i]:
            receipt = await witness.commit(outputs[i])
            receipts[str(outputs[i].output_id)] = receipt
            late += scopes[i].cancel_called
            return
        raised.add(str(outputs[i].output_id))

    async def cancel_later(i: int) -> None:
        await trio.sleep(rng.uniform(0, 0.04))
        scopes[i].cancel()

    async with SqliteWitness(path, synchronous="NORMAL") as witness:
        lock = WriteLock(path) if seed % 2 else None
        async with trio.open_nursery() as nursery:
            for i in range(72):
                nursery.start_soon(commit, witness, i)
            for i in rng.sample(range(72), rng.randint(1, 60)):
                nursery.start_soon(cancel_later, i)
            if lock is not None:
                await trio.sleep(rng.uniform(0, 0.03))
                lock.release()
        transactions = witness.transactions
    assert len(receipts) + len(raised) == 72
    logged = _logged(path)
    assert set(logged) == set(receipts)
    for output_id, receipt in receipts.items():
        assert logged[output_id] == (receipt.sequence, receipt.chain_hash)
    report = verify_log(path)
    assert report.ok and report.records == len(receipts)
    assert sorted(seq for seq, _ in logged.values()) == list(range(1, len(receipts) + 1))
    print(
        f"\nseed {seed}: {len(receipts)} committed ({late} after their cancel), "
        f"{len(raised)} withdrawn, {transactions} transactions"
    )


async def test_a_halt_is_not_delayed_by_a_locked_witness(tmp_path: Path) -> None:
    """A halt during a 72-agent batch whose witness is locked."""
    path = tmp_path / "w.db"
    switch = HaltSwitch()
    async with SqliteWitness(path) as witness:
        stub = AgentOrchestratorStub(latency_ms=1)
        service = ConcurrentDeliberationService(stub, switch, witness=witness)
        lock = WriteLock(path)
        err, took = await time_halt(
            lambda: service.invoke_concurrent(make_requests(72)),
            switch,
            lambda: _until(lambda: witness.statistics().queued == 72),
            "operator stop",
        )
        lock.release()
    print(f"\nhalt -> invoke_concurrent returned: {took * 1e3:.1f} ms")
    assert took < 1.0
    assert err.partial is not None
    released = {str(o.output_id) for o in err.partial.outputs}
    assert set(_logged(path)) == released == set()


@pytest.mark.parametrize("seed", range(6))
async def test_halt_at_a_random_moment_log_equals_released(tmp_path: Path, seed: int) -> None:
    """After a halt during commits, the log holds exactly the outputs the caller was
    given (guards against: 31 in the log, 25 given)."""
    rng = random.Random(seed)
    path = tmp_path / "w.db"
    switch = HaltSwitch()
    given: set[str] = set()
    async with SqliteWitness(path) as witness:
        stub = AgentOrchestratorStub(latency_ms=1, jitter_ms=20, seed=seed)
        service = ConcurrentDeliberationService(stub, switch, witness=witness)

        async def run() -> None:
            try:
                result = await service.invoke_concurrent(make_requests(72))
            except SystemHaltedError as exc:
                assert exc.partial is not None
                result = exc.partial
            given.update(str(o.output_id) for o in result.outputs)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            await trio.sleep(rng.uniform(0.002, 0.02))  # a random moment, mid-commits
            switch.halt("operator stop")
    assert set(_logged(path)) == given
    assert verify_log(path).records == len(given)


async def test_a_run_is_written_in_the_transaction_of_its_batch_first_output(
    tmp_path: Path,
) -> None:
    """Never an output of a recorded batch without its request set, even after a crash:
    both go in one transaction."""
    path = tmp_path / "w.db"
    batch = uuid4()
    async with SqliteWitness(path) as witness:
        end = witness.begin_run(batch, {"archon-1": "f" * 64, "archon-2": "f" * 64})
        lock = WriteLock(path)
        async with trio.open_nursery() as nursery:
            for agent in ("archon-1", "archon-2"):
                output = AgentOutput(agent, uuid4(), "yes", batch_id=batch)
                nursery.start_soon(witness.commit, output)
            await _until(lambda: witness.statistics().queued == 2)
            assert select(path, "SELECT count(*) FROM batch_runs") == [(0,)]
            lock.release()
        end()
        assert witness.transactions == 1
    assert select(path, "SELECT batch_id, run FROM batch_runs") == [(str(batch), 1)]
