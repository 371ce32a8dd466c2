"""Fan-out of committed events to live subscribers.

Each subscriber has a bounded queue: a slow one loses events (counted in
`missed` and told to it), it never slows the daemon or the other subscribers.
"""
from __future__ import annotations

import asyncio

QUEUE_EVENTS = 10000


class Subscription:
    def __init__(self, table: str | None, size: int):
        self.table = table
        self.queue: asyncio.Queue = asyncio.Queue(size)
        self.missed = 0             # since the subscriber was last told

    async def get(self) -> tuple[str, dict]:
        return await self.queue.get()


class EventHub:
    def __init__(self, queue_events: int = QUEUE_EVENTS):
        self.subscribers: set[Subscription] = set()
        self.queue_events = queue_events
        # Every event any subscriber missed, this run: it stays when the
        # subscriber that missed them goes.
        self.missed_total = 0

    def add(self, table: str | None) -> Subscription:
        sub = Subscription(table, self.queue_events)
        self.subscribers.add(sub)
        return sub

    def remove(self, sub: Subscription) -> None:
        self.subscribers.discard(sub)

    def wants(self, table: str) -> bool:
        return any(sub.table is None or sub.table == table for sub in self.subscribers)

    def publish(self, batches: list[tuple[str, list[dict]]]) -> None:
        for sub in self.subscribers:
            for table, rows in batches:
                if sub.table and sub.table != table:
                    continue
                for row in rows:
                    try:
                        sub.queue.put_nowait((table, row))
                    except asyncio.QueueFull:
                        sub.missed += 1
                        self.missed_total += 1
