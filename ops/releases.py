"""python -m ops release <stack>     build every image once, make it the stack's current release
   python -m ops rollback <stack>    make the release before the current one current again
   python -m ops pin-base [<tag>]    pin the base image (default debian:bookworm-slim) by its digest now

Then `pulumi up` ships the current release's images to the hosts that lack them and deploys it
(ADR 10). The stack's releases file is `releases/<stack>.json`: commit it with the change it ships.
Under `make local` the same two steps are `python -m components.local up` and `... rollback`.
Every release builds on the base image pinned in `releases/base-image` (by digest: a new upstream
build of the tag changes nothing until `pin-base` runs again); commit it too.
"""

from __future__ import annotations

import argparse
import sys

from components import release

ROOT = release.ROOT


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ops", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["release", "rollback", "pin-base"])
    parser.add_argument("stack", nargs="?", help="production, staging (a Pulumi stack); for pin-base: the tag to pin")
    parser.add_argument("--base", help="the base image every payload builds on, by digest (default: releases/base-image)")
    args = parser.parse_args(argv)
    if args.command == "pin-base":
        try:
            ref = release.pin_base(args.stack or "debian:bookworm-slim", release.build_env())
        except release.ReleaseError as e:
            print(f"ops: {e}", file=sys.stderr)
            return 1
        print(f"base image: {ref} ({release.BASE_PIN.relative_to(ROOT)}; commit it)")
        return 0
    if not args.stack:
        parser.error(f"{args.command} needs a stack (production, staging)")
    path = ROOT / "releases" / f"{args.stack}.json"
    try:
        history = release.History.load(path)
        if args.command == "release":
            base = release.pinned(args.base) if args.base else release.pinned_base()
            made = release.build(release.PRODUCTION_PAYLOADS, release.build_env(), base=base)
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
