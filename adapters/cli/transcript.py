"""The record of one deliberation: the ``conclave.transcript/1`` JSON document.

One document per run, written whole or not at all (write-then-rename)::

    schema        "conclave.transcript/1"
    status        "completed" | "halted" | "interrupted"
    halt_reason   the halt's reason, or null
    batch_id, started_at, completed_at, total_ms
                  the batch's; null when the run was halted before it began
    backend, model
    topic         {topic_id, bundle_id, content_sha256}: the topic by hash, never its text
    counts        {total, succeeded, failed, by_kind}
    pool_after    the pool's status when the batch was over
    outcomes      one record per agent that has an outcome, in request order: ids,
                  hashes, timings; the answer itself only with ``include_content``

Nothing here knows about the command line: every input is an explicit parameter.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from adapters._atomic import write_atomically
from kernel import (
    AgentFailure,
    AgentOutput,
    AgentRequest,
    ConcurrentResult,
    ContextBundle,
    PoolStatus,
)

__all__ = ["TRANSCRIPT_SCHEMA", "check_writable", "document", "write"]

TRANSCRIPT_SCHEMA = "conclave.transcript/1"


#: ``--json -``: the transcript goes to standard output (a file named ``-`` is ``./-``).
STDOUT = Path("-")


def check_writable(path: Path) -> None:
    """Raise :class:`ValueError` (the message starts with ``path``) if a transcript could
    not be written to ``path``; change nothing otherwise.

    It creates and removes a temp file beside ``path``, as :func:`write` will, so a
    directory that exists but takes no new file (read-only, ``/proc``) is refused too.
    Blocking: call it from a worker thread.
    """
    if path == STDOUT:
        return
    if path.is_dir():
        raise ValueError(f"{path}: is a directory")
    if not path.parent.exists():
        raise ValueError(f"{path}: directory {path.parent} does not exist")
    if not path.parent.is_dir():
        raise ValueError(f"{path}: {path.parent} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise ValueError(f"{path}: cannot write in {path.parent}: {exc.strerror}") from None
    os.close(fd)
    os.unlink(probe)


def document(
    *,
    context: ContextBundle,
    requests: Sequence[AgentRequest],
    result: ConcurrentResult | None,
    halt_reason: str | None,
    interrupted: bool,
    backend: str,
    model: str | None,
    pool_after: PoolStatus,
    include_content: bool = False,
) -> dict[str, Any]:
    """The transcript of one run, ready for :func:`write`.

    ``result`` is None when the run was halted before its batch began: then what did
    not happen is null, the counts are 0 and there are no outcomes.  The status is
    ``interrupted`` (an operator's Ctrl-C) over ``halted`` over ``completed``.
    """
    outputs: Sequence[AgentOutput] = result.outputs if result is not None else ()
    failures: Sequence[AgentFailure] = result.failures if result is not None else ()
    outcomes: dict[str, AgentOutput | AgentFailure] = {o.agent_id: o for o in outputs}
    outcomes.update({f.agent_id: f for f in failures})
    status = "halted" if halt_reason is not None else "completed"
    if interrupted:
        status = "interrupted"
    return {
        "schema": TRANSCRIPT_SCHEMA,
        "status": status,
        "halt_reason": halt_reason,
        "batch_id": str(result.batch_id) if result is not None else None,
        "started_at": result.started_at.isoformat() if result is not None else None,
        "completed_at": result.completed_at.isoformat() if result is not None else None,
        "total_ms": result.total_ms if result is not None else None,
        "backend": backend,
        "model": model,
        "topic": {
            "topic_id": context.topic_id,
            "bundle_id": str(context.bundle_id),
            "content_sha256": hashlib.sha256(context.topic_content.encode("utf-8")).hexdigest(),
        },
        "counts": {
            "total": len(outputs) + len(failures),
            "succeeded": len(outputs),
            "failed": len(failures),
            "by_kind": dict(Counter(f.kind.value for f in failures)),
        },
        "pool_after": pool_after.as_dict(),
        "outcomes": [
            _outcome_record(outcomes[r.agent_id], include_content)
            for r in requests
            if r.agent_id in outcomes
        ],
    }


def write(path: Path, doc: dict[str, Any]) -> None:
    """Write ``doc`` to ``path`` atomically: a reader (or a Ctrl-C) never sees half a
    transcript.  Raises :class:`OSError` if it cannot; ``path`` is then untouched.
    Blocking: call it from a worker thread.  :data:`STDOUT` writes it to standard
    output, in one write."""
    text = json.dumps(doc, indent=2) + "\n"
    if path == STDOUT:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    write_atomically(path, text.encode())


def _outcome_record(outcome: AgentOutput | AgentFailure, include_content: bool) -> dict[str, Any]:
    if isinstance(outcome, AgentOutput):
        record: dict[str, Any] = {
            "agent_id": outcome.agent_id,
            "request_id": str(outcome.request_id),
            "status": "completed",
            "output_id": str(outcome.output_id),
            "content_hash": outcome.content_hash,
            "content_type": outcome.content_type,
            "generated_at": outcome.generated_at.isoformat(),
            "metadata": dict(outcome.metadata),
        }
        if include_content:
            record["content"] = outcome.content
        return record
    return {
        "agent_id": outcome.agent_id,
        "request_id": str(outcome.request_id),
        "status": "failed",
        "kind": outcome.kind.value,
        "error_type": outcome.error_type,
        "message": outcome.message,
        "elapsed_ms": outcome.elapsed_ms,
    }
