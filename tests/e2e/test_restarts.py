"""The local stack survives its own faults: after every container of a region is killed (the primary's
region, twice in a row: a failover each time) and started
again (Podman's netavark sets the region's network up anew, rewriting its iptables rules), the
hosts reach each other again by themselves. Before `make local` made its networks itself, a restart
put netavark's isolation DROP above our exception and the regions lost each other for good."""

from __future__ import annotations

import subprocess
import time
import uuid

import httpx

from components import deploy, local, local_s3, postgres_config
from tests.e2e.conftest import LOCAL, leader, wait_sync
from tests.e2e.test_stack import endpoint_secret, purchase_event, signed_webhook

HOSTS = ("us-east", "eu-west", "witness")
ETCD = {"us-east": "10.77.1.1", "eu-west": "10.77.2.1", "witness": "10.77.3.1"}


def etcd_health(stack, host: str) -> str:
    """The other hosts' etcd endpoints as seen from `host`'s etcd container: a connection to each
    other host's published port, which answers only with a quorum (its peers reaching each other).
    (Not its own: a container reaching its own host's published port is hairpin NAT, which a real
    host has and this machine's Podman bridges do not; nothing of the bridge relies on it.)"""
    endpoints = ",".join(f"https://{ip}:2379" for name, ip in ETCD.items() if name != host)
    out = stack.podman("exec", f"ciris-{host}-etcd-1", "sh", "-c",
                       f"etcdctl --endpoints={endpoints} --cacert=/run/ciris-etcd/ca.crt --dial-timeout=3s "
                       "--command-timeout=5s --cert=/run/ciris-etcd/server.crt --key=/run/ciris-etcd/server.key "
                       "endpoint health 2>&1", check=False)
    return out


def reaches_the_s3(stack, region: str) -> str:
    """Whether the region's Postgres reaches the local S3 on this machine (its WAL archive): a
    connection to the host itself, through the network's gateway. (When a bridge's address followed
    its ports, a container that had learnt an earlier one reached every other host but this one.)"""
    return stack.podman("exec", f"ciris-{region}-postgres-1", "python3", "-c",
                        f"import socket; socket.create_connection(('{local_s3.ADDRESS}', {local_s3.PORT}), timeout=3)"
                        "; print('reached')", check=False)


def wait_reachable(stack, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while True:
        seen = {host: etcd_health(stack, host) for host in HOSTS}
        seen |= {f"{r}→s3": reaches_the_s3(stack, r) for r in ("us-east", "eu-west")}
        if all(out.count("is healthy") == len(ETCD) - 1 for h, out in seen.items() if h in HOSTS) and \
                all(out.strip() == "reached" for h, out in seen.items() if h not in HOSTS):
            return
        assert time.time() < deadline, f"the hosts do not reach each other after {timeout:.0f} s: {seen}"
        time.sleep(2)


def new_user(stack, region: dict) -> tuple[str, int]:
    admin = {"Authorization": f"Bearer {stack.admin_token}"}
    with stack.edge(region, "billing") as billing:
        r = billing.post("/v1/users", json={"email": f"dr-{uuid.uuid4().hex[:8]}@example.com"}, headers=admin)
        assert r.status_code == 201, r.text
        return r.json()["id"], r.json()["balance"]


def purchase_completes(stack, region: dict, user: str, signup: int, budget: float = 120) -> float:
    """Seconds until Stripe's delivery to `region`'s own endpoint (signed with that endpoint's secret,
    sent again while billing cannot write, as Stripe does) is credited: writes resumed there."""
    payload, headers = signed_webhook(endpoint_secret(stack, region), purchase_event(user, 500))
    admin = {"Authorization": f"Bearer {stack.admin_token}"}
    t0, last = time.time(), None
    with stack.edge(region, "billing") as billing:
        while True:
            try:
                r = billing.post("/v1/webhooks/stripe", content=payload, headers=headers, timeout=15)
                last = f"{r.status_code} {r.text[:200]}"
                if r.status_code == 200:  # credited, or a duplicate of an attempt whose answer was lost
                    assert r.json()["outcome"] in ("credited", "duplicate"), r.text
                    break
            except httpx.HTTPError as e:
                last = repr(e)
            if time.time() - t0 >= budget:
                raise AssertionError(f"{region['name']}: no purchase credited {budget:.0f} s after the other region "
                                     f"died: {last}\n{patroni_view(stack, region['name'])}")
            time.sleep(1)
        took = time.time() - t0
        assert billing.get(f"/v1/credits/{user}", headers=admin).json()["balance"] == signup + 500
    return took


def patroni_view(stack, region: str) -> str:
    """What the surviving member's Patroni says, for a failure's report."""
    ctl = stack.podman("exec", f"ciris-{region}-postgres-1", "gosu", "postgres", "patronictl", "-c",
                       "/run/ciris-postgres/patroni.yml", "list", check=False)
    logs = subprocess.run(["podman", "logs", "--tail", "40", f"ciris-{region}-postgres-1"], capture_output=True,
                          text=True, env=stack.env)
    return f"{ctl}\n{logs.stdout[-4000:]}{logs.stderr[-4000:]}"


def lose_and_return(stack, name: str) -> None:
    """Every container of `name` SIGKILLed; the other region's billing writes again (a failover
    when `name` led): a Stripe purchase completes there; then `name` starts again, reaches the other hosts, and the pair is synchronous."""
    ids = stack.podman("ps", "-q", "--filter", f"label=ciris.region={name}").split()
    assert ids, f"no container of {name} runs"
    survivor = next(r for r in stack.regions if r["name"] != name)
    leader_before = wait_sync(stack)  # only a synchronous standby may be promoted
    user, signup = new_user(stack, survivor)
    stack.podman("kill", "--signal", "KILL", *ids)
    try:
        took = purchase_completes(stack, survivor, user, signup)
        print(f"{name} lost (it led: {name == leader_before}): a purchase credited in {survivor['name']} after {took:.0f} s")
    finally:
        stack.podman("start", *ids)
    wait_reachable(stack)
    print(f"{name} back: {wait_sync(stack, timeout=180)} leads")  # it rejoined as the synchronous standby


def test_a_witness_whose_etcd_lost_its_volume_rejoins_on_the_next_deploy(stack, monkeypatch):
    """A replaced witness as `pulumi up` meets it: its etcd member gone with its data. The next
    deploy starts it again; it joins the running cluster by itself (payloads/etcd/join.sh), every
    host's etcd reaches a quorum, and the regions' restarts below run with it."""
    for key, value in stack.env.items():  # the engine, as make local runs it
        monkeypatch.setenv(key, value)
    wait_reachable(stack)
    stack.podman("rm", "-f", "-t", "2", "ciris-witness-etcd-1")
    stack.podman("volume", "rm", "ciris-witness_etcd-data")
    local.up()
    logs = stack.podman("logs", "ciris-witness-etcd-1")
    assert "witness added to the running cluster" in logs, logs
    wait_reachable(stack)
    listed = stack.podman("exec", "ciris-us-east-etcd-1", "sh", "-c",
                          "etcdctl --endpoints=https://10.77.3.1:2379 --cacert=/run/ciris-etcd/ca.crt "
                          "--cert=/run/ciris-etcd/server.crt --key=/run/ciris-etcd/server.key member list")
    assert sorted(line.split(", ")[1:3] for line in listed.splitlines()) == [
        ["started", "eu-west"], ["started", "us-east"], ["started", "witness"]], listed
    wait_healthy(stack)


def test_the_primarys_region_lost_twice_in_a_row_fails_over_and_rejoins_each_time(stack):
    """The region that leads is lost, returns, then the region that leads now (the other) is lost
    and returns: writes resume each time, and each returning region rejoins as the synchronous
    standby by itself. (Podman's netavark sets a restarted region's network up anew, rewriting its
    iptables rules; the hosts must reach each other again by themselves.)"""
    wait_reachable(stack)
    try:
        for _ in range(2):
            lose_and_return(stack, leader(stack))
    finally:
        # The declared primary leads again, and every container is healthy, for the tests after
        # this one (as `make local` leaves the stack).
        declared = "us-east"
        local.run_script(deploy.SWITCHOVER, [str(LOCAL / declared), postgres_config.member_name(declared)], "",
                         stack.env, f"making {declared} the primary")
        wait_healthy(stack)


def wait_healthy(stack, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while True:
        states = stack.podman("ps", "--filter", "label=ciris.region", "--format", "{{.Names}} {{.Status}}").splitlines()
        waiting = [s for s in states if "(healthy)" not in s]
        if not waiting:
            return
        assert time.time() < deadline, f"not healthy {timeout:.0f} s after the restarts: {waiting}"
        time.sleep(2)
