"""Every secret rotates under paid traffic (issue #26, docs/runbook-secrets.md), on the local stack:
billing's token signing key (ADR 21), the proxy's billing token (ADR 25), billing's database login
and the backup bucket's keys (ADR 26), and a Stripe endpoint secret, each in the runbook's steps,
folded into three deploys (add, switch, retire), with users' traffic through each region's edge
all along. No request fails, every answer is charged once, no user is signed out (their tokens
were signed with the old key, which keeps verifying), and the database servers never restart.

The old signing key stays (the runbook retires it 30 days later: tokens it signed are still valid),
so the stack ends on rotated settings: it runs after the other end-to-end tests, just before the
recovery drill, which rebuilds the stack on the committed settings (conftest.py)."""

from __future__ import annotations

import base64
import json
import secrets
import time
from pathlib import Path

import pytest
import yaml

from components import local
from tests.e2e.conftest import leader
from tests.e2e.test_stack import purchase_event, signed_webhook
from tests.e2e.traffic import containers, deploy_under_traffic, paying_user

pytestmark = pytest.mark.rotates_secrets


def stack_file(tmp_path: Path, step: int, **services) -> Path:
    """Pulumi.local.yaml with services settings added (a copy: the committed file is not touched)."""
    doc = yaml.safe_load(local.STACK_FILE.read_text())
    doc["config"]["ciris-bridge:services"] = {**doc["config"]["ciris-bridge:services"], **services}
    path = tmp_path / f"Pulumi.local-{step}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def kid(token: str) -> str:
    return json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))["kid"]


def logins(stack) -> dict[str, bool]:
    """Billing's login roles on the primary: role -> may it log in with a password."""
    rows = stack.psql(leader(stack), "SELECT rolname, rolpassword IS NOT NULL FROM pg_authid WHERE rolname LIKE 'billing%'")
    return {name: flag == "t" for name, flag in (row.split("|") for row in rows.splitlines())}


def archived(stack) -> tuple[int, int]:
    row = stack.psql(leader(stack), "SELECT archived_count, failed_count FROM pg_stat_archiver")
    return tuple(int(x) for x in row.split("|"))


def archive_now(stack, timeout: float = 120) -> None:
    """A WAL segment goes to the bucket with the keys the server reads now, without a failure."""
    before = archived(stack)
    stack.psql(leader(stack), "SELECT pg_switch_wal()")
    deadline = time.time() + timeout
    while archived(stack)[0] <= before[0]:
        assert time.time() < deadline, stack.psql(leader(stack), "SELECT * FROM pg_stat_archiver")
        time.sleep(1)
    assert archived(stack)[1] == before[1], stack.psql(leader(stack), "SELECT * FROM pg_stat_archiver")


def webhook_status(stack, region: dict, secret: str) -> int:
    user, _, _ = paying_user(stack, region)
    payload, headers = signed_webhook(secret, purchase_event(user, 100))
    with stack.edge(region, "billing") as billing:
        return billing.post("/v1/webhooks/stripe", content=payload, headers=headers).status_code


def test_every_secret_rotates_in_three_deploys_under_paid_traffic(stack, monkeypatch, tmp_path):
    saved = (local.LOCAL / "secrets.json").read_text()
    kept = json.loads(saved)
    old_hooks = kept["stripe_webhook_secret"].split(",")
    new_hook, new_key = f"whsec_{secrets.token_hex(16)}", f"rotated{secrets.token_hex(8)}"
    old_proxy_token = next(line.split("=", 1)[1] for line in (local.LOCAL / "us-east/proxy/env").read_text().splitlines()
                           if line.startswith("BILLING_SERVICE_TOKEN="))
    before = containers(stack)
    env = stack.env
    seen: dict[str, object] = {}

    def secrets_file(**changed) -> None:
        (local.LOCAL / "secrets.json").write_text(json.dumps({**json.loads((local.LOCAL / "secrets.json").read_text()), **changed}))

    def rotate() -> None:
        # 1. Add: a second signing key (verify-only), proxy token generation and database login; the
        #    bucket's new keys; a new Stripe endpoint secret beside the old ones.
        secrets_file(backup_s3_access_key=new_key, backup_s3_secret_key=secrets.token_hex(20),
                     stripe_webhook_secret=",".join([*old_hooks, new_hook]))
        local.deploy_current(stack_file(tmp_path, 1, jwt_keys=["1", "2"], proxy_tokens=["1", "2"],
                                        database_logins=["1", "2"]), env)
        seen["added"] = logins(stack)
        seen["keys in the server"] = stack.podman("exec", "ciris-us-east-postgres-1", "grep", "-c", new_key,
                                                  "/run/ciris-postgres/pgbackrest.d/keys.conf", check=False).strip()
        archive_now(stack)
        # 2. Switch: billing signs with the new key, the proxies carry the new generation, billing and
        #    the backup job log in with the new login.
        local.deploy_current(stack_file(tmp_path, 2, jwt_keys=["1", "2"], jwt_signing_key="2", proxy_tokens=["1", "2"],
                                        proxy_token="2", database_logins=["1", "2"], database_login="2"), env)
        seen["sessions"] = stack.psql(leader(stack), "SELECT DISTINCT usename FROM pg_stat_activity "
                                                     "WHERE datname = 'cirisbilling' AND usename LIKE 'billing%'")
        # 3. Retire what can go at once: the old generation, login and Stripe secret (the old signing
        #    key waits for the tokens it signed to expire).
        secrets_file(stripe_webhook_secret=",".join([*old_hooks[1:], new_hook]))
        local.deploy_current(stack_file(tmp_path, 3, jwt_keys=["1", "2"], jwt_signing_key="2", proxy_tokens=["2"],
                                        database_logins=["2"]), env)

    try:
        deploy_under_traffic(stack, monkeypatch, rotate, deploys=3)
        us = stack.regions[0]
        assert seen["added"] == {"billing": True, "billing_2": True}, seen
        assert seen["keys in the server"] == "1", "the server's pgBackRest does not read the new bucket keys"
        assert seen["sessions"] == "billing_2", seen
        assert logins(stack) == {"billing": False, "billing_2": True}
        archive_now(stack)  # the WAL archive still works with the new keys

        # The database servers were never restarted; only billing, the proxy and the backup job were.
        after = containers(stack)
        assert {n for n in before if n.endswith("-postgres-1") and after.get(n) != before[n]} == set()
        assert {n.split("-", 3)[-1] for n in before if after.get(n) != before[n]} == {"billing-1", "proxy-1", "backup-1"}

        # A new sign-in is signed with the new key and works through the other region's proxy.
        user, token, _ = paying_user(stack, stack.regions[1])
        assert kid(token) != kid(stack.admin_token)
        with stack.edge(us, "proxy") as proxy:
            r = proxy.post("/v1/chat/completions", headers={"Authorization": f"Bearer {token}"},
                           json={"model": "llama-3.3-70b", "messages": [{"role": "user", "content": "rotated"}]})
            assert r.status_code == 200, r.text
        # The old proxy token is revoked; the old Stripe secret is refused, the new one accepted.
        with stack.edge(us, "billing") as billing:
            r = billing.post("/v1/credits/lookup", json={"keys": []}, headers={"Authorization": f"Bearer {old_proxy_token}"})
            assert r.status_code == 401, r.text
        assert webhook_status(stack, us, new_hook) == 200
        assert webhook_status(stack, us, old_hooks[0]) == 400
    finally:
        # The next deploy (the recovery drill's) renders the stack's own secrets again.
        (local.LOCAL / "secrets.json").write_text(saved)
