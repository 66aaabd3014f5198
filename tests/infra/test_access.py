"""SSH access follows config on every `pulumi up` (components/access.py): each host's `<host>-access`
command, before anything else runs over SSH, re-run whenever the admin CIDRs or keys change."""

from __future__ import annotations

import subprocess

import pytest

from components import access as access_script, cloud_init, config, plan
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


@pytest.mark.parametrize("systemd, active, installs", [(True, "", True), (True, "chrony", False),
                                                        (True, "systemd-timesyncd", False), (False, "", False)])
def test_a_host_whose_clock_nothing_keeps_gets_timesyncd(tmp_path, systemd, active, installs):
    """Hosts made before cloud-init installed systemd-timesyncd get it at the next `pulumi up`."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    for name in ("apt-get", "systemctl"):  # record each call; `systemctl is-active` as the host's units are
        (bin_dir / name).write_text(f'#!/bin/sh\necho "{name} $*" >> {calls}\n'
                                    f'[ "$1" = is-active ] && {{ for u in "$@"; do [ "$u" = "{active or "-"}" ] && exit 0; done; exit 3; }}\n'
                                    "exit 0\n")
        (bin_dir / name).chmod(0o755)
    marker = tmp_path / "systemd"
    if systemd:
        marker.mkdir()
    script = "set -eu\n" + access_script.CLOCK.replace(access_script.SYSTEMD_DIR, str(marker))
    out = subprocess.run(["sh", "-c", script], env={"PATH": f"{bin_dir}:/usr/bin:/bin"}, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    seen = calls.read_text().splitlines() if calls.exists() else []
    assert ("systemctl enable --now systemd-timesyncd" in seen) is installs, seen
    assert any(c.startswith("apt-get install -y -q systemd-timesyncd") for c in seen) is installs, seen
