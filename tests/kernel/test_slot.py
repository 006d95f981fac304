"""Slot: the work a slot admits is cancelled when its shared lease is lost."""

from __future__ import annotations

import trio
import trio.testing

from kernel._slot import Slot


async def test_losing_the_lease_cancels_the_guarded_work_now_and_later() -> None:
    slot = Slot("a", lease="lease-1")
    reached_end = False
    async with trio.open_nursery() as nursery:

        async def work() -> None:
            nonlocal reached_end
            with slot.guard():
                await trio.sleep_forever()
            reached_end = True  # the guard absorbed its own cancellation

        nursery.start_soon(work)
        await trio.testing.wait_all_tasks_blocked()
        slot.lose("server lost it")
        slot.lose("a second report")  # the first reason stays
    assert reached_end and slot.lost == "server lost it"
    with slot.guard() as scope:  # guarded after the loss: cancelled at once
        await trio.lowlevel.checkpoint()
    assert scope.cancelled_caught
