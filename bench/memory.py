"""Peak memory of each host of the local stack under load (`make local` first), next to the RAM of
the plan production runs it on: paid completions (half streamed) through every region's edge at
`--concurrency` per region, billing's health writes between them, and a full backup of the primary
running meanwhile. Each host's peak is the highest sum of its containers' memory seen in one
sample (cgroup v1 `memory.usage_in_bytes`: resident plus page cache, which the kernel can give
back; `rss` alone is shown too), plus `--os-mb` for what the host runs outside them (Docker,
systemd, journald, sshd). A figure, not a test.

    .venv/bin/python -m bench.memory [--seconds 120] [--concurrency 8] [--os-mb 350]

One summary line: per host, peak MB (rss MB), the plan's MB and the headroom left (goal: >= 40 %).
Not covered: Prometheus after a day of series (this stack's is minutes old; see the README).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

from components import config
from tests.conftest import REPO
from tests.e2e.conftest import LOCAL, Stack, engine_env
from tests.e2e.traffic import paying_user, traffic

CGROUP = Path("/sys/fs/cgroup/memory")
# The RAM of the plans the production stack can name (providers' pages, as components/cost.py's prices).
PLAN_MB = {"vc2-1c-1gb": 1024, "vc2-1c-2gb": 2048, "vc2-2c-2gb": 2048, "vc2-2c-4gb": 4096, "vc2-4c-8gb": 8192,
           "cx23": 4096, "cx33": 8192, "cx43": 16384, "cx53": 32768,
           "s-1vcpu-512mb-10gb": 512, "s-1vcpu-1gb": 1024, "s-1vcpu-2gb": 2048}


def cgroups(env: dict[str, str]) -> dict[str, tuple[str, Path]]:
    """Container name -> (its host, its memory cgroup directory), for every container of the stack."""
    out = subprocess.run(["podman", "ps", "--filter", "label=ciris.region", "--format",
                          '{{.Names}} {{index .Labels "ciris.region"}} {{.ID}}', "--no-trunc"],
                         capture_output=True, text=True, env=env, check=True).stdout
    found = {}
    for line in out.splitlines():
        name, host, cid = line.split()
        path = subprocess.run(["podman", "inspect", "--format", "{{.State.CgroupPath}}", cid], capture_output=True,
                              text=True, env=env, check=True).stdout.strip()
        found[name] = (host, CGROUP / path.lstrip("/"))
    return found


def sample(groups: dict[str, tuple[str, Path]]) -> dict[str, tuple[int, int]]:
    """Host -> (usage, rss) in bytes, summed over its containers now."""
    hosts: dict[str, list[int]] = {}
    for host, path in groups.values():
        try:
            usage = int((path / "memory.usage_in_bytes").read_text())
            stat = dict(line.split() for line in (path / "memory.stat").read_text().splitlines())
        except OSError:
            continue  # a container that just went away
        total = hosts.setdefault(host, [0, 0])
        total[0] += usage
        total[1] += int(stat["total_rss"])
    return {h: (u, r) for h, (u, r) in hosts.items()}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--os-mb", type=int, default=350)
    args = ap.parse_args()
    if not (LOCAL / "client_config.json").exists():
        print("bench.memory: the local stack is not up (run `make local` first)", file=sys.stderr)
        return 2
    if not CGROUP.is_dir():
        print(f"bench.memory: no cgroup v1 memory controller at {CGROUP}", file=sys.stderr)
        return 2
    env = engine_env()
    os.environ.update(env)
    stack = Stack(env, json.loads((LOCAL / "client_config.json").read_text()),
                  (LOCAL / "admin.token").read_text().strip(), json.loads((LOCAL / "secrets.json").read_text()),
                  ssl.create_default_context(cafile=str(LOCAL / "ca.crt")))
    production = config.load_stack_file(REPO / "Pulumi.production.yaml")
    plans = {r.name: r.plan for r in production.regions} | ({"witness": production.witness.plan} if production.witness else {})
    groups = cgroups(env)
    peaks: dict[str, tuple[int, int]] = {}
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            for host, (usage, rss) in sample(groups).items():
                if usage > peaks.get(host, (0, 0))[0]:
                    peaks[host] = (usage, rss)
            time.sleep(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    users = [{r["name"]: paying_user(stack, r)[:2] for r in stack.regions} for _ in range(args.concurrency)]
    with contextlib.ExitStack() as flows:
        answered = [flows.enter_context(traffic(stack, u)) for u in users]
        primary = production.primary.name
        backup = subprocess.run(["podman", "exec", f"ciris-{primary}-backup-1", "python3", "/usr/local/lib/ciris/backup.py",
                                 "run"], capture_output=True, text=True, env=env, timeout=args.seconds * 3)
        if backup.returncode:
            print(f"bench.memory: the backup failed: {backup.stderr.strip()[-300:]}", file=sys.stderr)
        time.sleep(max(0.0, args.seconds - 1))
    stop.set()
    watcher.join()
    paid = sum(f.paid for fs in answered for f in fs.values())
    failed = sum(len(f.failed) for fs in answered for f in fs.values())
    parts = []
    for host in sorted(peaks, key=lambda h: (h == "witness", h)):
        usage, rss = peaks[host]
        mb, rss_mb = usage // 2**20 + args.os_mb, rss // 2**20 + args.os_mb
        plan = plans.get(host)
        ram = PLAN_MB.get(plan, 0)
        headroom = f"{1 - mb / ram:.0%}" if ram else "?"
        parts.append(f"{host} {mb} MB ({rss_mb} rss) of {plan} {ram} MB, headroom {headroom}")
    print(f"memory under load ({args.seconds:.0f} s, c={args.concurrency} per region, {paid} paid, {failed} failed, "
          f"backup {'ok' if not backup.returncode else 'failed'}, +{args.os_mb} MB for the OS): " + "; ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
