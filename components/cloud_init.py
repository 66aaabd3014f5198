"""cloud-init user data that hardens a fresh Debian 12 host (pure renderer: config in, text out).

Key-only SSH for an unprivileged deploy user (root and passwords refused), unattended security
upgrades, Docker with the compose plugin from Docker's repository, UFW mirroring the provider
firewall's base rules, and the script that prepares the Postgres data volume once it is attached.
"""

from __future__ import annotations

from typing import Sequence

import yaml

from components.firewall import Rule, ufw_commands

DEPLOY_USER = "ciris"
DATA_MOUNT = "/srv/ciris/data"
BUNDLE_DIR = "/srv/ciris"

# Docker's Debian repository signing key: fetched over HTTPS from Docker (not a keyserver, which
# fails often at first boot) and used only if its fingerprint is this one.
DOCKER_KEY_URL = "https://download.docker.com/linux/debian/gpg"
DOCKER_KEY_FINGERPRINT = "9DC858229FC7DD38854AE2D88D81803C0EBFCD88"
DOCKER_KEYRING = "/etc/apt/keyrings/docker.asc"

INSTALL_DOCKER = f"""\
#!/bin/sh
# ciris-install-docker: Docker CE and its compose plugin from Docker's repository, key pinned by fingerprint.
set -eu
install -d -m 755 /etc/apt/keyrings
curl -fsSL --retry 5 {DOCKER_KEY_URL} -o {DOCKER_KEYRING}.new
gpg --show-keys --with-colons {DOCKER_KEYRING}.new | grep -q '^fpr:*{DOCKER_KEY_FINGERPRINT}:' \\
  || {{ echo "ciris-install-docker: Docker's key does not have the pinned fingerprint" >&2; exit 1; }}
mv {DOCKER_KEYRING}.new {DOCKER_KEYRING} && chmod 644 {DOCKER_KEYRING}
echo "deb [signed-by={DOCKER_KEYRING}] https://download.docker.com/linux/debian bookworm stable" > /etc/apt/sources.list.d/docker.list
apt-get update -q
DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker-ce docker-ce-cli containerd.io docker-compose-plugin
"""

SSHD = """\
# Managed by ciris-bridge: keys only, no root.
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin no
PermitEmptyPasswords no
X11Forwarding no
"""

# Container logs go to journald (the compose files' log driver): kept 14 days by time (FSD §9.4).
# The size cap fits each host's disk: journald's own, 10 % of the filesystem (at most 4 GB), and
# it leaves 15 % free -- 1 GB on the witness's 10 GB disk, 4 GB on a region's 40-80 GB one.
JOURNALD = """\
[Journal]
Storage=persistent
MaxRetentionSec=14day
"""

# Docker starts only once the data volume is mounted: otherwise Postgres would start on an empty
# directory of the root disk after a reboot.
DOCKER_AFTER_DATA = f"""\
[Unit]
RequiresMountsFor={DATA_MOUNT}
[Service]
# Containers never reach the cloud's metadata service: the user data there holds the host's SSH key.
ExecStartPost=/bin/sh -c 'iptables -C DOCKER-USER -d 169.254.169.254 -j DROP 2>/dev/null || iptables -I DOCKER-USER -d 169.254.169.254 -j DROP'
"""

# Ports are published on the host's own addresses; at boot an IPv6 address may still be in
# duplicate-address detection when Docker starts, so allow binding it before it is up.
SYSCTL = """\
net.ipv4.ip_nonlocal_bind = 1
net.ipv6.ip_nonlocal_bind = 1
"""

# Unattended upgrades also take Docker's own packages (docker-ce is not in Debian's origins).
DOCKER_UPGRADES = """\
Unattended-Upgrade::Origins-Pattern:: "origin=Docker,label=Docker CE";
"""

AUTO_UPGRADES = """\
APT::Periodic::Update-Package-Lists "1";
APT::Periodic::Unattended-Upgrade "1";
"""

# Never formats a device that carries any signature (filesystem or partition table): a re-run,
# or a volume moved from another host, keeps its data.
PREPARE_VOLUME = """\
#!/bin/sh
# ciris-prepare-volume DEVICE MOUNTPOINT
set -eu
dev=$1; mnt=$2
i=0
while [ ! -b "$dev" ] && [ $i -lt 60 ]; do sleep 5; i=$((i + 1)); done
[ -b "$dev" ] || { echo "ciris-prepare-volume: $dev did not appear after 5 minutes" >&2; exit 1; }
# blkid -p: 0 a signature found, 2 none (blank: format it), anything else an error (never format).
rc=0; blkid -p "$dev" >/dev/null 2>&1 || rc=$?
case $rc in
  0) ;;
  2) mkfs.ext4 -q -L ciris-data "$dev" ;;
  *) echo "ciris-prepare-volume: blkid -p $dev failed ($rc); not formatting" >&2; exit 1 ;;
esac
uuid=$(blkid -s UUID -o value "$dev")
mkdir -p "$mnt"
fstab=${CIRIS_FSTAB:-/etc/fstab}
grep -q "UUID=$uuid" "$fstab" || echo "UUID=$uuid $mnt ext4 defaults,nofail,discard 0 2" >> "$fstab"
# A volume grown in config (volume_gb) arrives bigger: the filesystem grows with it, online when
# mounted (a full disk stops every write: availability first, so a failure here only warns).
fs_bytes=$(dumpe2fs -h "$dev" 2>/dev/null | awk -F: '/^Block count/ {c = $2} /^Block size/ {s = $2} END {print c * s}')
if [ "$(blockdev --getsize64 "$dev")" -gt "${fs_bytes:-0}" ]; then
  if mountpoint -q "$mnt"; then grown=$(resize2fs "$dev" 2>&1) || rc=$?
  else grown=$(e2fsck -fp "$dev" 2>&1 && resize2fs "$dev" 2>&1) || rc=$?
  fi
  [ "${rc:-0}" -eq 0 ] && echo "ciris-prepare-volume: grew the filesystem on $dev to $(blockdev --getsize64 "$dev") bytes" >&2 \
    || echo "ciris-prepare-volume: could not grow the filesystem on $dev: $grown" >&2
fi
mountpoint -q "$mnt" || mount -T "$fstab" "$mnt"
"""


def render(hostname: str, ssh_public_key: str, rules: Sequence[Rule], host_key: tuple[str, str] | None = None) -> str:
    """`rules` must have resolved (plain string) sources: the base rules do. `host_key` (OpenSSH
    private, public) is the host's own Ed25519 key, made by the program, so the deploy can pin it
    instead of trusting whatever answers on first use."""
    ufw = ["ufw default deny incoming", "ufw default allow outgoing"]
    for rule in rules:
        ufw += ufw_commands(rule.protocol, rule.port, [str(cidr) for _, cidr in rule.sources])
    ufw.append("ufw --force enable")

    doc = {
        "hostname": hostname,
        "disable_root": True,
        **({"ssh_deletekeys": True, "ssh_genkeytypes": [],
            "ssh_keys": {"ed25519_private": host_key[0], "ed25519_public": host_key[1]}} if host_key else {}),
        "ssh_pwauth": False,
        "users": [
            {
                "name": DEPLOY_USER,
                "shell": "/bin/bash",
                "lock_passwd": True,
                "sudo": "ALL=(ALL) NOPASSWD:ALL",
                "ssh_authorized_keys": [ssh_public_key],
            }
        ],
        "package_update": True,
        "package_upgrade": True,
        # systemd-timesyncd: the clock (tokens allow 60 s between regions; ClockNotSynchronised).
        "packages": ["ufw", "unattended-upgrades", "curl", "gnupg", "ca-certificates", "systemd-timesyncd"],
        "write_files": [
            {"path": "/etc/ssh/sshd_config.d/10-ciris.conf", "content": SSHD, "permissions": "0644"},
            {"path": "/etc/apt/apt.conf.d/20auto-upgrades", "content": AUTO_UPGRADES, "permissions": "0644"},
            {"path": "/usr/local/sbin/ciris-prepare-volume", "content": PREPARE_VOLUME, "permissions": "0755"},
            {"path": "/usr/local/sbin/ciris-install-docker", "content": INSTALL_DOCKER, "permissions": "0755"},
            {"path": "/etc/systemd/journald.conf.d/10-ciris.conf", "content": JOURNALD, "permissions": "0644"},
            {"path": "/etc/sysctl.d/60-ciris.conf", "content": SYSCTL, "permissions": "0644"},
            {"path": "/etc/systemd/system/docker.service.d/10-ciris-data.conf", "content": DOCKER_AFTER_DATA, "permissions": "0644"},
            {"path": "/etc/apt/apt.conf.d/51ciris-docker-upgrades", "content": DOCKER_UPGRADES, "permissions": "0644"},
        ],
        "runcmd": [
            *ufw,
            "/usr/local/sbin/ciris-install-docker",
            f"usermod -aG docker {DEPLOY_USER}",
            f"install -d -o {DEPLOY_USER} -g {DEPLOY_USER} {BUNDLE_DIR}",
            "sysctl --system",
            "systemctl daemon-reload",
            "systemctl restart systemd-journald",
            "systemctl enable --now docker unattended-upgrades systemd-timesyncd",
            "systemctl restart ssh",
        ],
    }
    return "#cloud-config\n" + yaml.safe_dump(doc, sort_keys=False, width=1000)
