"""The production base image is pinned by digest (`python -m ops pin-base`, releases/base-image): a
release builds on exactly those bytes, pulled by digest where missing, whatever the tag names later.
The registry is a real one (Debian's docker-registry, over TLS) on this machine's loopback."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from components import release
from tests.conftest import REPO
from tests.e2e.conftest import engine_env

CERTS_D = Path("/etc/containers/certs.d")  # where Podman (CLI and service) looks for a registry's CA


@pytest.fixture
def registry(tmp_path):
    binary = shutil.which("docker-registry")
    assert binary, "docker-registry is not installed (make test installs it: scripts/install-system-deps)"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    host = f"127.0.0.1:{port}"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", tmp_path / "key.pem", "-out", tmp_path / "cert.pem", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    (tmp_path / "registry.yml").write_text(
        f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {tmp_path / 'data'}\n"
        f"http:\n  addr: {host}\n  tls:\n    certificate: {tmp_path / 'cert.pem'}\n    key: {tmp_path / 'key.pem'}\n"
        "log:\n  level: warn\n")
    trust = CERTS_D / host
    trust.mkdir(parents=True, exist_ok=True)
    shutil.copy(tmp_path / "cert.pem", trust / "ca.crt")
    proc = subprocess.Popen([binary, "serve", str(tmp_path / "registry.yml")], stdout=subprocess.DEVNULL,
                            stderr=open(tmp_path / "registry.log", "w"))
    try:
        deadline = time.monotonic() + 20
        while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "registry.log").read_text()
            time.sleep(0.2)
        yield host
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(trust, ignore_errors=True)


def image(env: dict, tmp_path: Path, marker: str) -> str:
    """A small image of its own (the local base plus a label), so removing it touches nothing else."""
    (tmp_path / "Dockerfile").write_text(f"FROM localhost/ciris-base:bookworm\nLABEL ciris.test={marker}\n")
    ref = f"localhost/ciris-basetest:{marker}"
    subprocess.run(["docker", "build", "-q", "-t", ref, str(tmp_path)], env=env, check=True, capture_output=True)
    return ref


def image_id(env: dict, ref: str) -> str:
    return subprocess.run(["docker", "image", "inspect", "--format", "{{.Id}}", ref], env=env, check=True,
                          capture_output=True, text=True).stdout.strip()


def push(env: dict, ref: str, to: str) -> None:
    subprocess.run(["podman", "push", "-q", ref, to], env=env, check=True, capture_output=True)


def remove(env: dict, *refs: str) -> None:
    subprocess.run(["podman", "rmi", "-f", *refs], env=env, capture_output=True)


def test_the_base_image_is_pinned_by_digest_and_pulled_by_it_whatever_the_tag_names_later(registry, tmp_path):
    env = engine_env()
    tag = f"{registry}/debian:bookworm-slim"
    made = [tag]
    first = image(env, tmp_path, uuid.uuid4().hex[:12])
    made.append(first)
    first_id = image_id(env, first)
    push(env, first, tag)
    pin = tmp_path / "base-image"
    try:
        ref = release.pin_base(tag, env, pin)  # what the tag names now, by digest
        assert ref.startswith(f"{registry}/debian@sha256:") and release.pinned_base(pin) == ref
        assert pin.read_text().startswith(f"# {tag} as pulled on ")

        # Upstream rebuilds the tag: the pin still names the first bytes.
        later = image(env, tmp_path, uuid.uuid4().hex[:12])
        made += [later, ref]
        push(env, later, tag)
        # A machine that lacks the pinned image pulls it by digest, not by the tag.
        remove(env, first, tag, ref)
        assert subprocess.run(["docker", "image", "inspect", ref], env=env, capture_output=True).returncode != 0
        assert release.ensure_base(ref, env) == first_id
        assert release.ensure_base(ref, env) == first_id  # present now: nothing pulled again
    finally:
        remove(env, *made)


def test_a_release_refuses_a_base_image_not_pinned_by_digest(tmp_path):
    # Refused before anything is built, naming the value.
    out = subprocess.run([sys.executable, "-m", "ops", "release", "staging", "--base", "debian:bookworm-slim"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "'debian:bookworm-slim' is not pinned by digest" in out.stderr, out.stderr
    assert "release: building" not in out.stderr
    pin = tmp_path / "base-image"
    with pytest.raises(release.ReleaseError, match="is missing: run `python -m ops pin-base`"):
        release.pinned_base(pin)
    pin.write_text("# a comment\ndebian:bookworm-slim\n")
    with pytest.raises(release.ReleaseError, match="'debian:bookworm-slim' is not pinned"):
        release.pinned_base(pin)
    pin.write_text(f"debian@sha256:{'a' * 64}\n")
    assert release.pinned_base(pin) == f"debian@sha256:{'a' * 64}"
