"""Consumes that arrive while others are being committed wait and commit together (ADR 15).

A commit is what a consume costs most: in production one round trip to the synchronous standby
(~95 ms across the Atlantic), here PostgreSQL's per-transaction work and the hops between
processes. So a worker keeps at most `in_flight` batches in the database at once; a consume that
arrives meanwhile joins the queue, and the queue goes as the next batch as soon as one returns.
With nothing in flight a consume goes at once, alone: no timer, no added wait at low load.

A batch is one call (migrations/0006), one transaction: each consume has its own outcome
(debited, replayed, 402, 404, 409), but the commit is shared, so a commit that is not confirmed
(the budget ran out, the standby did not confirm, the connection failed) answers every consume
in the batch 503 `unavailable` -- retry with the same idempotency key, as for a single consume.
A consume never waits longer in total than the write budget: one whose time ran out in the queue
is answered 503 without being sent, and a batch is given only what its oldest consume has left.
"""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable

from billing.errors import Problem

MOST = 64  # consumes per batch: a bounded statement (a batch holds its users' locks until its commit)
NOT_SENT = "the database did not take this write in time; nothing was charged: retry with the same idempotency key"


class Batches:
    """`run(items, seconds)`: one batch's results, in the items' order, within `seconds`."""

    def __init__(self, run: Callable[[list, float], Awaitable[list]], budget: float, in_flight: int,
                 unavailable: Callable[[str], Problem]):
        self.run, self.budget, self.in_flight, self.unavailable = run, budget, in_flight, unavailable
        self.queue: list[tuple[tuple, float, asyncio.Future]] = []
        self.running = 0
        self._tasks: set[asyncio.Task] = set()

    async def submit(self, item: tuple):
        if self.running < self.in_flight and not self.queue:  # alone, at once, in this request's own task
            self.running += 1
            try:
                return (await self.run([item], self.budget))[0]
            finally:
                self.running -= 1
                if self.queue:
                    self._next()
        future = asyncio.get_running_loop().create_future()
        self.queue.append((item, time.monotonic() + self.budget, future))
        return await future

    def _next(self) -> None:
        now, waiting = time.monotonic(), []
        for entry in self.queue:  # never sent: one nobody waits for, one whose budget went waiting
            if entry[1] - now <= 0.05 and not entry[2].done():
                entry[2].set_exception(self.unavailable(NOT_SENT))
            if not entry[2].done():
                waiting.append(entry)
        if not waiting:
            self.queue = []
            return
        batch, self.queue = waiting[:MOST], waiting[MOST:]
        self.running += 1
        task = asyncio.get_running_loop().create_task(self._send(batch, batch[0][1] - now))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list, seconds: float) -> None:
        try:
            results = await self.run([item for item, _, _ in batch], seconds)
        except asyncio.CancelledError:  # the worker is stopping
            for _, _, future in batch:
                future.cancel()
            raise
        except Exception as e:  # one shared commit: every consume in it shares the answer
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(_copy(e))
        else:
            for (_, _, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
        finally:
            self.running -= 1
            if self.queue:
                self._next()


def _copy(e: BaseException) -> BaseException:
    """Each waiting request raises its own exception object (a shared one would collect every
    request's traceback)."""
    if isinstance(e, Problem):
        return Problem(e.status, e.code, e.message, headers=e.headers, **e.extra)
    return e
