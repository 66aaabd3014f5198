"""python -m ops status <stack> [--outputs FILE] [--json]
   (also: python -m ops release|rollback <stack>, pin-base [<tag>]: ops/releases.py; python -m ops ship, ops/ship.py)

One table of the bridge's state as seen from here: both nameservers for both zones (and whether
their serials agree), every region's billing and proxy readiness through its edge, certificate days
left, what each host's Prometheus has firing, the live database leader and its replication, a proxy
standing in for billing, the declared database layout and the cost estimate. Exit 0 all ok, 1 a warning, 2 critical,
3 the stack's outputs could not be read. <stack>: `local` (what `make local` runs), or a Pulumi
stack (`production`, `staging`: read with `pulumi stack output --json`)."""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor

from ops import checks, monitoring, outputs


def status(stack: outputs.Stack, ssh_identity: str | None = None) -> list[checks.Row]:
    config = stack.outputs["client_config"]
    with ThreadPoolExecutor(max_workers=4) as pool:  # a dead region costs its timeouts once, not per row
        parts = [pool.submit(checks.dns_rows, config), pool.submit(checks.edge_rows, config, stack.ca_file),
                 pool.submit(monitoring.rows, stack.outputs, ssh_identity)]
        dns, edges, monitored = (part.result() for part in parts)
    return dns + edges + checks.database_rows(stack.outputs) + monitored + checks.cost_rows(stack.outputs)


def table(rows: list[checks.Row]) -> str:
    widths = [max(len(getattr(r, f)) for r in rows) for f in ("check", "target", "verdict")]
    return "\n".join(f"{r.check:<{widths[0]}}  {r.target:<{widths[1]}}  {r.verdict.upper():<{widths[2]}}  {r.detail}"
                     for r in rows)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["ship"]:
        from ops import ship
        return ship.main(argv[1:])
    if argv[:1] in (["release"], ["rollback"], ["pin-base"]):
        from ops import releases
        return releases.main(argv)
    parser = argparse.ArgumentParser(prog="python -m ops", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    st = sub.add_parser("status", help="check the bridge from this machine")
    st.add_argument("stack", help="local, or a Pulumi stack name")
    st.add_argument("--outputs", help="a saved `pulumi stack output --json` file instead of asking pulumi")
    st.add_argument("--json", action="store_true", help="rows and the verdict as JSON")
    st.add_argument("--ssh-identity", metavar="FILE", help="the SSH key for the hosts' deploy user (default: your "
                    "ssh-agent and ~/.ssh/config); each host's Prometheus is reached through an SSH tunnel")
    args = parser.parse_args(argv)
    try:
        stack = outputs.load(args.stack, args.outputs)
    except outputs.OutputsError as e:
        print(f"ops: {e}", file=sys.stderr)
        return 3
    rows = status(stack, args.ssh_identity)
    verdict = checks.worst(rows)
    if args.json:
        print(json.dumps({"stack": stack.name, "verdict": verdict, "rows": [r.as_dict() for r in rows]}, indent=2))
    else:
        print(table(rows))
        print(f"\n{stack.name}: {verdict.upper()} ({len(rows)} checks)")
    return checks.SEVERITY[verdict]


if __name__ == "__main__":
    sys.exit(main())
