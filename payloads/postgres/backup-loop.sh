#!/bin/sh
# The daily backup job: sleep until BACKUP_HOUR_UTC (default 03), run backup.py, repeat.
# A failed run is logged and retried the next day; it never stops the loop.
set -u
hour=${BACKUP_HOUR_UTC:-3}
while :; do
  now=$(date -u +%s)
  next=$(date -u -d "today ${hour}:00" +%s)
  [ "$next" -le "$now" ] && next=$(date -u -d "tomorrow ${hour}:00" +%s)
  sleep $((next - now))
  python3 /usr/local/lib/ciris/backup.py run || echo "backup-loop: backup failed; next try tomorrow" >&2
done
