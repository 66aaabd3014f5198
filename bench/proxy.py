"""Requests/second and p50/p99 latency of a non-streamed chat completion, in one run, on the same fake
upstream: direct to the upstream, through a bare LiteLLM proxy (same models, no gate), and through
the bridge proxy (billing token check + hold + capture, billing on real PostgreSQL). A figure, not a
test.

    .venv/bin/python -m bench.proxy [--seconds 10] [--users 100]

Load comes from wrk (Debian package `wrk`); bridge requests rotate over `--users` users (billing
serialises one user's holds). Everything shares this machine's 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.billing import seed, wrk
from tests.billing.conftest import KEY_PEM, Billing, database_url
from tests.billing.conftest import token as mint
from tests.postgres.conftest import PRIMARY_ADDR, free_port, init_primary, workspace
from tests.proxy.conftest import MASTER_KEY, MODEL, Proxy, Upstream, proxy_env

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16])
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
        bridge = Proxy(proxy_env(billing.url, ups, work / "captures.jsonl"), work / "bridge.log")
        bare = Proxy(proxy_env(billing.url, ups, work / "bare.jsonl"), work / "bare.log")
        for proxy, extra in ((bridge, ()), (bare, ("--bare",))):
            started.append(proxy)
            proxy.start(*extra)
        targets = {
            "direct": (upstream.url, lua(work / "direct.lua", ["upstream"])),
            "bare": (bare.url, lua(work / "bare.lua", [MASTER_KEY])),
            "bridge": (bridge.url, lua(work / "bridge.lua", [mint("user", u, exp=int(time.time()) + 86_400) for u in users])),
        }
        for url, script in targets.values():  # warm up: LiteLLM loads its tokenizer and clients on first use
            wrk(url, script, 2, 3, "")
        results = {c: {name: wrk(url, script, c, args.seconds, "") for name, (url, script) in targets.items()}
                   for c in args.clients}
    finally:
        for proxy in started:
            proxy.stop()
        billing.stop()
        upstream.proc.terminate()
        cluster.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    parts = []
    for c, r in results.items():
        (d_rps, d50, d99), (b_rps, b50, b99), (g_rps, g50, g99) = r["direct"], r["bare"], r["bridge"]
        parts.append(
            f"c={c} direct {d_rps:.0f}/s p50 {d50:.1f} ms p99 {d99:.1f} ms, bare {b_rps:.0f}/s +{b50 - d50:.1f}/+{b99 - d99:.1f} ms, "
            f"bridge {g_rps:.0f}/s +{g50 - d50:.1f}/+{g99 - d99:.1f} ms (p50/p99 added), "
            f"bridge/bare {g_rps / b_rps:.2f}, bare/direct {b_rps / d_rps:.2f}")
    print("proxy chat completion: " + " | ".join(parts))


if __name__ == "__main__":
    sys.exit(main())
