"""The released CIRIS agent's own billing client (`ciris-agent` from PyPI, in a venv of its own:
tests/agent_venv.py) against the real billing process: server mode with an API key, mobile mode
with an ID token."""

from __future__ import annotations

import uuid
from pathlib import Path

from tests.agent_venv import agent_python, drive as drive_agent  # noqa: F401  (agent_python: fixture)
from tests.billing.conftest import ADMIN
from tests.billing.test_api_keys import mint

DRIVER = Path(__file__).with_name("agent_driver.py")


def drive(agent_python: str, tmp_path: Path, env_extra: dict | None = None, **args) -> dict:  # noqa: F811
    return drive_agent(agent_python, DRIVER, tmp_path, env_extra, **args)


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
