"""The local stack survives its own faults: after every container of a region is killed and started
again (Podman's netavark sets the region's network up anew, rewriting its iptables rules), the
hosts reach each other again by themselves. Before `make local` made its networks itself, a restart
put netavark's isolation DROP above our exception and the regions lost each other for good."""

from __future__ import annotations

import time

from components import deploy, local, local_s3, postgres_config
from tests.e2e.conftest import LOCAL, wait_sync

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


def kill_and_start(stack, region: str) -> None:
    ids = stack.podman("ps", "-q", "--filter", f"label=ciris.region={region}").split()
    assert ids, f"no container of {region} runs"
    stack.podman("kill", "--signal", "KILL", *ids)
    stack.podman("start", *ids)


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


def test_regions_reach_each_other_after_their_containers_are_killed_and_started_again(stack):
    wait_reachable(stack)
    try:
        for region in ("eu-west", "us-east", "eu-west"):  # each region, and the first again
            kill_and_start(stack, region)
            wait_reachable(stack)
            wait_sync(stack, timeout=180)  # the database pair is whole again (whichever member leads)
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
