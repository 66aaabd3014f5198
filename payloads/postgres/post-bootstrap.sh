#!/bin/sh
# Patroni runs this once, on the member that creates the cluster (argument: a superuser
# connection string). Patroni made the superuser, replication and rewind roles; this adds the
# billing app's role and database. BILLING_PASSWORD comes from the member's environment.
set -eu
psql "$1" -v ON_ERROR_STOP=1 -v app_pw="$BILLING_PASSWORD" <<'SQL'
CREATE ROLE billing WITH LOGIN PASSWORD :'app_pw';
CREATE DATABASE cirisbilling OWNER billing;
SQL
