"""Node: one hardened host of the bridge and the containers deployed on it.

What every host shares, whatever it serves: the VM behind the one host interface (components/hosts.py),
its SSH host key (made here, installed by cloud-init, pinned by every remote command), the
cloud-init hardening (components/cloud_init.py), the provider firewall and UFW from one list of
rules (components/firewall.py), its own container network, and one deploy path: components add
their containers and files with `add_service()`, open ports with `open()`, and `build()` ships the
bundle with the deploy script (components/deploy.py). A Region adds DNS and the edge on top; the
Witness adds nothing.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import shlex
import tarfile

import pulumi
import pulumi_command as command
import pulumi_tls as tls

from components import access, cloud_init, deploy, hosts, services
from components.config import BridgeConfig, Region as RegionConfig, Witness as WitnessConfig
from components.firewall import Rule, base_rules, ufw_commands
from components.release import Release


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


class Node(pulumi.ComponentResource):
    """Attributes every host has: `spec` (its config: `.name`, `.provider`, `.location`, `.plan`),
    `ipv4`, `ipv6`, `network`, `connection`, `host_public_key`, `containers`, `artifacts` (file
    name -> rendered text, as the offline plan writes them) and, after build(), `deploy`.

    `public`: the host serves DNS and HTTPS to the world (a region). Otherwise its base firewall
    is SSH from the admin CIDRs and nothing else."""

    def __init__(self, type_: str, name: str, spec: RegionConfig | WitnessConfig, config: BridgeConfig,
                 network: services.Network, *, public: bool, labels: dict[str, str], shared: dict | None = None,
                 opts: pulumi.ResourceOptions | None = None):
        super().__init__(type_, name, None, opts)
        cfg = config
        self.spec = spec
        self.network = network
        self.release = config.release  # None: no release built yet (the hosts build, as before ADR 10's revision)
        label = f"ciris-{cfg.environment}-{spec.name}"

        rules = base_rules(cfg.admin_ssh_cidrs, public=public)
        # The host's SSH key: made here, installed by cloud-init, pinned by every remote command.
        host_key = tls.PrivateKey(f"{name}-host-key", algorithm="ED25519", opts=pulumi.ResourceOptions(parent=self))
        self.host_public_key = host_key.public_key_openssh.apply(str.strip)
        user_data = pulumi.Output.secret(pulumi.Output.all(host_key.private_key_openssh, self.host_public_key).apply(
            lambda k: cloud_init.render(label, cfg.ssh_public_key, rules, host_key=(k[0], k[1]))))
        shown_user_data = self.host_public_key.apply(
            lambda pub: cloud_init.render(label, cfg.ssh_public_key, rules, host_key=("[secret]", pub)))
        self.host = hosts.create(
            name, label, spec, cfg.ssh_public_key, user_data, rules,
            {"project": "ciris-bridge", "environment": cfg.environment, **labels}, parent=self,
            shared=shared,
        )
        self.ipv4, self.ipv6 = self.host.ipv4, self.host.ipv6

        # Service containers: components add theirs (add_service) before build() deploys them.
        self.containers: list[services.ContainerSpec] = []
        # What lands in /srv/ciris on the host (cloud-init is the VM's user data instead).
        self.files: dict[str, pulumi.Input[str]] = {}
        self.private: dict[str, int] = {}  # bundle path -> uid that reads it (secrets)
        self.service_files: dict[str, list[str]] = {}  # container -> the bundle paths it reads
        self.artifacts: dict[str, pulumi.Input[str]] = {"cloud-init.yaml": shown_user_data}
        self.deploy: command.remote.Command | None = None
        self.openings: list[command.remote.Command] = []  # open()'s UFW commands, before the deploy

        private_key = cfg.secret("ssh_private_key")
        self.connection = command.remote.ConnectionArgs(
            host=self.ipv4,
            user=cloud_init.DEPLOY_USER,
            # Without a key in config, the operator's ssh-agent (SSH_AUTH_SOCK) is used.
            private_key=pulumi.Output.secret(private_key) if private_key else None,
            host_key=self.host_public_key,
        )
        # Who may reach SSH, as config says now (cloud-init applied it at first boot only): before
        # anything else is done over SSH. `make local`'s hosts are this machine: nothing to apply.
        self.access: command.remote.Command | None = None
        if spec.provider != "local":
            text = access.script(cfg.admin_ssh_cidrs, cfg.ssh_public_key, cfg.ssh_retired_public_keys,
                                 cloud_init.DEPLOY_USER)
            self.access = command.remote.Command(
                f"{name}-access", connection=self.connection, create=deploy.remote(text),
                triggers=[hashlib.sha256(text.encode()).hexdigest()],
                opts=pulumi.ResourceOptions(parent=self, depends_on=self.host.ready))

    def add_service(self, container: services.ContainerSpec, files: dict[str, pulumi.Input[str]],
                    shown: dict[str, pulumi.Input[str]] | None = None, private: dict[str, int] | None = None,
                    live: dict[str, pulumi.Input[str]] | None = None) -> None:
        """Add (or replace) a container and the files it reads in the bundle. `private` names the
        files that hold secrets, with the uid that reads them (0: root, e.g. the postgres image's env file);
        `shown` overrides what the offline plan writes for them. `live`: files the running container
        takes by its `reload` command, in a directory it mounts: a change to them alone restarts nothing."""
        assert self.deploy is None, "add services before build()"
        if live and not container.reload:
            raise ValueError(f"{container.name}: live files need a reload command that takes them")
        self.containers = [c for c in self.containers if c.name != container.name] + [container]
        self.files.update(files)
        self.files.update(live or {})
        self.private.update(private or {})
        self.service_files[container.name] = self.service_files.get(container.name, []) + sorted(files)
        self.artifacts.update(shown or {})

    def build(self, after: list[pulumi.Resource] | None = None) -> command.remote.Command:
        """Ship the bundle and start the containers: after every component has added its part,
        after this host's own firewall openings, and after `after` (another host's deploy)."""
        files = pulumi.Output.all(**self.files)
        # Digests of what each container reads: not secret, though some of the files are.
        digests = pulumi.Output.unsecret(files.apply(lambda f: {
            name: digest([f[p] for p in paths]) for name, paths in self.service_files.items()
        }))
        compose = pulumi.Output.all(digests, *self.host.public_addresses).apply(
            lambda a: services.render_compose(self.spec.name, self.network, self.containers,
                                              publish_on=a[1:], logging=self.host.logging, file_digests=a[0],
                                              loopback=self.host.loopback, release=self.release)
        )
        self.files["compose.yaml"] = compose
        if self.release:  # what the deploy checks is on the host (by id) before it starts anything
            self.files["release.images"] = self.release.manifest()
            self.files["release.id"] = self.release.id + "\n"
        self.artifacts = {**self.files, **self.artifacts}
        payload = pulumi.Output.secret(pulumi.Output.all(**self.files).apply(lambda f: bundle(f, self.private)))
        device = self.host.data_device if self.host.data_device is not None else ""
        shipped = [self._ship(self.release)] if self.release and self.spec.provider != "local" else []
        if self.access is not None:
            shipped.append(self.access)
        self.deploy = command.remote.Command(
            f"{self._name}-deploy",
            connection=self.connection,
            create=pulumi.Output.from_input(device).apply(
                lambda d: deploy.remote(deploy.DEPLOY, cloud_init.BUNDLE_DIR, *([d] if d else []))),
            stdin=payload,
            # The digest of the bundle, not the bundle: a changed file redeploys, no secret shows.
            # A grown volume redeploys too: the deploy grows its filesystem (ciris-prepare-volume).
            triggers=[payload.apply(lambda b: hashlib.sha256(b.encode()).hexdigest()),
                      *([f"volume_gb={self.spec.volume_gb}"] if self.spec.volume_gb else [])],
            opts=pulumi.ResourceOptions(parent=self, depends_on=[*self.host.ready, *self.openings, *shipped, *(after or [])]),
        )
        return self.deploy

    def _ship(self, release: Release) -> command.local.Command:
        """The release's images to this host, from the operator's machine, only those it lacks
        (ops/ship.py): `pulumi up` runs where the release was built. (`make local`: the host is
        this machine, which has them.)"""
        key = self.connection.private_key
        return command.local.Command(
            f"{self._name}-images",
            create=pulumi.Output.all(self.ipv4, self.host_public_key).apply(lambda a: " ".join(
                ["python", "-m", "ops", "ship", shlex.quote(f"{cloud_init.DEPLOY_USER}@{a[0]}"), "--host-key", shlex.quote(a[1])])),
            stdin=release.manifest(),
            environment={"CIRIS_SSH_KEY": key} if key is not None else None,
            triggers=[release.id],
            opts=pulumi.ResourceOptions(parent=self, depends_on=self.host.ready),
        )

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
            opts=pulumi.ResourceOptions(parent=self, depends_on=[*self.host.ready, *([self.access] if self.access else [])]),
        ))
