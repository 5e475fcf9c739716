"""Fair admission of origin fetches (cache/admission.py), on the event loop alone."""

from __future__ import annotations

import asyncio

import pytest

from stashflow.cache.admission import Admission, Overloaded


async def _hold(adm: Admission, origin: str, order: list[str], release: asyncio.Event) -> None:
    async with adm.slot(origin):
        order.append(origin)
        await release.wait()


def test_freed_slots_go_to_the_origins_in_turn() -> None:
    async def main() -> list[str]:
        adm = Admission(total=4, per_origin=4, queue_limit=100)
        order: list[str] = []
        gate_x, gate_a, gate_rest = asyncio.Event(), asyncio.Event(), asyncio.Event()
        tasks = [asyncio.create_task(_hold(adm, "X", order, gate_x)) for _ in range(2)]
        tasks += [asyncio.create_task(_hold(adm, "A", order, gate_a)) for _ in range(2)]
        await asyncio.sleep(0)
        # every slot is taken; a burst of 6 for A queues, then one request for B
        tasks += [asyncio.create_task(_hold(adm, "A", order, gate_rest)) for _ in range(6)]
        await asyncio.sleep(0)
        tasks.append(asyncio.create_task(_hold(adm, "B", order, gate_rest)))
        await asyncio.sleep(0)
        assert sorted(order) == ["A", "A", "X", "X"]
        gate_x.set()  # X's two slots free up: one goes to A's queue, one to B
        await asyncio.sleep(0.01)
        gate_a.set()
        gate_rest.set()
        await asyncio.gather(*tasks)
        return order

    order = asyncio.run(main())
    # first come, first served would have given both freed slots to A's burst
    assert sorted(order[4:6]) == ["A", "B"] and len(order) == 11


def test_one_origin_cannot_exceed_its_cap() -> None:
    async def main() -> dict[str, int]:
        adm = Admission(total=4, per_origin=2, queue_limit=100)
        release = asyncio.Event()
        order: list[str] = []
        tasks = [asyncio.create_task(_hold(adm, "A", order, release)) for _ in range(5)]
        tasks.append(asyncio.create_task(_hold(adm, "B", order, release)))
        await asyncio.sleep(0.01)
        active = adm.active()
        release.set()
        await asyncio.gather(*tasks)
        assert adm.active() == {"A": 0, "B": 0}
        return active

    assert asyncio.run(main()) == {"A": 2, "B": 1}


def test_queue_limit_and_wait_limit_refuse_with_a_reason() -> None:
    async def main() -> None:
        adm = Admission(total=1, per_origin=1, queue_limit=2, wait_limit=0.2)
        release = asyncio.Event()
        holder = asyncio.create_task(_hold(adm, "A", [], release))
        await asyncio.sleep(0)
        waiters = [asyncio.create_task(_hold(adm, "A", [], release)) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(Overloaded, match="2 requests waiting"):
            async with adm.slot("A"):
                pass
        # the two queued ones give up after wait_limit, with a reason
        for waiter in waiters:
            with pytest.raises(Overloaded, match="no fetch slot free within 0s"):
                await waiter
        release.set()
        await holder
        async with adm.slot("A"):  # the slot was returned: free again at once
            assert adm.active() == {"A": 1}

    asyncio.run(main())


def test_a_cancelled_waiter_gives_back_a_slot_granted_to_it() -> None:
    async def main() -> None:
        adm = Admission(total=1, per_origin=1, queue_limit=10)
        release = asyncio.Event()
        holder = asyncio.create_task(_hold(adm, "A", [], release))
        await asyncio.sleep(0)
        waiter = asyncio.create_task(_hold(adm, "A", [], asyncio.Event()))
        await asyncio.sleep(0)
        release.set()
        await holder  # the slot is granted to the waiter ...
        waiter.cancel()  # ... which is cancelled before it runs
        with pytest.raises(asyncio.CancelledError):
            await waiter
        async with adm.slot("B"):
            assert adm.active()["B"] == 1

    asyncio.run(main())
