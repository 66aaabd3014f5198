#!/bin/sh
# apply-logins.sh [logins.json]: billing's database logins as the program rendered them (ADR 26).
# On the primary: each listed login role takes its SCRAM verifier (created, a member of the app role
# acting as it, where it does not exist yet); every other billing login role is shut (no password)
# and its sessions ended. Changes only what differs, so running it again writes nothing. On a
# replica it does nothing: it replays what its primary did. Run by post-bootstrap.sh, by reload.sh
# (every deploy) and by Patroni when this member becomes the primary (on_role_change), as postgres.
set -eu
file=${1:-${CIRIS_LOGINS_FILE:-/run/ciris-postgres/logins.json}}
[ -r "$file" ] || { echo "apply-logins: $file cannot be read" >&2; exit 2; }
conn=${CIRIS_LOGINS_CONNINFO:-"host=/var/run/postgresql user=postgres dbname=postgres"}
psql "$conn" -X -q -v ON_ERROR_STOP=1 -v logins="$(cat "$file")" <<'SQL'
SELECT NOT pg_is_in_recovery() AS is_primary \gset
\if :is_primary
SELECT set_config('ciris.logins', :'logins', false) \g /dev/null
DO $$
DECLARE
  logins jsonb := current_setting('ciris.logins')::jsonb;
  l record;
BEGIN
  FOR l IN SELECT key AS name, value AS verifier FROM jsonb_each_text(logins) LOOP
    IF l.name <> 'billing' AND l.name NOT LIKE 'billing\_%' THEN
      RAISE EXCEPTION 'apply-logins: % is not a billing login role', l.name;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = l.name) THEN
      EXECUTE format('CREATE ROLE %I LOGIN IN ROLE billing', l.name);
      EXECUTE format('ALTER ROLE %I SET role = billing', l.name);
      RAISE NOTICE 'apply-logins: created %', l.name;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_authid WHERE rolname = l.name AND rolcanlogin AND rolpassword = l.verifier) THEN
      EXECUTE format('ALTER ROLE %I LOGIN PASSWORD %L', l.name, l.verifier);
      RAISE NOTICE 'apply-logins: set the password of %', l.name;
    END IF;
  END LOOP;
  FOR l IN SELECT rolname AS name FROM pg_authid
           WHERE (rolname = 'billing' OR rolname LIKE 'billing\_%') AND rolpassword IS NOT NULL AND NOT logins ? rolname LOOP
    EXECUTE format('ALTER ROLE %I PASSWORD NULL', l.name);
    PERFORM pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = l.name;
    RAISE NOTICE 'apply-logins: shut %', l.name;
  END LOOP;
END $$;
\endif
SQL
