"""The whole bridge running on this machine (`make local`): every image built from the payloads,
each region's containers deployed by the hosts' own deploy script, under Podman.

The stack is brought up once per session. If it was already up (a developer's `make local`), it
is left up afterwards; otherwise the session takes it down again (`make local-down`).
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field

import httpx
import pytest

from components import local
from tests.conftest import REPO, require_binary

LOCAL = REPO / "local"


def engine_env() -> dict[str, str]:
    out = subprocess.run([str(REPO / "scripts/container-engine"), "setup"], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.fail(f"the container engine did not start:\n{out.stderr[-2000:]}")
    env = dict(os.environ)
    for line in out.stdout.splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        env[key] = value
    return env


@dataclass
class Stack:
    # Never in a failure's report: the environment and the stack's keys stay out of CI logs.
    env: dict[str, str] = field(repr=False)
    client_config: dict
    admin_token: str = field(repr=False)
    secrets: dict = field(repr=False)
    tls: ssl.SSLContext

    @property
    def regions(self) -> list[dict]:
        return self.client_config["regions"]

    def edge(self, region: dict, service: str) -> httpx.Client:
        """A client for `https://<service>1.<domain>` through that region's edge, verified against
        local/ca.crt (the name is sent as SNI and Host; the address is the region's)."""
        host = f"{service}1.{region['domain']}"
        return httpx.Client(base_url=f"https://{region['ipv4']}", verify=self.tls, timeout=30,
                            headers={"Host": host}, transport=_SniTransport(host, self.tls))

    def podman(self, *args: str, check: bool = True) -> str:
        out = subprocess.run(["podman", *args], capture_output=True, text=True, env=self.env)
        if check and out.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)}: {out.stderr}")
        return out.stdout

    def compose(self, region: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["docker", "compose", "-f", str(LOCAL / region / "compose.yaml"), *args],
                              capture_output=True, text=True, env=self.env, timeout=600)

    def local(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "components.local", *args], cwd=REPO, env=self.env,
                              capture_output=True, text=True, timeout=1800)

    def psql(self, region: str, sql: str) -> str:
        return self.podman("exec", f"ciris-{region}-postgres-1", "gosu", "postgres", "psql", "-h", "/var/run/postgresql",
                           "-d", "cirisbilling", "-Atc", sql).strip()


class _SniTransport(httpx.HTTPTransport):
    """Every request carries the service's name as SNI, whatever address it is sent to."""

    def __init__(self, host: str, tls: ssl.SSLContext):
        super().__init__(verify=tls)
        self.host = host

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        request.extensions["sni_hostname"] = self.host
        return super().handle_request(request)


def pytest_collection_modifyitems(items):
    """A drill that rebuilds the whole stack (test_recovery) runs after every other end-to-end test,
    still among them (the suites after tests/e2e have the engine to themselves); the rotation that
    leaves the stack on rotated settings (test_releases_and_rotations) just before it."""
    rotates = [i for i in items if i.get_closest_marker("rotates_secrets")]
    rebuilds = [i for i in items if i.get_closest_marker("rebuilds_the_stack")]
    marked = rotates + rebuilds
    rest = [i for i in items if i not in marked]
    e2e = [n for n, i in enumerate(rest) if "tests/e2e/" in str(i.path)]
    at = e2e[-1] + 1 if e2e else len(rest)
    items[:] = rest[:at] + marked + rest[at:]


@pytest.fixture(scope="session")
def stack() -> Stack:
    require_binary("ip")
    env = engine_env()
    local.remove_dead(env)  # a stack whose processes died with the machine is not "up"
    was_up = bool(subprocess.run(["podman", "ps", "-q", "--filter", "label=ciris.region"], capture_output=True,
                                 text=True, env=env).stdout.strip())
    # CI builds every image as a fresh host would: from no cached layer, once per run (the tests that
    # deploy again later reuse this run's layers). The images must be free for that: a stack that
    # was up goes first.
    cold = os.environ.get("CI") == "true"
    if cold and was_up:
        subprocess.run([sys.executable, "-m", "components.local", "down"], cwd=REPO, env=env, capture_output=True)
        was_up = False
    up = subprocess.run([sys.executable, "-m", "components.local", "up", *(["--cold"] if cold else [])], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=2400)
    if up.returncode != 0:
        if not was_up:  # leave this machine as it was found
            subprocess.run([sys.executable, "-m", "components.local", "down"], cwd=REPO, env=env, capture_output=True)
        pytest.fail(f"make local failed:\n{up.stderr[-4000:]}")
    tls = ssl.create_default_context(cafile=str(LOCAL / "ca.crt"))
    yield Stack(env, json.loads((LOCAL / "client_config.json").read_text()), (LOCAL / "admin.token").read_text().strip(),
                json.loads((LOCAL / "secrets.json").read_text()), tls)
    if not was_up:
        subprocess.run([sys.executable, "-m", "components.local", "down"], cwd=REPO, env=env, capture_output=True)


def leader(stack) -> str:
    """The region whose member is the primary now (Patroni moves it)."""
    primaries = [r["name"] for r in stack.regions if stack.psql(r["name"], "SELECT pg_is_in_recovery()") == "f"]
    assert len(primaries) == 1, primaries
    return primaries[0]


def patroni_roles(stack, region: str) -> dict[str, str]:
    """Each member's role as Patroni's consensus record says (Leader, Sync Standby, Replica...)."""
    out = stack.podman("exec", f"ciris-{region}-postgres-1", "gosu", "postgres", "patronictl", "-c",
                       "/run/ciris-postgres/patroni.yml", "list", "-f", "json")
    return {m["Member"]: m["Role"] for m in json.loads(out)}


def wait_sync(stack, timeout: float = 120) -> str:
    """Until the leader streams to the other member synchronously *and* Patroni's record names that
    member the synchronous standby (only such a member may be promoted: the record is written a
    moment after the stream turns synchronous); returns the leader's region."""
    deadline = time.time() + timeout
    while True:
        try:
            primary = leader(stack)
            other = next(r["name"] for r in stack.regions if r["name"] != primary).replace("-", "_")
            rows = stack.psql(primary, "SELECT application_name, state, sync_state FROM pg_stat_replication")
            roles = patroni_roles(stack, primary)
            if rows == f"{other}|streaming|sync" and roles.get(other) == "Sync Standby":
                return primary
            rows += f" {roles}"
        except (AssertionError, ValueError) as e:
            rows = f"no single leader: {e}"
        assert time.time() < deadline, rows
        time.sleep(1)
