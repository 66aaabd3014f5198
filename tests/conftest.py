"""Shared test helpers. Under CI (CI=true) a test never skips for a missing tool: it fails."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from components import config

REPO = Path(__file__).resolve().parent.parent


def require_binary(name: str) -> str:
    path = shutil.which(name)
    if path:
        return path
    message = f"{name} is not installed (make test installs it when run as root: scripts/install-system-deps)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def wait_until_healthy(url: str, proc: subprocess.Popen, log: Path, what: str, timeout: float = 90,
                       path: str = "/health") -> None:
    """Until `url``path` answers 200; a process that exits or never answers fails with its log."""
    deadline = time.time() + timeout
    while True:
        try:
            if httpx.get(f"{url}{path}", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            raise AssertionError(f"{what} did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def stop_process(proc: subprocess.Popen | None, timeout: float = 15) -> None:
    """SIGTERM, then SIGKILL if it lingers: never leave a process behind a failed test."""
    if proc and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def stack_raw(stack: str = "staging") -> tuple[dict, set[str]]:
    """A committed stack file as the flat config map the engine would see (a deep copy to mutate)."""
    raw, secret_keys = config.read_stack_file(REPO / f"Pulumi.{stack}.yaml")
    return copy.deepcopy(raw), secret_keys


def without_witness(stack: str = "production") -> tuple[dict, set[str]]:
    """A committed stack file with its witness removed (a witness-less stack)."""
    raw, secret_keys = stack_raw(stack)
    del raw["ciris-bridge:witness"]
    return raw, secret_keys


def run_plan(stack: str = "production", raw=None, secret_keys=None):
    """The offline plan of a stack file, or of `raw` (the program under the mock runtime)."""
    from components import plan

    if raw is None:
        raw, secret_keys = stack_raw(stack)
    return plan.run(stack, raw, secret_keys)


def third_region(raw: dict) -> dict:
    """`raw` with a third region added by config alone."""
    raw["ciris-bridge:regions"].append(
        {
            "name": "eu-north",
            "provider": "hetzner",
            "location": "hel1",
            "plan": "cx23",
            "domain": raw["ciris-bridge:regions"][1]["domain"].replace("-2.", "-3."),
            "nameserver": "ns3",
            "volume_gb": 10,
            "postgres": "replica",
        }
    )
    return raw
