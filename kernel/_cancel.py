"""Two trio questions the kernel asks in many places, answered once.

* Was this ``trio.Cancelled`` asked for?  A cancellation that no halt, timeout, stop or
  caller asked for was made up (or let escape) by a part the kernel calls: it is that
  part's error, not a cancellation, and must not end anything as if it were one.
* Which exception of a nursery's group matters?  The kernel's tasks never raise an
  ``Exception``, so a group carries a ``BaseException`` a part let through
  (``KeyboardInterrupt``, ``SystemExit``) or cancellation.
"""

from __future__ import annotations

import math

import trio

__all__ = ["cancel_requested", "raise_if_requested", "surface"]


def cancel_requested() -> bool:
    """True if some cancel scope around this task has been cancelled."""
    return trio.current_effective_deadline() == -math.inf


def raise_if_requested(cancelled: trio.Cancelled) -> None:
    """Re-raise ``cancelled`` if someone asked for it; return if it is a stray.

    Use as the first line of ``except trio.Cancelled as exc:``; what follows it handles
    the stray.
    """
    if trio.current_effective_deadline() == -math.inf:
        raise cancelled


def surface(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one exception of a nursery's group a caller expects to catch.

    The first leaf that is not ``Cancelled`` (re-raised as itself, not wrapped); a
    group of only ``Cancelled`` goes up unchanged, for the cancel scope that owns it.
    """
    leaves: list[BaseException] = []
    stack: list[BaseException] = [group]
    while stack:
        exc = stack.pop(0)
        if isinstance(exc, BaseExceptionGroup):
            stack[:0] = list(exc.exceptions)
        else:
            leaves.append(exc)
    for leaf in leaves:
        if not isinstance(leaf, trio.Cancelled):
            return leaf
    return group
