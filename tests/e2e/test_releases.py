"""Releases on the local stack (ADR 10, ADR 16): a deploy that ships changed billing and proxy code,
and the rollback after it, under continuous paid traffic through each region's own edge (streamed
and not): no request fails, every answer is charged once, and nothing but billing and the proxy is
restarted."""

from __future__ import annotations

import uuid

from components import local, release as release_mod
from tests.e2e.traffic import containers, deploy_under_traffic

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
