"""The call log: one line per paid call that reached the credit gate, for reconciliation
(`python -m ciris_proxy reconcile`). Ids, the user and the outcome only, never request content:

    {"call": c, "user": u, "at": unix seconds, "via": "hold" | "standin" | "none", "hold": id | null, "answered": bool}
    ... and "window": <key> for a call of an agent interaction (its window's charge is under that key)

One file per UTC day beside the journal (calls-YYYY-MM-DD.jsonl); files older than `days` are
deleted when a new day's file is opened. Not fsync'd, and best effort: it is an audit aid, the journal
is the money, so a call log that cannot be written (a full disk, EIO) is counted and logged, and the
call goes on.
"""

from __future__ import annotations

import datetime as dt
import glob
import json
import logging
import os
import time

from ciris_proxy import metrics

log = logging.getLogger("ciris_proxy")
PREFIX = "calls-"


class CallLog:
    def __init__(self, directory: str, days: int):
        self.directory, self.days = directory, days
        os.makedirs(directory, exist_ok=True)
        self.day, self.fd = "", -1

    def record(self, call: str, user: str, via: str, hold: str | None, answered: bool, window: str | None = None) -> None:
        now = time.time()
        line = {"call": call, "user": user, "at": round(now, 3), "via": via, "hold": hold, "answered": answered}
        if window:
            line["window"] = window
        try:
            day = dt.datetime.fromtimestamp(now, dt.timezone.utc).strftime("%Y-%m-%d")
            if day != self.day:
                self._open(day)
            os.write(self.fd, (json.dumps(line) + "\n").encode())
        except OSError as e:  # the error's text only (no path or call: nothing a client sent)
            metrics.CALL_LOG_FAILURES.inc()
            log.error("the call log could not be written (%s)", e.strerror or type(e).__name__)

    def _open(self, day: str) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.fd = os.open(os.path.join(self.directory, f"{PREFIX}{day}.jsonl"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self.day = day  # only once open: a failed open is tried again at the next call
        oldest = (dt.date.fromisoformat(day) - dt.timedelta(days=self.days)).isoformat()
        for path in paths(self.directory):
            if os.path.basename(path)[len(PREFIX):len(PREFIX) + 10] < oldest:
                os.remove(path)


def paths(directory: str) -> list[str]:
    return sorted(glob.glob(os.path.join(directory, f"{PREFIX}????-??-??.jsonl")))


def read(directory: str, since: str = "") -> list[dict]:
    """Every call logged on `since` (YYYY-MM-DD) or later; lines torn by a crash are skipped."""
    calls = []
    for path in paths(directory):
        if os.path.basename(path)[len(PREFIX):len(PREFIX) + 10] < since:
            continue
        with open(path) as f:
            for line in f:
                try:
                    calls.append(json.loads(line))
                except ValueError:
                    pass
    return calls
