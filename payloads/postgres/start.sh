#!/bin/sh
# Start a database member: Patroni runs PostgreSQL (it creates the cluster on the first member to
# take the lock, clones the others, promotes, rewinds and re-clones by itself). The rendered
# files are root's in the bundle: copied where postgres owns them, keys and passwords private.
set -eu
RUN_DIR=/run/ciris-postgres
PGDATA=${PGDATA:-/var/lib/postgresql/data/pgdata}
SOCKET_DIR=/var/run/postgresql
install -d -o postgres -g postgres -m 700 "$RUN_DIR"
install -d -o postgres -g postgres -m 2775 "$SOCKET_DIR"  # a fresh volume is root's
chown postgres:postgres "$(dirname "$PGDATA")"
cp /etc/ciris-postgres/* "$RUN_DIR"/
chown postgres:postgres "$RUN_DIR"/* && chmod 600 "$RUN_DIR"/server.key "$RUN_DIR"/patroni.yml
# The live files (logins, bucket keys), where reload.sh puts them on every deploy (ADR 26).
sh /usr/local/lib/ciris/reload.sh files
# The member's metrics (pg_exporter.py, :9187 on the container network), restarted should it exit.
(while :; do gosu postgres python3 /usr/local/lib/ciris/pg_exporter.py "$RUN_DIR/exporter.json"; echo "pg_exporter exited; restarting" >&2; sleep 5; done) &
exec gosu postgres patroni "$RUN_DIR/patroni.yml"
