"""The per-user hash chain over transactions: hash = sha256(prev_hash || canonical row).

Changing, removing or reordering any committed row breaks the chain from that row on, which
`python -m billing verify-ledger` reports."""

from __future__ import annotations

import datetime as dt
import hashlib
import json

GENESIS = bytes(32)
FIELDS = ("user_id", "seq", "type", "amount", "balance_after", "available_after", "idempotency_key",
          "request_hash", "description", "ref", "created_at")


def canonical(row: dict) -> bytes:
    values = {k: row[k] for k in FIELDS}
    values["user_id"] = str(values["user_id"])
    created: dt.datetime = values["created_at"]
    values["created_at"] = created.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return json.dumps(values, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def row_hash(prev_hash: bytes, row: dict) -> bytes:
    return hashlib.sha256(bytes(prev_hash) + canonical(row)).digest()


def request_hash(op: str, **body) -> str:
    """What an idempotency key is bound to: replaying a key with another body is a conflict."""
    return hashlib.sha256(json.dumps({"op": op, **body}, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
