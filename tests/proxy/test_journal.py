"""The settlement journal on its own (payloads/proxy/ciris_proxy/journal.py): a rewrite that fails
part-way loses nothing, and one process at a time may use a journal."""

from __future__ import annotations

import json
import os
import sys

import pytest

from tests.proxy.conftest import PAYLOAD

sys.path.insert(0, str(PAYLOAD))
from ciris_proxy import journal as journal_mod  # noqa: E402
from ciris_proxy.journal import Journal, JournalInUse  # noqa: E402

OWED = [
    {"op": "capture", "id": "h1", "hold": "h1", "user": "u"},
    {"op": "advice", "id": "advice:c2", "user": "u", "call": "c2", "amount": 5},
    {"answered": "advice:c2"},
    {"op": "release", "id": "release:h3", "hold": "h3"},
    {"op": "capture", "id": "h4", "hold": "h4", "user": "u"},
    {"done": "h4"},
]


def write(path, lines) -> None:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_a_rewrite_that_fails_part_way_leaves_the_journal_whole(tmp_path, monkeypatch):
    path = tmp_path / "captures.jsonl"
    write(path, OWED)
    before = path.read_bytes()
    real_fsync = os.fsync

    def disk_full(fd):  # the rewrite's data never reaches the disk
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(journal_mod.os, "fsync", disk_full)
    with pytest.raises(OSError):
        Journal(str(path))
    monkeypatch.setattr(journal_mod.os, "fsync", real_fsync)
    assert path.read_bytes() == before
    assert not (tmp_path / "captures.jsonl.tmp").exists()
    j = Journal(str(path))  # the next start still finds everything owed
    assert [e["id"] for e in j.owed()] == ["h1", "advice:c2", "release:h3"]


def test_a_rewrite_killed_after_some_lines_leaves_the_journal_whole(tmp_path, monkeypatch):
    path = tmp_path / "captures.jsonl"
    write(path, OWED)
    before = path.read_bytes()
    dumps, written = json.dumps, []

    def dies_after_one(doc, *a, **kw):
        if written:
            raise OSError(5, "Input/output error")
        written.append(doc)
        return dumps(doc, *a, **kw)

    monkeypatch.setattr(journal_mod.json, "dumps", dies_after_one)
    with pytest.raises(OSError):
        Journal(str(path))
    monkeypatch.setattr(journal_mod.json, "dumps", dumps)
    assert path.read_bytes() == before


def test_a_second_process_on_the_same_journal_is_refused(tmp_path):
    path = tmp_path / "captures.jsonl"
    write(path, OWED)
    first = Journal(str(path))
    with pytest.raises(JournalInUse, match="in use by another process"):
        Journal(str(path))
    assert [e["id"] for e in first.owed()] == ["h1", "advice:c2", "release:h3"]
    assert list(journal_mod.read(str(path))[0]) == ["h1", "advice:c2", "release:h3"]  # nothing compacted away
    os.close(first.lock)  # the first process stops: the next may start
    Journal(str(path))


def test_calls_in_flight_are_voided_at_the_next_start(tmp_path):
    path = tmp_path / "captures.jsonl"

    def inflight(c):
        return {"op": "inflight", "id": f"call:{c}", "user": "u", "key": f"proxy:{c}", "amount": 5, "call": c}

    write(path, [
        inflight("c1"),  # the process died mid-call
        inflight("c2"),
        {"op": "capture", "id": "h2", "hold": "h2", "user": "u", "call": "c2"},  # ... after this call's capture
        inflight("c3"),
        {"op": "release", "id": "release:h3", "hold": "h3", "call": "c3"},
        {"done": "call:c3"},
        inflight("c4"),
        {"op": "advice", "id": "advice:c4", "user": "u", "call": "c4", "amount": 5},  # stood in, never ended
    ])
    j = Journal(str(path))
    assert [e["id"] for e in j.owed()] == ["h2", "release:h3", "void:proxy:c1"]
    assert j.owed()[-1] == {"op": "void", "id": "void:proxy:c1", "user": "u", "key": "proxy:c1", "amount": 5}
    # c2 was answered; c3 settled (and logged) before the stop; c4's advice is dropped, not voided
    assert [e["call"] for e in j.abandoned] == ["c1", "c4"]


def test_a_large_journal_is_compacted_while_running(tmp_path, monkeypatch):
    monkeypatch.setattr(journal_mod, "COMPACT_BYTES", 2000)
    path = tmp_path / "captures.jsonl"
    j = Journal(str(path))
    j.add({"op": "capture", "id": "kept", "hold": "kept", "user": "u"})
    for n in range(100):  # calls come and go; one capture stays owed throughout
        j.add({"op": "capture", "id": f"h{n}", "hold": f"h{n}", "user": "u"})
        j.settled(f"h{n}")
    assert path.stat().st_size < 2000
    j.add({"op": "release", "id": "release:x", "hold": "x"})  # appends go to the new file
    assert list(journal_mod.read(str(path))[0]) == ["kept", "release:x"]
