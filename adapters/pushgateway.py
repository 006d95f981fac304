"""Push a registry's metrics to a Prometheus Pushgateway once, at the end of a batch job.

    url = check_gateway_url("http://pushgateway:9091")      # before anything runs
    problem = await push_metrics(url, registry, grouping_key={"instance": "host-1", "run": run_id})

A batch job is gone before Prometheus scrapes it; the Pushgateway keeps its last push
for Prometheus to scrape (``honor_labels: true``).  The push is a ``PUT``: it replaces
the group ``job``/``grouping_key`` whole.

Monitoring never fails or slows the work it watches: :func:`push_metrics` runs the HTTP
call in a worker thread, gives up after ``timeout_s`` (a gateway that accepts the
connection and never answers included: the thread is abandoned, its socket times out on
its own), and reports a failure as a logged warning and its reason, never an exception.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import trio

from adapters.roster import check_base_url
from adapters.urls import redact_url
from kernel import InvalidRequestError

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

__all__ = ["DEFAULT_PUSH_TIMEOUT_S", "JOB", "check_gateway_url", "push_metrics"]

log = logging.getLogger(__name__)

#: How long a push may take before it is given up: long enough for a gateway across a
#: network, short enough that a dead one costs a batch job little.
DEFAULT_PUSH_TIMEOUT_S = 5.0
#: The ``job`` label of every push (the alert rules' ``job``).
JOB = "conclave"


def check_gateway_url(url: object) -> str:
    """``url`` if it is an ``http(s)://`` URL with a host and nothing secret or ambiguous
    in it (no credentials, query or fragment); else :class:`InvalidRequestError`."""
    return check_base_url(url, "url")


def _check_timeout(timeout_s: object) -> float:
    if (
        isinstance(timeout_s, bool)
        or not isinstance(timeout_s, int | float)
        or not math.isfinite(timeout_s)
        or timeout_s <= 0
    ):
        raise InvalidRequestError(f"timeout_s must be a finite number > 0, got {timeout_s!r}")
    return float(timeout_s)


async def push_metrics(
    url: str,
    registry: CollectorRegistry,
    *,
    grouping_key: dict[str, str],
    job: str = JOB,
    timeout_s: float = DEFAULT_PUSH_TIMEOUT_S,
) -> str | None:
    """Push ``registry`` to the gateway at ``url``: None once it took them, else why not.

    Returns within about ``timeout_s`` whatever the gateway does.  A gateway that is
    down, refuses the push or does not answer in time is a warning on the ``adapters``
    logger (the URL, the error's type and text) and its reason returned.  Bad arguments
    raise :class:`InvalidRequestError` before anything is sent.
    """
    url = check_gateway_url(url)
    timeout = _check_timeout(timeout_s)
    key = {str(k): str(v) for k, v in grouping_key.items()}

    # Imported here: checking a URL (the CLI, before a run) needs no prometheus-client.
    from prometheus_client import push_to_gateway

    def push() -> None:
        push_to_gateway(url, job=job, registry=registry, grouping_key=key, timeout=timeout)

    error: str | None = None
    with trio.move_on_after(timeout) as bound:
        try:
            # abandon_on_cancel: a hung gateway keeps a worker thread (until its socket's
            # own timeout), never the run.
            await trio.to_thread.run_sync(push, abandon_on_cancel=True)
        except Exception as exc:  # urllib's URLError, HTTPError, OSError, timeouts
            error = f"{type(exc).__name__}: {exc}"
    if bound.cancelled_caught:
        error = f"no answer within {timeout:g} s"
    group = ",".join(f"{k}={v}" for k, v in sorted(key.items()))
    where = {"gateway": redact_url(url), "job": job, "group": group}
    if error is None:
        log.info("metrics pushed", extra=where)
        return None
    log.warning("metrics not pushed", extra={**where, "error": error})
    return error
