"""Who may reach a host's SSH, applied at every `pulumi up` (pure renderer: config in, text out).

cloud-init sets UFW and the deploy user's key at first boot only, and VMs ignore later user-data
changes (ADR 12): a changed `admin_ssh_cidrs` reached the provider firewall but not UFW, and a new
`ssh_public_key` reached nothing, locking the operator out of every later `pulumi up`. This script
runs over SSH before each deploy whose settings changed:
- UFW lets SSH in from exactly `admin_ssh_cidrs`: the new ones are opened before any other is closed;
- the deploy user's `authorized_keys` gets `ssh_public_key`, and loses only the keys listed in
  `ssh_retired_public_keys`: a key is retired once its successor works (README, "Changing SSH
  settings"), so no step of a key change can lock the operator out;
- the clock is kept (CLOCK): a host made before cloud-init installed systemd-timesyncd gets it.
"""

from __future__ import annotations

import shlex
from typing import Sequence

SSH_PORT = 22

# Tokens allow 60 s between regions' clocks (ClockNotSynchronised pages when a clock drifts): a host
# whose clock nothing keeps gets systemd-timesyncd. Only where systemd runs (SYSTEMD_DIR: not in a
# container, nor in the e2e test's); a host running chrony instead is left alone.
SYSTEMD_DIR = "/run/systemd/system"
CLOCK = f"""\
if [ -d {SYSTEMD_DIR} ] && ! systemctl is-active --quiet systemd-timesyncd chrony; then
  DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null && \\
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q systemd-timesyncd >/dev/null
  systemctl enable --now systemd-timesyncd
  echo "access: the clock is now kept by systemd-timesyncd"
fi
"""


def key_body(key: str) -> str:
    """An OpenSSH public key's type and base64 body, without its comment."""
    return " ".join(key.split()[:2])


def script(admin_cidrs: Sequence[str], public_key: str, retired: Sequence[str], user: str) -> str:
    cidrs = " ".join(shlex.quote(c) for c in admin_cidrs)
    home = f"/home/{user}"
    keys = f"{home}/.ssh/authorized_keys"
    retire = " ".join(shlex.quote(key_body(k)) for k in retired)
    return f"""\
set -eu
# SSH from exactly the admin CIDRs: the new ones are opened before any other is closed.
for c in {cidrs}; do ufw allow proto tcp from "$c" to any port {SSH_PORT} >/dev/null; done
ufw show added | sed -n 's/^ufw allow from \\([^ ]*\\) to any port {SSH_PORT} proto tcp$/\\1/p' | while read -r c; do
  case " {" ".join(admin_cidrs)} " in *" $c "*) ;; *) ufw delete allow proto tcp from "$c" to any port {SSH_PORT} >/dev/null ;; esac
done
# The deploy user's keys: the configured one added, retired ones removed (by type and body).
install -d -m 700 -o {user} -g {user} {home}/.ssh
touch {keys}
grep -qF {shlex.quote(key_body(public_key))} {keys} || echo {shlex.quote(public_key.strip())} >> {keys}
for body in {retire}; do
  awk -v body="$body" '($1 " " $2) != body' {keys} > {keys}.new && mv {keys}.new {keys}
done
chown {user}:{user} {keys} && chmod 600 {keys}
""" + CLOCK
