"""This database member's metrics for Prometheus (issue #16: the database alerts), at
http://postgres:9187/metrics on the region's container network only (the port is not published).

    python3 pg_exporter.py [CONFIG]      (default /etc/ciris-postgres/exporter.json)

Started by start.sh beside Patroni, as the postgres user: it asks the local server over its unix
socket (peer authentication, no password) with psql, on each scrape. The config is rendered by
components/postgres_config.exporter_conf (the replicas this member expects when it is primary, and
REPLICATION_STATUS_SQL, the query replication_health() reads).

    ciris_pg_up                       1 if the local server answered, else 0 (and nothing below)
    ciris_pg_is_primary               1 on the primary, 0 on a replica
    ciris_pg_wal_bytes                bytes in pg_wal; ciris_pg_wal_budget_bytes: what it may hold (ADR 22)
  on the primary only (a replica reports none of these):
    ciris_pg_replicas_expected        the other members, all of which should stream
    ciris_pg_replicas_streaming       how many of them stream now
    ciris_pg_sync_standbys            how many of them are synchronous
    ciris_pg_replication_lag_seconds{member}, ciris_pg_replication_lag_bytes{member}
    ciris_pg_archiver_last_archived_timestamp_seconds, ..._last_failed_timestamp_seconds  (0: never)
  on every member, once the backup job has written its status (backup.py status):
    ciris_backup_last_success_timestamp_seconds   the newest backup in the bucket, whoever made it

Only the Python standard library and psql: nothing to add to the image.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CONFIG = "/etc/ciris-postgres/exporter.json"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STATE_SQL = """SELECT json_build_object('primary', NOT pg_is_in_recovery(),
  'archived', EXTRACT(EPOCH FROM last_archived_time), 'failed', EXTRACT(EPOCH FROM last_failed_time),
  'wal', (SELECT COALESCE(sum(size), 0) FROM pg_ls_waldir()),
  'wal_budget', pg_size_bytes(current_setting('max_slot_wal_keep_size'))) FROM pg_stat_archiver"""


def psql(conf: dict, sql: str):
    """One query's single JSON value, over the unix socket."""
    result = subprocess.run(
        ["psql", "-h", conf["socket_dir"], "-p", str(conf["pg_port"]), "-U", "postgres", "-d", "postgres",
         "-XAtq", "-v", "ON_ERROR_STOP=1", "-c", sql],
        capture_output=True, text=True, timeout=10, env={**os.environ, "PGCONNECT_TIMEOUT": "3"})
    if result.returncode != 0:
        raise RuntimeError((result.stderr.strip().splitlines() or [f"psql exited {result.returncode}"])[-1])
    return json.loads(result.stdout)


def query(conf: dict) -> tuple[dict, list]:
    """(state, replication rows): rows only on the primary (pg_current_wal_lsn fails on a replica)."""
    state = psql(conf, STATE_SQL)
    rows = []
    if state["primary"]:
        rows = psql(conf, "SELECT COALESCE(json_agg(json_build_array(application_name, state, sync_state, lag_seconds,"
                          f" lag_bytes)), '[]') FROM ({conf['replication_sql']}) r")
    return state, rows


def backup_newest(path: str) -> float | None:
    try:
        return float(json.loads(open(path).read())["newest"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def render(state: dict | None, rows: list, replicas: list[str], backup: float | None) -> str:
    """The exposition text. `state` None: the server did not answer. `rows`: REPLICATION_STATUS_SQL's
    (application_name, state, sync_state, lag_seconds, lag_bytes); only the expected replicas count
    (a base backup's walsender is no replica)."""
    out: list[str] = []

    def gauge(name: str, help: str, samples) -> None:
        out.append(f"# HELP {name} {help}\n# TYPE {name} gauge\n")
        for labels, value in samples:
            label = "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}" if labels else ""
            out.append(f"{name}{label} {float(value)!r}\n")

    gauge("ciris_pg_up", "1 if the local PostgreSQL answered the exporter", [({}, state is not None)])
    if state is not None:
        gauge("ciris_pg_is_primary", "1 if this member is the primary", [({}, state["primary"])])
        gauge("ciris_pg_wal_bytes", "Bytes in pg_wal", [({}, state.get("wal") or 0)])
        if (state.get("wal_budget") or -1) > 0:
            gauge("ciris_pg_wal_budget_bytes", "The WAL an absent replica or failing archiving may hold "
                  "(max_slot_wal_keep_size; pgBackRest's archive-push-queue-max is the same)", [({}, state["wal_budget"])])
    if state is not None and state["primary"]:
        mine = [r for r in rows if r[0] in replicas]
        gauge("ciris_pg_replicas_expected", "Replicas that should stream from this primary", [({}, len(replicas))])
        gauge("ciris_pg_replicas_streaming", "Expected replicas streaming now",
              [({}, sum(r[1] == "streaming" for r in mine))])
        gauge("ciris_pg_sync_standbys", "Expected replicas that are synchronous standbys",
              [({}, sum(r[1] == "streaming" and r[2] in ("sync", "quorum") for r in mine))])
        gauge("ciris_pg_replication_lag_seconds", "How far each replica's replay is behind (pg_stat_replication.replay_lag)",
              [({"member": r[0]}, r[3]) for r in mine])
        gauge("ciris_pg_replication_lag_bytes", "WAL bytes each replica has yet to replay",
              [({"member": r[0]}, r[4]) for r in mine])
        gauge("ciris_pg_archiver_last_archived_timestamp_seconds", "When a WAL file was last archived (0: never)",
              [({}, state["archived"] or 0)])
        gauge("ciris_pg_archiver_last_failed_timestamp_seconds", "When archiving a WAL file last failed (0: never)",
              [({}, state["failed"] or 0)])
    if backup is not None:
        gauge("ciris_backup_last_success_timestamp_seconds", "The newest backup in the bucket (backup.py status)",
              [({}, backup)])
    return "".join(out)


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def serve(conf: dict) -> None:
    lock = threading.Lock()  # one scrape's queries at a time

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path != "/metrics":
                self.send_error(404)
                return
            with lock:
                try:
                    state, rows = query(conf)
                except (RuntimeError, ValueError, KeyError, subprocess.TimeoutExpired) as e:
                    print(f"pg_exporter: the local server did not answer ({str(e)[:200]})", file=sys.stderr, flush=True)
                    state, rows = None, []
                body = render(state, rows, conf["replicas"], backup_newest(conf["backup_status"])).encode()
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # one line per scrape is noise
            pass

    ThreadingHTTPServer((conf.get("listen", "0.0.0.0"), conf["port"]), Handler).serve_forever()


if __name__ == "__main__":
    serve(json.loads(open(sys.argv[1] if len(sys.argv) > 1 else CONFIG).read()))
