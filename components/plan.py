"""Offline plan: the real program under Pulumi's mock runtime -- no cloud account, no Pulumi CLI.

    python -m components.plan <stack> [--json] [--stack-file PATH] [--out DIR]

Prints the resource tree by component, each host's firewall matrix, the cost table, what the
database does when a region is lost (automatic with a witness; say so when there is none), and the
stack outputs (or, with --json, one object with all of them). Secrets show as "[secret]".
Invalid config: exit status 2 and one message on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import pulumi
from pulumi.runtime.sync_await import _sync_await

from components import bridge, config, cost, firewall
from components import mocks
from components.mocks import Registration, scrub
from components.services import ContainerSpec

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Plan:
    stack: str
    registrations: list[Registration]
    outputs: dict[str, Any]  # resolved; secret outputs as "[secret]"
    secret_outputs: set[str]
    estimate: cost.Estimate
    artifacts: dict[str, str]
    containers: dict[str, list[ContainerSpec]]
    failover: str = ""  # what the database does when a region is lost (bridge.Bridge.failover)

    def resources(self) -> list[dict]:
        names = {r.urn: r.name for r in self.registrations}
        return [
            {"type": r.type, "name": r.name, "parent": names.get(r.parent or ""), "inputs": scrub(r.inputs)}
            for r in sorted(self.registrations, key=lambda r: (names.get(r.parent or "") or "", r.name))
        ]

    def firewall_matrix(self) -> dict[str, list[tuple[str, int, str]]]:
        """Host name (a region, the witness) -> sorted (protocol, port, source) openings, from the
        provider rules declared."""
        names = {r.urn: r.name for r in self.registrations}
        matrix: dict[str, set] = defaultdict(set)
        for r in self.registrations:
            for rule in firewall.normalize(r.type, r.inputs):
                matrix[names[r.parent]].add(rule)
        return {region: sorted(rules, key=lambda x: (x[1], x[0], x[2])) for region, rules in matrix.items()}

    def as_json(self) -> dict:
        return {"stack": self.stack, "resources": self.resources(), "outputs": self.outputs, "cost": self.estimate.as_output()}


def run(stack: str, raw: Mapping[str, Any], secret_keys: set[str]) -> Plan:
    """Run the program for a flat config map, as the engine would hand it over."""
    monitor = mocks.install(stack, dict(raw), set(secret_keys))

    built: dict[str, Any] = {}
    resolved: dict[str, Any] = {}

    @pulumi.runtime.test
    def program():
        cfg = config.from_engine()
        built["bridge"] = b = bridge.build(cfg)
        built["outputs"] = outs = {k: pulumi.Output.from_input(v) for k, v in b.outputs.items()}
        return pulumi.Output.all(pulumi.Output.all(**outs), b.artifacts).apply(
            lambda a: resolved.update(outputs=a[0], artifacts=a[1])
        )

    program()
    b = built["bridge"]
    secret_outputs = {k for k, o in built["outputs"].items() if _sync_await(o.is_secret())}
    outputs = {k: "[secret]" if k in secret_outputs else v for k, v in resolved["outputs"].items()}
    containers = {n.spec.name: n.containers for n in b.nodes}
    return Plan(stack, monitor.registrations, outputs, secret_outputs, b.estimate, resolved["artifacts"], containers,
                b.failover)


def run_stack_file(stack: str, path: str | Path) -> Plan:
    raw, secret_keys = config.read_stack_file(path)
    config.parse(raw, secret_keys)  # fail with the one clear message before anything is declared
    return run(stack, raw, secret_keys)


def render_text(plan: Plan) -> str:
    out = [f"Offline plan of stack '{plan.stack}' (mock runtime; addresses are documentation ranges)", ""]
    out.append("Resources by component:")
    children: dict[str | None, list[Registration]] = defaultdict(list)
    urns = {r.urn for r in plan.registrations}
    for r in plan.registrations:
        children[r.parent if r.parent in urns else None].append(r)

    def tree(parent: str | None, depth: int) -> None:
        for r in sorted(children.get(parent, []), key=lambda r: r.name):
            out.append(f"{'  ' * (depth + 1)}{r.name}  [{r.type}]")
            tree(r.urn, depth + 1)

    tree(None, 0)
    out += ["", "Firewall (inbound openings; everything else is dropped):"]
    for region, rules in plan.firewall_matrix().items():
        out.append(f"  {region}:")
        for proto, port, src in rules:
            out.append(f"    {port:>5}/{proto:<3}  from {src}")
    out += ["", "Service containers:"]
    for region, specs in plan.containers.items():
        if not specs:
            out.append(f"  {region}/(none yet)")
        for spec in specs:
            ports = f"  publishes {', '.join(spec.ports)}" if spec.ports else ""
            out.append(f"  {region}/{spec.name:<9} {spec.image:<34}{ports}")
    out += ["", f"Monthly cost (prices as of {cost.PRICES_AS_OF}):"]
    for item in plan.estimate.items:
        out.append(f"  {item.item:<52} ${cost.usd(item.cents):>7.2f}")
    est = plan.estimate
    out.append(
        f"  {'total':<52} ${cost.usd(est.total_cents):>7.2f}   "
        f"(target ${cost.usd(est.target_cents):.2f}, hard ceiling ${cost.usd(est.ceiling_cents):.2f})"
    )
    if est.witness_cents:
        out.append(f"  {'total without the witness':<52} ${cost.usd(est.total_cents - est.witness_cents):>7.2f}")
    out += ["", "Database failover:", f"  {plan.failover}"]
    out += ["", "Stack outputs:", json.dumps(plan.outputs, indent=2)]
    return "\n".join(out)


def write_artifacts(plan: Plan, out_dir: Path) -> list[Path]:
    written = []
    for rel, text in sorted(plan.artifacts.items()):
        path = out_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m components.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("stack", help="stack name, e.g. staging or production")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--stack-file", type=Path, help="plan this config file instead of Pulumi.<stack>.yaml")
    parser.add_argument("--out", type=Path, help="write the rendered artifacts (cloud-init, Caddyfile...) here")
    args = parser.parse_args(argv)

    stack_file = args.stack_file or ROOT / f"Pulumi.{args.stack}.yaml"
    try:
        plan = run_stack_file(args.stack, stack_file)
    except config.ConfigError as e:
        print(f"invalid config: {e}", file=sys.stderr)
        return 2
    if args.out:
        for path in write_artifacts(plan, args.out):
            print(f"wrote {path}", file=sys.stderr)
    print(json.dumps(plan.as_json(), indent=2) if args.json else render_text(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
