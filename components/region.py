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
import pulumi_tls as tls

from components import cloud_init, deploy, dns, edge, hosts, services
from components.config import BridgeConfig, Region as RegionConfig
from components.firewall import Rule, base_rules, ufw_commands


def dns_container() -> services.ContainerSpec:
    """PowerDNS on the region network, :53 published on the host's public addresses; its API
    listens inside the container only (the zone sync runs there too)."""
    return services.ContainerSpec(
        name="dns",
        image="ciris-dns:local",
        build="./dns",
        ports=("53:53/udp", "53:53/tcp"),
        volumes=("./dns/pdns.conf:/etc/powerdns/ciris/pdns.conf:ro", "pdns-data:/var/lib/powerdns"),
    )


@dataclass(frozen=True)
class RegionArgs:
    region: RegionConfig
    config: BridgeConfig
    index: int = 0  # position in config: gives the region network its own subnet
    # `make local` only: the stack's own CA (cert PEM, key PEM) that signs the edges' certificates.
    edge_ca: tuple[pulumi.Input[str], pulumi.Input[str]] | None = None
    shared: dict | None = None  # per-stack resources the regions' hosts share (hosts.create)


def bundle(files: dict[str, str], private: dict[str, int] | None = None) -> str:
    """A deterministic base64 tar.gz of the rendered files (same files, same bytes, no redeploy).
    Code and public files are root's and world-readable (0644): containers that run as a non-root
    user read their own code. `private` files (secrets) are 0600, owned by the uid that must read
    them (root extracts with ownership and modes kept)."""
    private = private or {}
    raw = io.BytesIO()
    with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(files):
            data = files[path].encode()
            info = tarfile.TarInfo(path)
            info.size, info.mtime = len(data), 0
            info.mode = 0o600 if path in private else 0o644
            info.uid = info.gid = private.get(path, 0)
            tar.addfile(info, io.BytesIO(data))
    return base64.b64encode(raw.getvalue()).decode()


def digest(texts: list[str]) -> str:
    h = hashlib.sha256()
    for text in texts:
        h.update(hashlib.sha256(text.encode()).digest())
    return h.hexdigest()


class Region(pulumi.ComponentResource):
    """Outputs: `ipv4`, `ipv6`, `nameserver` (FQDN), `domain`, `dns_api_key` (secret); `artifacts`
    maps file names to the rendered text deployed on the host (the offline plan writes them)."""

    def __init__(self, name: str, args: RegionArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("ciris:bridge:Region", name, None, opts)
        r, cfg = args.region, args.config
        self.spec = r
        self.network = services.Network.for_region(r.name, args.index)
        self.domain = r.domain
        self.nameserver = r.nameserver_fqdn
        label = f"ciris-{cfg.environment}-{r.name}"

        rules = base_rules(cfg.admin_ssh_cidrs)
        # The host's SSH key: made here, installed by cloud-init, pinned by every remote command.
        host_key = tls.PrivateKey(f"{name}-host-key", algorithm="ED25519", opts=pulumi.ResourceOptions(parent=self))
        self.host_public_key = host_key.public_key_openssh.apply(str.strip)
        user_data = pulumi.Output.secret(pulumi.Output.all(host_key.private_key_openssh, self.host_public_key).apply(
            lambda k: cloud_init.render(label, cfg.ssh_public_key, rules, host_key=(k[0], k[1]))))
        shown_user_data = self.host_public_key.apply(
            lambda pub: cloud_init.render(label, cfg.ssh_public_key, rules, host_key=("[secret]", pub)))
        self.host = hosts.create(
            name, label, r, cfg.ssh_public_key, user_data, rules,
            {"project": "ciris-bridge", "environment": cfg.environment, "region": r.name}, parent=self,
            shared=args.shared,
        )
        self.ipv4, self.ipv6 = self.host.ipv4, self.host.ipv6

        # PowerDNS: its API key is a random secret; the API listens inside its container only.
        self.dns_api_key = random.RandomPassword(
            f"{name}-dns-api-key", length=40, special=False, opts=pulumi.ResourceOptions(parent=self)
        ).result
        geoip = cfg.services.dns_geoip_database
        # Inside the container IPv4 only: Docker forwards the host's IPv6 :53 to it.
        pdns_conf = self.dns_api_key.apply(lambda key: dns.pdns_conf(api_key=key, listen=("0.0.0.0",), geoip_database=geoip))

        # Service containers: edge and DNS here; postgres, billing and proxy add theirs (add_service).
        self.containers: list[services.ContainerSpec] = []
        # What lands in /srv/ciris on the host (cloud-init is the VM's user data instead).
        # Components add theirs with add_service() before build() deploys the bundle.
        self.files: dict[str, pulumi.Input[str]] = {}
        self.private: dict[str, int] = {}  # bundle path -> uid that reads it (secrets)
        self.service_files: dict[str, list[str]] = {}  # container -> the bundle paths it reads
        self.artifacts: dict[str, pulumi.Input[str]] = {}
        self.deploy: command.remote.Command | None = None
        self.openings: list[command.remote.Command] = []  # open()'s UFW commands, before the deploy
        caddyfile = edge.render_caddyfile(
            edge.sites(r.domain), acme_email=cfg.services.acme_email, hsts_max_age=cfg.services.hsts_max_age,
            **({"tls": "internal", "ca_dir": edge.CA_DIR} if args.edge_ca else {}),
        )
        ca_files = {"edge/ca/root.crt": args.edge_ca[0], "edge/ca/root.key": args.edge_ca[1]} if args.edge_ca else {}
        self.add_service(edge.container(local_ca=bool(args.edge_ca)),
                         {"Caddyfile": caddyfile, **ca_files, **services.payload_files("edge")},
                         private={"edge/ca/root.key": 0}, shown={"edge/ca/root.key": "[secret]\n"} if args.edge_ca else None)
        self.add_service(dns_container(), {"dns/pdns.conf": pdns_conf, **services.payload_files("dns")},
                         private={"dns/pdns.conf": 0})
        # The plan's copy shows where the key goes, not the key.
        shown_conf = dns.pdns_conf(api_key="[secret]", listen=("0.0.0.0",), geoip_database=geoip)
        self.artifacts.update({"cloud-init.yaml": shown_user_data, "dns/pdns.conf": shown_conf})

        private_key = cfg.secret("ssh_private_key")
        self.connection = command.remote.ConnectionArgs(
            host=self.ipv4,
            user=cloud_init.DEPLOY_USER,
            # Without a key in config, the operator's ssh-agent (SSH_AUTH_SOCK) is used.
            private_key=pulumi.Output.secret(private_key) if private_key else None,
            host_key=self.host_public_key,
        )
        self.register_outputs({"ipv4": self.ipv4, "ipv6": self.ipv6, "nameserver": self.nameserver})

    def add_service(self, container: services.ContainerSpec, files: dict[str, pulumi.Input[str]],
                    shown: dict[str, pulumi.Input[str]] | None = None, private: dict[str, int] | None = None) -> None:
        """Add (or replace) a container and the files it reads in the bundle. `private` names the
        files that hold secrets, with the uid that reads them (0: root, e.g. compose's env files);
        `shown` overrides what the offline plan writes for them."""
        assert self.deploy is None, "add services before build()"
        self.containers = [c for c in self.containers if c.name != container.name] + [container]
        self.files.update(files)
        self.private.update(private or {})
        self.service_files[container.name] = self.service_files.get(container.name, []) + sorted(files)
        self.artifacts.update(shown or {})

    def build(self, after: list[pulumi.Resource] | None = None) -> command.remote.Command:
        """Ship the bundle and start the containers: after every component has added its part,
        after this host's own firewall openings, and after `after` (another region's deploy)."""
        files = pulumi.Output.all(**self.files)
        # Digests of what each container reads: not secret, though some of the files are.
        digests = pulumi.Output.unsecret(files.apply(lambda f: {
            name: digest([f[p] for p in paths]) for name, paths in self.service_files.items()
        }))
        compose = pulumi.Output.all(digests, *self.host.public_addresses).apply(
            lambda a: services.render_compose(self.spec.name, self.network, self.containers,
                                              publish_on=a[1:], logging=self.host.logging, file_digests=a[0])
        )
        self.files["compose.yaml"] = compose
        self.artifacts = {**self.files, **self.artifacts}
        payload = pulumi.Output.secret(pulumi.Output.all(**self.files).apply(lambda f: bundle(f, self.private)))
        device = self.host.data_device if self.host.data_device is not None else ""
        self.deploy = command.remote.Command(
            f"{self._name}-deploy",
            connection=self.connection,
            create=pulumi.Output.from_input(device).apply(
                lambda d: deploy.remote(deploy.DEPLOY, cloud_init.BUNDLE_DIR, *([d] if d else []))),
            stdin=payload,
            # The digest of the bundle, not the bundle: a changed file redeploys, no secret shows.
            triggers=[payload.apply(lambda b: hashlib.sha256(b.encode()).hexdigest())],
            opts=pulumi.ResourceOptions(parent=self, depends_on=[*self.host.ready, *self.openings, *(after or [])]),
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
            return "set -eu\n" + deploy.CLOUD_INIT_DONE + "; ".join(f"sudo {line}" for line in lines)

        self.openings.append(command.remote.Command(
            f"{self._name}-{purpose}-ufw",
            connection=self.connection,
            create=cidrs.apply(ufw),
            opts=pulumi.ResourceOptions(parent=self, depends_on=self.host.ready),
        ))
