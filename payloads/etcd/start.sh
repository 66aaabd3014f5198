#!/bin/sh
# Start the etcd member (its key must be private to etcd; the bundle is root's), or `health`.
#
# health: the member serves HTTP (its metrics listener, 2381, inside the container network only).
# Once the member has been part of a cluster with a leader (remembered in its volume), it must also
# pass etcd's own /health (a leader and a read through it). Before that it is alone by design -- the
# first host deployed waits for its peers -- and the deploy must not stop on it. A member without
# quorum later is an alert (EtcdNoLeader, EtcdMemberMissing) as well as an unhealthy container.
set -eu
RUN=/run/ciris-etcd
JOINED=/var/lib/etcd/joined  # written the first time /health passes
if [ "${1:-}" = health ]; then
  if curl -fsS --max-time 3 -o /dev/null http://127.0.0.1:2381/health; then
    [ -e "$JOINED" ] || touch "$JOINED"
    exit 0
  fi
  [ -e "$JOINED" ] && exit 1
  # Alone by design: alive is enough (it may still be starting: join.sh asks the peers first).
  exec curl -fsS --max-time 1 --retry 3 --retry-delay 1 --retry-connrefused -o /dev/null http://127.0.0.1:2381/metrics
fi
install -d -o etcd -g etcd -m 700 "$RUN" /var/lib/etcd/data
chown etcd:etcd /var/lib/etcd
cp /etc/ciris-etcd/* "$RUN"/ && chown etcd:etcd "$RUN"/* && chmod 600 "$RUN"/server.key
sh /usr/local/lib/ciris/join.sh "$RUN/etcd.conf.yml"  # an empty member joins a running cluster
exec setpriv --reuid=etcd --regid=etcd --init-groups etcd --config-file "$RUN/etcd.conf.yml"
