"""Releases and secret rotations on the local stack, under one stream of paid traffic through each
region's own edge (streamed and not), by users signed in before it starts: three deploys, as an
operator would run them.
1. A release of changed billing and proxy code (ADR 10, ADR 16), carrying the first step of every
   rotation in docs/runbook-secrets.md ("add"): a second token signing key (ADR 21), proxy token
   generation (ADR 25) and database login (ADR 26), and a new Stripe endpoint secret.
2. Its rollback (the release before, through the same path), carrying the second ("switch").
3. The third ("retire": the old generation, login and Stripe secret) with the bucket's new keys.
No request fails, every answer is charged once, no user is signed out (their tokens were signed with
the old key, which keeps verifying), only billing, the proxy and (for the database login and the
bucket's keys) the backup job are restarted, and the database servers never are.

The old signing key stays (the runbook retires it 30 days later), so the stack ends on rotated
settings: this runs after the other end-to-end tests, just before the recovery drill, which
rebuilds the stack on the committed settings (conftest.py)."""

from __future__ import annotations

import base64
import json
import secrets
import time
import uuid
from pathlib import Path

import pytest
import yaml

from components import local, release as release_mod
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


def replaced(stack, before: dict[str, str], after: dict[str, str]) -> set[str]:
    """The services (in every region) whose containers a deploy replaced, e.g. {"billing", "proxy"}."""
    names = {n for n in before if after.get(n) != before[n]}
    by_service = {s: {f"ciris-{r['name']}-{s}-1" for r in stack.regions} for s in ("billing", "proxy", "backup", "postgres",
                                                                                   "edge", "dns", "etcd", "fake-llm")}
    found = {s for s, containers_of in by_service.items() if containers_of <= names}
    assert names == set().union(*(by_service[s] for s in found)), f"replaced in one region only, or elsewhere: {names}"
    return found


def test_a_release_its_rollback_and_every_rotation_fail_no_request(stack, monkeypatch, tmp_path):
    saved = (local.LOCAL / "secrets.json").read_text()
    old_hooks = json.loads(saved)["stripe_webhook_secret"].split(",")
    new_hook, new_key = f"whsec_{secrets.token_hex(16)}", f"rotated{secrets.token_hex(8)}"
    old_proxy_token = next(line.split("=", 1)[1] for line in (local.LOCAL / "us-east/proxy/env").read_text().splitlines()
                           if line.startswith("BILLING_SERVICE_TOKEN="))
    previous = release_mod.History.load(local.RELEASES).current
    marker = uuid.uuid4().hex[:12]
    changed = {"billing": {"test": marker}, "proxy": {"test": marker}}  # new image ids: "changed code"
    seen: dict[str, object] = {"before": containers(stack)}

    def secrets_file(**changes) -> None:
        path = local.LOCAL / "secrets.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))

    def deploys() -> None:
        # 1. The release, and each rotation's "add".
        secrets_file(stripe_webhook_secret=",".join([*old_hooks, new_hook]))
        local.up(stack_file(tmp_path, 1, jwt_keys=["1", "2"], proxy_tokens=["1", "2"], database_logins=["1", "2"]),
                 labels=changed)
        seen["released"] = (containers(stack), release_mod.History.load(local.RELEASES).current,
                            stack.podman("inspect", "--format", "{{.ImageName}}", "ciris-us-east-billing-1").strip())
        seen["added"] = logins(stack)
        # 2. The rollback, and each rotation's "switch": billing signs with the new key, the proxies
        #    carry the new generation, billing and the backup job log in with the new login.
        local.rollback(stack_file(tmp_path, 2, jwt_keys=["1", "2"], jwt_signing_key="2", proxy_tokens=["1", "2"],
                                  proxy_token="2", database_logins=["1", "2"], database_login="2"))
        seen["rolled back"] = (containers(stack), release_mod.History.load(local.RELEASES).current,
                               stack.podman("inspect", "--format", "{{.ImageName}}", "ciris-us-east-billing-1").strip())
        seen["sessions"] = stack.psql(leader(stack), "SELECT DISTINCT usename FROM pg_stat_activity "
                                                     "WHERE datname = 'cirisbilling' AND usename LIKE 'billing%'")
        # 3. Each rotation's "retire" that can go at once (the old signing key waits for the tokens
        #    it signed to expire), and the bucket's new keys.
        secrets_file(stripe_webhook_secret=",".join([*old_hooks[1:], new_hook]),
                     backup_s3_access_key=new_key, backup_s3_secret_key=secrets.token_hex(20))
        local.deploy_current(stack_file(tmp_path, 3, jwt_keys=["1", "2"], jwt_signing_key="2", proxy_tokens=["2"],
                                        database_logins=["2"]), stack.env)
        seen["retired"] = containers(stack)

    try:
        deploy_under_traffic(stack, monkeypatch, deploys, deploys=3)
        history = release_mod.History.load(local.RELEASES)
        released, current, image = seen["released"]
        assert current != previous and image == history.get(current).ref("billing")
        assert replaced(stack, seen["before"], released) == {"billing", "proxy"}
        assert not [n for n in released if n.endswith("-twin-1")], "a twin was left running"
        back, current, image = seen["rolled back"]
        assert current == previous and image == history.get(previous).ref("billing")
        assert replaced(stack, released, back) == {"billing", "proxy", "backup"}  # backup: the new login
        assert replaced(stack, back, seen["retired"]) == {"billing", "backup"}  # backup: the bucket's keys
        assert seen["added"] == {"billing": True, "billing_2": True}, seen
        assert seen["sessions"] == "billing_2", seen
        assert logins(stack) == {"billing": False, "billing_2": True}
        # The server's pgBackRest reads the new keys, and the archive still works with them.
        assert stack.podman("exec", "ciris-us-east-postgres-1", "grep", "-c", new_key,
                            "/run/ciris-postgres/pgbackrest.d/keys.conf", check=False).strip() == "1"
        archive_now(stack)

        # A new sign-in is signed with the new key and works through the other region's proxy.
        us = stack.regions[0]
        _, token, _ = paying_user(stack, stack.regions[1])
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
