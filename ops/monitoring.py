"""`ops status`'s rows from each host's own Prometheus: what is firing there, the live database
leader and its replication, and whether a proxy is standing in for billing.

In production Prometheus listens on each host's loopback only, so it is reached through an SSH
tunnel as the deploy user, the host's key pinned from the stack outputs (no trust on first use);
`make local` publishes it on the host's own address, which is reached directly."""

from __future__ import annotations

import json
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Iterator

from ops.checks import CRIT, INFO, OK, SEVERITY, WARN, Row

ALERT_VERDICT = {"critical": CRIT, "warning": WARN}
QUERIES = {
    "firing": 'ALERTS{alertstate="firing", alertname!="Heartbeat"}',  # the heartbeat always fires
    "primary": "ciris_pg_is_primary",
    "expected": "ciris_pg_replicas_expected",
    "streaming": "ciris_pg_replicas_streaming",
    "sync": "ciris_pg_sync_standbys",
    "lag": "ciris_pg_replication_lag_seconds",
    "standin": "ciris_proxy_standin_active",
}
LAG_WARN_SECONDS = 10  # the ReplicationLagHigh rule's threshold (FSD §9.5)


class Unreachable(Exception):
    pass


def query(base_url: str, promql: str, timeout: float = 5.0) -> list[dict]:
    """The instant vector `promql` evaluates to, from the Prometheus at `base_url`."""
    url = f"{base_url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            doc = json.load(resp)
    except (OSError, ValueError) as e:
        raise Unreachable(f"{type(e).__name__}: {str(e)[:80]}") from None
    if doc.get("status") != "success":
        raise Unreachable(f"the query failed: {doc.get('error', '?')[:80]}")
    return doc["data"]["result"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def ssh_tunnel(user: str, host: str, host_key: str, remote: str, port: int = 22, identity: str | None = None,
               budget: float = 15.0) -> Iterator[str]:
    """`http://127.0.0.1:<local port>` forwarded over SSH to `remote` (host:port as the remote host
    sees it). The host key comes from the stack outputs; the operator's key is `identity`, or
    their agent or ~/.ssh/config as for any SSH session. Raises Unreachable with ssh's own last line."""
    local = _free_port()
    with tempfile.NamedTemporaryFile("w", prefix="ciris-known-hosts-", suffix=".txt") as known:
        known.write(f"[{host}]:{port} {host_key}\n" if port != 22 else f"{host} {host_key}\n")
        known.flush()
        argv = ["ssh", "-N", "-p", str(port), "-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes",
                "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={known.name}",
                "-o", "ConnectTimeout=5", *(["-i", identity, "-o", "IdentitiesOnly=yes"] if identity else []),
                "-L", f"127.0.0.1:{local}:{remote}", f"{user}@{host}"]
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    text=True)
        except OSError as e:
            raise Unreachable(f"cannot run ssh ({e.strerror}): install OpenSSH's client") from None
        try:
            deadline = time.monotonic() + budget
            while True:
                if proc.poll() is not None:
                    said = (proc.stderr.read().strip().splitlines() or [f"exit {proc.returncode}"])[-1]
                    raise Unreachable(f"ssh {user}@{host}: {said[:120]}")
                try:
                    socket.create_connection(("127.0.0.1", local), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise Unreachable(f"ssh {user}@{host}: no tunnel within {budget:.0f} s") from None
                    time.sleep(0.1)
            yield f"http://127.0.0.1:{local}"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()


@contextmanager
def reach(host: dict, identity: str | None = None) -> Iterator[str]:
    """The base URL of one host's Prometheus, as the `monitoring` output describes it."""
    ssh = host.get("ssh")
    if ssh is None:
        yield f"http://{host['prometheus']}"
        return
    with ssh_tunnel(ssh["user"], host["ipv4"], ssh["host_key"], host["prometheus"], port=ssh.get("port", 22),
                    identity=identity) as url:
        yield url


def observe(host: dict, identity: str | None = None) -> dict[str, list[dict]]:
    """Every QUERIES result from one host's Prometheus (raises Unreachable)."""
    with reach(host, identity) as url:
        return {name: query(url, promql) for name, promql in QUERIES.items()}


def _value(sample: dict) -> float:
    return float(sample["value"][1])


def host_rows(name: str, seen: dict[str, list[dict]]) -> list[Row]:
    """What one host's Prometheus says: its firing alerts, and the stand-in state of its proxy."""
    firing = sorted(seen["firing"], key=lambda s: (s["metric"].get("severity", ""), s["metric"]["alertname"]))
    if not firing:
        rows = [Row("alerts", f"{name}'s Prometheus", OK, "none firing")]
    else:
        verdict = max((ALERT_VERDICT.get(s["metric"].get("severity"), INFO) for s in firing),
                      key=SEVERITY.__getitem__)  # the exit code's order
        shown = ", ".join(_alert(s["metric"]) for s in firing)
        rows = [Row("alerts", f"{name}'s Prometheus", verdict, f"{len(firing)} firing: {shown}"[:300])]
    if any(_value(s) for s in seen["standin"]):
        rows.append(Row("stand-in", f"{name} proxy", WARN, "billing cannot place holds: the proxy authorises "
                        "within its caps and settles later"))
    return rows


def _alert(labels: dict) -> str:
    where = labels.get("region") or labels.get("instance") or ""
    return f"{labels['alertname']}({where})" if where else labels["alertname"]


def database_rows(declared: dict | None, seen: dict[str, dict[str, list[dict]]]) -> list[Row]:
    """The live leader as the database hosts' Prometheus report it, and its replication."""
    if not declared:
        return []
    members = [h for h in [declared.get("primary"), *(declared.get("replicas") or [])] if h in seen]
    if not members:
        return [Row("database", "live", WARN, "no database host's monitoring answered")]
    leaders = [h for h in members if any(_value(s) for s in seen[h]["primary"])]
    if len(leaders) != 1:
        what = "no member is the primary" if not leaders else f"more than one primary: {', '.join(leaders)}"
        return [Row("database", "live", CRIT, what)]
    leader = leaders[0]
    moved = "" if leader == declared.get("primary") else f" (declared: {declared.get('primary')}; pulumi up moves it back)"
    rows = [Row("database", "live", WARN if moved else OK, f"primary {leader}{moved}")]
    stats = seen[leader]
    expected = sum(_value(s) for s in stats["expected"])
    if expected:
        streaming, sync = sum(_value(s) for s in stats["streaming"]), sum(_value(s) for s in stats["sync"])
        lags = {s["metric"].get("member", "?"): _value(s) for s in stats["lag"]}
        lag = ", ".join(f"{m} {v:.1f} s" for m, v in sorted(lags.items())) or "none reported"
        if streaming < expected or (declared.get("mode") == "synchronous" and not sync):
            verdict = CRIT
        else:
            verdict = WARN if any(v > LAG_WARN_SECONDS for v in lags.values()) else OK
        rows.append(Row("replication", f"from {leader}", verdict,
                        f"{streaming:.0f}/{expected:.0f} replicas streaming, {sync:.0f} synchronous; lag {lag}"))
    return rows


def rows(outputs: dict, identity: str | None = None) -> list[Row]:
    """Every monitoring row for the stack (the hosts asked at once: a dead one costs its timeout once)."""
    hosts = outputs.get("monitoring") or []
    if not hosts:
        return [Row("monitoring", "outputs", INFO, "the stack's outputs name no monitoring hosts (deployed "
                    "before monitoring: pulumi up)")]
    with ThreadPoolExecutor(max_workers=len(hosts)) as pool:
        asked = {host["host"]: pool.submit(observe, host, identity) for host in hosts}
    seen, out = {}, []
    for name, future in asked.items():
        try:
            seen[name] = future.result()
        except Unreachable as e:
            out.append(Row("alerts", f"{name}'s Prometheus", WARN, f"unreachable ({e})"))
            continue
        out += host_rows(name, seen[name])
    return out + database_rows(outputs.get("database"), seen)
