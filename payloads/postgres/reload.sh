#!/bin/sh
# reload.sh: what a deploy changed that this member takes without a restart (ADR 26), run by the
# deploy as root in the running container (ContainerSpec.reload): the bundle's live files (mounted
# read-only, root's) copied where postgres reads them, then billing's logins applied on the primary.
# pgBackRest reads its keys afresh on every run (archive_command), so new bucket keys need nothing more.
set -eu
RUN_DIR=/run/ciris-postgres
copy() {  # <file in the bundle> <where postgres reads it>: private to postgres, replaced whole
  [ -f "$1" ] || return 0
  install -o postgres -g postgres -m 600 "$1" "$2.new" && mv "$2.new" "$2"
}
install -d -o postgres -g postgres -m 700 "$RUN_DIR/pgbackrest.d"
copy /etc/ciris-postgres/logins.json "$RUN_DIR/logins.json"
copy /etc/ciris-postgres/pgbackrest-keys.conf "$RUN_DIR/pgbackrest.d/keys.conf"
[ "${1:-}" = files ] && exit 0
# The server may be starting, or Patroni restarting or rewinding it: then the role-change callback
# adds the logins when it leads. A failure while it answers is tried again before the deploy fails.
for try in 1 2 3; do
  gosu postgres pg_isready -q -h /var/run/postgresql -U postgres || { echo "reload: the server is not up; Patroni adds the logins when it leads" >&2; exit 0; }
  gosu postgres sh /usr/local/lib/ciris/apply-logins.sh "$RUN_DIR/logins.json" && exit 0
  [ $try -lt 3 ] && sleep 3
done
exit 1
