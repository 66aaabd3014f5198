"""Requests/second and p50/p99 latency of a non-streamed chat completion, in one run, on the same fake
upstream: direct to the upstream, through a bare LiteLLM proxy server (the same rendered model list
and router settings, master key only, no gate), and through the bridge proxy (our front on
litellm.Router: token check, contract, hold, capture; billing on real PostgreSQL). A figure, not a
test.

    .venv/bin/python -m bench.proxy [--seconds 5] [--rounds 3] [--users 100]

Targets take turns (direct, bare, bridge) for `--rounds` rounds and each figure is the median of
its rounds, so load that other work puts on the machine meanwhile falls on all three alike.

Load comes from wrk (Debian package `wrk`); bridge requests rotate over `--users` users (billing
serialises one user's holds). Everything shares this machine's 2 cores.

The first line also gives an agent-shaped interaction through the bridge: `--interactions`
interactions of 20 calls sharing one `metadata.interaction_id` (one charge), sent 1 and 16 at a
time: the median latency added over a direct call to the upstream (at the same concurrency) of an
interaction's first call (its window's one billing round trip) and of its follow-up calls (no
billing: straight to the provider), and what a follow-up adds over the same calls through bare
LiteLLM (the goal of issue #24: at most 1 ms, i.e. nothing beyond the router's own cost).

A second line: the bridge during a billing outage. After the rounds billing is stopped and the
same bridge (which knows every user's balance from the rounds) serves on stand-in authorisation
(caps raised for the bench; each call journals its advice, fsync'd twice), next to its normal
figures from the rounds; then billing comes back and the run checks every advice was debited.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import yaml

from bench.billing import seed, wrk
from tests.billing.conftest import KEY_PEM, Billing, database_url
from tests.billing.conftest import token as mint
from tests.conftest import wait_until_healthy
from tests.postgres.conftest import PRIMARY_ADDR, free_port, init_primary, workspace
from tests.proxy.conftest import PAYLOAD, MODEL, Proxy, Upstream, proxy_env

sys.path.insert(0, str(PAYLOAD))
from ciris_proxy import litellm_config  # noqa: E402

MASTER_KEY = "sk-bench-master-key-0123456789"

BODY = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
WRK_SCRIPT = """
local n = 0
-- every request POSTs the same completion to /v1/chat/completions (the fake upstream takes that path too)
function request()
  n = n + 1
  local headers = {["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. TOKENS[(n % #TOKENS) + 1]}
  return wrk.format("POST", "/v1/chat/completions", headers, BODY)
end
"""


def lua(path: Path, tokens: list[str]) -> Path:
    path.write_text(f"TOKENS = {{{', '.join(json.dumps(t) for t in tokens)}}}\nBODY = {json.dumps(BODY)}\n" + WRK_SCRIPT)
    return path


class BareLiteLLM:
    """LiteLLM's own proxy server with the proxy's rendered models and router settings (the baseline)."""

    def __init__(self, env: dict, work: Path):
        config = {**yaml.safe_load(litellm_config.render()),
                  "general_settings": {"master_key": "os.environ/LITELLM_MASTER_KEY", "disable_spend_logs": True},
                  "litellm_settings": {"drop_params": True, "turn_off_message_logging": True}}
        (work / "bare.yaml").write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "litellm.proxy.proxy_server:app", "--host", "127.0.0.1", "--port", str(self.port),
             "--log-level", "warning", "--no-access-log"],
            cwd=work, env={**env, "CONFIG_FILE_PATH": str(work / "bare.yaml"), "LITELLM_MASTER_KEY": MASTER_KEY,
                           "LITELLM_LOG": "WARNING"},
            stdout=open(work / "bare.log", "ab"), stderr=subprocess.STDOUT)
        wait_until_healthy(self.url, self.proc, work / "bare.log", "bare LiteLLM", timeout=120, path="/health/liveliness")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(20)


def cpu_seconds(*pids: int) -> float:
    """User + system CPU time so far of these processes and their children (Linux /proc)."""
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(entry.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))  # ppid, ticks
    tree, ticks = set(pids), 0
    for _ in range(3):  # children and grandchildren (billing's uvicorn workers)
        tree |= {pid for pid, (ppid, _) in stats.items() if ppid in tree}
    ticks = sum(stats[pid][1] for pid in tree if pid in stats)
    return ticks / os.sysconf("SC_CLK_TCK")


def cluster_pid(cluster) -> int:
    """The postmaster's pid (its backends are its children)."""
    return int((Path(cluster.data) / "postmaster.pid").read_text().split()[0])


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) / 1024


def measure(url: str, script: Path, clients: int, seconds: float, pids: tuple[int, ...]) -> tuple[float, ...]:
    """wrk's (req/s, p50, p99) and CPU milliseconds per request of each of `pids` (with children)."""
    before = [cpu_seconds(pid) for pid in pids]
    rps, p50, p99, _ = wrk(url, script, clients, seconds, "")
    n = max(rps * int(seconds), 1)
    return (rps, p50, p99, *((cpu_seconds(pid) - b) * 1000 / n for pid, b in zip(pids, before)))


def owed(url: str) -> float:
    """Journal entries the proxy has not settled with billing (its ciris_proxy_owed gauges)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("ciris_proxy_owed{"))


INTERACTION_CALLS = 20  # an agent interaction's calls (the CIRIS agent makes 12-70)


async def interaction_latencies(url: str, tokens: list[str], clients: int, interactions: int,
                                agent: bool) -> tuple[list[float], list[float]]:
    """Milliseconds of each interaction's first call and of its follow-ups, `clients` at a time
    (the first is always sent first). `agent`: with a metadata.interaction_id, as the agent sends."""
    firsts, follow_ups = [], []
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=clients)) as c:
        for i in range(interactions):
            body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
            if agent:
                body["metadata"] = {"interaction_id": f"bench-{uuid.uuid4()}"}
            headers = {"Authorization": f"Bearer {tokens[i % len(tokens)]}"}
            gate = asyncio.Semaphore(clients)

            async def call(k: int) -> None:
                async with gate:
                    started = time.perf_counter()
                    r = await c.post("/v1/chat/completions", json=body, headers=headers)
                    (firsts if k == 0 else follow_ups).append((time.perf_counter() - started) * 1000)
                    if r.status_code != 200:
                        raise RuntimeError(f"an interaction's call answered HTTP {r.status_code}")

            await asyncio.gather(*(call(k) for k in range(INTERACTION_CALLS)))
    return firsts, follow_ups


def interaction_added(direct: tuple[str, list[str]], bare: tuple[str, list[str]], bridge: tuple[str, list[str]],
                      clients: int, interactions: int) -> tuple[float, float, float]:
    """The median ms a first call and a follow-up call add over a direct call at this concurrency, and
    what a follow-up adds over the same calls through bare LiteLLM (the router without our gate:
    what auth, the window's bookkeeping and the charge cost a follow-up)."""
    d_first, d_rest = asyncio.run(interaction_latencies(*direct, clients, interactions, agent=False))
    l_first, l_rest = asyncio.run(interaction_latencies(*bare, clients, interactions, agent=False))
    b_first, b_rest = asyncio.run(interaction_latencies(*bridge, clients, interactions, agent=True))
    base = statistics.median(d_first + d_rest)
    return (statistics.median(b_first) - base, statistics.median(b_rest) - base,
            statistics.median(b_rest) - statistics.median(l_first + l_rest))


def main() -> int:
    # The proxy itself no longer needs LiteLLM's proxy server; its baseline here does.
    if subprocess.run([sys.executable, "-c", "import litellm.proxy.proxy_server"], capture_output=True,
                      env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}).returncode:
        print("bench/proxy: the baseline needs LiteLLM's proxy server: pip install 'litellm[proxy]==1.106.2'", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5, help="per target and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--interactions", type=int, default=30, help="agent interactions of 20 calls, per concurrency")
    args = parser.parse_args()
    root, tls = workspace()
    cluster = init_primary(root, tls[PRIMARY_ADDR], replicas=())
    work = Path(tempfile.mkdtemp(prefix="ciris-bench-proxy-"))
    upstream = Upstream("together", work / "upstream.log")
    billing = Billing({**os.environ, "DATABASE_URL": database_url(cluster), "BILLING_JWT_PRIVATE_KEY": KEY_PEM,
                       "STRIPE_SECRET_KEY": "sk_test_bench", "STRIPE_WEBHOOK_SECRET": "whsec_bench", "HOST": "127.0.0.1",
                       "PORT": str(free_port()), "WORKERS": "2"}, work / "billing.log")
    started = []
    try:
        billing.start()
        seed(database_url(cluster), args.users)
        users = [f"00000000-0000-0000-0000-{n:012d}" for n in range(1, args.users + 1)]
        ups = {"together": upstream}
        # Stand-in caps above what the outage phase can spend (users hold 10^9 cents each).
        env = {**proxy_env(billing.url, ups, work / "captures.jsonl"), "STANDIN_USER_CAP_CENTS": "1000000",
               "STANDIN_INSTANCE_CAP_CENTS": "100000000"}
        bridge = Proxy(env, work / "bridge.log")
        started.append(bridge)
        bridge.start()
        started.append(BareLiteLLM(env, work))
        bare = started[-1]
        targets = {
            "direct": (upstream.url, lua(work / "direct.lua", ["upstream"]), ()),
            "bare": (bare.url, lua(work / "bare.lua", [MASTER_KEY]), (bare.proc.pid,)),
            "bridge": (bridge.url, lua(work / "bridge.lua", [mint("user", u, exp=int(time.time()) + 86_400) for u in users]),
                       (bridge.proc.pid, billing.proc.pid, cluster_pid(cluster))),
        }
        for url, script, _ in targets.values():  # warm up: LiteLLM loads its tokenizer and clients on first use
            wrk(url, script, 2, 3, "")
        results = {}
        for c in args.clients:
            rounds = [{name: measure(url, script, c, args.seconds, pid) for name, (url, script, pid) in targets.items()}
                      for _ in range(args.rounds)]
            results[c] = {name: tuple(statistics.median(r[name][i] for r in rounds) for i in range(len(rounds[0][name])))
                          for name in targets}
        rss = f"RSS bare {rss_mb(bare.proc.pid):.0f} MB, bridge {rss_mb(bridge.proc.pid):.0f} MB"
        tokens = [mint("user", u, exp=int(time.time()) + 86_400) for u in users]
        interaction = {c: interaction_added((upstream.url, ["upstream"]), (bare.url, [MASTER_KEY]), (bridge.url, tokens), c,
                                            args.interactions) for c in args.clients}
        url, script, _ = targets["bridge"]
        billing.stop()
        outage = {c: measure(url, script, c, args.seconds, (bridge.proc.pid,)) for c in args.clients}
        advices = owed(bridge.url)
        billing.start()
        deadline = time.time() + 120
        while owed(bridge.url) and time.time() < deadline:
            time.sleep(0.5)
        left = owed(bridge.url)
    finally:
        for proxy in started:
            proxy.stop()
        billing.stop()
        upstream.proc.terminate()
        cluster.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    parts = [f"medians of {args.rounds} rounds"]
    for c, r in results.items():
        (d_rps, d50, d99), (b_rps, b50, b99, b_cpu) = r["direct"], r["bare"]
        g_rps, g50, g99, g_cpu, billing_cpu, pg_cpu = r["bridge"]
        parts.append(
            f"c={c} direct {d_rps:.0f}/s p50 {d50:.1f} ms p99 {d99:.1f} ms, bare {b_rps:.0f}/s +{b50 - d50:.1f}/+{b99 - d99:.1f} ms "
            f"{b_cpu:.1f} ms CPU/req, bridge {g_rps:.0f}/s +{g50 - d50:.1f}/+{g99 - d99:.1f} ms {g_cpu:.1f} ms CPU/req "
            f"(+ billing {billing_cpu:.1f}, PostgreSQL {pg_cpu:.1f}) (p50/p99 added), bridge/bare {g_rps / b_rps:.2f} "
            f"in throughput, {g_cpu / b_cpu:.2f} in proxy CPU/req, bare/direct {b_rps / d_rps:.2f}")
    agent = ", ".join(f"c={c} first +{first:.1f} ms, follow-up +{rest:.1f} ms ({over_bare:+.1f} ms over bare)"
                      for c, (first, rest, over_bare) in interaction.items())
    print("proxy chat completion: " + " | ".join(parts) + f" | {rss} | agent interaction of {INTERACTION_CALLS} calls "
          f"(median added over direct; a follow-up over bare LiteLLM's same calls): {agent}")
    parts = []
    for c, (o_rps, o50, o99, o_cpu) in outage.items():
        g_rps, g50, g99, g_cpu = results[c]["bridge"][:4]
        parts.append(f"c={c} stand-in {o_rps:.0f}/s p50 {o50:.1f} ms p99 {o99:.1f} ms {o_cpu:.1f} ms CPU/req, normal "
                     f"{g_rps:.0f}/s p50 {g50:.1f} ms p99 {g99:.1f} ms, stand-in/normal {o_rps / g_rps:.2f} in throughput, "
                     f"{o50 - g50:+.1f}/{o99 - g99:+.1f} ms p50/p99")
    print("proxy during a billing outage: " + " | ".join(parts) + f" | {advices:.0f} advices journaled, "
          f"{advices - left:.0f} debited within 2 min of billing's return")
    return 0


if __name__ == "__main__":
    sys.exit(main())
