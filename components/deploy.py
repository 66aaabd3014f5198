"""What runs on a host to deploy it: one source for `pulumi up` (over SSH) and `make local`.

`script()` is the whole deploy: the bundle (a base64 tar.gz) arrives on stdin, is unpacked into the
bundle directory with its owners and modes, the images are built and every container is started;
it succeeds only when every container is running and healthy (`--wait`). Remote commands run it
with `sudo sh -c`; scripts/local-up runs the same text with `sh -c` against Podman.
"""

from __future__ import annotations

import shlex

# docker compose v2 as a Docker CLI plugin (hosts) or as its own binary (this machine's Podman setup).
_COMPOSE = """\
if docker compose version >/dev/null 2>&1; then dc() { docker compose "$@"; }; else dc() { docker-compose "$@"; }; fi
"""

# A host's first deploy waits for cloud-init to finish setting it up: 0 done, 2 done with recoverable
# errors ("degraded"). Only where cloud-init runs at boot (/run/cloud-init is made at boot when it is
# enabled): installed but never run (a machine set up another way), `status --wait` waits forever.
# Bounded: a cloud-init stuck for 15 minutes fails the deploy with a message, not a silent hang.
CLOUD_INIT_DONE = """\
if command -v cloud-init >/dev/null 2>&1 && [ -d /run/cloud-init ]; then
  rc=0; timeout 900 cloud-init status --wait >/dev/null || rc=$?
  [ $rc -eq 124 ] && { echo "deploy: cloud-init has not finished after 15 minutes (cloud-init status --long)" >&2; exit 1; }
  [ $rc -eq 0 ] || [ $rc -eq 2 ] || exit $rc
fi
"""

DEPLOY = """\
set -eu
dir=$1 device=${2:-}
""" + CLOUD_INIT_DONE + """\
[ -z "$device" ] || ciris-prepare-volume "$device" "$dir/data"
install -d -m 755 "$dir"
base64 -d | tar -xz -C "$dir"
cd "$dir"
""" + _COMPOSE + """\
# A host with nothing to run (yet): compose refuses `up` without services; stop what ran before.
if [ -z "$(dc config --services)" ]; then dc down --remove-orphans; exit 0; fi
# On the hosts the base image is refreshed at every deploy (security updates); a local base (BASE
# set, `make local`) is never pulled.
if [ -n "${BASE:-}" ]; then dc build -q; else dc build -q --pull; fi
# A container can be briefly unhealthy for a reason outside this deploy (billing's health is "can
# write": 503 while the database drops a vanished standby): compose fails at once on that, so it
# gets two more chances before the deploy fails.
for try in 1 2 3; do
  if dc up -d --remove-orphans --wait --wait-timeout 300; then exit 0; fi
  [ $try -lt 3 ] && { echo "deploy: not every container is healthy yet; again in 20 s" >&2; sleep 20; }
done
exit 1
"""

# The zones go to PowerDNS's API from inside its own container: the API is never published.
DNS_SYNC = 'set -eu\ncd "$1"\n' + _COMPOSE + "dc exec -T dns python3 /usr/local/lib/ciris/pdns_sync.py\n"

# A declared switchover (`postgres: primary` moved in config), run where a member's container is.
SWITCHOVER = ('set -eu\ncd "$1"\n' + _COMPOSE
              + 'dc exec -T postgres sh /usr/local/lib/ciris/switchover.sh "$2"\n')


def remote(script: str, *args: str) -> str:
    """The command line that runs `script` as root on a host, with `args` as $1, $2..."""
    return " ".join(["sudo sh -c", shlex.quote(script), "ciris", *(shlex.quote(a) for a in args)])


def local(script: str, *args: str) -> list[str]:
    """The same script as an argv for this machine (already root)."""
    return ["sh", "-c", script, "ciris", *args]
