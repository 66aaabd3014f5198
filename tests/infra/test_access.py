"""SSH access follows config on every `pulumi up` (components/access.py): each host's `<host>-access`
command, before anything else runs over SSH, re-run whenever the admin CIDRs or keys change."""

from __future__ import annotations

import pytest

from components import cloud_init, config, plan
from tests.conftest import REPO, stack_raw

OLD = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPU/+6BWuZJm0j8ttiTuDSHmj9RskqpHfmrH1CG6NQAY old@ciris"


def access(p: plan.Plan) -> dict:
    return {r.name.removesuffix("-access"): r for r in p.registrations if r.name.endswith("-access")}


def test_every_host_applies_the_admin_cidrs_and_keys_before_anything_else_over_ssh():
    raw, keys = stack_raw("production")
    p = plan.run("production", raw, keys)
    found = access(p)
    assert set(found) == {"us-east", "eu-west", "witness"}
    for host, cmd in found.items():
        assert cmd.type == "command:remote:Command"
        for cidr in raw["ciris-bridge:admin_ssh_cidrs"]:
            assert f"ufw allow proto tcp from \"$c\"" in cmd.inputs["create"] and cidr in cmd.inputs["create"]
        assert f"/home/{cloud_init.DEPLOY_USER}/.ssh/authorized_keys" in cmd.inputs["create"]
        dependents = [r for r in p.registrations if cmd.urn in r.dependencies]
        assert {r.name for r in dependents} >= {f"{host}-deploy"}, host
        assert all(r.name.endswith(("-ufw", "-deploy")) for r in dependents), [r.name for r in dependents]

    # A changed CIDR list or a retired key changes the command (Pulumi runs it again); nothing else does.
    raw2 = {**raw, "ciris-bridge:admin_ssh_cidrs": ["8.8.8.8/32"], "ciris-bridge:ssh_retired_public_keys": [OLD]}
    again = access(plan.run("production", raw2, keys))
    for host in found:
        assert again[host].inputs["triggers"] != found[host].inputs["triggers"]
        assert "8.8.8.8/32" in again[host].inputs["create"] and "AAAAIPU/+6BWuZJm0j8" in again[host].inputs["create"]
    same = access(plan.run("production", raw, keys))
    assert all(same[h].inputs["triggers"] == found[h].inputs["triggers"] for h in found)


def test_the_local_stack_has_no_ssh_to_manage():
    raw, keys = config.read_stack_file(REPO / "Pulumi.local.yaml")
    assert access(plan.run("local", raw, keys)) == {}


def test_retiring_the_key_in_use_is_refused():
    raw, keys = stack_raw("staging")
    raw["ciris-bridge:ssh_retired_public_keys"] = [raw["ciris-bridge:ssh_public_key"]]
    with pytest.raises(config.ConfigError, match="ssh_retired_public_keys: lists ssh_public_key itself"):
        config.parse(raw, keys)
