"""Service containers on a host: their specs and the compose file rendered from them.

Every container joins the host's `ciris` network and reaches the others by name. A port is
published only when the spec says so: public ones (53, 443) and peer ones (5432) are guarded by
the provider firewall; internal services publish nothing, or bind to 127.0.0.1.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shlex
from pathlib import Path
from typing import Sequence

import yaml
from pydantic import BaseModel, ConfigDict

from components.release import Release

BILLING_ADDRESS_SUFFIX = 10  # billing's fixed address on the region network (pg_hba names it)
BILLING_TWIN_ADDRESS_SUFFIX = 13  # its twin's, while a deploy replaces it (pg_hba names it too)
BACKUP_ADDRESS_SUFFIX = 11  # the backup job's
PROMETHEUS_ADDRESS_SUFFIX = 12  # the host's Prometheus (PowerDNS's webserver lets it in)
PAYLOADS = Path(__file__).resolve().parent.parent / "payloads"
SERVICE_UID = 10001  # the non-root user of the billing and proxy images (their Dockerfiles)
MONITORING_UID = 10002  # the monitoring image's user (payloads/monitoring/Dockerfile)


class ContainerSpec(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    image: str
    build: str | None = None  # build context inside the bundle, e.g. "./dns"
    network_mode: str | None = None  # "host": the service binds the host's addresses itself
    ports: tuple[str, ...] = ()
    # Published on the host's loopback only (an operator's SSH tunnel reaches them; `make local`:
    # the host's own address, so the hosts sharing this machine do not collide).
    loopback_ports: tuple[str, ...] = ()
    volumes: tuple[str, ...] = ()
    environment: dict[str, str] = {}
    # Settings with secrets, KEY=value lines shipped in the bundle (never in compose.yaml): mounted at
    # SECRETS_FILE, which the payload reads at start (never the container's environment, which
    # `docker inspect` shows). The file's owner is the uid the container starts as.
    env_file: str | None = None
    command: tuple[str, ...] | None = None
    entrypoint: tuple[str, ...] | None = None
    healthcheck: tuple[str, ...] | None = None
    address_suffix: int | None = None  # a fixed address on the region network (see Network.address)
    # A deploy that changes it starts its twin first (same image and files, answering to the same
    # name), replaces it, then stops the twin: the service never stops taking traffic (ADR 16).
    rolling: bool = False
    twin_address_suffix: int | None = None  # the twin's fixed address, where the service has one
    stop_grace_seconds: int | None = None  # SIGTERM, then this long to finish what it serves, then SIGKILL
    # Run by every deploy in the running container (as root), after its files land: how it takes
    # its live files (Node.add_service) without a restart. Fails the deploy when it fails.
    reload: tuple[str, ...] | None = None
    dns: tuple[str, ...] = ()  # resolvers instead of the engine's choice (and resolv.conf options)
    dns_options: tuple[str, ...] = ()


class Network(BaseModel):
    """A region's container network: its own name and subnet, so regions can share one machine
    (`make local`) and pg_hba can name the few containers allowed to connect."""

    model_config = ConfigDict(frozen=True)
    name: str
    subnet: str

    @classmethod
    def for_region(cls, region: str, index: int) -> "Network":
        return cls(name=f"ciris-{region}", subnet=f"172.30.{index}.0/24")

    @property
    def gateway(self) -> str:
        """The engine's address on the network (Podman's name server answers there)."""
        return self.subnet.rsplit(".", 1)[0] + ".1"

    def address(self, suffix: int) -> str:
        """A fixed address: from the lower half, which the engine never hands out by itself."""
        assert 2 <= suffix < 128, suffix
        return self.subnet.rsplit(".", 1)[0] + f".{suffix}"

    @property
    def dynamic_range(self) -> str:
        # .128-.191: Podman hands out a range's every address, and .255 (the /24's broadcast, the
        # end of a .128/25) was once given to a container that then could not be reached.
        return self.subnet.rsplit(".", 1)[0] + ".128/26"


def payload_files(name: str) -> dict[str, str]:
    """A payload's source as bundle files under `<name>/` (what its Dockerfile builds from)."""
    root = PAYLOADS / name
    return {
        f"{name}/{p.relative_to(root)}": p.read_text()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def env_file(values: dict) -> str:
    """A compose env_file: KEY=value lines (the values are the caller's; secrets stay Outputs)."""
    return "".join(f"{k}={v}\n" for k, v in values.items())


def publish(address: str, port: str) -> str:
    """A compose port bound to one host address ("443:443/tcp" -> "203.0.113.5:443:443/tcp")."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def render_compose(region: str, network: Network, specs: Sequence[ContainerSpec], *,
                   publish_on: Sequence[str], logging: dict, file_digests: dict[str, str],
                   loopback: str = "127.0.0.1", release: Release | None = None) -> str:
    """The compose file of one region. Ports are published on the host's own public addresses only
    (never the wildcard); `file_digests` (service -> digest of the files it reads) is a label, so
    `docker compose up` recreates exactly the containers whose mounted files changed. With a
    `release`, every payload's image is the release's, by id, and nothing is built on the host."""
    services = {}
    named_volumes: set[str] = set()
    for spec in specs:
        svc: dict = {"image": spec.image}
        if release and (payload := payload_of(spec)):
            svc["image"] = release.ref(payload)
            svc["pull_policy"] = "never"  # shipped with the release (ops/ship.py), never pulled
        elif spec.build:
            # BASE: the base image (tests pass a locally made one); EXTRA_CA_CERTS: a build behind
            # a TLS-intercepting proxy. Both come from the environment when set, else the defaults.
            svc["build"] = {"context": spec.build, "args": ["BASE", "EXTRA_CA_CERTS"]}
        svc["restart"] = "unless-stopped"
        if spec.network_mode:
            svc["network_mode"] = spec.network_mode
        elif spec.address_suffix is not None or spec.rolling:
            # A rolling service's own name, `<name>-main`, is one its twin never answers to: the
            # edge tells the two apart (edge.py).
            address = {"ipv4_address": network.address(spec.address_suffix)} if spec.address_suffix is not None else {}
            svc["networks"] = {network.name: {**address, **({"aliases": [main_name(spec.name)]} if spec.rolling else {})}}
        else:
            svc["networks"] = [network.name]
        if spec.dns:
            svc["dns"] = list(spec.dns)
        if spec.dns_options:
            svc["dns_opt"] = list(spec.dns_options)
        if spec.entrypoint:
            svc["entrypoint"] = list(spec.entrypoint)
        if spec.command:
            svc["command"] = list(spec.command)
        if spec.ports or spec.loopback_ports:
            svc["ports"] = [publish(a, p) for p in spec.ports for a in publish_on] + \
                [publish(loopback, p) for p in spec.loopback_ports]
        if spec.volumes:
            svc["volumes"] = list(spec.volumes)
            named_volumes |= {v.split(":", 1)[0] for v in spec.volumes if not v.startswith(("/", "."))}
        if spec.env_file:
            svc["volumes"] = [*svc.get("volumes", []), f"{spec.env_file}:{SECRETS_FILE}:ro"]
        if spec.environment or spec.env_file:
            svc["environment"] = {**spec.environment, **({SECRETS_FILE_VAR: SECRETS_FILE} if spec.env_file else {})}
        if spec.healthcheck:
            svc["healthcheck"] = {"test": list(spec.healthcheck), "interval": "30s", "timeout": "5s", "retries": 3}
        svc["labels"] = {"ciris.region": region, "ciris.service": spec.name,
                         "ciris.files-sha256": file_digests.get(spec.name, "")}
        svc["logging"] = copy.deepcopy(logging)
        if spec.stop_grace_seconds:
            svc["stop_grace_period"] = f"{spec.stop_grace_seconds}s"
        # What the deploy compares with the running container's to tell whether it changes
        # (compose's own `config --hash` does not always match the hash `up` labels it with).
        svc["labels"][CONFIG_LABEL] = hashlib.sha256(json.dumps(svc, sort_keys=True).encode()).hexdigest()
        services[spec.name] = svc
        if spec.rolling:
            services[twin_name(spec.name)] = twin(spec, svc, network)
    named_volumes |= {f"{v}-twin" for v in named_volumes for spec in specs if spec.rolling
                      and any(x.startswith(f"{v}:") for x in spec.volumes)}
    net = {"name": network.name, "ipam": {"config": [{"subnet": network.subnet, "ip_range": network.dynamic_range}]}}
    doc = {"name": network.name, "services": services, "networks": {network.name: net}}
    if named_volumes:
        doc["volumes"] = {v: {} for v in sorted(named_volumes)}
    header = "".join(f"# {CONFIG_LABEL} {name} {services[name]['labels'][CONFIG_LABEL]}\n"
                     for name in sorted(services) if f"{name}-twin" in services)
    header += "".join(f"# {RELOAD_HEADER} {spec.name} {shlex.join(spec.reload)}\n" for spec in specs if spec.reload)
    return header + yaml.safe_dump(doc, sort_keys=False)


def payload_of(spec: ContainerSpec) -> str | None:
    """The payload whose image a container runs: the one it builds, or the one whose image it
    shares (the backup job runs the postgres image)."""
    if spec.build:
        return spec.build.removeprefix("./")
    if spec.image.startswith("ciris-") and spec.image.endswith(":local"):
        return spec.image.removeprefix("ciris-").removesuffix(":local")
    return None


def main_name(service: str) -> str:
    return f"{service}-main"


def twin_name(service: str) -> str:
    return f"{service}-twin"


# A rolling service answers 503 on /serving while this file exists (ADR 16); the payloads' own
# default (billing's and the proxy's settings.py) is the same path.
DRAIN_FILE = "/tmp/ciris-draining"
# Where a container finds its secret settings (ContainerSpec.env_file), and the variable naming it
# (the payloads' settings.load_env_file, payloads/postgres/env-file.sh).
SECRETS_FILE = "/run/secrets/ciris.env"
SECRETS_FILE_VAR = "CIRIS_ENV_FILE"
RELOAD_HEADER = "ciris.reload"  # compose.yaml's header: `# ciris.reload <service> <command>` (ContainerSpec.reload)
CONFIG_LABEL = "ciris.config-sha256"  # a service's rendered config; compose.yaml names the rolling ones' too


def twin(spec: ContainerSpec, svc: dict, network: Network) -> dict:
    """The twin of a rolling service: the same container under another name, started only by the
    deploy (profile `twin`), answering to the service's name on the network, with its own named
    volumes (a proxy's journal is one process's) and its own fixed address where it needs one."""
    out = copy.deepcopy(svc)
    out["profiles"] = ["twin"]
    address = {"ipv4_address": network.address(spec.twin_address_suffix)} if spec.twin_address_suffix else {}
    out["networks"] = {network.name: {**address, "aliases": [spec.name]}}
    out["volumes"] = [v if v.startswith(("/", ".")) else v.replace(":", "-twin:", 1) for v in svc.get("volumes", [])]
    out["labels"] = {**svc["labels"], "ciris.twin": "true"}
    return out
