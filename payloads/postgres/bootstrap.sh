#!/bin/sh
# Start a ReplicatedPostgres member. First start on an empty data directory:
#   primary: initdb, then the roles, database and one replication slot per replica
#            (with synchronous_commit=local: no replica exists yet to confirm those commits);
#   replica: pg_basebackup from the primary over verified TLS through its slot (-R: standby).
# Environment: ROLE, PRIMARY_HOST, PRIMARY_PORT, SLOT (replica), SLOTS (primary),
# POSTGRES_PASSWORD, REPLICATION_PASSWORD, BILLING_PASSWORD. Rendered files: /etc/ciris-postgres.
set -eu
PGDATA=${PGDATA:-/var/lib/postgresql/data}
RUN_DIR=${RUN_DIR:-/run/ciris-postgres}
SOCKET_DIR=${SOCKET_DIR:-/var/run/postgresql}
if [ "$(id -u)" = 0 ]; then
  # The key must be private to postgres; the bundle is root's.
  install -d -o postgres -g postgres -m 700 "$RUN_DIR" "$PGDATA"
  install -d -o postgres -g postgres -m 2775 "$SOCKET_DIR"  # a fresh volume is root's
  chown postgres:postgres "$(dirname "$PGDATA")"
  cp /etc/ciris-postgres/* "$RUN_DIR"/
  chown postgres:postgres "$RUN_DIR"/* && chmod 600 "$RUN_DIR"/server.key
  exec gosu postgres sh "$0" "$@"
fi
create_slots() {  # one physical slot per replica (slots are not replicated: a new primary needs its own)
  for slot in ${SLOTS:-}; do
    psql -v ON_ERROR_STOP=1 -h "$SOCKET_DIR" -U postgres -c "SET synchronous_commit = local" \
      -c "SELECT pg_create_physical_replication_slot('$slot') WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = '$slot')"
  done
}
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  # Built beside PGDATA and moved into place only when complete: a first start that dies half-way
  # (a crash, a full disk) leaves no half-made cluster that a restart would take for a real one.
  new="$PGDATA.new"
  rm -rf "$new"
  if [ "$ROLE" = primary ]; then
    pw=$(mktemp) && printf '%s' "$POSTGRES_PASSWORD" > "$pw"
    initdb -D "$new" -U postgres --auth-local=peer --auth-host=scram-sha-256 --pwfile="$pw" -E UTF8
    rm -f "$pw"
    pg_ctl -D "$new" -w -o "-c listen_addresses='' -c unix_socket_directories=$SOCKET_DIR" start
    psql -v ON_ERROR_STOP=1 -h "$SOCKET_DIR" -U postgres -v repl_pw="$REPLICATION_PASSWORD" -v app_pw="$BILLING_PASSWORD" <<'SQL'
SET synchronous_commit = local;
CREATE ROLE replicator WITH REPLICATION LOGIN PASSWORD :'repl_pw';
CREATE ROLE billing WITH LOGIN PASSWORD :'app_pw';
CREATE DATABASE cirisbilling OWNER billing;
SQL
    create_slots
    pg_ctl -D "$new" -w stop
  else
    PGPASSWORD="$REPLICATION_PASSWORD" pg_basebackup -D "$new" -X stream -S "$SLOT" -R --checkpoint=fast \
      -d "host=$PRIMARY_HOST port=$PRIMARY_PORT user=replicator sslmode=verify-full sslrootcert=$RUN_DIR/ca.crt"
    # -R also wrote a primary_conninfo without our application_name into postgresql.auto.conf,
    # which would override the rendered one: the primary would never see its synchronous standby.
    : > "$new/postgresql.auto.conf"
  fi
  rmdir "$PGDATA" 2>/dev/null || true
  mv "$new" "$PGDATA"
fi
# Declared failover: the config moved the primary role (then `pulumi up` restarted us).
if [ "$ROLE" = primary ] && [ -f "$PGDATA/standby.signal" ]; then
  echo "bootstrap: promoting this replica to primary (standby.signal removed)"
  rm -f "$PGDATA/standby.signal"
  pg_ctl -D "$PGDATA" -w -o "-c listen_addresses='' -c unix_socket_directories=$SOCKET_DIR" start
  create_slots
  pg_ctl -D "$PGDATA" -w stop
elif [ "$ROLE" = replica ] && [ -s "$PGDATA/PG_VERSION" ] && [ ! -f "$PGDATA/standby.signal" ]; then
  # An old primary: keep its data aside (never delete it) and rebuild from the new primary.
  aside="$PGDATA.old-$(date -u +%Y%m%dT%H%M%SZ)"
  echo "bootstrap: was a primary; moving its data to $aside and re-cloning from $PRIMARY_HOST"
  mv "$PGDATA" "$aside" && install -d -m 700 "$PGDATA"
  exec sh "$0" "$@"
fi
exec postgres -D "$PGDATA" -c config_file="$RUN_DIR/postgresql.conf" -c hba_file="$RUN_DIR/pg_hba.conf"
