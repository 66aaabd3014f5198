"""The database as billing uses it: whichever member is the writable primary now, never a hang,
never a stale answer (README "Billing": failover).

DATABASE_URL lists every member (libpq multi-host, target_session_attrs=read-write), so a new
connection finds the primary by itself after a failover. What the pool cannot see by itself:

- A commit waiting for a synchronous standby that is gone, or a server frozen mid-call: every call
  runs under a deadline (DB_WRITE_TIMEOUT_SECONDS) and past it answers 503 `unavailable` at once.
  The call is cancelled and its connection closed in the background: psycopg's own cancel waits
  up to 10 s more for a frozen server, which no request should.
- A cancelled commit wait: PostgreSQL then commits locally and says so only in a WARNING
  ("canceling wait for synchronous replication ... might not have been replicated"). Such a
  commit may be lost in a failover, so it is an unknown outcome too, never a success.
- A connection to a server that was demoted (read-only) or died: the error closes it and drains
  the pool, so the next calls reconnect to the member that is now primary.
- A connection to an old primary that does not know yet that it was replaced (frozen, then
  thawed): reads are answered only after a fence, a tiny write whose commit the synchronous
  standby confirms. An old primary's standby (now the primary itself) never confirms it.
"""

from __future__ import annotations

import asyncio
import logging
import time

import psycopg
from psycopg import errors
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from billing import ledger
from billing.errors import Problem

log = logging.getLogger("billing")

# One row written (migrations/0003): its commit waits for the synchronous standby like any money
# movement, and a read-only server refuses it like one.
FENCE = ("INSERT INTO billing_fence (slot, at) VALUES (pg_backend_pid() % 1024, now()) "
         "ON CONFLICT (slot) DO UPDATE SET at = excluded.at")
CONNECT_TIMEOUT = 3  # seconds per member, unless DATABASE_URL says otherwise
HEALTH_INTERVAL = 1.0  # /health probes at most once a second per process
HEALTH_BUDGET = 1.5  # ... and its fence must commit within this (or the write budget, if shorter):
#                     under the 2 s the proxy gives billing's /health
RETRY_AFTER = "2"
WRITE_UNKNOWN = ("the database did not confirm this write in time; its outcome is unknown: "
                 "retry with the same idempotency key")
READ_UNAVAILABLE = "no writable database confirmed this read in time; retry"


class Unavailable(Exception):
    """No writable primary answered the call for sure. `reason`: short, no hosts, no secrets."""

    def __init__(self, reason: str, retry: bool = False):
        super().__init__(reason)
        self.reason, self.retry = reason, retry  # retry: a read may try once more, on a fresh connection


def unavailable(message: str) -> Problem:
    return Problem(503, "unavailable", message, headers={"Retry-After": RETRY_AFTER})


class Connection(ledger.Connection):
    """Notes every WARNING: the only one a billing call can draw is the cancelled synchronous
    commit wait (by our deadline, an operator, or a timeout), and matching the severity rather
    than the text works whatever the server's lc_messages."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.warned = False
        self.add_notice_handler(self._notice)

    def _notice(self, diag) -> None:
        if diag.severity_nonlocalized == "WARNING":
            self.warned = True


class Database:
    def __init__(self, url: str, pool_size: int, budget: float):
        given = conninfo_to_dict(url)
        kwargs: dict = {"autocommit": True, "target_session_attrs": "read-write"}
        if "connect_timeout" not in given:
            kwargs["connect_timeout"] = CONNECT_TIMEOUT
        if "options" not in given:  # the server's own backstop, should a client vanish mid-call
            ms = int(budget * 1000)
            kwargs["options"] = f"-c statement_timeout={ms} -c idle_in_transaction_session_timeout={ms}"
        self.budget = budget
        self.health_budget = min(HEALTH_BUDGET, budget)
        # autocommit: a movement function is its own transaction, one round trip (no BEGIN/COMMIT).
        # timeout: a full pool answers 503 well within the budget. reconnect_timeout: the pool's
        # retries back off exponentially (1, 2, 4 ... 64 s) and would find a new primary up to a
        # minute late; given up after `budget`, a connection is tried afresh on the next request.
        self.pool = AsyncConnectionPool(url, min_size=min(2, pool_size), max_size=pool_size, connection_class=Connection,
                                        open=False, kwargs=kwargs, timeout=budget / 2, reconnect_timeout=budget)
        self._background: set[asyncio.Task] = set()
        self._drained_at = float("-inf")
        self._health: tuple[float, str | None] = (float("-inf"), None)
        self._probe: asyncio.Future | None = None

    async def open(self) -> None:
        await self.pool.open(wait=False)

    async def close(self) -> None:
        await self.pool.close()

    async def write(self, fn, *args, transaction: bool = False, within: float | None = None):
        """fn(conn, *args) as one write (`transaction`: inside BEGIN/COMMIT; otherwise fn is one
        autocommitted call). 503 `unavailable` unless the server confirms it within the budget
        (or `within` seconds, if less)."""
        seconds = self.budget if within is None else min(within, self.budget)
        try:
            return await self._bounded(self._call(fn, args, transaction=transaction), seconds)
        except Unavailable:
            raise unavailable(WRITE_UNKNOWN) from None

    async def read(self, fn, *args):
        """fn(conn, *args), answered only once a fence shows its server is still the primary; once
        more on a fresh connection if that server turned read-only or went away."""
        async def attempts():
            try:
                return await self._call(fn, args, fence=True)
            except Unavailable as e:
                if not e.retry:
                    raise
                return await self._call(fn, args, fence=True)

        try:
            return await self._bounded(attempts(), self.budget)
        except Unavailable:
            raise unavailable(READ_UNAVAILABLE) from None

    async def writable(self) -> str | None:
        """None if a fence committed at most HEALTH_INTERVAL ago; otherwise why not. One probe at
        a time per process: concurrent callers share it."""
        at, problem = self._health
        if time.monotonic() - at < HEALTH_INTERVAL:
            return problem
        if self._probe is None or self._probe.done():
            self._probe = asyncio.ensure_future(self._check())
        return await asyncio.shield(self._probe)

    async def _check(self) -> str | None:
        try:
            await self._bounded(self._call(_nothing, (), fence=True), self.health_budget)
            problem = None
        except Unavailable as e:
            problem = e.reason
        self._health = (time.monotonic(), problem)
        return problem

    async def _call(self, fn, args: tuple, *, transaction: bool = False, fence: bool = False):
        try:
            conn = await self.pool.getconn()
        except PoolTimeout:
            raise Unavailable("no connection to a writable database") from None
        conn.warned = False
        answer = None
        try:
            if transaction:
                async with conn.transaction():
                    result = await fn(conn, *args)
            else:
                result = await fn(conn, *args)
            if fence:
                await conn.execute(FENCE)
        except Problem as e:  # an answer (402, 404, 409 ...), unless the commit went unconfirmed (below)
            answer = e
        except errors.ReadOnlySqlTransaction:
            await self._discard(conn)
            raise Unavailable("the database is read-only", retry=True) from None
        except (psycopg.OperationalError, psycopg.InterfaceError) as e:
            await self._discard(conn)
            raise Unavailable(f"database connection failed ({type(e).__name__})", retry=True) from None
        except psycopg.Error:  # a bug, not the database's state: the pool rolls back and keeps the connection
            await self.pool.putconn(conn)
            raise
        except BaseException:  # cancelled at the deadline: the connection's state is unknown
            await self._discard(conn)
            raise
        if conn.warned:
            await self._discard(conn)
            raise Unavailable("the synchronous standby did not confirm a commit")
        await self.pool.putconn(conn)
        if answer is not None:
            raise answer
        return result

    async def _bounded(self, call, seconds: float):
        """`call`'s result, or Unavailable after `seconds` without waiting for its cleanup. (A task
        and one future: asyncio.wait or shield + timeout cost two to three times as much per call.)"""
        loop = asyncio.get_running_loop()
        task = loop.create_task(call)
        ended = loop.create_future()

        def end(_=None):
            if not ended.done():
                ended.set_result(None)

        task.add_done_callback(end)
        timer = loop.call_later(seconds, end)
        try:
            await ended
        except asyncio.CancelledError:
            task.cancel()
            self._keep(task)
            raise
        finally:
            timer.cancel()
        if not task.done():
            task.cancel()  # psycopg cancels the statement (or gives up) and _call closes the connection
            self._keep(task)
            self._keep(asyncio.ensure_future(self._drain()))
            raise Unavailable(f"the database did not confirm within {seconds:g} s")
        return task.result()

    async def _discard(self, conn) -> None:
        await conn.close()
        await self.pool.putconn(conn)  # a closed connection is replaced, not reused
        await self._drain()

    async def _drain(self) -> None:
        """A server failed us: its other connections in the pool are suspect too. Drain them (at
        most once a second), so the next calls connect afresh to whichever member is primary. A
        cached healthy /health is stale now: the next one probes."""
        if self._health[1] is None:
            self._health = (float("-inf"), None)
        now = time.monotonic()
        if now - self._drained_at >= 1.0:
            self._drained_at = now
            await self.pool.drain()

    def _keep(self, task: asyncio.Future) -> None:
        """Hold a background task until it ends, and collect its outcome (no 'never retrieved')."""
        self._background.add(task)
        task.add_done_callback(_collected)
        task.add_done_callback(self._background.discard)


def _collected(task: asyncio.Future) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.debug("background database task ended with %s", type(task.exception()).__name__)


async def _nothing(conn) -> None:
    return None
