"""What a deploy costs on the local stack (`make local` first): the time of a deploy that changes
nothing, one that ships changed billing and proxy code (a new release whose two images differ), and
the rollback to the release before it, each under continuous paid traffic through every region's own
edge (half the completions streamed, billing's health between them); and the requests that failed
during each (the goal: 0; ADR 16). A figure, not a test.

    .venv/bin/python -m bench.deploy

One summary line: seconds per deploy and failed/answered requests for each.
"""

from __future__ import annotations

import json
import os
import ssl
import sys
import time
import uuid

from components import local
from tests.e2e.conftest import LOCAL, Stack, engine_env
from tests.e2e.traffic import paying_user, traffic


def timed(stack: Stack, action) -> tuple[float, int, int]:
    starts = {r["name"]: paying_user(stack, r) for r in stack.regions}
    with traffic(stack, {name: (u, t) for name, (u, t, _) in starts.items()}) as flows:
        t = time.monotonic()
        action()
        took = time.monotonic() - t
    for name, flow in flows.items():
        for failure in flow.failed[:5]:
            print(f"bench.deploy: {name}: {failure}", file=sys.stderr)
    return took, sum(len(f.failed) for f in flows.values()), sum(f.paid + f.ok for f in flows.values())


def main() -> int:
    if not (LOCAL / "client_config.json").exists():
        print("bench.deploy: the local stack is not up (run `make local` first)", file=sys.stderr)
        return 2
    env = engine_env()
    os.environ.update(env)  # the engine, as make local runs it
    stack = Stack(env, json.loads((LOCAL / "client_config.json").read_text()),
                  (LOCAL / "admin.token").read_text().strip(), json.loads((LOCAL / "secrets.json").read_text()),
                  ssl.create_default_context(cafile=str(LOCAL / "ca.crt")))
    local.up()  # what is there now, as the baseline release
    marker = uuid.uuid4().hex[:12]
    figures = {
        "no-change": timed(stack, lambda: local.up()),
        "code-change": timed(stack, lambda: local.up(labels={"billing": {"bench": marker}, "proxy": {"bench": marker}})),
        "rollback": timed(stack, lambda: local.rollback()),
    }
    print("deploy (local stack, paid traffic through both edges): " + ", ".join(
        f"{name} {took:.0f} s, {failed} failed of {answered}" for name, (took, failed, answered) in figures.items()))
    return 0 if all(failed == 0 for _, failed, _ in figures.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
