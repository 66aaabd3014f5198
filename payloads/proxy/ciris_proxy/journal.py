"""The settlement journal: what the proxy still owes billing, on disk, so neither a billing outage
nor a crash loses or doubles a charge. JSON lines, appended (O_APPEND), compacted at start:

    {"op": "capture", "id": <hold>, "hold": <hold>, "user": u}    a hold to capture (its call was answered)
    {"op": "release", "id": "release:<hold>", "hold": <hold>}     a hold to release (no answer)
    {"op": "void", "id": "void:<call>", "user": u, "key": k, "amount": n}
                                                                  a placement whose outcome is unknown: undo it
    {"op": "advice", "id": "advice:<call>", "user": u, "call": c, "amount": n}
                                                                  a stand-in authorisation (before the call)
    {"answered": <id>}                                            ... its call was answered: charge it
    {"done": <id>}                                                settled with billing

An advice is written (and fsync'd) before the upstream call; only an answered one is charged. One
whose call never ended (the process died meanwhile) is dropped at the next start, as a hold would
expire. Every id is derived from the hold or the call, and every billing operation is idempotent
under it, so posting an entry twice (a crash between billing's answer and "done") charges once.
Older journals' lines ({"capture": <hold>}) are read as captures.
"""

from __future__ import annotations

import json
import logging
import os

from ciris_proxy import metrics

log = logging.getLogger("ciris_proxy")
KINDS = {"capture": "capture", "release": "release", "void": "release", "advice": "advice"}  # op -> metric kind


class Journal:
    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.pending, self.answered = read(path)
        dropped = [i for i, e in self.pending.items() if e["op"] == "advice" and i not in self.answered]
        for i in dropped:  # authorised, but the call never ended: nobody got an answer
            del self.pending[i]
        if dropped:
            log.warning("dropped %d stand-in advices whose calls never ended (the process stopped)", len(dropped))
        with open(path, "w") as f:  # compact: only what is still owed
            for i, entry in self.pending.items():
                f.write(json.dumps(entry) + "\n")
                if i in self.answered:
                    f.write(json.dumps({"answered": i}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        self.counts = dict.fromkeys(("capture", "release", "advice"), 0)
        for entry in self.pending.values():
            self._count(entry, 1)

    def _append(self, entry: dict, sync: bool = False) -> None:
        os.write(self.fd, (json.dumps(entry) + "\n").encode())
        if sync:
            os.fdatasync(self.fd)

    def add(self, entry: dict, sync: bool = False) -> None:
        """`sync`: on disk before this returns (an advice authorises spending billing cannot see yet)."""
        if entry["id"] not in self.pending:
            self._count(entry, 1)
        self.pending[entry["id"]] = entry
        self._append(entry, sync)

    def answer(self, entry_id: str) -> None:
        self.answered.add(entry_id)
        self._append({"answered": entry_id}, sync=True)

    def settled(self, entry_id: str) -> None:
        entry = self.pending.pop(entry_id, None)
        if entry is None:
            return
        self._count(entry, -1)
        self.answered.discard(entry_id)
        if self.pending:
            self._append({"done": entry_id})
        else:
            os.ftruncate(self.fd, 0)  # nothing owed: start the file afresh

    def owed(self) -> list[dict]:
        """What billing should be told now: everything but advices whose call has not ended yet."""
        return [e for i, e in self.pending.items() if e["op"] != "advice" or i in self.answered]

    def _count(self, entry: dict, n: int) -> None:
        kind = KINDS[entry["op"]]
        self.counts[kind] += n
        metrics.OWED.labels(kind).set(self.counts[kind])


def read(path: str) -> tuple[dict[str, dict], set[str]]:
    """(what is owed: id -> entry in the order written, the advices whose call was answered)."""
    pending: dict[str, dict] = {}
    answered: set[str] = set()
    try:
        with open(path) as f:
            for line in f:
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue  # a line torn by a crash mid-write
                if not isinstance(entry, dict):
                    continue
                if "capture" in entry:  # the journal's first format
                    entry = {"op": "capture", "id": entry["capture"], "hold": entry["capture"]}
                if entry.get("op") in KINDS and "id" in entry:
                    pending[entry["id"]] = entry
                elif "answered" in entry:
                    answered.add(entry["answered"])
                elif "done" in entry:
                    pending.pop(entry["done"], None)
                    answered.discard(entry["done"])
    except FileNotFoundError:
        pass
    return pending, answered
