"""The credit gate: a billing hold before every paid upstream call, its capture after the answer and
its release when no provider did the work; and, while billing cannot place holds, stand-in
authorisation within caps (README "Proxy": stand-in; ADR 8). Billing is called over aiohttp
(httpx was most of the proxy's CPU under load).

Money stays exact off the critical path: everything owed to billing (captures, releases, voids of
placements whose outcome is unknown, stand-in advices) is written to the journal first and posted
by one settler until billing confirms it. Every posting is idempotent under an id derived from the
call, so a retry, a crash or a billing outage delays a charge, never loses or doubles it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import aiohttp

from ciris_proxy import metrics
from ciris_proxy.calls import CallLog
from ciris_proxy.errors import ApiError
from ciris_proxy.journal import Journal
from ciris_proxy.settings import Settings

log = logging.getLogger("ciris_proxy")
BATCH = 64  # journal entries posted at once
# The longest an entry waits before it is posted again: while billing is away (no answer, 5xx),
# and after billing answered with a refusal a fix can change (an expired token, an older billing).
AWAY_CAP, KEPT_CAP = 5.0, 60.0
# /ready is public (probes reach it through the edge): billing's answer is reused this long and
# concurrent callers share one request, so a flood of /ready never becomes a flood on billing.
READY_INTERVAL = 1.0
SETTLED, KEPT, AWAY = "settled", "kept", "away"  # what posting one journal entry came to
UNAVAILABLE = "billing is unavailable, so nothing was sent upstream and nothing charged; retry shortly or use the other region"


WALK = 1000  # window keys one call may look at before giving up (a 503): ~1000 windows of one interaction id
KEEP_SECONDS = 3600  # an interaction idle this long is forgotten (its next call walks billing's keys again)
FORCED_WINDOW = "an interaction window answered after its hold was released"


class KeyTaken(ApiError):
    """Billing answered 409 to a hold placement: the key holds a void row or another request's hold."""

    def __init__(self) -> None:
        super().__init__(503, "billing refused the credit check (HTTP 409); nothing was sent upstream",
                         code="billing_unavailable")


@dataclass
class Authorisation:
    """How one paid call was authorised: a hold billing placed, or (hold_id None) a stand-in advice;
    `window` for a call of an agent interaction (its window's charge authorises it)."""
    call: str
    user: str
    amount: int
    hold_id: str | None = None
    window: "Window | None" = None
    replayed: bool = False  # billing had the hold's key already: its status and age say what became of it
    status: str = "active"
    age: float = 0.0


@dataclass
class Window:
    """One charge of an agent interaction, as this process knows it (README "Proxy": interactions).
    `key` names the charge at billing (`ix:<user>:<interaction>:<n>`); `placed`: this process placed
    it (or stood in for it), so it releases it should none of its calls here be answered."""
    user: str
    interaction: str
    n: int
    key: str
    auth: Authorisation  # the window's hold (or stand-in advice): call = key
    started: float  # time.monotonic() of the window's start, as billing recorded it
    placed: bool
    answered: bool = False  # a call of it was answered (here, or -- captured -- in another region)
    calls: int = 0
    tokens: int = 0
    inflight: int = 0
    closed: bool = False  # released (nothing answered): the next call looks at `resume` onwards
    resume: int = 0
    used: float = 0.0  # monotonic time of its last call


class CreditGate:
    def __init__(self, settings: Settings, journal: Journal, calls: CallLog) -> None:
        self.settings, self.journal, self.calls = settings, journal, calls
        self.balances: dict[str, tuple[int, float]] = {}  # user -> (available cents billing last said, when)
        self.exposure: dict[str, int] = {}  # user -> cents authorised on stand-in, not yet debited
        for entry in journal.pending.values():
            if entry["op"] == "advice":
                self._expose(entry["user"], entry["amount"])
        for e in journal.abandoned:  # calls the last process never finished: not answered, so not charged
            calls.record(e["call"], e["user"], "hold" if e["op"] == "inflight" else "standin", e.get("hold"), False)
        # (user, interaction id) -> its current window, or a future while a call places it
        self.windows: dict[tuple[str, str], Window | asyncio.Future] = {}
        self._pruned = time.monotonic()
        self.tasks: set[asyncio.Task] = set()
        self.failing = False  # the last hold placement failed: billing cannot write
        self._ready: tuple[float, bool] = (float("-inf"), False)  # (when billing's health was asked, its answer)
        self._ready_probe: asyncio.Future | None = None

    # --- lifecycle (the app calls start() at startup, stop() at shutdown) ---

    def start(self) -> None:
        self.billing = aiohttp.ClientSession(
            base_url=self.settings.billing_url + "/",
            headers={"Authorization": f"Bearer {self.settings.billing_service_token}"},
            timeout=aiohttp.ClientTimeout(total=5.0),
            connector=aiohttp.TCPConnector(limit=100, ttl_dns_cache=300),
        )
        self.wake = asyncio.Event()
        self.settler = asyncio.get_running_loop().create_task(self._settle_forever())
        if self.journal.pending:
            log.info("replaying %d settlements owed from the journal", len(self.journal.pending))
            self.wake.set()

    async def stop(self, grace_seconds: float = 10.0) -> None:
        """What is not posted by then stays in the journal for the next start."""
        deadline = time.monotonic() + grace_seconds
        while self.journal.owed() and not self.failing and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.settler.cancel()
        await self.billing.close()

    async def billing_ready(self) -> bool:
        """Whether billing's health says a write commits: asked at most once per READY_INTERVAL."""
        at, ready = self._ready
        if time.monotonic() - at < READY_INTERVAL:
            return ready
        if self._ready_probe is None or self._ready_probe.done():
            self._ready_probe = asyncio.ensure_future(self._ask_billing_health())
        return await asyncio.shield(self._ready_probe)

    async def _ask_billing_health(self) -> bool:
        try:
            async with self.billing.get("health", timeout=aiohttp.ClientTimeout(total=2.0)) as r:
                ready = r.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError):
            ready = False
        self._ready = (time.monotonic(), ready)
        return ready

    @property
    def stand_in_enabled(self) -> bool:
        return self.settings.stand_in.instance_cap_cents > 0

    async def _post(self, path: str, json: dict | None = None, timeout: float | None = None) -> tuple[int, dict | None]:
        kwargs = {"timeout": aiohttp.ClientTimeout(total=timeout)} if timeout else {}
        async with self.billing.post(path, json=json, **kwargs) as r:
            try:
                return r.status, await r.json(content_type=None)
            except ValueError:
                return r.status, None

    def _billing_failing(self, failing: bool) -> None:
        if failing and not self.failing:
            self.wake.set()  # the settler watches for billing's return (_settle_forever)
        self.failing = failing
        metrics.STANDIN_ACTIVE.set(1 if failing and self.stand_in_enabled else 0)

    # --- authorising a paid call ---

    async def authorise(self, user: str, call: str, interaction: str | None = None) -> Authorisation:
        """What lets one paid call (`call`: its id, made by the proxy) go upstream: its own hold, or
        for a call of an agent interaction its window's; a stand-in authorisation while billing cannot
        place one; otherwise the error to answer (402, 401, 503)."""
        if interaction is None:
            metrics.INTERACTION_CALLS.labels("single").inc()
            return await self._authorise(user, call, f"proxy:{call}")
        return await self._in_window(user, call, interaction)

    async def _authorise(self, user: str, call: str, key: str) -> Authorisation:
        """A hold under `key` (idempotent), or a stand-in advice for `call`."""
        price = self.settings.price_per_interaction_cents
        # In flight until settle() writes the outcome: should the process die first, the next start
        # voids the placement by its key, which releases the hold at once instead of locking the
        # user's credit for the hold's TTL. Marked before placing, as billing may commit the hold
        # and the process die before its answer arrives. Not fsync'd: the write survives the
        # process dying; if the machine dies with it, the hold just expires as before, and an fsync
        # per paid call would put the disk's latency on every request.
        mark = f"call:{call}"
        self.journal.add({"op": "inflight", "id": mark, "user": user, "key": key, "amount": price, "call": call})
        try:
            auth = await self._place(user, call, price, key)
        except ApiError:
            self.journal.settled(mark)  # refused: nothing placed, or its void journaled
            raise
        except BaseException:  # cancelled or broken mid-placement: the hold may exist
            self._void(user, key, price)
            self.journal.settled(mark)
            raise
        if auth.hold_id is None or auth.replayed:
            # Stood in (the advice now stands for the call), or the key's hold existed already (it is
            # not this call's to void should the process die: whoever placed it settles it).
            self.journal.settled(mark)
        return auth

    # --- agent interactions: one charge per window ---

    def _current(self, w: Window, now: float) -> bool:
        s = self.settings.interactions
        return (not w.closed and now - w.started < s.window_seconds and w.calls < s.max_calls
                and w.tokens < s.max_tokens)

    async def _in_window(self, user: str, call: str, interaction: str) -> Authorisation:
        """A call of an interaction: straight through on its current window (no billing call), or,
        for the first call of a window, the window's charge -- one billing round trip, or a walk over
        the keys another region or an earlier process placed. Calls arriving meanwhile wait for it."""
        ikey = (user, interaction)
        while True:
            now = time.monotonic()
            entry = self.windows.get(ikey)
            if isinstance(entry, asyncio.Future):  # another call of it is placing the window's charge
                await asyncio.shield(entry)
                continue
            if entry is not None and self._current(entry, now):
                metrics.INTERACTION_CALLS.labels("followup").inc()
                return self._join(entry, call, now)
            break
        start = 0 if entry is None else (entry.resume if entry.closed else entry.n + 1)
        placing = asyncio.get_running_loop().create_future()
        self.windows[ikey] = placing
        try:
            w = await self._open_window(user, interaction, start, call)
        except BaseException:
            if entry is None:
                self.windows.pop(ikey, None)
            else:
                self.windows[ikey] = entry
            raise
        finally:
            placing.set_result(None)
        self.windows[ikey] = w
        self._prune(now)
        metrics.INTERACTION_CALLS.labels("first").inc()
        return self._join(w, call, time.monotonic())

    def _join(self, w: Window, call: str, now: float) -> Authorisation:
        w.calls += 1
        w.inflight += 1
        w.used = now
        return Authorisation(call, w.user, w.auth.amount, w.auth.hold_id, window=w)

    async def _open_window(self, user: str, interaction: str, n: int, call: str) -> Window:
        """The window's charge: walk the keys from `n`. A key billing has not seen is placed here (the
        window starts now); one whose hold is active or captured and younger than the window is the
        current window (another region's, or an earlier process's: paid, no new charge); one
        released, expired, void or past its window is skipped."""
        window = self.settings.interactions.window_seconds
        for n in range(n, n + WALK):
            key = f"ix:{user}:{interaction}:{n}"
            try:
                auth = await self._authorise(user, key, key)
            except KeyTaken:
                metrics.WINDOWS.labels("skipped").inc()
                continue
            if auth.hold_id is None:
                metrics.WINDOWS.labels("stood_in").inc()
            elif not auth.replayed:
                metrics.WINDOWS.labels("placed").inc()
            elif auth.status in ("active", "captured") and auth.age < window:
                metrics.WINDOWS.labels("joined").inc()
            else:
                metrics.WINDOWS.labels("skipped").inc()
                continue
            w = Window(user, interaction, n, key, auth, time.monotonic() - auth.age,
                       placed=not auth.replayed, answered=auth.status == "captured")
            return w
        log.error("an interaction has more than %d windows to walk; refused", WALK)
        self.calls.record(call, user, "none", None, False)
        raise ApiError(503, "this interaction_id has been used for too long: start a new interaction",
                       code="billing_unavailable")

    def _prune(self, now: float) -> None:
        """Forget interactions idle past KEEP_SECONDS (every minute at most)."""
        if now - self._pruned < 60:
            return
        self._pruned = now
        for k, w in list(self.windows.items()):
            if isinstance(w, Window) and w.inflight == 0 and now - w.used > KEEP_SECONDS:
                del self.windows[k]

    def spent(self, auth: Authorisation | None, tokens: int) -> None:
        """A finished call's tokens (prompt and completion) count toward its window's budget."""
        if auth is not None and auth.window is not None:
            auth.window.tokens += max(tokens, 0)

    async def _place(self, user: str, call: str, price: int, key: str) -> Authorisation:
        s = self.settings
        try:
            status, doc = await self._post("v1/credits/holds", {
                "user_id": user, "amount": price, "idempotency_key": key, "ttl_seconds": s.hold_ttl_seconds,
            }, timeout=s.stand_in.placement_timeout_ms / 1000)
        except aiohttp.ClientConnectorError:  # nothing reached billing: nothing to undo
            metrics.HOLDS.labels("billing_unreachable").inc()
            return self._stand_in(user, call, "unreachable")
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            metrics.HOLDS.labels("billing_unreachable").inc()
            self._void(user, key, price)
            return self._stand_in(user, call, type(e).__name__)
        if status == 201:
            metrics.HOLDS.labels("replayed" if doc.get("replayed") else "placed").inc()
            self._billing_failing(False)
            self._known(user, doc.get("balance"))
            return Authorisation(call, user, price, doc["hold_id"], replayed=bool(doc.get("replayed")),
                                 status=doc.get("status", "active"), age=float(doc.get("age_seconds") or 0.0))
        if status == 409:
            metrics.HOLDS.labels("key_taken").inc()
            self._billing_failing(False)
            raise KeyTaken()
        if status == 402:
            metrics.HOLDS.labels("insufficient").inc()
            self._billing_failing(False)
            balance = (doc or {}).get("error", {}).get("balance", "?") if isinstance(doc, dict) else "?"
            self._known(user, balance)
            self.calls.record(call, user, "none", None, False)
            raise ApiError(402, f"insufficient credits: a request costs {price} cents "
                                f"and your balance is {balance} cents; buy credits at billing "
                                f"(POST /v1/credits/purchase)", code="insufficient_credits")
        if status == 404:
            metrics.HOLDS.labels("unknown_user").inc()
            raise ApiError(401, "token names no billing user")
        metrics.HOLDS.labels("billing_error").inc()
        if status >= 500:  # billing could not write (its outcome may be unknown): undo, then stand in
            self._void(user, key, price)
            return self._stand_in(user, call, f"HTTP {status}")
        # 401/403: the proxy's own billing token (a revoked generation, an expired token: ADR 25), not the user's.
        log.error("billing refused a hold: HTTP %d%s", status,
                  "; check the proxy's billing token (BILLING_SERVICE_TOKEN: its generation still accepted?)" if status in (401, 403) else "")
        raise ApiError(503, f"billing refused the credit check (HTTP {status}); nothing was sent upstream",
                       code="billing_unavailable")

    def _known(self, user: str, balance) -> None:
        if isinstance(balance, int):
            self.balances[user] = (balance, time.monotonic())

    def _void(self, user: str, key: str, amount: int) -> None:
        """A placement billing may have committed after we gave up: release it once billing answers.
        fsync'd (only failed placements pay for it): a hold it voids would lock the user's credit
        for the hold's TTL if the machine died with the write unflushed."""
        self.journal.add({"op": "void", "id": f"void:{key}", "user": user, "key": key, "amount": amount}, sync=True)
        self.wake.set()

    def _expose(self, user: str, cents: int) -> None:
        self.exposure[user] = self.exposure.get(user, 0) + cents
        if self.exposure[user] <= 0:
            del self.exposure[user]
        metrics.STANDIN_EXPOSURE.set(sum(self.exposure.values()))

    def _stand_in(self, user: str, call: str, why: str) -> Authorisation:
        """Authorise the call ourselves if billing recently said the user can pay, within the caps."""
        self._billing_failing(True)
        s, price = self.settings.stand_in, self.settings.price_per_interaction_cents
        if not self.stand_in_enabled:
            return self._refuse(user, call, why, None)
        known = self.balances.get(user)
        if known is None or time.monotonic() - known[1] > s.balance_max_age_seconds:
            return self._refuse(user, call, why, "no_recent_balance")
        if self.exposure.get(user, 0) + price > min(s.user_cap_cents, known[0]):
            return self._refuse(user, call, why, "over_user_cap")
        if sum(self.exposure.values()) + price > s.instance_cap_cents:
            return self._refuse(user, call, why, "over_instance_cap")
        self.journal.add({"op": "advice", "id": f"advice:{call}", "user": user, "call": call, "amount": price}, sync=True)
        self._expose(user, price)
        metrics.STANDIN.labels("authorised").inc()
        return Authorisation(call, user, price)

    def _refuse(self, user: str, call: str, why: str, outcome: str | None):
        if outcome:
            metrics.STANDIN.labels(outcome).inc()
        log.error("billing could not place a hold (%s); stand-in: %s", why, outcome or "disabled")
        self.calls.record(call, user, "none", None, False)
        raise ApiError(503, UNAVAILABLE, code="billing_unavailable")

    # --- settling ---

    def settle(self, auth: Authorisation, answered: bool) -> None:
        """The call's one outcome: charged if answered, otherwise nothing. Journaled first (the money);
        the call log after it is best effort (calls.py)."""
        if auth.window is not None:
            return self._settle_in_window(auth, answered)
        self._settle(auth, answered)
        self.calls.record(auth.call, auth.user, "standin" if auth.hold_id is None else "hold", auth.hold_id, answered)

    def _settle_in_window(self, auth: Authorisation, answered: bool) -> None:
        """A window is charged once, when the first of its calls here is answered (a capture under
        `hold:<id>` is idempotent, so a second region capturing the same hold is harmless); it is
        settled as unanswered -- released, or its advice dropped -- only by the process that placed
        it, once none of its calls is in flight and none was answered."""
        w = auth.window
        w.inflight -= 1
        if answered and not w.answered:
            w.answered = True
            self._settle(w.auth, True, mark=w.placed)
        elif not w.answered and w.inflight == 0 and not w.closed:
            w.closed = True
            w.resume = w.n + 1 if w.placed else w.n  # a joined window's hold may still be answered elsewhere
            if w.placed:
                self._settle(w.auth, False)
        self.calls.record(auth.call, auth.user, "standin" if auth.hold_id is None else "hold", auth.hold_id, answered,
                          window=w.key)

    def _settle(self, auth: Authorisation, answered: bool, mark: bool = True) -> None:
        """Journal a hold's capture or release, or settle a stand-in advice; `mark`: the in-flight
        mark of its placement is this process's to drop."""
        if auth.hold_id is None:  # stand-in: the advice is in the journal already
            entry = f"advice:{auth.call}"
            if answered:
                self.journal.answer(entry)
            else:
                self.journal.settled(entry)
                self._expose(auth.user, -auth.amount)
        else:  # the outcome (naming the call) first, then the in-flight mark: a crash between leaves the outcome
            if answered:
                capture = {"op": "capture", "id": auth.hold_id, "hold": auth.hold_id, "user": auth.user, "call": auth.call}
                if auth.call.startswith("ix:"):  # a window's hold: another region may release it first (_post_entry)
                    capture["amount"] = auth.amount
                self.journal.add(capture)
            else:
                self.journal.add({"op": "release", "id": f"release:{auth.hold_id}", "hold": auth.hold_id, "call": auth.call})
            if mark:
                self.journal.settled(f"call:{auth.call}")
        self.wake.set()

    async def _settle_forever(self) -> None:
        """Post what the journal owes, a batch at a time. An entry billing did not settle waits out a
        back-off of its own, so entries billing keeps refusing never hold up the others; the settler
        pauses only when nothing is due, or when billing answered nothing in a batch (it is away:
        probe gently)."""
        retry: dict[str, tuple[float, float]] = {}  # entry id -> (not before, its back-off)
        pause = 0.1
        while True:
            self.wake.clear()  # before looking: what settle() adds from here on wakes the waits below
            now = time.monotonic()
            retry = {i: r for i, r in retry.items() if i in self.journal.pending}
            due = [e for e in self.journal.owed() if retry.get(e["id"], (0.0,))[0] <= now][:BATCH]
            if not due:
                timeout = max(min(t for t, _ in retry.values()) - now, 0.01) if retry else None
                if self.failing and not retry:
                    # Nothing owed will show billing is back (only refused calls since): ask its health,
                    # or the stand-in gauge -- and its alert -- would stay up until the next paid call.
                    if await self.billing_ready():
                        self._billing_failing(False)
                        continue
                    timeout = AWAY_CAP
                await self._woken(timeout)
                continue
            results = await asyncio.gather(*(self._post_entry(e) for e in due), return_exceptions=True)
            now = time.monotonic()
            for e, r in zip(due, results):
                if r == SETTLED:
                    retry.pop(e["id"], None)
                    continue
                if isinstance(r, BaseException):
                    log.error("settlement failed: %s", type(r).__name__)
                metrics.CAPTURE_RETRIES.inc()
                backoff = min(retry.get(e["id"], (0.0, 0.1))[1] * 2, KEPT_CAP if r == KEPT else AWAY_CAP)
                retry[e["id"]] = (now + backoff, backoff)
            if any(r in (SETTLED, KEPT) for r in results):
                pause = 0.1
            else:
                pause = min(pause * 2, AWAY_CAP)
                await self._woken(pause)  # a new entry (settle() wakes us) is still posted at once

    async def _woken(self, timeout: float | None) -> None:
        """Until settle() adds something, or `timeout` seconds."""
        try:
            await asyncio.wait_for(self.wake.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    async def _post_entry(self, e: dict) -> str:
        """One journal entry to billing. SETTLED: confirmed, or refused for good (logged); KEPT:
        refused in a way a fix can change (logged), AWAY: no answer; both tried again later."""
        op = e["op"]
        try:
            if op == "capture":
                status, doc = await self._post(f"v1/credits/holds/{e['hold']}/capture", {"force": True})
                if status == 409 and e.get("amount"):
                    # An interaction window's hold, released (by the region that placed it, or a
                    # restart's void) although a call of the window was answered here: charged as a
                    # forced debit under the key its capture would have used, once across regions.
                    status, doc = await self._post("v1/credits/forced-debits", {
                        "user_id": e["user"], "amount": e["amount"], "idempotency_key": f"hold:{e['hold']}",
                        "description": FORCED_WINDOW})
            elif op == "release":
                status, doc = await self._post(f"v1/credits/holds/{e['hold']}/release")
            elif op == "void":
                status, doc = await self._post("v1/credits/holds/void", {
                    "user_id": e["user"], "idempotency_key": e["key"], "amount": e["amount"]})
            else:
                status, doc = await self._post("v1/credits/forced-debits", {
                    "user_id": e["user"], "amount": e["amount"], "idempotency_key": f"standin:{e['call']}",
                    "description": "answered while billing could not write (stand-in)"})
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return AWAY
        if status >= 500:
            return AWAY
        if status not in (200, 404, 409):  # a refusal a fix can change (an expired service token, an older billing)
            log.error("billing answered the %s of %s with HTTP %d; kept, retrying", op, e["id"], status)
            return KEPT
        doc = doc if isinstance(doc, dict) else {}
        if status == 200:
            self._billing_failing(False)
            metrics.SETTLED.labels({"capture": "captured", "release": "released", "void": "voided",
                                    "advice": "advice_debited"}[op]).inc()
            if op == "advice":
                self._expose(e["user"], -e["amount"])
                self._known(e["user"], doc.get("balance"))
                if doc.get("shortfall"):
                    metrics.FORCED_SHORTFALL.inc(doc["shortfall"])
                    log.warning("a stand-in advice could not be debited in full (short %d cents)", doc["shortfall"])
        else:  # 404/409: a refusal no retry changes (unknown hold or user, a released hold): say so
            metrics.SETTLED.labels(f"{op}_refused").inc()
            log.error("billing refused the %s of %s: HTTP %d", op, e["id"], status)
            if op == "advice":
                self._expose(e["user"], -e["amount"])
        self.journal.settled(e["id"])
        return SETTLED
