"""The released CIRIS agent's own billing client (`ciris-agent` from PyPI, in a venv of its own)
against the real billing process: server mode with an API key, mobile mode with an ID token.

The venv is built once at $CIRIS_AGENT_VENV (default ~/.cache/ciris-bridge/agent-venv-<version>):
the agent with --no-deps plus its requirements, without `ciris-server` (no wheel for this glibc;
its billing client does not use it). Without network it skips, except under CI=true: it fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.billing.conftest import ADMIN
from tests.billing.test_api_keys import mint

AGENT_VERSION = "2.16.5"
DRIVER = Path(__file__).with_name("agent_driver.py")
# Not in the agent's own requirements (its ciris-server brings it), but its engine imports it.
EXTRA = ["ciris-persist==22.0.0"]


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
    probe = [str(python), "-c", "import ciris_engine.logic.services.infrastructure.resource_monitor.ciris_billing_provider"]
    if not python.exists() or subprocess.run(probe, capture_output=True).returncode:
        try:
            build(venv)
        except (subprocess.SubprocessError, OSError, StopIteration) as e:
            if os.environ.get("CI") == "true":
                raise
            pytest.skip(f"cannot install ciris-agent {AGENT_VERSION} ({type(e).__name__})")
    return str(python)


def drive(agent_python: str, tmp_path: Path, env_extra: dict | None = None, **args) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CIRIS_")} | {"CIRIS_HOME": str(tmp_path)} | (env_extra or {})
    r = subprocess.run([agent_python, str(DRIVER), json.dumps(args)], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_server_mode_with_an_api_key(api, billing, agent_python, tmp_path):
    key = mint(api, "contract agent")["api_key"]
    account_id = f"g-{uuid.uuid4().hex}"
    out = drive(agent_python, tmp_path, url=billing.url, api_key=key, provider="oauth:google", account_id=account_id, key="msg-1")
    assert out["check"]["has_credit"] is True and out["check"]["credits_remaining"] == 15, out
    assert out["spend"]["succeeded"] is True and out["spend"]["balance_remaining"] == 14, out
    # The agent's retry of the same message: it sees "already charged", and nothing is debited twice.
    assert out["again"]["succeeded"] is True and out["again"]["reason"] == "ALREADY_CHARGED:idempotency", out
    assert out["again"]["transaction_id"] == out["spend"]["transaction_id"]
    assert out["after"]["credits_remaining"] == 14
    # Nothing left: the agent reads it as no credit.
    out = drive(agent_python, tmp_path, url=billing.url, api_key=key, provider="oauth:google", account_id=account_id,
                key="msg-2", amount=14)
    assert out["spend"]["balance_remaining"] == 0 and out["after"]["has_credit"] is False, out
    assert out["after"]["reason"].startswith("NO_CREDITS"), out


def test_mobile_mode_with_an_id_token(api, billing, oidc, agent_python, tmp_path):
    subject = f"sub-{uuid.uuid4().hex}"
    token = oidc.id_token("google", subject)
    out = drive(agent_python, tmp_path, url=billing.url, id_token=token, provider="google", account_id=subject, key="m-1")
    assert out["check"]["has_credit"] is True and out["check"]["credits_remaining"] == 15, out
    assert out["spend"]["succeeded"] is True and out["again"]["reason"] == "ALREADY_CHARGED:idempotency", out
    user = api.post("/v1/auth/token", json={"id_token": token}).json()["user_id"]
    assert api.get(f"/v1/credits/{user}", headers=ADMIN).json()["balance"] == 14
    # An expired token: the agent sees its session expired (401), nothing is charged.
    expired = oidc.id_token("google", subject, ttl=-120)
    out = drive(agent_python, tmp_path, url=billing.url, id_token=expired, provider="google", account_id=subject, key="m-2")
    assert out["spend"]["succeeded"] is False and out["spend"]["reason"].startswith("AUTH_EXPIRED"), out
    assert api.get(f"/v1/credits/{user}", headers=ADMIN).json()["balance"] == 14
