"""The capture journal: what the proxy still owes billing, on disk, so a restart can settle it."""

from __future__ import annotations

import json
import os


class Journal:
    """Captures not yet confirmed by billing, as JSON lines: {"capture": id} then {"done": id}.
    Written with O_APPEND before the capture is attempted, so it survives the process."""

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.pending = self._read()
        with open(path, "w") as f:  # compact: only what is still owed
            f.writelines(json.dumps({"capture": h}) + "\n" for h in self.pending)
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND)

    def _read(self) -> list[str]:
        owed: dict[str, None] = {}
        try:
            with open(self.path) as f:
                for line in f:
                    try:
                        entry = json.loads(line)
                    except ValueError:
                        continue  # a line torn by a crash mid-write
                    if "capture" in entry:
                        owed[entry["capture"]] = None
                    elif "done" in entry:
                        owed.pop(entry["done"], None)
        except FileNotFoundError:
            pass
        return list(owed)

    def _append(self, entry: dict) -> None:
        os.write(self.fd, (json.dumps(entry) + "\n").encode())

    def owe(self, hold_id: str) -> None:
        self.pending.append(hold_id)
        self._append({"capture": hold_id})

    def settled(self, hold_id: str) -> None:
        self.pending.remove(hold_id)
        if self.pending:
            self._append({"done": hold_id})
        else:
            os.ftruncate(self.fd, 0)  # nothing owed: start the file afresh
