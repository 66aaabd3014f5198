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
A batch never waits for a lock: a consume whose user another transaction holds comes back 'busy'
and goes again alone. A consume never waits longer in total than the write budget: a batch is
given what its oldest consume has left, and one left with under a quarter of the budget after
queueing is answered 503 without being sent (nothing charged).
"""

from __future__ import annotations

import asyncio
import logging
import time
from functools import partial
from typing import Awaitable, Callable

from billing.db import unavailable
from billing.errors import Problem

log = logging.getLogger("billing")

MOST = 64  # consumes per batch: a bounded statement
NOT_SENT = "the database did not take this write in time; nothing was charged: retry with the same idempotency key"


class Batches:
    """`run(items, seconds)`: one batch's results (outcome, transaction id, balance) in the items'
    order, within `seconds`."""

    def __init__(self, run: Callable[[list, float], Awaitable[list]], budget: float, in_flight: int):
        self.run, self.budget, self.in_flight = run, budget, in_flight
        self.least = budget / 4  # what a consume must have left to be sent from the queue
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
                self._next()
        future = asyncio.get_running_loop().create_future()
        self.queue.append((item, time.monotonic() + self.budget, future))
        return await future

    def _next(self) -> None:
        """Send the queue's next batch, if a slot is free and anyone still waits."""
        if self.running >= self.in_flight or not self.queue:
            return
        now, waiting = time.monotonic(), []
        for entry in self.queue:  # never sent: one nobody waits for, one whose budget went waiting
            if entry[1] - now < self.least and not entry[2].done():
                entry[2].set_exception(unavailable(NOT_SENT))
            if not entry[2].done():
                waiting.append(entry)
        batch, self.queue = waiting[:MOST], waiting[MOST:]
        if batch:
            self.running += 1
            self._spawn(self._send(batch, batch[0][1] - now), partial(self._sent, batch))

    async def _send(self, batch: list, seconds: float) -> None:
        try:
            results = await self.run([item for item, _, _ in batch], seconds)
            if len(results) != len(batch):
                raise RuntimeError(f"a batch of {len(batch)} answered {len(results)} rows")
        except Exception as e:  # one shared commit: every consume in it shares the answer
            _log(e, len(batch))
            for _, _, future in batch:
                _fail(future, e)
            return
        for (item, deadline, future), result in zip(batch, results):
            if result[0] == "busy":  # its user's row was locked: alone, it waits for the lock
                self._spawn(self._alone(item, deadline, future))
            elif not future.done():
                future.set_result(result)

    async def _alone(self, item: tuple, deadline: float, future: asyncio.Future) -> None:
        seconds = deadline - time.monotonic()
        if seconds < 0.05:  # its batch took all its time (and rolled nothing back for it: it was skipped)
            _fail(future, unavailable(NOT_SENT))
            return
        try:
            result = (await self.run([item], seconds))[0]
        except Exception as e:
            _log(e, 1)
            _fail(future, e)
        else:
            if not future.done():
                future.set_result(result)

    def _sent(self, batch: list, task: asyncio.Task) -> None:
        self.running -= 1
        if task.cancelled():  # the worker is stopping
            for _, _, future in batch:
                future.cancel()
        self._next()

    def _spawn(self, coro, done=None) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if done:
            task.add_done_callback(done)


def _log(e: Exception, consumes: int) -> None:
    """Anything but an answer (a Problem) is a bug: one line, as the app's catch-all, no values."""
    if not isinstance(e, Problem):
        log.error("unhandled %s on a batch of %d consumes", type(e).__name__, consumes)


def _fail(future: asyncio.Future, e: Exception) -> None:
    """Each waiting request gets its own exception object (a shared one would collect every
    request's traceback); anything but an answer is a 500 (logged by `_log`)."""
    if future.done():
        return
    if isinstance(e, Problem):
        future.set_exception(Problem(e.status, e.code, e.message, headers=e.headers, **e.extra))
    else:
        future.set_exception(Problem(500, "internal", "internal error"))
