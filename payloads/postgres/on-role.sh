#!/bin/sh
# Patroni's callback (on_start, on_role_change; arguments: action, role, scope): a member that now
# leads adds billing's logins once its promotion has finished (a deploy may have added one while
# another member led; ADR 26). Adding only: this member's file may be older than the last deploy's
# (its region's deploy failed), and must not shut a login billing uses. Patroni does not wait for it.
case ${2:-} in master | primary) ;; *) exit 0 ;; esac
conn=${CIRIS_LOGINS_CONNINFO:-"host=/var/run/postgresql user=postgres dbname=postgres"}
i=0
while [ $i -lt 60 ]; do
  if [ "$(psql "$conn" -XAtc 'SELECT NOT pg_is_in_recovery()' 2>/dev/null)" = t ]; then
    CIRIS_LOGINS_ADD_ONLY=1 exec sh "$(dirname "$0")/apply-logins.sh"
  fi
  i=$((i + 1)); sleep 1
done
echo "on-role: still not a writable primary after 60 s; the logins wait for the next deploy" >&2
