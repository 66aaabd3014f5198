"""The credit gate: a billing hold before every paid upstream call, its capture after the answer and
its release when no provider did the work. Billing is called over aiohttp (httpx was most of the
proxy's CPU under load, issue #13).

Money stays safe off the critical path: the hold is placed before the upstream call (fail closed:
no hold, no call); the capture runs after the response is sent, but is first written to a local
journal and retried until billing answers, so a crash or a billing outage delays it, never loses it.
A lost release only means the hold expires at its TTL and the user's credit comes back by itself.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from ciris_proxy import metrics
from ciris_proxy.errors import ApiError
from ciris_proxy.journal import Journal
from ciris_proxy.settings import Settings

log = logging.getLogger("ciris_proxy")


class CreditGate:
    def __init__(self, settings: Settings, journal: Journal) -> None:
        self.settings, self.journal = settings, journal
        self.tasks: set[asyncio.Task] = set()

    # --- lifecycle (the app calls start() at startup, stop() at shutdown) ---

    def start(self) -> None:
        self.billing = aiohttp.ClientSession(
            base_url=self.settings.billing_url + "/",
            headers={"Authorization": f"Bearer {self.settings.billing_service_token}"},
            timeout=aiohttp.ClientTimeout(total=5.0),
            connector=aiohttp.TCPConnector(limit=100, ttl_dns_cache=300),
        )
        for hold_id in list(self.journal.pending):  # owed from before a restart
            self._spawn(self._capture(hold_id))
        if self.journal.pending:
            log.info("replaying %d captures owed from the journal", len(self.journal.pending))

    async def stop(self, grace_seconds: float = 10.0) -> None:
        if self.tasks:  # whatever does not finish stays in the journal for the next start
            await asyncio.wait(self.tasks, timeout=grace_seconds)
        await self.billing.close()

    async def billing_ready(self) -> bool:
        try:
            async with self.billing.get("health", timeout=aiohttp.ClientTimeout(total=2.0)) as r:
                return r.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return False

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _post(self, path: str, json: dict | None = None) -> tuple[int, dict | None]:
        async with self.billing.post(path, json=json) as r:
            try:
                return r.status, await r.json(content_type=None)
            except ValueError:
                return r.status, None

    # --- holds ---

    async def hold(self, user_id: str, call_id: str) -> str:
        """Place the hold for one paid call (its id is the idempotency key); the hold id, or an error."""
        s = self.settings
        try:
            status, doc = await self._post("v1/credits/holds", {
                "user_id": user_id, "amount": s.price_per_interaction_cents,
                "idempotency_key": f"proxy:{call_id}", "ttl_seconds": s.hold_ttl_seconds,
            })
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            metrics.HOLDS.labels("billing_unreachable").inc()
            log.error("billing unreachable placing a hold: %s", type(e).__name__)
            raise ApiError(503, "billing is unreachable, so nothing was sent upstream and nothing charged; "
                                "retry shortly or use the other region", code="billing_unavailable") from None
        if status == 201:
            metrics.HOLDS.labels("placed").inc()
            return doc["hold_id"]
        if status == 402:
            metrics.HOLDS.labels("insufficient").inc()
            balance = (doc or {}).get("error", {}).get("balance", "?") if isinstance(doc, dict) else "?"
            raise ApiError(402, f"insufficient credits: a request costs {s.price_per_interaction_cents} cents "
                                f"and your balance is {balance} cents; buy credits at billing "
                                f"(POST /v1/credits/purchase)", code="insufficient_credits")
        if status == 404:
            metrics.HOLDS.labels("unknown_user").inc()
            raise ApiError(401, "token names no billing user")
        metrics.HOLDS.labels("billing_error").inc()
        log.error("billing refused a hold: HTTP %d", status)
        raise ApiError(503, f"billing refused the credit check (HTTP {status}); nothing was sent upstream",
                       code="billing_unavailable")

    def settle(self, hold_id: str, capture: bool) -> None:
        """The hold's one outcome, after the response: captured (journal first) or released."""
        if capture:
            self.journal.owe(hold_id)
            self._spawn(self._capture(hold_id))
        else:
            self._spawn(self._release(hold_id))

    async def _capture(self, hold_id: str) -> None:
        delay = 0.2
        while True:
            try:
                status, _ = await self._post(f"v1/credits/holds/{hold_id}/capture")
                if status == 200:
                    metrics.SETTLED.labels("captured").inc()
                    break
                if status in (404, 409):  # expired before billing came back, or unknown: nothing to retry
                    metrics.SETTLED.labels("capture_refused").inc()
                    log.error("billing refused capture of hold %s: HTTP %d", hold_id, status)
                    break
                log.warning("capture of hold %s: HTTP %d, retrying", hold_id, status)
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                log.warning("capture of hold %s: billing unreachable (%s), retrying", hold_id, type(e).__name__)
            metrics.CAPTURE_RETRIES.inc()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)
        self.journal.settled(hold_id)

    async def _release(self, hold_id: str) -> None:
        try:
            status, _ = await self._post(f"v1/credits/holds/{hold_id}/release")
            metrics.SETTLED.labels("released" if status == 200 else "release_refused").inc()
        except (aiohttp.ClientError, asyncio.TimeoutError):
            metrics.SETTLED.labels("release_failed").inc()  # the hold expires at its TTL instead
            log.warning("release of hold %s failed; it expires at its TTL", hold_id)
