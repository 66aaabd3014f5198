"""The released CIRIS agent (`ciris-agent` from PyPI) in a venv of its own, for the contract tests
that drive its own clients against our real processes (tests/billing/test_agent_contract.py: its
billing client; tests/proxy/test_agent_llm_contract.py: its LLM service).

The venv is built once at $CIRIS_AGENT_VENV (default ~/.cache/ciris-bridge/agent-venv-<version>):
the agent with --no-deps plus its requirements, without `ciris-server` (no wheel for this glibc;
the clients driven here do not use it). Without network it skips, except under CI=true: it fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

AGENT_VERSION = "2.16.5"
# Not in the agent's own requirements (its ciris-server brings it), but its engine imports it.
EXTRA = ["ciris-persist==22.0.0"]
# What the drivers import: a venv that cannot is rebuilt.
PROBES = ("ciris_engine.logic.services.infrastructure.resource_monitor.ciris_billing_provider",
          "ciris_engine.logic.services.runtime.llm_service.service")


def build(venv: Path) -> None:
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([*pip, "--no-deps", f"ciris-agent=={AGENT_VERSION}"], check=True, timeout=600)
    metadata = next(venv.glob("lib/python*/site-packages/ciris_agent-*.dist-info/METADATA")).read_text()
    requires = [line.removeprefix("Requires-Dist: ") for line in metadata.splitlines()
                if line.startswith("Requires-Dist: ") and "extra ==" not in line and not line.startswith("Requires-Dist: ciris-server")]
    subprocess.run([*pip, *requires, *EXTRA], check=True, timeout=1800)


@pytest.fixture(scope="module")
def agent_python() -> str:
    venv = Path(os.environ.get("CIRIS_AGENT_VENV") or Path.home() / ".cache" / "ciris-bridge" / f"agent-venv-{AGENT_VERSION}")
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
