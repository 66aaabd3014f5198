#!/bin/sh
# apply-logins.sh [logins.json]: billing's database logins as the program rendered them (ADR 26).
# On the primary: each listed login role takes its SCRAM verifier (created, a member of the app role
# acting as it, where it does not exist yet); every other billing login role is shut (no password),
# then, once that is committed, its sessions are ended. Changes only what differs, so running it
# again writes nothing. On a replica it does nothing: it replays what its primary did. Run by
# post-bootstrap.sh, by reload.sh (every deploy) and, adding only (CIRIS_LOGINS_ADD_ONLY=1: a
# member's file may be older than the last deploy's), when this member becomes the primary.
set -eu
file=${1:-${CIRIS_LOGINS_FILE:-/run/ciris-postgres/logins.json}}
[ -r "$file" ] || { echo "apply-logins: $file cannot be read" >&2; exit 2; }
conn=${CIRIS_LOGINS_CONNINFO:-"host=/var/run/postgresql user=postgres dbname=postgres"}
shut=true
[ "${CIRIS_LOGINS_ADD_ONLY:-}" = 1 ] && shut=false
psql "$conn" -X -q -v ON_ERROR_STOP=1 -v logins="$(cat "$file")" -v shut=$shut <<'SQL'
SELECT NOT pg_is_in_recovery() AS is_primary \gset
\if :is_primary
SELECT set_config('ciris.logins', :'logins', false), set_config('ciris.shut', :'shut', false) \g /dev/null
DO $$
DECLARE
  logins jsonb := current_setting('ciris.logins')::jsonb;
  l record;
BEGIN
  -- reload.sh and the role-change callback may run at once on a new primary.
  PERFORM pg_advisory_xact_lock(hashtext('ciris apply-logins'));
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
  IF current_setting('ciris.shut')::boolean THEN
    FOR l IN SELECT rolname AS name FROM pg_authid
             WHERE (rolname = 'billing' OR rolname LIKE 'billing\_%') AND rolpassword IS NOT NULL AND NOT logins ? rolname LOOP
      EXECUTE format('ALTER ROLE %I PASSWORD NULL', l.name);
      RAISE NOTICE 'apply-logins: shut %', l.name;
    END LOOP;
  END IF;
END $$;
-- After the commit: a session that logged in while it was pending is ended too.
\if :shut
SELECT count(pg_terminate_backend(a.pid)) FROM pg_stat_activity a JOIN pg_authid r ON r.rolname = a.usename
 WHERE (r.rolname = 'billing' OR r.rolname LIKE 'billing\_%') AND r.rolpassword IS NULL \g /dev/null
\endif
\endif
SQL
