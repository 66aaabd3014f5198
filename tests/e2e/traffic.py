"""Paid traffic through each region's own edge while something happens to the stack (a deploy, a
rollback): shared by tests/e2e/test_releases.py and bench/deploy.py."""

from __future__ import annotations

import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field

import httpx

PRICE = 5  # cents per paid call (Pulumi.local.yaml leaves services.price_per_interaction_cents at 5)


@dataclass
class Traffic:
    """Paid completions through one region's edge, back to back, half of them streamed, plus
    billing's health; every answer recorded."""
    stack: object
    region: dict
    token: str
    ok: int = 0
    paid: int = 0
    failed: list[str] = field(default_factory=list)
    since: float = field(default_factory=time.time)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        with self.stack.edge(self.region, "proxy") as proxy, self.stack.edge(self.region, "billing") as billing:
            n = 0
            while not self.stop.is_set():
                n += 1
                body = {"model": "llama-3.3-70b", "messages": [{"role": "user", "content": f"deploy {n}"}],
                        "stream": n % 2 == 0}
                try:
                    with proxy.stream("POST", "/v1/chat/completions", json=body,
                                      headers={"Authorization": f"Bearer {self.token}"}) as r:
                        text = r.read().decode(errors="replace")
                    answered = text.rstrip().endswith("data: [DONE]") if body["stream"] else "local fake upstream" in text
                    if r.status_code != 200 or not answered or '"error"' in text:
                        self.failed.append(f"proxy {r.status_code} {text[:120]}")
                    else:
                        self.paid += 1
                    h = billing.get("/health")
                    if h.status_code != 200:
                        self.failed.append(f"billing health {h.status_code} {h.text[:120]}")
                    else:
                        self.ok += 1
                except httpx.HTTPError as e:
                    self.failed.append(f"{type(e).__name__}: {e}")
                time.sleep(0.05)


@contextmanager
def traffic(stack, users: dict[str, tuple[str, str]]):
    flows = {name: Traffic(stack, region, users[name][1]) for name, region in
             ((r["name"], r) for r in stack.regions)}
    threads = [threading.Thread(target=f.run, daemon=True) for f in flows.values()]
    for t in threads:
        t.start()
    try:
        time.sleep(3)  # traffic flows before the deploy starts
        yield flows
        time.sleep(3)
    finally:
        for f in flows.values():
            f.stop.set()
        for t in threads:
            t.join(timeout=200)


def paying_user(stack, region: dict) -> tuple[str, str, int]:
    admin = {"Authorization": f"Bearer {stack.admin_token}"}
    with stack.edge(region, "billing") as billing:
        r = billing.post("/v1/users", json={"email": f"release-{uuid.uuid4().hex[:8]}@example.com"}, headers=admin)
        assert r.status_code == 201, r.text
        user = r.json()["id"]
        r = billing.post("/v1/credits/grant", headers=admin, json={"user_id": user, "amount": 100_000,
                                                                   "idempotency_key": f"grant-{user}", "reason": "deploy drill"})
        assert r.status_code == 200, r.text
        token = billing.post("/v1/auth/token", json={"user_id": user}, headers=admin).json()["access_token"]
        return user, token, billing.get(f"/v1/credits/{user}", headers=admin).json()["balance"]


def containers(stack) -> dict[str, str]:
    """Container name -> id, of every running container of the stack."""
    rows = stack.podman("ps", "--filter", "label=ciris.region", "--format", "{{.Names}} {{.ID}}").split("\n")
    return dict(row.split() for row in rows if row.strip())


def wait_balance(stack, region: dict, user: str, expected: int, timeout: float = 60) -> int:
    """Captures are posted after the answer: wait for the ledger to show every one of them."""
    admin = {"Authorization": f"Bearer {stack.admin_token}"}
    deadline = time.time() + timeout
    with stack.edge(region, "billing") as billing:
        while True:
            balance = billing.get(f"/v1/credits/{user}", headers=admin).json()["balance"]
            if balance == expected or time.time() > deadline:
                return balance
            time.sleep(1)


