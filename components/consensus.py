"""The consensus store Patroni keeps the database's leader lock in: etcd, one member per database
region plus the witness at a third provider (pure renderers and the container spec).

With one member per provider, losing any one provider leaves a majority, so the surviving database
member can be promoted by Patroni without a person. Every connection is mutual TLS against the
stack's database CA (members and Patroni present their member certificates), and the ports are
opened to the bridge's own hosts only (ReplicatedPostgres adds the rules). A stack without a
witness runs a single member beside the declared primary: losing the replica's region still
degrades by itself (the primary keeps the lock), losing the primary's needs a person (runbook).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import yaml

from components.services import ContainerSpec

CLIENT_PORT = 2379
PEER_PORT = 2380
# Plain HTTP /metrics and /health for the host's own Prometheus and the container's health check:
# inside the container network only (not published, so the firewall never sees it).
METRICS_PORT = 2381
CONFIG_DIR = "/etc/ciris-etcd"  # the bundle's files, root's
RUN_DIR = "/run/ciris-etcd"  # where start.sh copies them, owned by etcd (the key must be private)
DATA_DIR = "/var/lib/etcd/data"
CLUSTER_TOKEN = "ciris-bridge-dcs"


@dataclass(frozen=True)
class Member:
    name: str  # the host's name: a region ("us-east") or "witness"
    address: str  # the host's public IPv4 address, which the certificates name

    @property
    def peer_url(self) -> str:
        return f"https://{self.address}:{PEER_PORT}"

    @property
    def client_url(self) -> str:
        return f"https://{self.address}:{CLIENT_PORT}"


@dataclass(frozen=True)
class Timing:
    """etcd's Raft timers. Between continents a round trip is ~100 ms: the heartbeat is about one
    round trip and the election timeout ten (etcd's tuning guide); loopback tests use less."""
    heartbeat_ms: int = 250
    election_ms: int = 2500


def etcd_conf(me: Member, members: Sequence[Member], *, tls_dir: str = RUN_DIR, data_dir: str = DATA_DIR,
              listen: str = "0.0.0.0", timing: Timing = Timing()) -> str:
    """etcd's --config-file. The initial cluster only matters on a member's first start (an empty
    data directory); afterwards the data directory is the truth."""
    tls = {
        "cert-file": f"{tls_dir}/server.crt",
        "key-file": f"{tls_dir}/server.key",
        "trusted-ca-file": f"{tls_dir}/ca.crt",
        "client-cert-auth": True,
    }
    conf = {
        "name": me.name,
        "data-dir": data_dir,
        "listen-client-urls": f"https://{listen}:{CLIENT_PORT}",
        "advertise-client-urls": me.client_url,
        "listen-peer-urls": f"https://{listen}:{PEER_PORT}",
        "listen-metrics-urls": f"http://{listen}:{METRICS_PORT}",
        "initial-advertise-peer-urls": me.peer_url,
        "initial-cluster": ",".join(f"{m.name}={m.peer_url}" for m in members),
        "initial-cluster-state": "new",
        "initial-cluster-token": CLUSTER_TOKEN,
        "heartbeat-interval": timing.heartbeat_ms,
        "election-timeout": timing.election_ms,
        "auto-compaction-mode": "periodic",
        "auto-compaction-retention": "1h",
        "client-transport-security": tls,
        "peer-transport-security": tls,
        # Patroni speaks etcd's v2 API: bookworm's etcd 3.4 has no gRPC gateway for its v3 client (ADR 0014).
        "enable-v2": True,
        # A member that lost its peers asks before it disrupts a working leader with a new election.
        "pre-vote": True,
        "log-level": "warn",
    }
    return yaml.safe_dump(conf, sort_keys=False)


def container() -> ContainerSpec:
    """etcd from payloads/etcd; both ports published on the host's addresses (peer-only firewall)."""
    return ContainerSpec(
        name="etcd",
        image="ciris-etcd:local",
        build="./etcd",
        ports=(f"{CLIENT_PORT}:{CLIENT_PORT}/tcp", f"{PEER_PORT}:{PEER_PORT}/tcp"),
        volumes=(f"./etcd/etc:{CONFIG_DIR}:ro", "etcd-data:/var/lib/etcd"),
    )
