"""Money movements, each one database transaction on the primary (FSD §4.2: exactly once).

Every movement locks the user's credit_balances row first (the head of their chain), so a user's
movements are serialised and idempotency keys are checked after the lock: concurrent identical
requests see each other's committed row and replay it. Locks are always taken balance first,
then hold or purchase, so movements never deadlock. The database enforces what must never
happen (negative balance, duplicate key per user, UPDATE/DELETE on transactions).

The hot movements (consume, grant, holds, capture, release) are one call each to a PL/pgSQL
function (migrations/0002): one round trip, run as its own transaction on an autocommit
connection. The function answers an outcome word; the mapping to errors is here.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from psycopg import AsyncConnection, AsyncCursor, errors

from billing import chain
from billing.errors import Problem, conflict, insufficient, not_found

RETRIES = 3


@dataclass
class Head:
    user_id: uuid.UUID
    balance: int  # available: settled - active holds
    settled: int  # sum of the user's transactions
    last_seq: int
    last_hash: bytes


class Connection(AsyncConnection):
    """The pool's connections. Each keeps one cursor for the movement calls: a cursor keeps its
    adapters (how to send a UUID, how to read a bigint) between calls, and a new one per call cost
    about a third of psycopg's CPU per consume."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: AsyncCursor = self.cursor()


async def call(conn: Connection, sql: str, params: tuple, *, rows: bool = False):
    """One movement function, one round trip, its own transaction (conn is in autocommit mode).
    The functions look keys up after taking the lock, in a fresh snapshot, so a concurrent twin's
    row is seen and replayed; should a unique violation still surface (a twin committing between
    lookup and insert), the whole call is repeated and its new snapshot finds the twin's row.
    The function's row, or with `rows` all of them (a batch's)."""
    cur = conn.calls
    for attempt in range(RETRIES):
        try:
            await cur.execute(sql, params)
            return await (cur.fetchall() if rows else cur.fetchone())
        except errors.UniqueViolation:
            if attempt == RETRIES - 1:
                raise
    raise AssertionError("unreachable")


async def lock_head(conn: AsyncConnection, user_id: uuid.UUID) -> Head:
    cur = await conn.execute(
        "SELECT user_id, balance, settled, last_seq, last_hash FROM credit_balances WHERE user_id = %s FOR UPDATE",
        (user_id,),
    )
    row = await cur.fetchone()
    if row is None:
        raise not_found("user")
    return Head(row[0], row[1], row[2], row[3], bytes(row[4]))


async def append(conn, head: Head, *, type: str, amount: int, key: str, req: str, description=None, ref=None) -> int:
    """Append one transaction to the locked head's chain (billing_append: the same hashing as the
    hot movements) and move the head. Returns the transaction id."""
    cur = await conn.execute(
        """SELECT (r).id, (r).available_after, (r).balance_after, (r).seq, (r).hash
           FROM (SELECT billing_append(b, %s, %s, 0, %s, %s, %s, %s) AS r FROM credit_balances b WHERE b.user_id = %s) x""",
        (type, amount, key, req, description, ref, head.user_id),
    )
    tx_id, head.balance, head.settled, head.last_seq, last_hash = await cur.fetchone()
    head.last_hash = bytes(last_hash)
    return tx_id


# --- users -----------------------------------------------------------------------------------

async def create_user(conn: AsyncConnection, email: str, signup_credits: int) -> dict:
    user_id = uuid.uuid4()
    try:
        await conn.execute("INSERT INTO users (id, email) VALUES (%s, %s)", (user_id, email))
    except errors.UniqueViolation:
        raise conflict("a user with this email already exists") from None
    head = await _open_account(conn, user_id, signup_credits)
    return {"id": str(user_id), "email": email, "balance": head.balance}


async def _open_account(conn, user_id: uuid.UUID, signup_credits: int) -> Head:
    """A new user's balance row and signup credits (the user row is the caller's)."""
    await conn.execute(
        "INSERT INTO credit_balances (user_id, balance, settled, last_seq, last_hash) VALUES (%s, 0, 0, 0, %s)",
        (user_id, chain.GENESIS),
    )
    head = Head(user_id, 0, 0, 0, chain.GENESIS)
    if signup_credits:
        await append(conn, head, type="signup", amount=signup_credits, key="signup",
                     req=chain.request_hash("signup", amount=signup_credits), description="signup credits")
    return head


IDENTITY_USER = "SELECT user_id FROM identities WHERE provider = %s AND subject = %s"


async def identity_user(conn, provider: str, subject: str) -> uuid.UUID | None:
    cur = await conn.execute(IDENTITY_USER, (provider, subject))
    row = await cur.fetchone()
    return row[0] if row else None


async def user_for_identity(conn, provider: str, subject: str, signup_credits: int) -> uuid.UUID:
    """The identity's user, made with the signup credits the first time (in a transaction). The
    identity row is claimed first: of two concurrent first calls (two regions), the second's insert
    waits for the first's commit and then does nothing, and it answers the first one's user."""
    user_id = uuid.uuid4()
    cur = await conn.execute(
        "INSERT INTO identities (provider, subject, user_id) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING RETURNING user_id",
        (provider, subject, user_id))
    if await cur.fetchone() is None:
        return await identity_user(conn, provider, subject)
    await conn.execute("INSERT INTO users (id) VALUES (%s)", (user_id,))
    await _open_account(conn, user_id, signup_credits)
    return user_id


async def balance(conn: AsyncConnection, user_id: uuid.UUID) -> dict:
    """The available balance now: holds past their expiry no longer count, whether or not the
    sweeper has marked them yet."""
    cur = await conn.execute(
        """SELECT b.balance + coalesce((SELECT sum(h.amount) FROM holds h WHERE h.user_id = b.user_id
                                        AND h.status = 'active' AND h.expires_at <= now()), 0)::bigint,
                  b.updated_at FROM credit_balances b WHERE b.user_id = %s""", (user_id,))
    row = await cur.fetchone()
    if row is None:
        raise not_found("user")
    return {"user_id": str(user_id), "balance": row[0], "updated_at": row[1].isoformat()}


async def user_exists(conn: AsyncConnection, user_id: uuid.UUID) -> bool:
    cur = await conn.execute("SELECT 1 FROM users WHERE id = %s", (user_id,))
    return await cur.fetchone() is not None


# --- debits and credits: one call each --------------------------------------------------------

MOVE = "SELECT outcome, transaction_id, balance FROM billing_move(%s, %s, %s, %s, %s, %s)"
HOLD = "SELECT outcome, hold_id, balance FROM billing_hold(%s, %s, %s, %s, %s, %s)"
CAPTURE = "SELECT outcome, transaction_id, balance, detail FROM billing_capture(%s, %s)"
RELEASE = "SELECT outcome, status, balance FROM billing_release(%s)"
FORCE = "SELECT outcome, transaction_id, balance, taken, shortfall FROM billing_force(%s, %s, %s, %s, %s, %s)"
VOID = "SELECT outcome, status, balance FROM billing_void(%s, %s, %s)"
# A hold's status as reads see it (active past its expiry: expired) and its age by the database's clock.
HOLD_STATE = """SELECT CASE WHEN status = 'active' AND expires_at <= now() THEN 'expired' ELSE status END,
                       extract(epoch FROM now() - created_at) FROM holds WHERE id = %s"""
REUSED = "idempotency_key was already used with a different request"


MOVE_MANY = "SELECT outcome, transaction_id, balance FROM billing_move_many(%s, %s, %s, %s, %s) ORDER BY i"


async def consume_many(conn, items: list[tuple[uuid.UUID, int, str, str | None]]) -> list[tuple]:
    """Consumes (user, amount, key, description) as one call and one transaction (batches.py,
    migrations/0006): each one's (outcome, transaction id, balance), in their order. One alone is
    billing_move itself (less work for the database than a batch of one)."""
    if len(items) == 1:
        user_id, amount, key, description = items[0]
        req = chain.request_hash("consume", amount=amount, description=description)
        return [await call(conn, MOVE, (user_id, "consume", -amount, key, req, description))]
    users, amounts, keys, reqs, descriptions = [], [], [], [], []
    for user_id, amount, key, description in items:
        users.append(user_id)
        amounts.append(amount)
        keys.append(key)
        reqs.append(chain.request_hash("consume", amount=amount, description=description))
        descriptions.append(description)
    return await call(conn, MOVE_MANY, (users, amounts, keys, reqs, descriptions), rows=True)


def consumed(outcome: str, tx: int | None, balance: int, amount: int) -> dict:
    """A consume's answer from its outcome, or the error it means."""
    return _keyed(outcome, balance, amount, {"transaction_id": tx})


async def grant(conn, user_id: uuid.UUID, amount: int, key: str, reason: str) -> dict:
    req = chain.request_hash("grant", amount=amount, reason=reason)
    outcome, tx, balance = await call(conn, MOVE, (user_id, "grant", amount, key, req, reason))
    return _keyed(outcome, balance, amount, {"transaction_id": tx})


def _keyed(outcome: str, balance: int, amount: int, answer: dict) -> dict:
    """A movement under an idempotency key: its answer (done or replayed), or the error its outcome means."""
    if outcome in ("done", "replayed"):
        return {**answer, "balance": balance, "replayed": outcome == "replayed"}
    if outcome == "insufficient":
        raise insufficient(balance, amount)
    if outcome == "conflict":
        raise conflict(REUSED)
    raise not_found("user")


# --- holds: reserve before a call whose cost is known only afterwards ---------------------------

async def place_hold(conn, user_id: uuid.UUID, amount: int, key: str, ttl_seconds: int) -> dict:
    req = chain.request_hash("hold", amount=amount, ttl_seconds=ttl_seconds)
    outcome, hold_id, balance = await call(conn, HOLD, (user_id, amount, key, req, ttl_seconds, uuid.uuid4()))
    answer = _keyed(outcome, balance, amount, {"hold_id": str(hold_id)})
    if outcome == "replayed":  # what became of it since: a caller sharing one hold under a key needs to know
        cur = await conn.execute(HOLD_STATE, (hold_id,))
        answer["status"], age = await cur.fetchone()
        answer["age_seconds"] = float(age)
    else:
        answer["status"], answer["age_seconds"] = "active", 0.0
    return answer


async def capture(conn, hold_id: uuid.UUID, amount: int | None, force: bool = False) -> dict:
    """`force`: the call was answered, so a hold that expired meanwhile is charged anyway, as a
    forced debit under the key the capture would have used (migrations/0004)."""
    outcome, tx, balance, detail = await call(conn, CAPTURE, (hold_id, amount))
    if outcome in ("done", "replayed"):
        return {"transaction_id": tx, "balance": balance, "replayed": outcome == "replayed"}
    if outcome == "too_much":
        raise Problem(422, "invalid_request", f"amount {amount} exceeds the hold's {detail}")
    if outcome == "conflict":
        # A forced capture that came up short marked the hold captured for what it took: its retry
        # (same amount) is a replay of that forced debit, not another amount.
        forced = await _forced_capture(conn, hold_id)
        if forced is not None and forced[0] == amount:
            return await _force_hold(conn, hold_id, amount)
        raise conflict(f"hold already captured for {detail}")
    if outcome == "expired" and force:
        if amount == 0:
            return {"transaction_id": None, "balance": balance, "replayed": False, "forced": True, "taken": 0, "shortfall": 0}
        return await _force_hold(conn, hold_id, amount)
    if outcome in ("expired", "released", "void"):
        raise conflict(f"hold is {outcome} and cannot be captured")
    raise not_found("hold")


async def _forced_capture(conn, hold_id: uuid.UUID) -> tuple[int] | None:
    cur = await conn.execute("SELECT amount FROM forced_debits WHERE hold_id = %s", (hold_id,))
    return await cur.fetchone()


async def _force_hold(conn, hold_id: uuid.UUID, amount: int | None) -> dict:
    """The forced debit of an expired hold's call, under the key its capture would have used."""
    cur = await conn.execute("SELECT user_id, amount FROM holds WHERE id = %s", (hold_id,))
    user_id, held = await cur.fetchone()
    result = await forced_debit(conn, user_id, held if amount is None else amount, f"hold:{hold_id}", None, hold_id=hold_id)
    return {"transaction_id": result["transaction_id"], "balance": result["balance"], "replayed": result["replayed"],
            "forced": True, "taken": result["taken"], "shortfall": result["shortfall"]}


async def release(conn, hold_id: uuid.UUID) -> dict:
    outcome, status, balance = await call(conn, RELEASE, (hold_id,))
    if outcome == "done":
        return {"hold_id": str(hold_id), "status": status, "balance": balance}
    if outcome == "conflict":
        raise conflict("hold was captured and cannot be released")
    raise not_found("hold")


async def void(conn, user_id: uuid.UUID, key: str, amount: int) -> dict:
    outcome, status, balance = await call(conn, VOID, (user_id, key, amount))
    if outcome == "done":
        return {"idempotency_key": key, "status": status, "balance": balance}
    if outcome == "conflict":
        raise conflict("the hold under this key was captured and cannot be voided")
    raise not_found("user")


# --- forced debits: charging a call that was already answered ---------------------------------

async def forced_debit(conn, user_id: uuid.UUID, amount: int, key: str, description: str | None,
                       hold_id: uuid.UUID | None = None) -> dict:
    """Take `amount` down to a zero balance at most; the rest is the shortfall, recorded."""
    req = chain.request_hash("forced", amount=amount, description=description, hold=str(hold_id) if hold_id else None)
    outcome, tx, balance, taken, shortfall = await call(conn, FORCE, (user_id, amount, key, req, description, hold_id))
    if outcome == "conflict":
        raise conflict(REUSED)
    if outcome == "not_found":
        raise not_found("user")
    return {"transaction_id": tx, "balance": balance, "taken": taken, "shortfall": shortfall,
            "replayed": outcome == "replayed"}


async def expire_holds(conn, batch: int = 100) -> int:
    """Release holds past their TTL (the background sweeper); one user per transaction."""
    cur = await conn.execute(
        "SELECT DISTINCT user_id FROM holds WHERE status = 'active' AND expires_at <= now() LIMIT %s", (batch,)
    )
    users = [r[0] for r in await cur.fetchall()]
    for user_id in users:
        await conn.execute("SELECT billing_sweep(%s)", (user_id,))
    return len(users)


# --- Stripe ----------------------------------------------------------------------------------

async def record_event(conn, event_id: str, event_type: str) -> bool:
    """True the first time an event id is seen. A concurrent delivery of the same id waits here for
    the first one's transaction and then finds it recorded."""
    cur = await conn.execute(
        "INSERT INTO stripe_events (id, type) VALUES (%s, %s) ON CONFLICT (id) DO NOTHING RETURNING id", (event_id, event_type)
    )
    return await cur.fetchone() is not None


async def credit_purchase(conn, user_id: uuid.UUID, session_id: str, credits: int, amount_paid: int, payment_intent: str | None,
                          source: str = "stripe") -> bool:
    """Grant a paid purchase's credits, once per id (a Checkout Session's, a PaymentIntent's, a
    Google Play purchase token's hash). False when already granted."""
    head = await lock_head(conn, user_id)
    cur = await conn.execute(
        """INSERT INTO purchases (session_id, user_id, credits, amount_paid, payment_intent) VALUES (%s, %s, %s, %s, %s)
           ON CONFLICT (session_id) DO NOTHING RETURNING session_id""",
        (session_id, user_id, credits, amount_paid, payment_intent),
    )
    if await cur.fetchone() is None:
        return False
    await append(conn, head, type="purchase", amount=credits, key=f"{source}:{session_id}",
                 req=chain.request_hash("purchase", session=session_id, credits=credits), ref=session_id,
                 description=f"purchase of {credits} credits")
    return True


async def purchase_owner(conn, session_id: str) -> tuple[uuid.UUID, int] | None:
    """Who a purchase's credits went to, and how many; None if never granted."""
    cur = await conn.execute("SELECT user_id, credits FROM purchases WHERE session_id = %s", (session_id,))
    return await cur.fetchone()


async def refund_purchase(conn, payment_intent: str, amount_refunded: int, charge_amount: int, charge_id: str) -> tuple[int, int] | None:
    """Take back the credits of a (partly) refunded purchase, down to a zero balance at most.
    Returns (taken, shortfall) for this event, or None when no purchase matches."""
    cur = await conn.execute("SELECT user_id FROM purchases WHERE payment_intent = %s", (payment_intent,))
    row = await cur.fetchone()
    if row is None:
        return None
    head = await lock_head(conn, row[0])
    cur = await conn.execute(
        "SELECT session_id, credits, credits_refunded FROM purchases WHERE payment_intent = %s FOR UPDATE", (payment_intent,)
    )
    session_id, credits, already = await cur.fetchone()
    target = min(credits, credits * amount_refunded // max(charge_amount, 1))
    due = max(0, target - already)
    taken = min(due, head.balance)
    if taken:
        await append(conn, head, type="refund", amount=-taken, key=f"stripe-refund:{charge_id}:{target}",
                     req=chain.request_hash("refund", charge=charge_id, target=target), ref=session_id,
                     description="stripe refund")
    await conn.execute(
        "UPDATE purchases SET credits_refunded = credits_refunded + %s, refund_shortfall = refund_shortfall + %s WHERE session_id = %s",
        (due, due - taken, session_id),
    )
    return taken, due - taken


# --- reading ---------------------------------------------------------------------------------

async def lookup(conn, keys: list[tuple[uuid.UUID, str]]) -> list[dict]:
    users, names = [u for u, _ in keys], [k for _, k in keys]
    cur = await conn.execute(
        """SELECT k.user_id, k.key,
                  h.id, CASE WHEN h.status = 'active' AND h.expires_at <= now() THEN 'expired' ELSE h.status END,
                  h.amount, h.captured, t.id, t.type, t.amount, f.amount, f.taken, f.shortfall
           FROM unnest(%s::uuid[], %s::text[]) WITH ORDINALITY AS k(user_id, key, n)
           LEFT JOIN holds h ON h.user_id = k.user_id AND h.idempotency_key = k.key
           LEFT JOIN transactions t ON t.user_id = k.user_id AND t.idempotency_key = k.key
           LEFT JOIN forced_debits f ON f.user_id = k.user_id AND f.idempotency_key = k.key
           ORDER BY k.n""", (users, names))
    return [{"user_id": str(r[0]), "idempotency_key": r[1],
             "hold": None if r[2] is None else {"id": str(r[2]), "status": r[3], "amount": r[4], "captured": r[5]},
             "transaction": None if r[6] is None else {"id": r[6], "type": r[7], "amount": r[8]},
             "forced": None if r[9] is None else {"amount": r[9], "taken": r[10], "shortfall": r[11]}}
            for r in await cur.fetchall()]


async def usage(conn, user_id: uuid.UUID, limit: int, before: int | None) -> dict:
    if not await user_exists(conn, user_id):
        raise not_found("user")
    cur = await conn.execute(
        """SELECT id, type, amount, balance_after, description, created_at FROM transactions
           WHERE user_id = %s AND (%s::bigint IS NULL OR id < %s) ORDER BY id DESC LIMIT %s""",
        (user_id, before, before, limit + 1),
    )
    rows = await cur.fetchall()
    items = [
        {"id": r[0], "type": r[1], "amount": r[2], "balance_after": r[3], "description": r[4], "created_at": r[5].isoformat()}
        for r in rows[:limit]
    ]
    return {"items": items, "next_cursor": str(items[-1]["id"]) if len(rows) > limit else None}


async def transactions_page(conn, user_id: uuid.UUID, limit: int, offset: int) -> tuple[list[dict], int]:
    """A page of the user's transactions, newest first, by offset, and how many there are."""
    cur = await conn.execute(
        """SELECT id, type, amount, balance_after, description, ref, created_at, count(*) OVER () FROM transactions
           WHERE user_id = %s ORDER BY id DESC LIMIT %s OFFSET %s""", (user_id, limit, offset))
    rows = await cur.fetchall()
    if not rows and offset:  # past the end: the count alone
        cur = await conn.execute("SELECT count(*) FROM transactions WHERE user_id = %s", (user_id,))
        return [], (await cur.fetchone())[0]
    return [{"id": r[0], "type": r[1], "amount": r[2], "balance_after": r[3], "description": r[4], "ref": r[5],
             "created_at": r[6].isoformat()} for r in rows], rows[0][7] if rows else 0
