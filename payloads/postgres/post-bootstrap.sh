#!/bin/sh
# Patroni runs this once, on the member that creates the cluster (argument: a superuser
# connection string). Patroni made the superuser, replication and rewind roles; this adds the
# billing app's role (it owns the database; billing logs in through its login roles, ADR 26) and
# database, then the logins. Also after a restore from the bucket (ADR 24), where role and database
# already exist: the logins then take this stack's passwords (a replacement stack may have new ones).
set -eu
psql "$1" -X -v ON_ERROR_STOP=1 <<'SQL'
SELECT 'CREATE ROLE billing' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'billing') \gexec
SELECT 'CREATE DATABASE cirisbilling OWNER billing' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'cirisbilling') \gexec
SQL
CIRIS_LOGINS_CONNINFO="$1" sh "$(dirname "$0")/apply-logins.sh"
