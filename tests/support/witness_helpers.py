"""Witness logs for tests: real ones to audit, and edits made behind the witness's back."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any
from uuid import uuid4

import trio

from adapters.witness.sqlite import SqliteWitness
from kernel import AgentOutput


def make_log(path: Path, n: int = 5) -> str:
    """A witness log with n records (n >= 1), closed cleanly; returns its head chain hash."""

    async def fill() -> str:
        async with SqliteWitness(path) as witness:
            receipt = None
            for i in range(n):
                receipt = await witness.commit(AgentOutput(f"archon-{i}", uuid4(), f"a{i}"))
            assert receipt is not None
            return receipt.chain_hash

    return trio.run(fill)


def run_sql(path: Path, script: str) -> None:
    """Run ``script`` on the database at ``path`` through a connection of its own, as
    another program (or someone tampering with the file) would."""
    db = sqlite3.connect(path)
    try:
        db.executescript(script)
    finally:
        db.close()


def select(path: Path, sql: str) -> list[tuple[Any, ...]]:
    """The rows ``sql`` returns from the database at ``path``, read through a connection
    of its own."""
    db = sqlite3.connect(path)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()
