#!/bin/sh
# Start the etcd member (its key must be private to etcd; the bundle is root's), or `health`: is
# it listening for its peers (port 2380 = 0x094C). Not: does the cluster have quorum -- etcd serves
# clients only once a majority is up, and the first host deployed is alone for a while; nor an
# HTTPS request -- etcd accepts a peer's certificate only from the address the certificate names.
set -eu
RUN=/run/ciris-etcd
if [ "${1:-}" = health ]; then
  exec grep -Eq ':094C 0+:0000 0A' /proc/net/tcp /proc/net/tcp6
fi
install -d -o etcd -g etcd -m 700 "$RUN" /var/lib/etcd/data
chown etcd:etcd /var/lib/etcd
cp /etc/ciris-etcd/* "$RUN"/ && chown etcd:etcd "$RUN"/* && chmod 600 "$RUN"/server.key
exec setpriv --reuid=etcd --regid=etcd --init-groups etcd --config-file "$RUN/etcd.conf.yml"
