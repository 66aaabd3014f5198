"""The settlement journal: what the proxy still owes billing, on disk, so neither a billing outage
nor a crash loses or doubles a charge. JSON lines, appended (O_APPEND), compacted at start
(and when it grows large):

    {"op": "capture", "id": <hold>, "hold": <hold>, "user": u}    a hold to capture (its call was answered);
                                                                  an interaction window's carries "amount": a
                                                                  refused (released) one is force-debited instead
    {"op": "release", "id": "release:<hold>", "hold": <hold>}     a hold to release (no answer)
    {"op": "void", "id": "void:<call>", "user": u, "key": k, "amount": n}
                                                                  a placement whose outcome is unknown: undo it
    {"op": "advice", "id": "advice:<call>", "user": u, "call": c, "amount": n}
                                                                  a stand-in authorisation (before the call)
    {"op": "inflight", "id": "call:<call>", "user": u, "key": k, "amount": n, "call": c}
                                                                  a paid call in flight (not owed yet)
    {"answered": <id>}                                            ... its call was answered: charge it
    {"done": <id>}                                                settled with billing (or superseded)

An interaction window's entries name the window's key (`ix:<user>:<interaction>:<n>`) where a
call's name the call: its placement's in-flight mark, its advice, its capture or release.

An advice is written (and fsync'd) before the upstream call; only an answered one is charged. One
whose call never ended (the process died meanwhile) is dropped at the next start. A paid call is
marked in flight before its hold is placed; the mark is superseded by the capture or release
(which name the call), or dropped. A call still in flight at the next start got no answer, so it
pays nothing: its placement is voided by its key (releasing the hold if billing placed one) at
once, not after the hold's TTL. Every id is derived from the hold or the call, and every billing
operation is idempotent under it, so posting an entry twice (a crash between billing's answer and
"done") charges once. Older journals' lines ({"capture": <hold>}) are read as captures.

One process per journal (an exclusive lock on `<journal>.lock`); it is rewritten only by replacing
it whole (a new file, fsync'd, renamed over it), so a crash or a full disk mid-rewrite loses nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os

from ciris_proxy import metrics

log = logging.getLogger("ciris_proxy")
KINDS = {"capture": "capture", "release": "release", "void": "release", "advice": "advice", "inflight": None}  # op -> metric kind
COMPACT_BYTES = 4 << 20  # rewrite a journal this large while running (in-flight marks keep it from emptying)


class JournalInUse(Exception):
    pass


class Journal:
    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        # A second process on this journal (a new container started before the old one stopped) would
        # compact away what the first still owes. The lock is on a file of its own: compaction
        # replaces the journal's inode, and a lock on the old one would not stop the next process.
        self.lock = os.open(path + ".lock", os.O_WRONLY | os.O_CREAT, 0o640)
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.lock)
            raise JournalInUse(f"{path} is in use by another process (it holds {path}.lock)") from None
        try:
            self._start()
        except BaseException:
            os.close(self.lock)
            raise

    def _start(self) -> None:
        """What the last process left: what is still owed, compacted; its unfinished calls settled."""
        self.pending, self.answered = read(self.path)
        self.abandoned: list[dict] = []  # calls the last process never finished: for the call log
        # Calls whose mark was superseded (an outcome, or an advice, written just before the stop).
        superseded = {e.get("call") for e in self.pending.values() if e["op"] in ("capture", "release", "advice")}
        for i, e in list(self.pending.items()):
            if e["op"] == "advice" and i not in self.answered:  # authorised, but the call never ended
                del self.pending[i]
                self.abandoned.append(e)
            elif e["op"] == "inflight":  # the call was in flight when the process stopped
                del self.pending[i]
                if e["call"] in superseded:
                    continue
                self.abandoned.append(e)  # no answer reached the client: undo the placement now, not at its TTL
                void = {"op": "void", "id": f"void:{e['key']}", "user": e["user"], "key": e["key"], "amount": e["amount"]}
                self.pending.setdefault(void["id"], void)
        dropped = sum(e["op"] == "advice" for e in self.abandoned)
        if dropped:
            log.warning("dropped %d stand-in advices whose calls never ended (the process stopped)", dropped)
        if len(self.abandoned) > dropped:
            log.warning("voiding the holds of %d paid calls in flight when the process stopped", len(self.abandoned) - dropped)
        self.fd = -1
        self._compact()
        self.counts = dict.fromkeys(("capture", "release", "advice"), 0)
        for entry in self.pending.values():
            self._count(entry, 1)

    def _compact(self) -> None:
        """Rewrite the journal as what is still owed: into a new file beside it, on disk before it
        replaces the journal, so a crash or a full disk part-way leaves the old journal whole."""
        tmp, directory = self.path + ".tmp", os.path.dirname(self.path) or "."
        try:
            with open(tmp, "w") as f:
                for i, entry in self.pending.items():
                    f.write(json.dumps(entry) + "\n")
                    if i in self.answered:
                        f.write(json.dumps({"answered": i}) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        if self.fd >= 0:
            os.close(self.fd)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)  # appends go to the new file from here on
        self.size = os.fstat(self.fd).st_size
        dirfd = os.open(directory, os.O_RDONLY)  # the rename itself on disk
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)

    def _append(self, entry: dict, sync: bool = False) -> None:
        self.size += os.write(self.fd, (json.dumps(entry) + "\n").encode())
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
        if not self.pending:
            os.ftruncate(self.fd, 0)  # nothing owed: start the file afresh
            self.size = 0
            return
        self._append({"done": entry_id})
        if self.size > COMPACT_BYTES:
            try:
                self._compact()
            except OSError as e:  # the journal as appended is still whole: keep going
                log.error("could not compact the journal (%s); it keeps growing", e.strerror)

    def owed(self) -> list[dict]:
        """What billing should be told now: everything but calls still in flight (holds, advices)."""
        return [e for i, e in self.pending.items() if e["op"] != "inflight" and (e["op"] != "advice" or i in self.answered)]

    def _count(self, entry: dict, n: int) -> None:
        kind = KINDS[entry["op"]]
        if kind is None:  # a call in flight: nothing owed yet
            return
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
