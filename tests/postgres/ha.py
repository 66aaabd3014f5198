"""Hosts in network namespaces running the database as production does (etcd + Patroni +
PostgreSQL from Debian's packages, configured by the project's renderers), for fault drills.

Each host is a network namespace with its own address on a bridge; the test process sits on the
bridge too (the clients). A host can be killed (SIGKILL every process in its namespace), frozen
(SIGSTOP) and thawed, cut off (its link down), or cut off from one other host only (iptables in
both namespaces), then brought back.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from components import consensus, postgres_config as pgc
from tests.postgres.conftest import make_ca, pg_bin

BRIDGE = "cirisha0"
SUBNET = "10.66.0"  # not 10.88: Podman's default network (a host that ever ran a container has 10.88.0.1)
CLIENT_ADDR = f"{SUBNET}.254"  # the test process (billing and the drill's clients) on the bridge
PASSWORDS = {"superuser": "su-CANARY", "replication": "repl-CANARY", "rewind": "rewind-CANARY", "api": "api-CANARY",
             "app": "app-CANARY"}
REPO = Path(__file__).resolve().parents[2]
POST_BOOTSTRAP = REPO / "payloads" / "postgres" / "post-bootstrap.sh"
ON_ROLE = REPO / "payloads" / "postgres" / "on-role.sh"  # a new leader applies billing's logins (ADR 26)
BILLING = REPO / "payloads" / "billing"
ETCD_JOIN = REPO / "payloads" / "etcd" / "join.sh"
BILLING_PORT = 8000


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(list(cmd), capture_output=True, text=True)
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {out.stderr.strip()}")
    return out


@dataclass
class Host:
    name: str  # "us-east", "eu-west", "witness"
    index: int
    root: Path
    database: bool = True  # the witness runs etcd only
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def addr(self) -> str:
        return f"{SUBNET}.{self.index}"

    @property
    def ns(self) -> str:
        return f"ciris-ha-{self.name}"

    @property
    def veth(self) -> str:
        return f"ciris-ha{self.index}"

    @property
    def member(self) -> str:
        return pgc.member_name(self.name)

    @property
    def dir(self) -> Path:
        return self.root / self.name

    def pids(self) -> list[int]:
        return [int(p) for p in sh("ip", "netns", "pids", self.ns).stdout.split()]

    def signal(self, sig: int) -> None:
        for pid in self.pids():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        for p in self.procs:
            p.wait(timeout=10)
        self.procs.clear()

    def kill_etcd(self) -> None:
        """SIGKILL this host's etcd member only (Patroni and PostgreSQL go on)."""
        for pid in self.pids():
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == "etcd":
                    os.kill(pid, signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass
        for p in [p for p in self.procs if "etcd" in p.args]:
            p.kill()  # runuser, which waits for etcd: gone with it, or now
            p.wait(timeout=10)
            self.procs.remove(p)

    def freeze(self) -> None:
        self.signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self.signal(signal.SIGCONT)

    def cut(self) -> None:
        sh("ip", "link", "set", self.veth, "down")

    def reconnect(self) -> None:
        sh("ip", "link", "set", self.veth, "up")

    def exec(self, *cmd: str) -> list[str]:
        """A command inside this host's namespace, as the postgres user."""
        return ["ip", "netns", "exec", self.ns, "runuser", "-u", "postgres", "--", *cmd]

    def api(self, path: str = "/patroni", timeout: float = 2) -> dict | None:
        """Patroni's REST API (TLS, verified against the cluster's CA), or None when it does not answer."""
        ctx = ssl.create_default_context(cafile=str(self.root / "ca.crt"))
        try:
            with urllib.request.urlopen(f"https://{self.addr}:8008{path}", context=ctx, timeout=timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:  # /primary answers 503 with the member's state on a replica
            return json.loads(e.read() or b"{}")
        except (OSError, ValueError):
            return None


class Cluster:
    """us-east, eu-west (database members) and a witness (etcd only), on one bridge."""

    def __init__(self, root: Path, timing: pgc.HaTiming, etcd_timing: consensus.Timing,
                 names: tuple[str, ...] = ("us-east", "eu-west", "witness"), consensus_on: tuple[str, ...] | None = None,
                 billing_key_pem: str | None = None, archive_env: dict[str, str] | None = None):
        """`consensus_on`: the hosts running etcd (all by default; a witness-less stack: the
        declared primary only, as components/postgres.py deploys it). `archive_env`: pgBackRest's
        keys; with them every member archives its WAL as configured by its `pgbackrest.conf`
        (written by the test), and `restore` (None, "latest" or a time) is the restore switch."""
        self.archive_env = archive_env
        self.restore = None
        self.root, self.timing, self.etcd_timing = root, timing, etcd_timing
        self.hosts = [Host(n, i + 1, root, database=(n != "witness")) for i, n in enumerate(names)]
        self.by_name = {h.name: h for h in self.hosts}
        self.consensus = [self.by_name[n] for n in (consensus_on or names)]
        # With a signing key, a billing process (payloads/billing) runs beside each database member,
        # in its namespace, on its address, with the multi-host DATABASE_URL the program renders.
        self.billing_key_pem = billing_key_pem

    # --- setup -----------------------------------------------------------------------------------
    def create(self) -> None:
        self.teardown_network()
        sh("ip", "link", "add", BRIDGE, "type", "bridge")
        sh("ip", "addr", "add", f"{CLIENT_ADDR}/24", "dev", BRIDGE)
        sh("ip", "link", "set", BRIDGE, "up")
        for h in self.hosts:
            sh("ip", "netns", "add", h.ns)
            sh("ip", "link", "add", h.veth, "type", "veth", "peer", "name", "eth0", "netns", h.ns)
            sh("ip", "link", "set", h.veth, "master", BRIDGE)
            sh("ip", "link", "set", h.veth, "up")
            for cmd in (["ip", "addr", "add", f"{h.addr}/24", "dev", "eth0"], ["ip", "link", "set", "eth0", "up"],
                        ["ip", "link", "set", "lo", "up"]):
                sh("ip", "netns", "exec", h.ns, *cmd)
        ca_file, certs = make_ca(self.root, addrs=tuple(h.addr for h in self.hosts))
        for h in self.hosts:
            h.dir.mkdir()
            crt, key = certs[h.addr]
            for src, dst in ((crt, "server.crt"), (key, "server.key"), (ca_file, "ca.crt")):
                shutil.copy(src, h.dir / dst)
            (h.dir / "sock").mkdir()
            self._write_configs(h)
        if os.geteuid() == 0:
            for p in [self.root, *self.root.rglob("*")]:
                shutil.chown(p, "postgres", "postgres")
        (self.root / "ca.crt").chmod(0o644)

    def _write_configs(self, h: Host) -> None:
        members = [consensus.Member(x.name, x.addr) for x in self.consensus]
        if h in self.consensus:
            (h.dir / "etcd.yml").write_text(consensus.etcd_conf(
                consensus.Member(h.name, h.addr), members, tls_dir=str(h.dir), data_dir=str(h.dir / "etcd"),
                listen=h.addr, timing=self.etcd_timing))
        if not h.database:
            return
        tls = pgc.Tls(str(h.dir / "server.crt"), str(h.dir / "server.key"), str(h.dir / "ca.crt"))
        peers = [f"{x.addr}/32" for x in self.hosts if x is not h and x.database]
        hba = pgc.pg_hba(peers=peers, app_cidrs=[f"{CLIENT_ADDR}/32", f"{h.addr}/32"], app_peers=True)
        hba += f"hostssl all postgres {CLIENT_ADDR}/32 scram-sha-256\n"  # the drill inspects every member
        (h.dir / "patroni.yml").write_text(pgc.patroni_yml(
            name=h.member, address=h.addr, etcd_hosts=[f"{x.addr}:{consensus.CLIENT_PORT}" for x in self.consensus],
            tls=tls, passwords=PASSWORDS, data_dir=str(h.dir / "data"), bin_dir=str(Path(pg_bin("postgres")).parent),
            socket_dir=str(h.dir / "sock"), listen=h.addr, hba=hba, post_bootstrap=f"sh {POST_BOOTSTRAP}", on_role=f"sh {ON_ROLE}",
            timing=self.timing, pgpass=str(h.dir / "pgpass"),
            archive_config=str(h.dir / "pgbackrest.conf") if self.archive_env else None, restore=self.restore,
            nofailover=not any(x.name == "witness" for x in self.consensus) and h is not self.consensus[0]))
        (h.dir / "logins.json").write_text(pgc.logins_json({"1": PASSWORDS["app"]}, PASSWORDS["superuser"]))

    def start(self, h: Host) -> None:
        log = open(h.dir / "processes.log", "ab")
        env = {"PATH": os.environ["PATH"], "HOME": str(h.dir), "LANG": "C.UTF-8",
               "CIRIS_LOGINS_FILE": str(h.dir / "logins.json"),
               "CIRIS_LOGINS_CONNINFO": f"host={h.dir / 'sock'} user=postgres dbname=postgres",
               **(self.archive_env or {})}
        if h in self.consensus:
            self.start_etcd(h)
        if h.database:
            h.procs.append(subprocess.Popen(h.exec("patroni", str(h.dir / "patroni.yml")), stdout=log,
                                            stderr=subprocess.STDOUT, env=env))
            if self.billing_key_pem and (h.dir / "billing.log").exists():  # a restart: billing was running
                self.start_billing(h)

    def rewrite_configs(self) -> None:
        """Every host's files rendered again (after a change such as `restore`)."""
        for h in self.hosts:
            self._write_configs(h)
            if os.geteuid() == 0:
                for p in h.dir.glob("*.yml"):
                    shutil.chown(p, "postgres", "postgres")

    def lose_everything(self) -> None:
        """Every host dies with its disks: processes killed, PostgreSQL's and etcd's data (so also
        Patroni's keys) and pgBackRest's local spool gone. Only the bucket is left."""
        self.stop()
        for h in self.hosts:
            for d in ("data", "etcd", "pgbackrest-spool"):
                shutil.rmtree(h.dir / d, ignore_errors=True)
            if (h.dir / "billing.log").exists():  # kept for reading; start() no longer restarts billing
                (h.dir / "billing.log").rename(h.dir / f"billing.log.lost-{time.monotonic_ns()}")

    def start_etcd(self, h: Host) -> None:
        log = open(h.dir / "processes.log", "ab")
        env = {"PATH": os.environ["PATH"], "HOME": str(h.dir), "LANG": "C.UTF-8", "ETCD_UNSUPPORTED_ARCH": ""}
        h.procs.append(subprocess.Popen(h.exec("etcd", "--config-file", str(h.dir / "etcd.yml")), stdout=log,
                                        stderr=subprocess.STDOUT, env=env))

    def rebuild_etcd(self, h: Host) -> str:
        """`h`'s etcd member lost with its data (a replaced host, a lost volume), then started again as
        the container starts it: payloads/etcd/join.sh first. Returns join.sh's output."""
        h.kill_etcd()
        shutil.rmtree(h.dir / "etcd", ignore_errors=True)
        out = self.join(h)
        self.start_etcd(h)
        return out

    def join(self, h: Host) -> str:
        """payloads/etcd/join.sh on `h`'s config, in its namespace; its output."""
        out = sh("ip", "netns", "exec", h.ns, "sh", str(ETCD_JOIN), str(h.dir / "etcd.yml"))
        return out.stdout + out.stderr

    def etcd_members(self) -> list[list[str]]:
        """`etcdctl member list` as the test process sees it: [id, status, name, peer url, client url, learner]."""
        h = self.consensus[0]
        out = sh("etcdctl", f"--endpoints={','.join(f'https://{x.addr}:2379' for x in self.consensus)}",
                 f"--cacert={self.root / 'ca.crt'}", f"--cert={h.dir / 'server.crt'}", f"--key={h.dir / 'server.key'}",
                 "--dial-timeout=3s", "--command-timeout=5s", "member", "list", check=False)
        return [line.split(", ") for line in out.stdout.splitlines()]

    def start_all(self) -> None:
        for h in self.hosts:
            self.start(h)

    def billing_url(self, h: Host) -> str:
        return f"http://{h.addr}:{BILLING_PORT}"

    def start_billing(self, h: Host) -> None:
        """Billing beside member `h` (its own member first in DATABASE_URL, like components/billing.py)."""
        log = open(h.dir / "billing.log", "ab")
        h.procs.append(subprocess.Popen(["ip", "netns", "exec", h.ns, sys.executable, "-m", "billing"], cwd=BILLING,
                                        env=self._billing_env(h), stdout=log, stderr=subprocess.STDOUT))

    def billing_command(self, h: Host, *args: str) -> subprocess.CompletedProcess:
        """`python -m billing <args>` beside member `h`, as an operator runs it in billing's container."""
        return subprocess.run(["ip", "netns", "exec", h.ns, sys.executable, "-m", "billing", *args], cwd=BILLING,
                              env=self._billing_env(h), capture_output=True, text=True, timeout=120)

    def _billing_env(self, h: Host) -> dict[str, str]:
        members = [h, *(x for x in self.hosts if x.database and x is not h)]
        url = (f"postgresql://{pgc.APP_ROLE}:{PASSWORDS['app']}@{','.join(f'{x.addr}:5432' for x in members)}/"
               f"{pgc.DATABASE}?target_session_attrs=read-write&sslmode=verify-full"
               f"&sslrootcert={self.root / 'ca.crt'}&connect_timeout=3")
        return {"PATH": os.environ["PATH"], "DATABASE_URL": url, "BILLING_JWT_PRIVATE_KEY": self.billing_key_pem,
                "HOST": h.addr, "PORT": str(BILLING_PORT), "DB_WRITE_TIMEOUT_SECONDS": "4", "PYTHONUNBUFFERED": "1",
                "STRIPE_SECRET_KEY": "", "STRIPE_WEBHOOK_SECRET": "", "LANG": "C.UTF-8"}

    def wait_billing(self, timeout: float = 90) -> None:
        """Until every billing answers /health 200 (it can write)."""
        deadline = time.monotonic() + timeout
        for h in self.hosts:
            if h.database:
                self.wait_billing_on(h, deadline - time.monotonic())

    def wait_billing_on(self, h: Host, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if urllib.request.urlopen(f"{self.billing_url(h)}/health", timeout=3).status == 200:
                    return
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"billing beside {h.name} not healthy in {timeout:.0f} s\n"
                                     f"{(h.dir / 'billing.log').read_text(errors='replace')[-3000:]}")
            time.sleep(0.5)

    # --- state -----------------------------------------------------------------------------------
    def leader(self) -> Host | None:
        """The member whose Patroni says it is the running primary holding the lock."""
        for h in self.hosts:
            if h.database and (s := h.api("/patroni")) and s.get("role") in ("master", "primary") \
                    and s.get("state") == "running":
                return h
        return None

    def replica_of(self, leader: Host) -> Host:
        return next(h for h in self.hosts if h.database and h is not leader)

    def wait_healthy(self, timeout: float = 120) -> Host:
        """Until one leader streams to the other member synchronously (Patroni's view and
        pg_stat_replication agree). Returns the leader."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            leader = self.leader()
            if leader:
                replica = self.replica_of(leader)
                rows = self.query(leader, "SELECT application_name, sync_state FROM pg_stat_replication")
                last = rows
                if rows == [(replica.member, "sync")]:
                    return leader
            time.sleep(0.5)
        raise AssertionError(f"no synchronous pair within {timeout} s (last: {last})\n{self.logs()}")

    def query(self, h: Host, sql: str, dbname: str = "postgres", timeout: float = 3):
        import psycopg

        try:
            with psycopg.connect(self.dsn([h], user="postgres", dbname=dbname, target=None), autocommit=True,
                                 connect_timeout=timeout) as conn:
                return conn.execute(sql).fetchall()
        except psycopg.Error:
            return None

    def dsn(self, hosts: list[Host], *, user: str = "billing", dbname: str = pgc.DATABASE,
            target: str | None = "read-write", connect_timeout: int = 2) -> str:
        password = PASSWORDS["superuser"] if user == "postgres" else PASSWORDS["app"]
        parts = {"host": ",".join(h.addr for h in hosts), "port": ",".join("5432" for _ in hosts), "user": user,
                 "password": password, "dbname": dbname, "sslmode": "verify-full",
                 "sslrootcert": str(self.root / "ca.crt"), "connect_timeout": connect_timeout}
        if target:
            parts["target_session_attrs"] = target
        return " ".join(f"{k}={v}" for k, v in parts.items())

    def logs(self, tail: int = 4000) -> str:
        return "\n".join(f"--- {h.name}\n{(h.dir / 'processes.log').read_text(errors='replace')[-tail:]}"
                         for h in self.hosts if (h.dir / "processes.log").exists())

    # --- teardown --------------------------------------------------------------------------------
    def stop(self) -> None:
        for h in self.hosts:
            try:
                h.thaw()
                h.kill()
            except Exception:  # already gone
                pass

    def teardown_network(self) -> None:
        existing = sh("ip", "netns", "list").stdout.split()
        for h in self.hosts:
            if h.ns in existing:  # a run that was cut short may have left processes in it
                h.thaw()
                h.signal(signal.SIGKILL)
            sh("ip", "netns", "del", h.ns, check=False)
            sh("ip", "link", "del", h.veth, check=False)
        sh("ip", "link", "del", BRIDGE, check=False)
