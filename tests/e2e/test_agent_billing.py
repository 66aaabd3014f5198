"""The released CIRIS agent's own billing client (`ciris-agent` from PyPI, tests/agent_venv.py
builds its venv) against `make local`, through the regions' edges: server
mode with the API key `make local` wrote to local/agent.env, mobile mode with an ID token from the
local stand-in for Google (`make id-token`), and the agent's own fallback from a dead first URL to
its packaged second one (`billing1.ciris-services-2.ai`, which eu-west's edge serves: ADR 19)."""

from __future__ import annotations

import uuid

from components import local
from tests.agent_venv import agent_python  # noqa: F401  (the fixture)
from tests.billing.test_agent_contract import drive
from tests.e2e.test_stack import id_token

FALLBACK = "billing1.ciris-services-2.ai"  # the agent's packaged second billing URL (CIRIS_SERVICES.json)


def agent_env() -> dict[str, str]:
    return dict(line.split("=", 1) for line in local.AGENT_ENV.read_text().splitlines()
                if "=" in line and not line.startswith("#"))


def hosts(stack) -> dict[str, str]:
    """Every name the agent may call, as the bridge's DNS would answer it (plus the packaged fallback)."""
    us, eu = stack.regions
    return {f"billing1.{us['domain']}": us["ipv4"], f"billing1.{eu['domain']}": eu["ipv4"], FALLBACK: eu["ipv4"]}


def test_the_agents_billing_client_in_server_mode_with_the_local_api_key(stack, agent_python, tmp_path):  # noqa: F811
    env = agent_env()
    account = f"e2e-server-{uuid.uuid4().hex[:8]}"
    out = drive(agent_python, tmp_path, {"SSL_CERT_FILE": env["SSL_CERT_FILE"]}, url=env["CIRIS_BILLING_API_URL"],
                api_key=env["CIRIS_BILLING_API_KEY"], provider="oauth:google", account_id=account, key="m-1",
                hosts=hosts(stack))
    assert out["check"]["has_credit"] is True and out["check"]["credits_remaining"] == 15, out
    assert out["spend"]["succeeded"] is True and out["spend"]["balance_remaining"] == 14, out
    assert out["again"]["reason"] == "ALREADY_CHARGED:idempotency" and out["after"]["credits_remaining"] == 14, out


def test_the_agents_billing_client_in_mobile_mode_fails_over_to_its_second_url(stack, agent_python, tmp_path):  # noqa: F811
    """Mobile mode (a Google ID token) with the first URL dead (nothing listens where it points):
    the agent moves to its packaged fallback, eu-west's edge, which serves that name."""
    env = agent_env()
    sub = f"e2e-mobile-{uuid.uuid4().hex[:8]}"
    token = id_token("google", sub)
    dead = f"billing1.{stack.regions[0]['domain']}"
    names = hosts(stack) | {dead: "127.0.0.1"}  # connection refused: the first region is gone
    out = drive(agent_python, tmp_path, {"SSL_CERT_FILE": env["SSL_CERT_FILE"]}, url=f"https://{dead}", id_token=token,
                provider="google", account_id=sub, key="m-1", hosts=names)
    assert out["check"]["has_credit"] is True and out["check"]["credits_remaining"] == 15, out
    assert out["spend"]["succeeded"] is True and out["again"]["reason"] == "ALREADY_CHARGED:idempotency", out
    # The one charge is in the ledger, as either region reads it.
    for region in stack.regions:
        with stack.edge(region, "billing") as billing:
            r = billing.post("/v1/billing/credits/check", headers={"Authorization": f"Bearer {token}"},
                             json={"oauth_provider": "oauth:google", "external_id": sub})
            assert r.json()["credits_remaining"] == 14, (region["name"], r.text)
