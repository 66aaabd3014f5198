"""`python -m ciris_proxy reconcile [--since YYYY-MM-DD]`: every paid call in the call log checked
against billing's ledger (POST /v1/credits/lookup, with the proxy's own billing token). Names
every answered call with no capture, advice or debit, and every unanswered one that was charged or
still holds credit; a settlement still owed in the journal is "owed", not a problem (billing has
not confirmed it yet). Exit 1 when anything is wrong. Run it in the proxy's container: it reads the
journal and call log the running proxy writes, and changes neither."""

from __future__ import annotations

import asyncio
import os
import sys

import aiohttp

from ciris_proxy import calls as call_log, journal as journal_mod
from ciris_proxy.settings import Settings

BATCH = 500  # billing's lookup limit


def keys(call: dict) -> tuple[str, str, str]:
    """Billing's keys for a logged call: its hold's (a window's, for a call of an interaction), its
    stand-in debit's, and its hold's capture's (a window's hold released elsewhere is debited there)."""
    charge = call.get("window") or call["call"]
    return call.get("window") or f"proxy:{charge}", f"standin:{charge}", f"hold:{call.get('hold')}"


def verdict(call: dict, owed: set[str], ledger: dict[str, dict]) -> tuple[str, str]:
    """("ok" | "owed" | "problem", why) for one logged call, given billing's entries by key."""
    c, hold_id = call["call"], call.get("hold")
    hold_key, standin_key, capture_key = keys(call)
    held = ledger[hold_key]["hold"]
    status = held["status"] if held else None
    forced = ledger[standin_key]
    if call.get("window") and not call["answered"]:
        return "ok", ""  # its window is charged by its answered calls, released by the process that placed it
    if call["answered"]:
        if call["via"] == "hold":
            if status == "captured" or ledger[capture_key]["forced"]:
                return "ok", ""
            if hold_id in owed:
                return "owed", "capture"
            return "problem", f"answered call {c} (user {call['user']}) has no capture of hold {hold_id} (hold {status})"
        if forced["forced"] or forced["transaction"]:
            return "ok", ""
        if f"advice:{c}" in owed:
            return "owed", "advice"
        return "problem", f"answered call {c} (user {call['user']}) was stood in but never debited"
    if status == "captured" or forced["forced"]:
        return "problem", f"unanswered call {c} (user {call['user']}) was charged"
    if status == "active":
        if f"release:{hold_id}" in owed or f"void:proxy:{c}" in owed:
            return "owed", "release"
        return "problem", f"unanswered call {c} (user {call['user']}) still holds credit (hold {held['id']})"
    return "ok", ""


async def check(settings: Settings, since: str) -> tuple[dict[str, int], list[str]]:
    directory = os.path.dirname(settings.capture_journal) or "."
    logged = call_log.read(os.path.join(directory, "calls"), since)
    pending, _ = journal_mod.read(settings.capture_journal)
    owed = set(pending)
    counts, problems = {"ok": 0, "owed": 0, "problem": 0}, []
    async with aiohttp.ClientSession(base_url=settings.billing_url + "/", timeout=aiohttp.ClientTimeout(total=30),
                                     headers={"Authorization": f"Bearer {settings.billing_service_token}"}) as s:
        for i in range(0, len(logged), BATCH // 3):
            batch = logged[i:i + BATCH // 3]
            asked = [{"user_id": c["user"], "idempotency_key": k} for c in batch for k in keys(c)]
            async with s.post("v1/credits/lookup", json={"keys": asked}) as r:
                if r.status != 200:
                    raise RuntimeError(f"billing's lookup answered HTTP {r.status}")
                items = (await r.json())["items"]
            ledger = {item["idempotency_key"]: item for item in items}
            for call in batch:
                kind, why = verdict(call, owed, ledger)
                counts[kind] += 1
                if why and kind == "problem":
                    problems.append(why)
    return counts, problems


def main(settings: Settings, since: str) -> int:
    try:
        counts, problems = asyncio.run(check(settings, since))
    except (aiohttp.ClientError, asyncio.TimeoutError, RuntimeError) as e:
        print(f"reconcile: billing could not be asked ({e or type(e).__name__})", file=sys.stderr)
        return 2
    for line in problems:
        print(line)
    total = sum(counts.values())
    print(f"reconcile: {total} calls checked: {counts['ok']} settled, {counts['owed']} owed in the journal, "
          f"{counts['problem']} problems")
    return 1 if problems else 0
