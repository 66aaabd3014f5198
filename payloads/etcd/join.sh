#!/bin/sh
# join.sh <etcd config file>: before a member with an empty data directory starts, make it a member
# of the cluster that already runs, if one does (a replaced or added host, a lost volume): remove
# any entry with its name or peer address, add it again, and rewrite the config to join with
# `initial-cluster-state: existing` and the cluster's own member list. The deploy starts the
# container, so `pulumi up` changes the membership, never a person.
#
# The cluster's first start needs nothing: no peer answers, or they cannot change the membership
# yet (no majority: the first hosts are being deployed) while this member is still one of the
# initial, never-started entries. A member with data is left alone: its data is the truth.
set -eu
conf=$1
val() { sed -n "s/^ *$1: *//p" "$conf" | head -n 1 | tr -d "'\""; }
data=$(val data-dir)
[ -n "$(ls -A "$data" 2>/dev/null)" ] && exit 0
name=$(val name)
me=$(val initial-advertise-peer-urls)
endpoints=$(val initial-cluster | tr ',' '\n' | sed 's/^[^=]*=//' | grep -vxF "$me" | sed 's/:2380$/:2379/' | paste -sd, -)
[ -n "$endpoints" ] || exit 0  # a single-member cluster
ctl() {
  ETCDCTL_API=3 etcdctl --endpoints="$endpoints" --cacert="$(val trusted-ca-file)" --cert="$(val cert-file)" \
    --key="$(val key-file)" --dial-timeout=2s --command-timeout=8s "$@"
}
# id, status, name, peer urls, client urls, learner
members=$(ctl member list 2>/dev/null) || { echo "join: no peer answers; the cluster's first start"; exit 0; }
mine=$(echo "$members" | awk -F', ' -v me="$me" -v name="$name" '$4 == me || ($3 == name && name != "")')
first_start=no
echo "$mine" | awk -F', ' -v me="$me" '$4 == me && $2 == "unstarted" {found=1} END {exit !found}' && first_start=yes
register() {  # remove the old entries, add this member; the answer or the error in $added
  added=""
  for id in $(echo "$mine" | awk -F', ' '$1 != "" {print $1}'); do
    added=$(ctl member remove "$id" 2>&1) || return 1
    echo "join: removed the old entry $id of $name"
  done
  added=$(ctl member add "$name" --peer-urls="$me" 2>&1)
}
# A member that just died may have been etcd's leader: the others need an election first.
for attempt in 1 2 3 4 5; do
  if register; then
    cluster=$(echo "$added" | sed -n 's/^ETCD_INITIAL_CLUSTER="\(.*\)"$/\1/p')
    sed -i -e "s|^initial-cluster: .*|initial-cluster: $cluster|" -e "s|^initial-cluster-state: .*|initial-cluster-state: existing|" "$conf"
    echo "join: $name added to the running cluster ($cluster)"
    exit 0
  fi
  if [ "$first_start" = yes ]; then
    echo "join: no majority yet; $name starts with the cluster's initial members"
    exit 0
  fi
  members=$(ctl member list 2>/dev/null) || true
  mine=$(echo "$members" | awk -F', ' -v me="$me" -v name="$name" '$4 == me || ($3 == name && name != "")')
  sleep 3
done
echo "join: $name cannot join the running cluster yet: $added" >&2
exit 1
