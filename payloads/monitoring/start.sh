#!/bin/sh
# start.sh <prometheus|alertmanager|blackbox|node-exporter>: one of the monitoring containers.
# Flags that depend on the host (Alertmanager's cluster peers) are in a rendered args file, one
# per line (components/monitoring.alertmanager_args), so the image stays the same everywhere.
set -eu
C=/etc/ciris-monitoring
case "${1:-}" in
  prometheus)
    exec prometheus --config.file=$C/prometheus.yml --storage.tsdb.path=/var/lib/prometheus/data \
      --storage.tsdb.retention.time=30d --web.listen-address=0.0.0.0:9090 --web.enable-lifecycle ;;
  alertmanager)
    # shellcheck disable=SC2046  # one flag per line, none with spaces
    exec prometheus-alertmanager $(cat $C/alertmanager.args) ;;
  blackbox)
    exec prometheus-blackbox-exporter --config.file=$C/blackbox.yml --web.listen-address=0.0.0.0:9115 ;;
  node-exporter)
    exec prometheus-node-exporter --path.rootfs=/host --collector.textfile.directory=$C/textfile \
      --web.listen-address=0.0.0.0:9100 ;;
  health)  # health <port> <path>: the container's own endpoint answers
    exec curl -fsS -o /dev/null "http://127.0.0.1:$2$3" ;;
  *) echo "start.sh: unknown service '${1:-}'" >&2; exit 2 ;;
esac
