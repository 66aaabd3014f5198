"""python -m ops release <stack>     build every image once, make it the stack's current release
   python -m ops rollback <stack>    make the release before the current one current again

Then `pulumi up` ships the current release's images to the hosts that lack them and deploys it
(ADR 10). The stack's releases file is `releases/<stack>.json`: commit it with the change it ships.
Under `make local` the same two steps are `python -m components.local up` and `... rollback`.
"""

from __future__ import annotations

import argparse
import sys

from components import release

ROOT = release.ROOT


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ops", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["release", "rollback"])
    parser.add_argument("stack", help="production, staging (a Pulumi stack)")
    parser.add_argument("--base", default="debian:bookworm-slim", help="the base image every payload builds on")
    args = parser.parse_args(argv)
    path = ROOT / "releases" / f"{args.stack}.json"
    try:
        history = release.History.load(path)
        if args.command == "release":
            made = release.build(release.PRODUCTION_PAYLOADS, release.build_env(), base=args.base)
            history.add(made)
        else:
            made = history.previous()
            history.current = made.id
        history.save(path)
    except release.ReleaseError as e:
        print(f"ops: {e}", file=sys.stderr)
        return 1
    print(f"{args.stack}: release {made.id} is current ({path.relative_to(ROOT)}); now run `pulumi up -s {args.stack}`")
    return 0
