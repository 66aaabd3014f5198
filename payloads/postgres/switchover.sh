#!/bin/sh
# A declared switchover (`postgres: primary` moved in config): Patroni hands the primary role to
# CANDIDATE once it is the synchronous standby (waited for up to 3 minutes: it may still be
# catching up after a deploy); nothing happens when it already leads.
#   switchover.sh CANDIDATE      (inside a member's container)
set -eu
candidate=${1:?usage: switchover.sh CANDIDATE}
ctl() { gosu postgres patronictl -c /run/ciris-postgres/patroni.yml "$@"; }
role() {  # role of member $1 (Leader, Sync Standby, Replica...), empty when unknown
  ctl list -f json | python3 -c 'import json, sys; print(next((m["Role"] for m in json.load(sys.stdin) if m["Member"] == sys.argv[1]), ""))' "$1"
}
leader() { ctl list -f json | python3 -c 'import json, sys; print(next((m["Member"] for m in json.load(sys.stdin) if m["Role"] == "Leader"), ""))'; }
deadline=$(( $(date +%s) + 180 ))
until [ "$(role "$candidate")" = Leader ] || [ "$(role "$candidate")" = "Sync Standby" ]; do
  [ "$(date +%s)" -lt "$deadline" ] || { echo "switchover: $candidate is not a synchronous standby after 3 minutes" >&2; ctl list >&2; exit 1; }
  sleep 2
done
if [ "$(role "$candidate")" = Leader ]; then echo "switchover: $candidate already leads"; exit 0; fi
ctl switchover --leader "$(leader)" --candidate "$candidate" --force
until [ "$(role "$candidate")" = Leader ]; do
  [ "$(date +%s)" -lt "$deadline" ] || { echo "switchover: $candidate did not take the lead" >&2; ctl list >&2; exit 1; }
  sleep 1
done
echo "switchover: $candidate leads"
