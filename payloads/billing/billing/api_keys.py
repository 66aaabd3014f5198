"""API keys for server agents (ADR 17): minted by an admin, shown once, stored as a sha256 hash,
sent as X-API-Key. A key acts for the users its requests name, never as an admin."""

from __future__ import annotations

import base64
import hashlib
import secrets
import uuid

PREFIX = "cbk_live_"  # CIRISBilling's form, so operators recognise them
SHOWN_CHARS = 16  # of the key, kept to tell keys apart in listings
MAX_KEY_CHARS = 128
# On the proxy a key names no account (the agent's LLM calls carry none): it pays from its own,
# the identity (ACCOUNT_PROVIDER, key id), made on first sight like any account a key names.
ACCOUNT_PROVIDER = "api_key"


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


async def mint(conn, name: str) -> dict:
    key = PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
    key_id = uuid.uuid4()
    cur = await conn.execute("INSERT INTO api_keys (id, name, prefix, key_hash) VALUES (%s, %s, %s, %s) RETURNING created_at",
                             (key_id, name, key[:SHOWN_CHARS], digest(key)))
    (created_at,) = await cur.fetchone()
    return {"id": str(key_id), "name": name, "prefix": key[:SHOWN_CHARS], "api_key": key, "created_at": created_at.isoformat()}


def _listed(row) -> dict:
    return {"id": str(row[0]), "name": row[1], "prefix": row[2], "created_at": row[3].isoformat(),
            "revoked_at": row[4] and row[4].isoformat(), "last_used_at": row[5] and row[5].isoformat()}


async def listing(conn) -> dict:
    cur = await conn.execute("SELECT id, name, prefix, created_at, revoked_at, last_used_at FROM api_keys ORDER BY created_at")
    return {"items": [_listed(r) for r in await cur.fetchall()]}


async def revoke(conn, key_id: uuid.UUID) -> dict | None:
    cur = await conn.execute(
        """UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE id = %s
           RETURNING id, name, prefix, created_at, revoked_at, last_used_at""", (key_id,))
    row = await cur.fetchone()
    return row and _listed(row)


async def check(conn, key: str) -> uuid.UUID | None:
    """The key's id if it is known and not revoked; records its use (at most once a minute, so a
    busy agent's calls do not each write a row)."""
    cur = await conn.execute(
        """WITH used AS (UPDATE api_keys SET last_used_at = now()
                         WHERE key_hash = %(h)s AND revoked_at IS NULL
                           AND (last_used_at IS NULL OR last_used_at < now() - interval '1 minute'))
           SELECT id FROM api_keys WHERE key_hash = %(h)s AND revoked_at IS NULL""", {"h": digest(key)})
    row = await cur.fetchone()
    return row[0] if row else None
