"""python -m ops ship USER@HOST --host-key KEY [--port N] [--identity FILE] < release.images

Sends a release's images to a host over SSH, only those it lacks (ADR 10): asks the host which
image ids it has, streams `docker save` of the others into `docker load` there, then checks that
every image is there under its id. Run by `pulumi up` before a host's deploy (its `<host>-images`
command), from the operator's machine where the release was built; hosts pull nothing.

Standard input: the release's manifest, `<ref> <image id>` per line (components/release.py).
The host key is pinned (from the stack), never learned on first use.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile


class ShipError(RuntimeError):
    pass


def ssh_argv(target: str, host_key: str, port: int, identity: str | None, known: str) -> list[str]:
    host = target.split("@", 1)[-1]
    with open(known, "w") as f:
        f.write(f"[{host}]:{port} {host_key}\n" if port != 22 else f"{host} {host_key}\n")
    return ["ssh", "-p", str(port), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={known}", "-o", "ConnectTimeout=10",
            *(["-i", identity, "-o", "IdentitiesOnly=yes"] if identity else []), target]


def missing(ssh: list[str], docker: str, images: dict[str, str]) -> list[str]:
    """The refs whose image (by id) the host does not have under that name."""
    script = "".join(f"{docker} image inspect --format '{{{{.Id}}}}' {shlex.quote(ref)} 2>/dev/null || echo none\n"
                     for ref in images)
    out = subprocess.run([*ssh, "sh", "-c", shlex.quote(script)], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise ShipError(f"asking the host for its images failed: {out.stderr.strip()[-300:]}")
    have = [h.removeprefix("sha256:") for h in out.stdout.split()]  # Podman's CLI prints ids without it
    return [ref for (ref, image), seen in zip(images.items(), have) if seen != image.removeprefix("sha256:")]


def ship(ssh: list[str], docker: str, images: dict[str, str], env: dict[str, str] | None = None,
         say=lambda line: print(line, file=sys.stderr, flush=True)) -> list[str]:
    """Send what the host lacks; returns the refs sent."""
    lacking = missing(ssh, docker, images)
    if lacking:
        say(f"ship: sending {len(lacking)} of {len(images)} images: {', '.join(lacking)}")
        send(ssh, docker, lacking, env)
    still = missing(ssh, docker, images)
    if still:
        raise ShipError(f"the host still lacks {', '.join(still)} after loading them")
    say(f"ship: the host has all {len(images)} images of the release")
    return lacking


def send(ssh: list[str], docker: str, refs: list[str], env: dict[str, str] | None) -> None:
    """docker save | gzip | ssh host 'gzip -d | docker load'. Each pipe end is held by one process
    only, so a side that fails ends the others instead of leaving them blocked."""
    save = subprocess.Popen(["docker", "save", *refs], stdout=subprocess.PIPE, env=env)
    gz = subprocess.Popen(["gzip", "-1", "-c"], stdin=save.stdout, stdout=subprocess.PIPE)
    save.stdout.close()
    load = subprocess.Popen([*ssh, f"gzip -d | {docker} load -q"], stdin=gz.stdout, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    gz.stdout.close()
    try:
        _, err = load.communicate(timeout=3600)
    finally:
        for p in (load, gz, save):
            if p.poll() is None and load.returncode != 0:
                p.kill()
            p.wait()
    if load.returncode != 0 or save.returncode != 0:
        raise ShipError(f"sending the images failed (docker save exit {save.returncode}, load exit {load.returncode}): "
                        f"{err.decode(errors='replace').strip()[-300:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ops ship", description=__doc__.split("\n\n")[0])
    parser.add_argument("target", help="user@host")
    parser.add_argument("--host-key", required=True, help="the host's public key line (the stack pins it)")
    parser.add_argument("--port", type=int, default=22)
    parser.add_argument("--identity", help="SSH private key file (default: CIRIS_SSH_KEY's key, else your agent)")
    parser.add_argument("--docker", default="sudo docker", help="the container CLI on the host")
    args = parser.parse_args(argv)
    images = dict(line.split() for line in sys.stdin.read().splitlines() if line.strip())
    if not images:
        print("ship: no images on standard input (a release manifest: <ref> <id> per line)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="ciris-ship-") as tmp:
        identity = args.identity
        if not identity and os.environ.get("CIRIS_SSH_KEY"):  # the stack's deploy key, handed over by Pulumi
            identity = os.path.join(tmp, "key")
            with open(os.open(identity, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
                f.write(os.environ["CIRIS_SSH_KEY"].strip() + "\n")
        ssh = ssh_argv(args.target, args.host_key, args.port, identity, os.path.join(tmp, "known_hosts"))
        try:
            ship(ssh, args.docker, images)
        except (ShipError, subprocess.TimeoutExpired) as e:
            print(f"ship: {args.target}: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
