"""The released CIRIS agent (`ciris-agent` from PyPI) in a venv of its own, for the contract tests
that drive its own clients against our real processes (tests/billing/test_agent_contract.py: its
billing client; tests/proxy/test_agent_llm_contract.py: its LLM service).

The venv is built once at $CIRIS_AGENT_VENV (default ~/.cache/ciris-bridge/agent-venv-<version>-<lock>)
from tests/agent_lock/requirements.lock, by hash and --no-deps: the agent and its requirements but
`ciris-server` (no wheel for this glibc; the clients driven here do not use it). Without network it skips, except under CI=true: it fails.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

LOCK = Path(__file__).parent / "agent_lock"  # requirements.lock: every package, by hash (`make lock`)
AGENT_VERSION = (LOCK / "ciris-agent.txt").read_text().strip().removeprefix("ciris-agent==")
# What the drivers import: a venv that cannot is rebuilt.
PROBES = ("ciris_engine.logic.services.infrastructure.resource_monitor.ciris_billing_provider",
          "ciris_engine.logic.services.runtime.llm_service.service")


def build(venv: Path) -> None:
    """The locked set, nothing resolved: no later upstream release changes what the tests drive.
    `pip check` may miss only ciris-server (left out on purpose)."""
    python = str(venv / "bin" / "python")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--require-hashes", "-r",
                    str(LOCK / "requirements.lock")], check=True, timeout=1800)
    check = subprocess.run([python, "-m", "pip", "check"], capture_output=True, text=True)
    problems = [line for line in check.stdout.splitlines() if line.strip() and "ciris-server" not in line]
    if problems:
        raise subprocess.SubprocessError(f"the agent venv's locked set is incomplete: {problems[:5]}")


@pytest.fixture(scope="module")
def agent_python() -> str:
    digest = hashlib.sha256((LOCK / "requirements.lock").read_bytes()).hexdigest()[:12]  # a new lock, a new venv
    venv = Path(os.environ.get("CIRIS_AGENT_VENV") or
                Path.home() / ".cache" / "ciris-bridge" / f"agent-venv-{AGENT_VERSION}-{digest}")
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "; ".join(f"import {m}" for m in PROBES)]
    if not python.exists() or subprocess.run(probe, capture_output=True).returncode:
        try:
            build(venv)
        except (subprocess.SubprocessError, OSError, StopIteration) as e:
            if os.environ.get("CI") == "true":
                raise
            pytest.skip(f"cannot install ciris-agent {AGENT_VERSION} ({type(e).__name__})")
    return str(python)


def drive(agent_python: str, driver: Path, tmp_path: Path, env_extra: dict | None = None, timeout: float = 120,
          **args) -> dict:
    """Run `driver` in the agent's venv with `args` (JSON); its last stdout line, parsed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CIRIS_")} | {"CIRIS_HOME": str(tmp_path)} | (env_extra or {})
    r = subprocess.run([agent_python, str(driver), json.dumps(args)], capture_output=True, text=True, timeout=timeout,
                       env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])
