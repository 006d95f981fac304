"""``--hedge-after auto`` for a one-batch command: answer times remembered across runs.

The kernel's observed hedge delay needs answers seen by the same service, and a
``conclave deliberate`` run is one batch: the first batch of a service never hedges.
So the command keeps, per endpoint and model (or stub profile), the most recent answer
times of earlier runs in one small JSON file under ``$XDG_STATE_HOME/conclave/``
(``~/.local/state/conclave/`` without it), and turns the 95th percentile of them into a
fixed delay for this run.  With fewer than :data:`MIN_SAMPLES` answers remembered, the
run is not hedged and says so; its own answers are remembered for the next one.

Only runs given ``--hedge-after auto`` read or write the file.  Keys are SHA-256 digests
of the endpoint (secrets redacted first) and model, never the URL itself.  A missing,
unreadable, corrupt or oversized file is an empty history (a warning, never a failed run).
Blocking I/O: call :func:`load` and :func:`remember` from a worker thread.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

from adapters._atomic import write_atomically
from adapters.urls import redact_url
from kernel import nearest_rank

__all__ = [
    "KEEP",
    "MAX_FILE_BYTES",
    "MAX_KEYS",
    "MIN_SAMPLES",
    "QUANTILE",
    "history_path",
    "history_key",
    "load",
    "remember",
]

log = logging.getLogger("adapters.cli.latency_history")

#: Answers needed before a delay is trusted (the kernel's ``HedgePolicy.min_samples``).
MIN_SAMPLES = 20
#: The quantile hedged at (the kernel's default).
QUANTILE = 0.95
#: Answer times kept per key: recent behaviour, bounded file.
KEEP = 256
#: Keys kept in the file (endpoints x models); the least recently written go first.
MAX_KEYS = 64
#: The largest file read: what this module writes stays far below it (MAX_KEYS x KEEP
#: floats, ~0.4 MB), so anything bigger is not ours and is not read into memory.
MAX_FILE_BYTES = 1 << 20


def history_path() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "conclave" / "latency-history.json"


def history_key(backend: str, base_url: str | None, model: str | None, stub: str = "") -> str:
    """The key of one endpoint and model (or stub profile): a digest, never the URL."""
    where = redact_url(base_url) if base_url else ""
    text = "\0".join((backend, where, model or "", stub))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _read(path: Path) -> dict[str, list[float]]:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
        if len(data) > MAX_FILE_BYTES:
            raise ValueError(f"over {MAX_FILE_BYTES} bytes")
        raw = json.loads(data)
    except FileNotFoundError:
        return {}
    # RecursionError: nesting deeper than the parser goes is corrupt too.
    except (OSError, ValueError, RecursionError) as exc:
        log.warning(
            "latency history unreadable; starting afresh",
            extra={"error": type(exc).__name__ if isinstance(exc, RecursionError) else str(exc)},
        )
        return {}
    if not isinstance(raw, dict):
        return {}
    return {k: _seconds(v) for k, v in raw.items() if isinstance(k, str) and isinstance(v, list)}


def _seconds(values: list[object]) -> list[float]:
    """The answer times among ``values``: finite, non-negative numbers (not JSON's
    true/false, which Python reads as ints; not ints too large for a float)."""
    kept = []
    for x in values:
        if isinstance(x, bool) or not isinstance(x, int | float):
            continue
        try:
            seconds = float(x)
        except OverflowError:
            continue
        if math.isfinite(seconds) and seconds >= 0:
            kept.append(seconds)
    return kept


def load(key: str, path: Path | None = None) -> list[float]:
    """The answer times (seconds) remembered for ``key``, oldest first."""
    return _read(path or history_path()).get(key, [])


def delay(samples: Sequence[float]) -> float | None:
    """The hedge delay ``samples`` support, or None (too few)."""
    if len(samples) < MIN_SAMPLES:
        return None
    return nearest_rank(samples, QUANTILE)


def remember(key: str, answers_s: Sequence[float], path: Path | None = None) -> None:
    """Add this run's answer times to ``key``'s (atomically; best effort: a file that
    cannot be written is a warning)."""
    if not answers_s:
        return
    path = path or history_path()
    history = _read(path)
    kept = (history.pop(key, []) + [float(a) for a in answers_s])[-KEEP:]
    history[key] = kept  # last written last: the eviction order below
    for old in list(history)[: max(len(history) - MAX_KEYS, 0)]:
        del history[old]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, json.dumps(history).encode())
    except OSError as exc:
        log.warning("latency history not written", extra={"error": exc.strerror or str(exc)})
