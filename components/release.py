"""A release: every payload image built once, from the locked inputs, and named by its content digest
(the image id); every host runs exactly those images (ADR 10).

The images are built where the operator runs `pulumi up` (python -m ops release build <stack>) or,
for `make local`, on this machine; hosts never build and reach neither PyPI nor Debian for a deploy.
A stack's releases file (`releases/<environment>.json`; `local/releases.json` for `make local`)
keeps every release built for it and which one is current: the program deploys the current one,
and a rollback makes the one before it current again (python -m ops rollback <stack>).

    {"current": "<id>", "releases": [{"id": "<id>", "built": "<UTC time>", "images": {"billing": "sha256:..."}}]}
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterable

from pydantic import BaseModel, ConfigDict, Field

ROOT = Path(__file__).resolve().parent.parent
PAYLOADS = ROOT / "payloads"
# What a stack's hosts run; fake-llm only under `make local`.
PRODUCTION_PAYLOADS = ("billing", "dns", "edge", "etcd", "monitoring", "postgres", "proxy")
LOCAL_PAYLOADS = (*PRODUCTION_PAYLOADS, "fake-llm")
KEEP = 3  # releases whose images a host keeps (the current one and two to roll back to)
_ID = r"^sha256:[0-9a-f]{64}$"
# The base image every production payload builds on, pinned by digest (python -m ops pin-base):
# an upstream rebuild of the tag changes nothing until an operator pins it again and commits it.
BASE_PIN = ROOT / "releases" / "base-image"
_PINNED = re.compile(r"^[^@\s]+@sha256:[0-9a-f]{64}$")


class ReleaseError(RuntimeError):
    pass


class Release(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(pattern=r"^[0-9a-f]{12}$")
    built: str = ""
    images: dict[str, str] = Field(min_length=1)  # payload -> image id

    def ref(self, payload: str) -> str:
        """The name the hosts know the payload's image by: its id in the tag."""
        try:
            image = self.images[payload]
        except KeyError:
            raise ReleaseError(f"release {self.id} has no image for the payload {payload!r} "
                               f"(it has {', '.join(sorted(self.images))})") from None
        return f"localhost/ciris-{payload}:{image.removeprefix('sha256:')[:16]}"

    def manifest(self) -> str:
        """`<ref> <id>` per line: what the deploy script checks on the host before it starts anything."""
        return "".join(f"{self.ref(p)} {i}\n" for p, i in sorted(self.images.items()))


def release_id(images: dict[str, str]) -> str:
    return hashlib.sha256("".join(f"{p}={i}\n" for p, i in sorted(images.items())).encode()).hexdigest()[:12]


class History(BaseModel):
    model_config = ConfigDict(extra="forbid")

    current: str | None = None
    releases: list[Release] = []

    @classmethod
    def load(cls, path: Path) -> "History":
        if not path.exists():
            return cls()
        try:
            return cls.model_validate_json(path.read_text())
        except ValueError as e:
            raise ReleaseError(f"{path}: not a releases file ({e})") from None

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.model_dump_json(indent=2) + "\n")
        tmp.replace(path)

    def get(self, rid: str | None) -> Release | None:
        return next((r for r in self.releases if r.id == rid), None)

    def add(self, release: Release) -> None:
        """Make `release` current (kept once, at the end: the newest last)."""
        self.releases = [r for r in self.releases if r.id != release.id] + [release]
        self.current = release.id

    def previous(self) -> Release:
        """The release built before the current one: what a rollback deploys."""
        ids = [r.id for r in self.releases]
        if self.current not in ids or ids.index(self.current) == 0:
            raise ReleaseError(f"no release before {self.current or 'the current one'} to roll back to "
                               f"(releases: {', '.join(ids) or 'none'})")
        return self.releases[ids.index(self.current) - 1]


def _run(argv: list[str], env: dict[str, str]) -> str:
    out = subprocess.run(argv, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise ReleaseError(f"{' '.join(argv[:3])} … failed (exit {out.returncode}):\n{out.stdout[-2000:]}{out.stderr[-3000:]}")
    return out.stdout


def build(payloads: Iterable[str], env: dict[str, str], *, base: str | None = None, cold: bool = False,
          labels: dict[str, dict[str, str]] | None = None, say: Callable[[str], None] | None = None) -> Release:
    """Build each payload's image once (docker, or Podman behind its API) and tag it by its id.
    `base`: the base image (a local one is never pulled); `cold`: reuse no cached layer, as a
    fresh machine builds; `labels`: payload -> labels added to its image (a test ships "changed
    code" this way)."""
    say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    payloads = list(payloads)
    images: dict[str, str] = {}
    started = time.monotonic()
    base_id = ensure_base(base, env) if base else ""
    for n, payload in enumerate(payloads, 1):
        # What the image is made of: its payload's files, the base, the labels. An image made of
        # the same is not built again (so a release with no change is the release already running).
        source = source_digest(payload, base_id or base or "", (labels or {}).get(payload, {}))
        made = f"ciris-{payload}:src-{source}"
        if not cold and (have := subprocess.run(["docker", "image", "inspect", "--format", "{{.Id}}", made], env=env,
                                                capture_output=True, text=True)).returncode == 0:
            images[payload] = have.stdout.strip()
            say(f"release: {payload} unchanged ({images[payload][:19]}…) ({n}/{len(payloads)})")
            continue
        argv = ["docker", "build", "-q", "-t", made, "--pull=false"]
        if base:
            argv += ["--build-arg", f"BASE={base}"]
        if env.get("EXTRA_CA_CERTS"):
            argv += ["--build-arg", "EXTRA_CA_CERTS"]
        if cold:
            argv.append("--no-cache")
        argv += [f"--label=ciris.release.{k}={v}" for k, v in (labels or {}).get(payload, {}).items()]
        t = time.monotonic()
        say(f"release: building {payload} ({n}/{len(payloads)}){' from a cold cache' if cold else ''} ...")
        with Heartbeat(lambda: f"release: still building {payload} ({time.monotonic() - t:.0f} s; "
                                f"{time.monotonic() - started:.0f} s in all)", say):
            image = _run([*argv, str(PAYLOADS / payload)], env).strip().splitlines()[-1].strip()
        if not image.startswith("sha256:"):
            image = _run(["docker", "image", "inspect", "--format", "{{.Id}}", image], env).strip()
        images[payload] = image
        say(f"release: {payload} built in {time.monotonic() - t:.0f} s ({image[:19]}…)")
    release = Release(id=release_id(images), images=images,
                      built=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
    for payload in payloads:
        _run(["docker", "tag", images[payload], release.ref(payload)], env)
    say(f"release: {release.id} ({len(payloads)} images, {time.monotonic() - started:.0f} s)")
    return release


def pinned(ref: str) -> str:
    if not _PINNED.match(ref):
        raise ReleaseError(f"the base image {ref!r} is not pinned by digest (name@sha256:<64 hex digits>): "
                           "run `python -m ops pin-base` and commit releases/base-image")
    return ref


def pinned_base(path: Path = BASE_PIN) -> str:
    """The committed base image (its last line; lines starting with # say where it came from)."""
    if not path.exists():
        raise ReleaseError(f"{path} is missing: run `python -m ops pin-base` once and commit it")
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return pinned(lines[-1] if lines else "")


def pin_base(tag: str, env: dict[str, str], path: Path = BASE_PIN) -> str:
    """Pull `tag` and write the digest it names now to `path`: the one place a release reaches a registry."""
    _run(["docker", "pull", tag], env)
    name = tag.rsplit(":", 1)[0] if ":" in tag.rsplit("/", 1)[-1] else tag
    digests = json.loads(_run(["docker", "image", "inspect", "--format", "{{json .RepoDigests}}", tag], env) or "[]")
    ours = [f"{name}@{d.split('@')[1]}" for d in digests or [] if _repository(d.split("@")[0]) == _repository(name)]
    # Podman also lists the digest of its own local copy's manifest, which no registry has: the
    # pin is the first digest the registry serves.
    served = [ref for ref in dict.fromkeys(ours)
              if subprocess.run(["docker", "pull", ref], env=env, capture_output=True).returncode == 0]
    if not served:
        raise ReleaseError(f"{tag}: its registry serves none of its digests {digests}: was it built here rather than pulled?")
    ref = pinned(served[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    path.write_text(f"# {tag} as pulled on {stamp} (python -m ops pin-base {tag})\n{ref}\n")
    return ref


def _repository(name: str) -> str:
    """`debian`, `library/debian` and `docker.io/library/debian` are one repository."""
    name = name.removeprefix("docker.io/")
    return name if "/" in name else f"library/{name}"


def ensure_base(ref: str, env: dict[str, str]) -> str:
    """The base image's id; a pinned one this machine lacks is pulled by its digest (never by a tag)."""
    have = subprocess.run(["docker", "image", "inspect", "--format", "{{.Id}}", ref], env=env, capture_output=True, text=True)
    if have.returncode != 0 and _PINNED.match(ref):
        _run(["docker", "pull", ref], env)
        return _run(["docker", "image", "inspect", "--format", "{{.Id}}", ref], env).strip()
    if have.returncode != 0:
        raise ReleaseError(f"the base image {ref} is not on this machine: {have.stderr.strip()[-300:]}")
    return have.stdout.strip()


def source_digest(payload: str, base: str, labels: dict[str, str]) -> str:
    h = hashlib.sha256(f"{base}\n{sorted(labels.items())}\n".encode())
    root = PAYLOADS / payload
    for path in sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        h.update(f"{path.relative_to(root)}\n".encode() + hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()[:16]


def forget_builds(env: dict[str, str], payloads: Iterable[str], say: Callable[[str], None]) -> None:
    """Before a cold build: drop every image of ours that no container uses and the layers cached
    for them, so nothing of an earlier run is reused (the base image stays: a fresh host pulls it)."""
    refs = _run(["docker", "image", "ls", "--format", "{{.Repository}}:{{.Tag}}"], env).split()
    ours = [r for r in refs if any(f"ciris-{p}:" in r for p in payloads)]
    if ours:
        subprocess.run(["docker", "image", "rm", *ours], env=env, capture_output=True)
    subprocess.run(["docker", "image", "prune", "-f"], env=env, capture_output=True)
    subprocess.run(["docker", "builder", "prune", "-af"], env=env, capture_output=True)
    say(f"release: forgot {len(ours)} earlier image name(s) and the build cache")


class Heartbeat:
    """Says `line()` every `every` seconds while a `with` block runs: no minutes of silence."""

    def __init__(self, line: Callable[[], str], say: Callable[[str], None], every: float = 30):
        self.line, self.say, self.every = line, say, every
        self.done = threading.Event()

    def __enter__(self) -> "Heartbeat":
        def beat() -> None:
            while not self.done.wait(self.every):
                self.say(self.line())
        self.thread = threading.Thread(target=beat, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()


def build_env() -> dict[str, str]:
    """The environment a build runs in: Docker's classic builder behind Podman's API (BuildKit
    would need an image from a registry), and a TLS-intercepting proxy's CA when this machine has one."""
    env = dict(os.environ)
    extra = sorted(Path("/usr/local/share/ca-certificates").glob("*.crt"))
    if extra and "EXTRA_CA_CERTS" not in env:
        env["EXTRA_CA_CERTS"] = "".join(p.read_text() for p in extra)
    return env
