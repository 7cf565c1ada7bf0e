"""FairQueue alone: the order queued requests are served in (fair share across tenants,
weights, priority classes), the bound and the deadline. Asserted on order, not timings."""

from __future__ import annotations

import asyncio

import pytest

from cluster.admission.fair_queue import FairQueue, QueueFull, QueueTimeout


async def served_order(queue: FairQueue, requests: list[tuple[str, float, str]]) -> list[str]:
    """Enqueue `requests` (tenant, weight, priority) behind one running request, then
    finish requests one at a time; return the tenants in the order they got a slot."""
    order: list[str] = []

    async def one(tenant: str, weight: float, priority: str) -> None:
        await queue.acquire(tenant, weight=weight, priority=priority, deadline_s=30)  # type: ignore[arg-type]
        order.append(tenant)

    await queue.acquire("running")
    tasks = []
    for req in requests:
        tasks.append(asyncio.create_task(one(*req)))
        await asyncio.sleep(0)  # enqueue in this order
    for _ in requests:
        queue.release()
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    return order


async def test_a_flooding_tenant_does_not_starve_one_sending_a_few() -> None:
    queue = FairQueue(capacity=lambda: 1, max_queued=100)
    flood = [("A", 1.0, "interactive")] * 10
    order = await served_order(queue, flood + [("B", 1.0, "interactive")] * 3)
    # B arrived after all of A's ten, yet alternates with A from the start.
    assert order[:6] == ["A", "B", "A", "B", "A", "B"] and order[6:] == ["A"] * 7


async def test_weights_give_proportional_shares() -> None:
    queue = FairQueue(capacity=lambda: 1, max_queued=100)
    order = await served_order(queue, [("A", 1.0, "interactive")] * 6 + [("B", 2.0, "interactive")] * 6)
    assert order[:6].count("B") == 4 and order[:6].count("A") == 2


async def test_interactive_goes_before_batch() -> None:
    queue = FairQueue(capacity=lambda: 1, max_queued=100)
    order = await served_order(queue, [("A", 1.0, "batch")] * 3 + [("B", 1.0, "interactive")] * 2)
    assert order == ["B", "B", "A", "A", "A"]


async def test_free_capacity_admits_at_once_and_the_deadline_refuses() -> None:
    queue = FairQueue(capacity=lambda: 2, max_queued=10)
    await queue.acquire("A")
    await queue.acquire("A")
    assert queue.in_flight == 2
    with pytest.raises(QueueTimeout):
        await queue.acquire("B", deadline_s=0.05)
    assert queue.queued == 0 and queue.in_flight == 2
    queue.release()
    await queue.acquire("B", deadline_s=0.05)  # the slot went to the next request


async def test_full_queue_sheds_batch_for_interactive_else_refuses() -> None:
    queue = FairQueue(capacity=lambda: 1, max_queued=2)
    await queue.acquire("running")
    batch = [asyncio.create_task(queue.acquire("A", priority="batch", deadline_s=5)) for _ in range(2)]
    await asyncio.sleep(0)
    interactive = asyncio.create_task(queue.acquire("B", priority="interactive", deadline_s=5))
    await asyncio.sleep(0)
    with pytest.raises(QueueFull):
        await batch[1]  # the newest batch request made room
    with pytest.raises(QueueFull):
        await queue.acquire("C", priority="batch", deadline_s=5)  # nothing below batch to shed
    queue.release()
    await interactive
    assert not batch[0].done()
    queue.release()
    await batch[0]


async def test_a_client_leaving_the_queue_frees_its_place() -> None:
    queue = FairQueue(capacity=lambda: 1, max_queued=10)
    await queue.acquire("running")
    waiting = asyncio.create_task(queue.acquire("A", deadline_s=5))
    await asyncio.sleep(0)
    waiting.cancel()
    await asyncio.sleep(0)
    queue.release()
    assert queue.in_flight == 0 and queue.queued == 0
