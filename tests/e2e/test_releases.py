"""Releases on the local stack (ADR 10, ADR 16): a deploy that ships changed billing and proxy code,
and the rollback after it, under continuous paid traffic through each region's own edge (streamed
and not): no request fails, every answer is charged once, and nothing but billing and the proxy is
restarted."""

from __future__ import annotations

import subprocess
import uuid

from components import local, release as release_mod
from tests.e2e.traffic import PRICE, containers, paying_user, traffic, wait_balance

def deploy_under_traffic(stack, monkeypatch, action) -> dict[str, Traffic]:
    for key, value in stack.env.items():  # the engine, as make local runs it
        monkeypatch.setenv(key, value)
    starts = {r["name"]: paying_user(stack, r) for r in stack.regions}
    users = {name: (u, t) for name, (u, t, _) in starts.items()}
    with traffic(stack, users) as flows:
        action()
    for region in stack.regions:
        name = region["name"]
        user, _, start = starts[name]
        flow = flows[name]
        # Nothing fails but, a few times per deploy, billing's own "cannot write now" 503 to a
        # health probe while this 2-core machine runs both regions, the twins and the traffic (a
        # write that took longer than its budget: an answer, not a dropped request), and at most
        # one of the edge's empty 502s: a POST whose upstream connection closed as Caddy 2.6 sent
        # its body ("invalid Read on closed Body"; ADR 16, "What is left": 1 in ~44,000 requests
        # since the edge asks Podman's name server alone). The edge's errors are printed with them.
        known = [f for f in flow.failed if f.startswith('billing health 503 {"status":"unhealthy"')]
        reset = [f for f in flow.failed if f in ("proxy 502 ", "billing health 502 ")]
        assert len(flow.failed) == len(known) + len(reset) and len(known) <= 5 and len(reset) <= 1, \
            f"{name}: {len(flow.failed)} failed of {flow.paid + len(flow.failed)}: {flow.failed[:10]}; " \
            f"the edge's errors: {edge_errors(stack, name, flow.since)}"
        if reset:
            print(f"{name}: the edge's errors: {edge_errors(stack, name, flow.since)}")
        print(f"{name}: {len(flow.failed)} failed of {flow.paid + flow.ok + len(flow.failed)}: {flow.failed}")
        assert flow.paid > 10, f"{name}: only {flow.paid} paid calls went through during the deploy"
        # Every answered call charged exactly once.
        assert wait_balance(stack, region, user, start - PRICE * flow.paid) == start - PRICE * flow.paid, name
    return flows


def edge_errors(stack, region: str, since: float) -> list[str]:
    logs = subprocess.run(["podman", "logs", "--since", str(int(since)), f"ciris-{region}-edge-1"], env=stack.env,
                          capture_output=True, text=True)
    logs = logs.stdout + logs.stderr
    return [line[:600] for line in logs.splitlines() if '"status":502' in line or
            ('"level":"error"' in line and "OCSP" not in line)][-6:]


def test_a_deploy_of_changed_billing_and_proxy_code_and_its_rollback_fail_no_request(stack, monkeypatch):
    before = containers(stack)
    previous = release_mod.History.load(local.RELEASES).current
    marker = uuid.uuid4().hex[:12]
    changed = {"billing": {"test": marker}, "proxy": {"test": marker}}  # new image ids: "changed code"
    deploy_under_traffic(stack, monkeypatch, lambda: local.up(labels=changed))
    after = containers(stack)
    current = release_mod.History.load(local.RELEASES).current
    assert current != previous
    replaced = {name for name in before if after.get(name) != before[name]}
    assert replaced == {f"ciris-{r['name']}-{s}-1" for r in stack.regions for s in ("billing", "proxy")}, replaced
    assert not [n for n in after if n.endswith("-twin-1")], "a twin was left running"
    image = stack.podman("inspect", "--format", "{{.ImageName}}", "ciris-us-east-billing-1").strip()
    assert image == release_mod.History.load(local.RELEASES).get(current).ref("billing")

    # The rollback: the release before, through the same path, under the same traffic.
    deploy_under_traffic(stack, monkeypatch, lambda: local.rollback())
    assert release_mod.History.load(local.RELEASES).current == previous
    back = containers(stack)
    assert {n for n in after if back.get(n) != after[n]} == replaced
    image = stack.podman("inspect", "--format", "{{.ImageName}}", "ciris-us-east-billing-1").strip()
    assert image == release_mod.History.load(local.RELEASES).get(previous).ref("billing")
