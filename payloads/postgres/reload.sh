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
# The server may still be starting (a deploy that also restarted it): then on_role_change applies them.
gosu postgres pg_isready -q -h /var/run/postgresql -U postgres || { echo "reload: the server is not up; Patroni applies the logins when it leads" >&2; exit 0; }
gosu postgres sh /usr/local/lib/ciris/apply-logins.sh "$RUN_DIR/logins.json"
