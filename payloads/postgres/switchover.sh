#!/bin/sh
# A declared switchover (`postgres: primary` moved in config): Patroni hands the primary role to
# CANDIDATE once it is a healthy synchronous standby; nothing happens when it already leads.
#   switchover.sh CANDIDATE      (inside a member's container)
set -eu
candidate=${1:?usage: switchover.sh CANDIDATE}
ctl() { gosu postgres patronictl -c /run/ciris-postgres/patroni.yml "$@"; }
leader=$(ctl list -f json | python3 -c 'import json, sys; print(next((m["Member"] for m in json.load(sys.stdin) if m["Role"] == "Leader"), ""))')
if [ "$leader" = "$candidate" ]; then echo "switchover: $candidate already leads"; exit 0; fi
ctl switchover --leader "$leader" --candidate "$candidate" --force
