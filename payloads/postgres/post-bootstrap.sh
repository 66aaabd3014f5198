#!/bin/sh
# Patroni runs this once, on the member that creates the cluster (argument: a superuser
# connection string). Patroni made the superuser, replication and rewind roles; this adds the
# billing app's role and database. BILLING_PASSWORD comes from the member's environment.
# Also after a restore from the bucket (ADR 24), where both already exist: the role then takes
# this stack's password (a replacement stack may have generated new ones).
set -eu
psql "$1" -v ON_ERROR_STOP=1 -v app_pw="$BILLING_PASSWORD" <<'SQL'
SELECT 'CREATE ROLE billing WITH LOGIN' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'billing') \gexec
ALTER ROLE billing WITH LOGIN PASSWORD :'app_pw';
SELECT 'CREATE DATABASE cirisbilling OWNER billing' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'cirisbilling') \gexec
SQL
