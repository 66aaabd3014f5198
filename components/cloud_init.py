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

# Docker's Debian repository signing key (https://download.docker.com/linux/debian/gpg).
DOCKER_KEY_ID = "9DC858229FC7DD38854AE2D88D81803C0EBFCD88"

SSHD = """\
# Managed by ciris-bridge: keys only, no root.
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin no
PermitEmptyPasswords no
X11Forwarding no
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
if ! blkid -p "$dev" >/dev/null 2>&1; then mkfs.ext4 -q -L ciris-data "$dev"; fi
uuid=$(blkid -s UUID -o value "$dev")
mkdir -p "$mnt"
grep -q "UUID=$uuid" /etc/fstab || echo "UUID=$uuid $mnt ext4 defaults,nofail,discard 0 2" >> /etc/fstab
mountpoint -q "$mnt" || mount "$mnt"
"""


def render(hostname: str, ssh_public_key: str, rules: Sequence[Rule]) -> str:
    """`rules` must have resolved (plain string) sources: the base rules do."""
    ufw = ["ufw default deny incoming", "ufw default allow outgoing"]
    for rule in rules:
        ufw += ufw_commands(rule.protocol, rule.port, [str(cidr) for _, cidr in rule.sources])
    ufw.append("ufw --force enable")

    doc = {
        "hostname": hostname,
        "disable_root": True,
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
        "apt": {
            "sources": {
                "docker.list": {
                    "source": "deb [signed-by=$KEY_FILE] https://download.docker.com/linux/debian bookworm stable",
                    "keyid": DOCKER_KEY_ID,
                }
            }
        },
        "package_update": True,
        "package_upgrade": True,
        "packages": [
            "ufw",
            "unattended-upgrades",
            "docker-ce",
            "docker-ce-cli",
            "containerd.io",
            "docker-compose-plugin",
        ],
        "write_files": [
            {"path": "/etc/ssh/sshd_config.d/10-ciris.conf", "content": SSHD, "permissions": "0644"},
            {"path": "/etc/apt/apt.conf.d/20auto-upgrades", "content": AUTO_UPGRADES, "permissions": "0644"},
            {"path": "/usr/local/sbin/ciris-prepare-volume", "content": PREPARE_VOLUME, "permissions": "0755"},
        ],
        "runcmd": [
            *ufw,
            f"usermod -aG docker {DEPLOY_USER}",
            f"install -d -o {DEPLOY_USER} -g {DEPLOY_USER} {BUNDLE_DIR}",
            "systemctl enable --now docker unattended-upgrades",
            "systemctl restart ssh",
        ],
    }
    return "#cloud-config\n" + yaml.safe_dump(doc, sort_keys=False, width=1000)
