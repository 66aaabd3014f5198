"""The SSH access script (components/access.py) on a real UFW and a real deploy user, in a container
of the local base image: what a changed `admin_ssh_cidrs` or `ssh_public_key` does to a running host."""

from __future__ import annotations

import subprocess
import uuid

import pytest

from components import access
from tests.e2e.conftest import engine_env

NEW = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJCWa0CWmimGblFI1W2B9rNX3k9vDdboenQfYtl/eqCU new@ciris"
OLD = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPU/+6BWuZJm0j8ttiTuDSHmj9RskqpHfmrH1CG6NQAY old@ciris"
IMAGE = "localhost/ciris-test-ufw:1"


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    """A container with Debian's UFW and the deploy user, its first-boot state as cloud-init leaves it."""
    env = engine_env()
    d = tmp_path_factory.mktemp("ufw")
    (d / "Dockerfile").write_text("FROM localhost/ciris-base:bookworm\nRUN apt-get update && apt-get install -y -q "
                                  "--no-install-recommends ufw && useradd -m ciris\n")
    out = subprocess.run(["docker", "build", "-q", "-t", IMAGE, str(d)], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    name = f"ciris-test-ufw-{uuid.uuid4().hex[:8]}"
    subprocess.run(["docker", "run", "-d", "--name", name, IMAGE, "sleep", "600"], env=env, check=True, capture_output=True)

    def sh(script: str) -> subprocess.CompletedProcess:
        return subprocess.run(["docker", "exec", "-i", name, "sh", "-s"], input=script, env=env, capture_output=True,
                              text=True, timeout=60)

    # First boot: SSH from the first admin address, the old key (cloud-init's part).
    first = sh("set -e\nufw allow proto tcp from 198.51.100.7 to any port 22 >/dev/null\n"
               "ufw allow 443/tcp >/dev/null\ninstall -d -m 700 -o ciris -g ciris /home/ciris/.ssh\n"
               f"echo '{OLD}' > /home/ciris/.ssh/authorized_keys\n")
    assert first.returncode == 0, first.stderr
    yield sh
    subprocess.run(["docker", "rm", "-f", name], env=env, capture_output=True)


def ssh_sources(sh) -> list[str]:
    shown = sh("ufw show added").stdout
    return sorted(line.split()[3] for line in shown.splitlines() if line.endswith("port 22 proto tcp"))


def keys(sh) -> list[str]:
    return [" ".join(k.split()[:2]) for k in sh("cat /home/ciris/.ssh/authorized_keys").stdout.splitlines()]


def test_changed_admin_addresses_and_a_new_key_reach_a_running_host_without_locking_anyone_out(host):
    # The operator moves to new addresses and a new key, still connecting with the old key.
    out = host(access.script(["203.0.113.0/24", "2001:db8::/48"], NEW, [], "ciris"))
    assert out.returncode == 0, out.stderr
    assert ssh_sources(host) == ["2001:db8::/48", "203.0.113.0/24"]  # the old address is closed
    assert "ufw allow 443/tcp" in host("ufw show added").stdout  # other rules untouched
    assert keys(host) == [access.key_body(OLD), access.key_body(NEW)]  # the old key kept: it is in use
    # Run again (any later pulumi up): nothing changes, nothing is added twice.
    assert host(access.script(["203.0.113.0/24", "2001:db8::/48"], NEW, [], "ciris")).returncode == 0
    assert ssh_sources(host) == ["2001:db8::/48", "203.0.113.0/24"]
    assert keys(host) == [access.key_body(OLD), access.key_body(NEW)]
    # The new key works; the operator retires the old one.
    assert host(access.script(["203.0.113.0/24"], NEW, [OLD], "ciris")).returncode == 0
    assert keys(host) == [access.key_body(NEW)] and ssh_sources(host) == ["203.0.113.0/24"]
    mode = host("stat -c '%a %U' /home/ciris/.ssh/authorized_keys").stdout.strip()
    assert mode == "600 ciris"
