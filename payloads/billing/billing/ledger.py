"""Money movements, each one database transaction on the primary (FSD §4.2: exactly once).

Every movement locks the user's credit_balances row first (the head of their chain), so a user's
movements are serialised and idempotency keys are checked after the lock: concurrent identical
requests see each other's committed row and replay it. Locks are always taken balance first,
then hold or purchase, so movements never deadlock. The database enforces what must never
happen (negative balance, duplicate key per user, UPDATE/DELETE on transactions).
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass

from psycopg import AsyncConnection, errors
from psycopg.rows import dict_row

from billing import chain
from billing.errors import Problem, conflict, insufficient, not_found


@dataclass
class Head:
    user_id: uuid.UUID
    balance: int  # available: settled - active holds
    settled: int  # sum of the user's transactions
    last_seq: int
    last_hash: bytes


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


async def lock_head(conn: AsyncConnection, user_id: uuid.UUID) -> Head:
    cur = await conn.execute(
        "SELECT user_id, balance, settled, last_seq, last_hash FROM credit_balances WHERE user_id = %s FOR UPDATE",
        (user_id,),
    )
    row = await cur.fetchone()
    if row is None:
        raise not_found("user")
    return Head(row[0], row[1], row[2], row[3], bytes(row[4]))


async def append(conn, head: Head, *, type: str, amount: int, key: str, req: str, description=None, ref=None, held_change=0) -> int:
    """Append one transaction to the head's chain and move the head; `held_change` adjusts the
    available balance for holds settled in the same step. Returns the transaction id."""
    row = {
        "user_id": head.user_id, "seq": head.last_seq + 1, "type": type, "amount": amount,
        "balance_after": head.settled + amount, "available_after": head.balance + amount + held_change,
        "idempotency_key": key, "request_hash": req, "description": description, "ref": ref, "created_at": now(),
    }
    digest = chain.row_hash(head.last_hash, row)
    # One round trip: the row and the moved head together.
    cur = await conn.execute(
        """WITH tx AS (
             INSERT INTO transactions (user_id, seq, type, amount, balance_after, available_after, idempotency_key,
                                       request_hash, description, ref, created_at, prev_hash, hash)
             VALUES (%(user_id)s, %(seq)s, %(type)s, %(amount)s, %(balance_after)s, %(available_after)s, %(idempotency_key)s,
                     %(request_hash)s, %(description)s, %(ref)s, %(created_at)s, %(prev)s, %(hash)s) RETURNING id)
           UPDATE credit_balances SET balance = %(available_after)s, settled = %(balance_after)s, last_seq = %(seq)s,
                                      last_hash = %(hash)s, updated_at = now()
           WHERE user_id = %(user_id)s RETURNING (SELECT id FROM tx)""",
        {**row, "prev": head.last_hash, "hash": digest},
    )
    tx_id = (await cur.fetchone())[0]
    head.settled, head.balance = row["balance_after"], row["available_after"]
    head.last_seq, head.last_hash = row["seq"], digest
    return tx_id


async def save_head(conn, head: Head) -> None:
    await conn.execute(
        "UPDATE credit_balances SET balance = %s, settled = %s, last_seq = %s, last_hash = %s, updated_at = now() WHERE user_id = %s",
        (head.balance, head.settled, head.last_seq, head.last_hash, head.user_id),
    )


async def _replay(conn, user_id, key: str, req: str):
    """The transaction an idempotency key already produced, or None. Another body: 409."""
    cur = await conn.execute(
        "SELECT id, request_hash, available_after FROM transactions WHERE user_id = %s AND idempotency_key = %s",
        (user_id, key),
    )
    row = await cur.fetchone()
    if row and row[1] != req:
        raise conflict("idempotency_key was already used with a different request")
    return row


# --- users -----------------------------------------------------------------------------------

async def create_user(conn: AsyncConnection, email: str, signup_credits: int) -> dict:
    user_id = uuid.uuid4()
    try:
        await conn.execute("INSERT INTO users (id, email) VALUES (%s, %s)", (user_id, email))
    except errors.UniqueViolation:
        raise conflict("a user with this email already exists") from None
    await conn.execute(
        "INSERT INTO credit_balances (user_id, balance, settled, last_seq, last_hash) VALUES (%s, 0, 0, 0, %s)",
        (user_id, chain.GENESIS),
    )
    head = Head(user_id, 0, 0, 0, chain.GENESIS)
    if signup_credits:
        await append(conn, head, type="signup", amount=signup_credits, key="signup",
                     req=chain.request_hash("signup", amount=signup_credits), description="signup credits")
    return {"id": str(user_id), "email": email, "balance": head.balance}


async def balance(conn: AsyncConnection, user_id: uuid.UUID) -> dict:
    cur = await conn.execute("SELECT balance, updated_at FROM credit_balances WHERE user_id = %s", (user_id,))
    row = await cur.fetchone()
    if row is None:
        raise not_found("user")
    return {"user_id": str(user_id), "balance": row[0], "updated_at": row[1].isoformat()}


async def user_exists(conn: AsyncConnection, user_id: uuid.UUID) -> bool:
    cur = await conn.execute("SELECT 1 FROM users WHERE id = %s", (user_id,))
    return await cur.fetchone() is not None


# --- debits and credits ----------------------------------------------------------------------

async def consume(conn, user_id: uuid.UUID, amount: int, key: str, description: str | None) -> dict:
    req = chain.request_hash("consume", amount=amount, description=description)
    head = await lock_head(conn, user_id)
    done = await _replay(conn, user_id, key, req)
    if done:
        return {"transaction_id": done[0], "balance": done[2], "replayed": True}
    if head.balance < amount:
        raise insufficient(head.balance, amount)
    tx = await append(conn, head, type="consume", amount=-amount, key=key, req=req, description=description)
    return {"transaction_id": tx, "balance": head.balance, "replayed": False}


async def grant(conn, user_id: uuid.UUID, amount: int, key: str, reason: str) -> dict:
    req = chain.request_hash("grant", amount=amount, reason=reason)
    head = await lock_head(conn, user_id)
    done = await _replay(conn, user_id, key, req)
    if done:
        return {"transaction_id": done[0], "balance": done[2], "replayed": True}
    tx = await append(conn, head, type="grant", amount=amount, key=key, req=req, description=reason)
    return {"transaction_id": tx, "balance": head.balance, "replayed": False}


# --- holds: reserve before a call whose cost is known only afterwards ---------------------------

async def place_hold(conn, user_id: uuid.UUID, amount: int, key: str, ttl_seconds: int) -> dict:
    req = chain.request_hash("hold", amount=amount, ttl_seconds=ttl_seconds)
    head = await lock_head(conn, user_id)
    await _expire_user_holds(conn, head)
    cur = await conn.execute("SELECT id, request_hash FROM holds WHERE user_id = %s AND idempotency_key = %s", (user_id, key))
    existing = await cur.fetchone()
    if existing:
        if existing[1] != req:
            raise conflict("idempotency_key was already used with a different request")
        return {"hold_id": str(existing[0]), "balance": head.balance, "replayed": True}
    if head.balance < amount:
        raise insufficient(head.balance, amount)
    hold_id = uuid.uuid4()
    await conn.execute(
        "INSERT INTO holds (id, user_id, amount, idempotency_key, request_hash, expires_at) VALUES (%s, %s, %s, %s, %s, %s)",
        (hold_id, user_id, amount, key, req, now() + dt.timedelta(seconds=ttl_seconds)),
    )
    head.balance -= amount
    await save_head(conn, head)
    return {"hold_id": str(hold_id), "balance": head.balance, "replayed": False}


async def _lock_hold(conn, hold_id: uuid.UUID):
    cur = await conn.execute("SELECT user_id FROM holds WHERE id = %s", (hold_id,))
    row = await cur.fetchone()
    if row is None:
        raise not_found("hold")
    head = await lock_head(conn, row[0])  # balance first, then the hold: the one lock order
    cur = await conn.execute(
        "SELECT id, amount, status, captured, transaction_id, expires_at <= now() AS overdue FROM holds WHERE id = %s FOR UPDATE",
        (hold_id,),
    )
    cur.row_factory = dict_row
    return head, await cur.fetchone()


async def capture(conn, hold_id: uuid.UUID, amount: int | None) -> dict:
    head, hold = await _lock_hold(conn, hold_id)
    take = hold["amount"] if amount is None else amount
    if take > hold["amount"]:
        raise Problem(422, "invalid_request", f"amount {take} exceeds the hold's {hold['amount']}")
    if hold["status"] == "captured":
        if amount is not None and amount != hold["captured"]:
            raise conflict(f"hold already captured for {hold['captured']}")
        return {"transaction_id": hold["transaction_id"], "balance": head.balance, "replayed": True}
    if hold["status"] != "active" or hold["overdue"]:
        raise conflict(f"hold is {'expired' if hold['overdue'] or hold['status'] == 'expired' else hold['status']} and cannot be captured")
    tx = None
    if take:
        tx = await append(conn, head, type="capture", amount=-take, key=f"hold:{hold_id}",
                          req=chain.request_hash("capture", hold=str(hold_id), amount=take),
                          ref=str(hold_id), held_change=hold["amount"])
    else:
        head.balance += hold["amount"]
        await save_head(conn, head)
    await conn.execute(
        "UPDATE holds SET status = 'captured', captured = %s, transaction_id = %s, settled_at = now() WHERE id = %s",
        (take, tx, hold_id),
    )
    return {"transaction_id": tx, "balance": head.balance, "replayed": False}


async def release(conn, hold_id: uuid.UUID) -> dict:
    head, hold = await _lock_hold(conn, hold_id)
    if hold["status"] == "captured":
        raise conflict("hold was captured and cannot be released")
    if hold["status"] == "active":
        head.balance += hold["amount"]
        await save_head(conn, head)
        status = "expired" if hold["overdue"] else "released"
        await conn.execute("UPDATE holds SET status = %s, settled_at = now() WHERE id = %s", (status, hold_id))
        hold["status"] = status
    return {"hold_id": str(hold_id), "status": hold["status"], "balance": head.balance}


async def _expire_user_holds(conn, head: Head) -> None:
    cur = await conn.execute(
        "UPDATE holds SET status = 'expired', settled_at = now() WHERE user_id = %s AND status = 'active' AND expires_at <= now() RETURNING amount",
        (head.user_id,),
    )
    freed = sum(r[0] for r in await cur.fetchall())
    if freed:
        head.balance += freed
        await save_head(conn, head)


async def expire_holds(pool, batch: int = 100) -> int:
    """Release holds past their TTL (the background sweeper); one user per transaction."""
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT DISTINCT user_id FROM holds WHERE status = 'active' AND expires_at <= now() LIMIT %s", (batch,)
        )
        users = [r[0] for r in await cur.fetchall()]
    for user_id in users:
        async with pool.connection() as conn, conn.transaction():
            await _expire_user_holds(conn, await lock_head(conn, user_id))
    return len(users)


# --- Stripe ----------------------------------------------------------------------------------

async def record_event(conn, event_id: str, event_type: str) -> bool:
    """True the first time an event id is seen. A concurrent delivery of the same id waits here for
    the first one's transaction and then finds it recorded."""
    cur = await conn.execute(
        "INSERT INTO stripe_events (id, type) VALUES (%s, %s) ON CONFLICT (id) DO NOTHING RETURNING id", (event_id, event_type)
    )
    return await cur.fetchone() is not None


async def credit_purchase(conn, user_id: uuid.UUID, session_id: str, credits: int, amount_paid: int, payment_intent: str | None) -> bool:
    """Grant a paid Checkout Session's credits, once per session. False when already granted."""
    head = await lock_head(conn, user_id)
    cur = await conn.execute(
        """INSERT INTO purchases (session_id, user_id, credits, amount_paid, payment_intent) VALUES (%s, %s, %s, %s, %s)
           ON CONFLICT (session_id) DO NOTHING RETURNING session_id""",
        (session_id, user_id, credits, amount_paid, payment_intent),
    )
    if await cur.fetchone() is None:
        return False
    await append(conn, head, type="purchase", amount=credits, key=f"stripe:{session_id}",
                 req=chain.request_hash("purchase", session=session_id, credits=credits), ref=session_id,
                 description=f"purchase of {credits} credits")
    return True


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
