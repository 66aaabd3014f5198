"""Region: one hardened host with its firewall, data volume, DNS zone and service containers."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import tarfile
from dataclasses import dataclass

import pulumi
import pulumi_command as command
import pulumi_random as random

from components import cloud_init, dns, edge, hosts, services
from components.config import BridgeConfig, Region as RegionConfig
from components.firewall import Rule, base_rules, ufw_commands

COMPOSE_PROJECT = "ciris"


def dns_container() -> services.ContainerSpec:
    """PowerDNS on the host's network: it binds :53 on the public addresses and its API on 127.0.0.1."""
    return services.ContainerSpec(
        name="dns",
        image="ciris-dns:local",
        build="./dns",
        network_mode="host",
        volumes=("./dns/pdns.conf:/etc/powerdns/ciris/pdns.conf:ro", "pdns-data:/var/lib/powerdns"),
    )


@dataclass(frozen=True)
class RegionArgs:
    region: RegionConfig
    config: BridgeConfig


def bundle(files: dict[str, str], owners: dict[str, int] | None = None) -> str:
    """A deterministic base64 tar.gz of the rendered files (same files, same bytes, no redeploy).
    Files are 0640 root's unless `owners` gives the uid a non-root container reads them as
    (root extracts with ownership kept)."""
    owners = owners or {}
    raw = io.BytesIO()
    with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(files):
            data = files[path].encode()
            info = tarfile.TarInfo(path)
            info.size, info.mode, info.mtime = len(data), 0o640, 0
            info.uid = info.gid = owners.get(path, 0)
            tar.addfile(info, io.BytesIO(data))
    return base64.b64encode(raw.getvalue()).decode()


class Region(pulumi.ComponentResource):
    """Outputs: `ipv4`, `ipv6`, `nameserver` (FQDN), `domain`, `dns_api_key` (secret); `artifacts`
    maps file names to the rendered text deployed on the host (the offline plan writes them)."""

    def __init__(self, name: str, args: RegionArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("ciris:bridge:Region", name, None, opts)
        r, cfg = args.region, args.config
        self.spec = r
        self.domain = r.domain
        self.nameserver = r.nameserver_fqdn
        label = f"ciris-{cfg.environment}-{r.name}"

        rules = base_rules(cfg.admin_ssh_cidrs)
        user_data = cloud_init.render(label, cfg.ssh_public_key, rules)
        self.host = hosts.create(
            name, label, r, cfg.ssh_public_key, user_data, rules,
            {"project": "ciris-bridge", "environment": cfg.environment, "region": r.name}, parent=self,
        )
        self.ipv4, self.ipv6 = self.host.ipv4, self.host.ipv6

        # PowerDNS: its API key is a random secret; the API listens on the host's loopback only.
        self.dns_api_key = random.RandomPassword(
            f"{name}-dns-api-key", length=40, special=False, opts=pulumi.ResourceOptions(parent=self)
        ).result
        geoip = cfg.services.dns_geoip_database
        pdns_conf = self.dns_api_key.apply(lambda key: dns.pdns_conf(api_key=key, geoip_database=geoip))

        # Service containers: edge and DNS here; postgres, billing and proxy add theirs (add_service).
        self.containers = [edge.container(), dns_container()]
        caddyfile = edge.render_caddyfile(
            edge.sites(r.domain), acme_email=cfg.services.acme_email, hsts_max_age=cfg.services.hsts_max_age
        )
        # What lands in /srv/ciris on the host (cloud-init is the VM's user data instead).
        # Other components add theirs with add_service() before build() deploys the bundle.
        self.files: dict[str, pulumi.Input[str]] = {
            "Caddyfile": caddyfile,
            "dns/pdns.conf": pdns_conf,
            **services.payload_files("dns"),
        }
        # The plan's copy shows where the key goes, not the key.
        shown_conf = dns.pdns_conf(api_key="[secret]", geoip_database=geoip)
        self.artifacts: dict[str, pulumi.Input[str]] = {"cloud-init.yaml": user_data, "dns/pdns.conf": shown_conf}

        private_key = cfg.secret("ssh_private_key")
        self.connection = command.remote.ConnectionArgs(
            host=self.ipv4,
            user=cloud_init.DEPLOY_USER,
            # Without a key in config, the operator's ssh-agent (SSH_AUTH_SOCK) is used.
            private_key=pulumi.Output.secret(private_key) if private_key else None,
        )
        self.owners: dict[str, int] = {}  # bundle path -> uid (add_service's owner)
        self.deploy: command.remote.Command | None = None
        self.register_outputs({"ipv4": self.ipv4, "ipv6": self.ipv6, "nameserver": self.nameserver})

    def add_service(self, container: services.ContainerSpec, files: dict[str, pulumi.Input[str]],
                    shown: dict[str, pulumi.Input[str]] | None = None, owner: int | None = None) -> None:
        """Add (or replace) a container and the files it needs in the bundle.
        `shown` overrides what the offline plan writes for files that hold secrets; `owner` is the
        uid the container runs as, when it must read its mounted files."""
        assert self.deploy is None, "add services before build()"
        self.containers = [c for c in self.containers if c.name != container.name] + [container]
        self.files.update(files)
        if owner is not None:
            self.owners.update(dict.fromkeys(files, owner))
        self.artifacts.update(shown or {})

    def build(self) -> command.remote.Command:
        """Ship the bundle and start the containers: after every component has added its part."""
        self.files["compose.yaml"] = services.render_compose(COMPOSE_PROJECT, self.containers)
        self.artifacts = {**self.files, **self.artifacts, "compose.yaml": self.files["compose.yaml"]}
        payload = pulumi.Output.secret(pulumi.Output.all(**self.files).apply(lambda f: bundle(f, self.owners)))
        prepare = (
            self.host.data_device.apply(lambda d: f"sudo ciris-prepare-volume {d} {cloud_init.DATA_MOUNT}")
            if self.host.data_device is not None
            else "true"
        )
        self.deploy = command.remote.Command(
            f"{self._name}-deploy",
            connection=self.connection,
            create=pulumi.Output.concat(
                "set -eu; cloud-init status --wait >/dev/null; ",
                prepare,
                f"; base64 -d | sudo tar -xz -C {cloud_init.BUNDLE_DIR}",
                f"; cd {cloud_init.BUNDLE_DIR} && sudo docker compose up -d --build --remove-orphans",
            ),
            stdin=payload,
            # The digest of the bundle, not the bundle: a changed file redeploys, no secret shows.
            triggers=[payload.apply(lambda b: hashlib.sha256(b.encode()).hexdigest())],
            opts=pulumi.ResourceOptions(parent=self, depends_on=self.host.ready),
        )
        return self.deploy

    def open(self, purpose: str, rules: list[Rule]) -> None:
        """Open more ports on this host: the provider firewall, then UFW to match."""
        self.host.open(purpose, rules)
        cidrs = pulumi.Output.all(*[cidr for rule in rules for _, cidr in rule.sources])

        def ufw(resolved: list[str]) -> str:
            lines, i = [], 0
            for rule in rules:
                n = len(rule.sources)
                lines += ufw_commands(rule.protocol, rule.port, resolved[i : i + n])
                i += n
            return "set -eu; cloud-init status --wait >/dev/null; " + "; ".join(f"sudo {line}" for line in lines)

        command.remote.Command(
            f"{self._name}-{purpose}-ufw",
            connection=self.connection,
            create=cidrs.apply(ufw),
            opts=pulumi.ResourceOptions(parent=self, depends_on=self.host.ready),
        )
