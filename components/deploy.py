"""What runs on a host to deploy it: one source for `pulumi up` (over SSH) and `make local`.

`script()` is the whole deploy: the bundle (a base64 tar.gz) arrives on stdin, is unpacked into the
bundle directory with its owners and modes, the images are built and every container is started;
it succeeds only when every container is running and healthy (`--wait`). Remote commands run it
with `sudo sh -c`; scripts/local-up runs the same text with `sh -c` against Podman.
"""

from __future__ import annotations

import shlex

from components.release import KEEP as KEEP_RELEASES
from components.services import CONFIG_LABEL, DRAIN_FILE, RELOAD_HEADER

# The edge asks each upstream every second whether it serves (edge.py): five intervals (a loaded
# edge's checks run late).
DRAIN_WAIT_SECONDS = 5

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

# Bundle files that held secrets in earlier releases (the Postgres container's secrets file: ADR 26).
RETIRED_FILES = ("postgres/env",)

DEPLOY = ("""\
set -eu
dir=$1 device=${2:-}
""" + CLOUD_INIT_DONE + """\
[ -z "$device" ] || ciris-prepare-volume "$device" "$dir/data"
install -d -m 755 "$dir"
base64 -d | tar -xz -C "$dir"
cd "$dir"
rm -f RETIRED  # what earlier bundles shipped with secrets and this one no longer has (tar adds, never deletes)
""" + _COMPOSE + """\
# The images of the last KEEP releases deployed here stay (a rollback needs no shipping); older
# releases' images go. (An image a container still uses is refused by docker and stays.)
prune_releases() {
  touch releases.log
  { grep -vx "$(cat release.id)" releases.log || true; cat release.id; } > releases.log.new && mv releases.log.new releases.log
  cp release.images "release-$(cat release.id).images"
  keep=$(tail -n KEEP releases.log)
  for old in $(head -n -KEEP releases.log); do
    [ -f "release-$old.images" ] || continue
    for ref in $(cut -d' ' -f1 "release-$old.images"); do
      in_kept=no
      for k in $keep; do grep -q "^$ref " "release-$k.images" 2>/dev/null && in_kept=yes; done
      [ $in_kept = yes ] || docker image rm "$ref" >/dev/null 2>&1 || true
    done
    rm -f "release-$old.images"
  done
  tail -n KEEP releases.log > releases.log.new && mv releases.log.new releases.log
}
# A host with nothing to run (yet): compose refuses `up` without services; stop what ran before.
if [ -z "$(dc config --services)" ]; then dc down --remove-orphans; exit 0; fi
if [ -f release.images ]; then
  # A release (ADR 10): its images were shipped before this (ops/ship.py; `make local` built them
  # here). Each must be here under its id; nothing is built or pulled on the host.
  while read -r ref id; do
    have=$(docker image inspect --format '{{.Id}}' "$ref" 2>/dev/null || true)
    [ "$have" = "$id" ] || { echo "deploy: the image $ref ($id) of release $(cat release.id) is not on this host: ship the release first (python -m ops ship)" >&2; exit 1; }
  done < release.images
else
  # No release yet: the host builds. The base image is refreshed (security updates); a local base
  # (BASE set, `make local`) is never pulled.
  if [ -n "${BASE:-}" ]; then dc build -q; else dc build -q --pull; fi
fi
# A container can be briefly unhealthy for a reason outside this deploy (billing's health is "can
# write": 503 while the database drops a vanished standby): compose fails at once on that, so it
# gets two more chances before the deploy fails.
up() {
  for try in 1 2 3; do
    dc up -d --remove-orphans --wait --wait-timeout 300 "$@" && return 0
    [ $try -lt 3 ] && { echo "deploy: not every container is healthy yet; again in 20 s" >&2; sleep 20; }
  done
  return 1
}
# A rolling service (billing, the proxy: ADR 16) that this deploy changes never stops taking
# traffic. What it needs comes first (the other services, the database's new pg_hba among them);
# then its twin (the new version) starts and must be healthy; then the service is drained (its
# /serving answers 503: the edge, which asks every second, sends new requests to the twin), then
# replaced (it finishes what it serves: its stop grace period); then the twin is drained and stops
# the same way. Nothing is stopped while the edge may still send it a new request.
rolling=$(dc --profile twin config --services | sed -n 's/-twin$//p')
changed=""
for svc in $rolling; do
  running=$(dc ps -q "$svc" 2>/dev/null || true)
  [ -n "$running" ] || continue
  want=$(sed -n "s/^# CONFIG_LABEL $svc //p" compose.yaml)
  have=$(docker inspect --format '{{index .Config.Labels "CONFIG_LABEL"}}' $running)
  [ "$want" = "$have" ] || changed="$changed $svc"
done
# What a service takes without a restart (ContainerSpec.reload: its live files, e.g. billing's
# database logins) is taken before a rolling service's new version starts, and again at the end.
reload() {
  sed -n 's/^# RELOAD_HEADER //p' compose.yaml | while read -r svc cmd; do
    dc exec -T "$svc" sh -c "$cmd" </dev/null || { echo "deploy: $svc could not take its new files ($cmd)" >&2; exit 1; }
  done
}
if [ -n "$changed" ]; then
  others=$(dc config --services | grep -vxF "$(printf '%s\\n' $rolling)" || true)
  [ -z "$others" ] || up $others || exit 1
  reload || exit 1
fi
drain() {  # <service> [profile args]: new requests go elsewhere within the edge's health interval
  svc=$1; shift
  dc "$@" exec -T "$svc" touch DRAIN_FILE || echo "deploy: could not drain $svc (it stops anyway)" >&2
}
twins=""
for svc in $changed; do
  echo "deploy: $svc changes: its twin takes its traffic while it is replaced" >&2
  twins="$twins $svc-twin"
done
if [ -n "$twins" ]; then  # together: each waits for its health checks, not for the other's
  dc --profile twin up -d --no-deps --force-recreate --wait --wait-timeout 300 $twins \\
    || { echo "deploy: the new$changed did not become healthy; the running ones are untouched" >&2; dc --profile twin rm -sf $twins; exit 1; }
fi
if [ -n "$twins" ]; then
  sleep DRAIN_WAIT  # the edge has seen each twin serving
  drained=""
  for svc in $changed; do drained="$drained $svc=$(dc ps -q "$svc")"; drain "$svc"; done
  sleep DRAIN_WAIT
fi
up || exit 1  # a twin that was healthy keeps serving; the next deploy replaces it
reloaded=0; reload || reloaded=$?  # a failure fails the deploy, after the twins are put away
if [ -n "$twins" ]; then
  for pair in $drained; do  # compose kept one after all: it serves again
    svc=${pair%%=*}
    [ "$(dc ps -q "$svc")" != "${pair#*=}" ] || dc exec -T "$svc" rm -f DRAIN_FILE
  done
  sleep DRAIN_WAIT  # the edge has seen each new container serving
  for twin in $twins; do drain "$twin" --profile twin; done
  sleep DRAIN_WAIT
  for twin in $twins; do dc --profile twin stop "$twin" && dc --profile twin rm -f "$twin"; done
fi
[ $reloaded -eq 0 ] || exit 1
[ -f release.images ] && prune_releases
exit 0
""").replace("KEEP", str(KEEP_RELEASES)).replace("DRAIN_FILE", DRAIN_FILE).replace("DRAIN_WAIT", str(DRAIN_WAIT_SECONDS)).replace("CONFIG_LABEL", CONFIG_LABEL).replace("RELOAD_HEADER", RELOAD_HEADER).replace("RETIRED", " ".join(RETIRED_FILES))

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
