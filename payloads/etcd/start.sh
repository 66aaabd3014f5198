#!/bin/sh
# Start the etcd member (its key must be private to etcd; the bundle is root's), or `health`:
# does this member answer over mutual TLS (not: does the cluster have quorum).
set -eu
RUN=/run/ciris-etcd
if [ "${1:-}" = health ]; then
  exec etcdctl --endpoints=https://127.0.0.1:2379 --insecure-skip-tls-verify \
    --cert=$RUN/server.crt --key=$RUN/server.key --command-timeout=3s endpoint status >/dev/null
fi
install -d -o etcd -g etcd -m 700 "$RUN" /var/lib/etcd/data
chown etcd:etcd /var/lib/etcd
cp /etc/ciris-etcd/* "$RUN"/ && chown etcd:etcd "$RUN"/* && chmod 600 "$RUN"/server.key
exec setpriv --reuid=etcd --regid=etcd --init-groups etcd --config-file "$RUN/etcd.conf.yml"
