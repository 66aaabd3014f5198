"""Service containers on a host: their specs and the compose file rendered from them.

Every container joins the host's `ciris` network and reaches the others by name. A port is
published only when the spec says so: public ones (53, 443) and peer ones (5432) are guarded by
the provider firewall; internal services publish nothing, or bind to 127.0.0.1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import yaml
from pydantic import BaseModel, ConfigDict

NETWORK = "ciris"
NETWORK_SUBNET = "172.30.0.0/24"  # fixed, so pg_hba can name the host's containers
PAYLOADS = Path(__file__).resolve().parent.parent / "payloads"
SERVICE_UID = 10001  # the non-root user of the billing and proxy images (their Dockerfiles)


class ContainerSpec(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    image: str
    build: str | None = None  # build context inside the bundle, e.g. "./dns"
    network_mode: str | None = None  # "host": the service binds the host's addresses itself
    ports: tuple[str, ...] = ()
    volumes: tuple[str, ...] = ()
    environment: dict[str, str] = {}
    env_file: str | None = None  # secrets, shipped in the bundle (never in compose.yaml)
    command: tuple[str, ...] | None = None
    entrypoint: tuple[str, ...] | None = None
    healthcheck: tuple[str, ...] | None = None


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


def render_compose(project: str, specs: Sequence[ContainerSpec]) -> str:
    services = {}
    named_volumes: set[str] = set()
    for spec in specs:
        svc: dict = {"image": spec.image}
        if spec.build:
            svc["build"] = spec.build
        svc["restart"] = "unless-stopped"
        if spec.network_mode:
            svc["network_mode"] = spec.network_mode
        else:
            svc["networks"] = [NETWORK]
        if spec.entrypoint:
            svc["entrypoint"] = list(spec.entrypoint)
        if spec.command:
            svc["command"] = list(spec.command)
        if spec.ports:
            svc["ports"] = list(spec.ports)
        if spec.volumes:
            svc["volumes"] = list(spec.volumes)
            named_volumes |= {v.split(":", 1)[0] for v in spec.volumes if not v.startswith(("/", "."))}
        if spec.environment:
            svc["environment"] = dict(spec.environment)
        if spec.env_file:
            svc["env_file"] = [spec.env_file]
        if spec.healthcheck:
            svc["healthcheck"] = {"test": list(spec.healthcheck), "interval": "30s", "timeout": "5s", "retries": 3}
        svc["logging"] = {"driver": "local", "options": {"max-size": "20m", "max-file": "5"}}
        services[spec.name] = svc
    network = {"name": NETWORK, "ipam": {"config": [{"subnet": NETWORK_SUBNET}]}}
    doc = {"name": project, "services": services, "networks": {NETWORK: network}}
    if named_volumes:
        doc["volumes"] = {v: {} for v in sorted(named_volumes)}
    return yaml.safe_dump(doc, sort_keys=False)
