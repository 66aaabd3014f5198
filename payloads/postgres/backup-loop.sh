#!/bin/sh
# The backup job beside every database member (FSD §6.1); it works only while its member is the
# primary (Patroni moves that role), two layers in the same bucket:
#   - pgBackRest: WAL archived continuously by the server's archive_command, plus a daily full
#     backup; together they allow point-in-time recovery within the retention;
#   - backup.py: a daily pg_dump, encrypted client-side (restorable with nothing but Python).
# Runs daily at BACKUP_HOUR_UTC (default 03). A failed run is logged and retried the next day.
set -u
# `backup-loop.sh health`: is the loop alive (the container's health check).
if [ "${1:-}" = health ]; then kill -0 "$(cat /tmp/backup-loop.pid)"; exit; fi
echo $$ > /tmp/backup-loop.pid
. /usr/local/lib/ciris/env-file.sh
hour=${BACKUP_HOUR_UTC:-3}
pgbr() { gosu postgres pgbackrest --config=/etc/ciris-postgres/pgbackrest.conf --stanza=ciris "$@"; }
is_primary() {
  [ "$(gosu postgres psql -h /var/run/postgresql -U postgres -d postgres -Atc 'SELECT NOT pg_is_in_recovery()' 2>/dev/null)" = t ]
}
# archive_command fails (and WAL waits in pg_wal) until the stanza exists: create it as soon as this
# member is the primary, then take the first full backup unless the repository already has one. In
# the background: the daily pg_dump below never waits for pgBackRest's repository.
(
  until is_primary && pgbr stanza-create; do sleep 30; done
  pgbr info | grep -q "full backup" || pgbr backup --type=full || echo "backup-loop: first full backup failed" >&2
) &
# Every member's job records the newest backup in the bucket, whichever member made it (the
# exporter beside the server serves it; the BackupStale alert reads it), at start and once a day.
status() { python3 /usr/local/lib/ciris/backup.py status >/dev/null || echo "backup-loop: cannot read the bucket's backups" >&2; }
status
while :; do
  now=$(date -u +%s)
  next=$(date -u -d "today ${hour}:00" +%s)
  [ "$next" -le "$now" ] && next=$(date -u -d "tomorrow ${hour}:00" +%s)
  sleep $((next - now))
  if ! is_primary; then echo "backup-loop: this member is a replica today; the primary's job backs up" >&2; sleep 600; status; continue; fi
  python3 /usr/local/lib/ciris/backup.py run || echo "backup-loop: pg_dump backup failed; next try tomorrow" >&2
  # Expires full backups (and their WAL) past repo1-retention-full days.
  pgbr backup --type=full || echo "backup-loop: pgBackRest backup failed; next try tomorrow" >&2
done
