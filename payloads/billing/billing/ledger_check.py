"""The ledger's invariants as metrics (issue #16: the NegativeBalance and LedgerVerifyFailing alerts):
`verify-ledger` run in the background, its outcome served by every worker's /metrics.

Measured: verify-ledger recomputes every row in Python, about 6 s per 100,000 transactions (1,000
users) on the 2-core development machine, so it cannot run per scrape. Instead:

- One check at a time per server: every worker wakes when a check is due, and only the one that
  takes the lock (flock on a file in the server's state directory) runs it; the others find its
  result. The check is `python -m billing verify-ledger --json` in a child process at lower
  priority: the same code as the operator's command, on its own core, never holding a worker's
  event loop or GIL. The next check is due LEDGER_VERIFY_INTERVAL_SECONDS after the last ended.
- The result is one small JSON file in that directory (written atomically), so every worker
  reports the same values, and a worker reports nothing it has not read there: before the first
  check has finished, the gauges are absent, never a guessed 0 or 1.
- A check that cannot read the database (unreachable, timed out, unparseable output) reports no
  ok and no count: an unknown ledger is not an ok one. The last successful run's time stays, so
  its age shows how long the ledger has gone unchecked.

The state directory is made fresh by the server's parent process (BILLING_STATE_DIR, inherited by
the workers), so an earlier run's result is never served.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger("billing")

STATE_FILE = "ledger-check.json"
LOCK_FILE = "ledger-check.lock"
TIMEOUT = 900  # seconds a check may take before it is killed and counted as unknown
PAYLOAD = Path(__file__).resolve().parent.parent  # where `python -m billing` is importable


def read_state(state_dir: Path) -> dict:
    try:
        return json.loads((state_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _write_state(state_dir: Path, state: dict) -> None:
    tmp = state_dir / f".{STATE_FILE}.{os.getpid()}"
    tmp.write_text(json.dumps(state))
    os.replace(tmp, state_dir / STATE_FILE)  # readers see the old file or the new one, never half


async def run_verify(timeout: float = TIMEOUT) -> dict:
    """One `verify-ledger --json` in a child process: its report, or {"error": why}."""
    nice = shutil.which("nice")
    cmd = [*([nice, "-n", "10"] if nice else []), sys.executable, "-m", "billing", "verify-ledger", "--json"]
    proc = await asyncio.create_subprocess_exec(*cmd, cwd=PAYLOAD, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except (asyncio.TimeoutError, asyncio.CancelledError):
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        if asyncio.current_task().cancelling():
            raise
        return {"error": f"verify-ledger did not finish within {timeout:g} s"}
    try:
        report = json.loads(out)
        if isinstance(report.get("ok"), bool) and isinstance(report.get("negative"), int):
            return report
    except (ValueError, AttributeError):
        pass
    lines = err.decode(errors="replace").strip().splitlines()
    return {"error": lines[-1][:200] if lines else f"verify-ledger exited {proc.returncode} without a report"}


class Checker:
    """The background loop of one worker (in the app's lifespan)."""

    def __init__(self, state_dir: Path, interval: float, verify=run_verify):
        self.state_dir, self.interval, self.verify = state_dir, interval, verify

    async def loop(self) -> None:
        """The first check soon after start, then one per interval (whichever worker runs it)."""
        while True:
            await asyncio.sleep(min(max(1.0, self._due() - time.time()), self.interval))
            try:
                await self.check_if_due()
            except Exception:  # never let the loop die: the next round tries again
                log.exception("ledger check failed")

    def _due(self, state: dict | None = None) -> float:
        state = read_state(self.state_dir) if state is None else state
        if "attempted_at" not in state:
            return 0.0
        return state["attempted_at"] + state["duration"] + self.interval

    async def check_if_due(self) -> bool:
        """Run the check if none ran within the interval and no other worker is running it."""
        with open(self.state_dir / LOCK_FILE, "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # another worker is checking; its result is what we will serve
            state = read_state(self.state_dir)
            if time.time() < self._due(state):
                return False  # another worker just did
            started = time.time()
            report = await self.verify()
            state.update(attempted_at=started, duration=time.time() - started, runs=state.get("runs", 0) + 1)
            if "error" in report:
                state.update(error=report["error"], last_error_at=time.time())
                state.pop("ok", None)
                state.pop("negative", None)
                log.warning("ledger check: the ledger could not be read (%s)", report["error"])
            else:
                state.update(ok=report["ok"], negative=report["negative"], finished_at=time.time(),
                             verified_in=time.time() - started)
                state.pop("error", None)
                if not report["ok"] or report["negative"]:
                    log.error("ledger check: %s; %d negative balance(s)", report.get("problem") or "ok", report["negative"])
            _write_state(self.state_dir, state)
            return True


def collect(state_dir: Path):
    """The gauges from the shared state: only what a finished check established."""
    state = read_state(state_dir)
    if "ok" in state:
        yield GaugeMetricFamily("billing_ledger_verify_ok", "1 if the last verify-ledger passed (hash chains, "
                                "balances, forced debits), 0 if it found a break; absent while unknown",
                                value=1 if state["ok"] else 0)
        yield GaugeMetricFamily("billing_negative_balances", "Accounts whose balance is below zero (at the last check)",
                                value=state["negative"])
    if "finished_at" in state:
        yield GaugeMetricFamily("billing_ledger_verify_last_run_timestamp_seconds",
                                "When the last verify-ledger that could read the ledger finished", value=state["finished_at"])
        yield GaugeMetricFamily("billing_ledger_verify_duration_seconds", "How long the last verify-ledger that could "
                                "read the ledger took", value=state["verified_in"])
    if "last_error_at" in state:
        yield GaugeMetricFamily("billing_ledger_verify_last_error_timestamp_seconds",
                                "When verify-ledger last could not read the ledger", value=state["last_error_at"])
