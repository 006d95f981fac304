"""Resuming a batch from its witness log: which deliberation a request set is, and the
check that a resume asks for the same one.

    the call's requests + what the log recorded of the batch (a :class:`BatchLog`)
        -> refused (:class:`InvalidRequestError`, nothing invoked)
        or the committed outputs, by request index, marked resumed

A batch is identified by its ``batch_id``; a resumed run reuses it.  What must match is
the *request set*: the same agent ids, each with the same context fingerprint as the
first run recorded.  Request ids need not match: a rerun builds its requests anew.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Final
from uuid import UUID

import attrs

from kernel._errors import InvalidRequestError
from kernel._ports import RecordedBatch
from kernel._types import AgentOutput, AgentRequest, ContextBundle

__all__ = [
    "RESUMED",
    "context_fingerprint",
    "mark_resumed",
    "parse_batch_id",
    "request_set",
    "resumed_outputs",
]

#: The metadata key a resumed output carries (``True``) in a result.  Only the returned
#: copy carries it: the log keeps the output as it was committed.
RESUMED: Final = "resumed"

_LISTED = 5  # agent ids named in a refusal; the rest are counted


def context_fingerprint(context: ContextBundle) -> str:
    """SHA-256 (hex) of what a context says: its topic id, topic content and metadata.

    Not its ``bundle_id`` or ``created_at``: a process that runs the same topic again
    (a resume after a crash) builds a new bundle with new ones."""
    meta = json.dumps(dict(context.metadata), sort_keys=True, ensure_ascii=False)
    digest = hashlib.sha256()
    for part in (context.topic_id, meta, context.topic_content):
        # surrogatepass: a bundle may hold lone surrogates (JSON's "\ud800"); still one
        # encoding per string, so still unambiguous.
        encoded = part.encode("utf-8", "surrogatepass")
        digest.update(len(encoded).to_bytes(8, "big"))  # unambiguous concatenation
        digest.update(encoded)
    return digest.hexdigest()


def request_set(requests: Sequence[AgentRequest]) -> dict[str, str]:
    """Each agent's context fingerprint: what a run records and a resume must match."""
    by_context: dict[int, str] = {}  # a batch usually shares one bundle: hash it once
    result = {}
    for req in requests:
        key = id(req.context)
        if key not in by_context:
            by_context[key] = context_fingerprint(req.context)
        result[req.agent_id] = by_context[key]
    return result


def parse_batch_id(value: object) -> UUID:
    """``resume=``: a batch id, as a UUID or its string form."""
    if isinstance(value, UUID):
        return value
    if isinstance(value, str):
        try:
            return UUID(value)
        except ValueError:
            pass
    raise InvalidRequestError(f"resume must be a batch id (a UUID), got {value!r:.80}")


def mark_resumed(output: AgentOutput) -> AgentOutput:
    """``output`` as a resumed run returns it: every field as committed (ids, hashes,
    timestamps), its metadata plus ``resumed: True``."""
    return attrs.evolve(output, metadata={**output.metadata, RESUMED: True})


def resumed_outputs(
    recorded: RecordedBatch | None, batch_id: UUID, requests: Sequence[AgentRequest]
) -> dict[int, AgentOutput]:
    """The committed outputs of ``batch_id`` by index into ``requests``, marked resumed;
    :class:`InvalidRequestError` unless ``requests`` are the batch's request set."""
    if recorded is None:
        raise InvalidRequestError(
            f"resume: nothing of batch {batch_id} is in the witness log (no output of it "
            "was committed): there is nothing to resume; run it again without resume"
        )
    if recorded.requests is None:
        raise InvalidRequestError(
            f"resume: the witness log holds outputs of batch {batch_id} but not its request "
            "set (written before batches were recorded): it cannot be checked, so it is "
            "not resumed"
        )
    wanted = request_set(requests)
    _check_same_agents(batch_id, recorded.requests, wanted)
    changed = sorted(a for a, fp in wanted.items() if recorded.requests[a] != fp)
    if changed:
        raise InvalidRequestError(
            f"resume: the context differs from the one batch {batch_id} ran on, for "
            f"{_named(changed)}: a resume must deliberate on the same topic"
        )
    index = {req.agent_id: i for i, req in enumerate(requests)}
    strays = sorted(set(recorded.outputs) - set(index))
    if strays:  # the log contradicts its own request set
        raise InvalidRequestError(
            f"resume: the witness log holds outputs of batch {batch_id} for agents outside "
            f"its request set: {_named(strays)}"
        )
    return {index[a]: mark_resumed(out) for a, out in recorded.outputs.items()}


def _check_same_agents(
    batch_id: UUID, recorded: Mapping[str, str], wanted: Mapping[str, str]
) -> None:
    missing = sorted(set(recorded) - set(wanted))
    extra = sorted(set(wanted) - set(recorded))
    if missing or extra:
        parts = [f"missing {_named(missing)}"] if missing else []
        parts += [f"not in it {_named(extra)}"] if extra else []
        raise InvalidRequestError(
            f"resume: the agents differ from batch {batch_id}'s ({len(recorded)} agents): "
            + "; ".join(parts)
        )


def _named(agent_ids: Sequence[str]) -> str:
    shown = ", ".join(repr(a) for a in agent_ids[:_LISTED])
    more = len(agent_ids) - _LISTED
    return f"{shown} and {more} more" if more > 0 else shown
