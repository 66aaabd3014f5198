"""`python -m ops ship` (ADR 10): a release's images travel to a host over its SSH, only those it
lacks, and arrive under their ids. The "host" is this machine behind a real sshd, its container
engine the one `make local` uses."""

from __future__ import annotations

import getpass
import shutil
import subprocess
import sys
import tempfile
import uuid

from tests.conftest import REPO
from tests.e2e.conftest import engine_env


def test_a_release_ships_only_the_images_a_host_lacks_and_they_arrive_by_id(sshd, tmp_path):
    port, host_key, identity = sshd
    env = engine_env()
    marker = uuid.uuid4().hex[:12]
    (tmp_path / "Dockerfile").write_text(f"FROM localhost/ciris-base:bookworm\nLABEL ciris.test={marker}\n")
    subprocess.run(["docker", "build", "-q", "-t", f"localhost/ciris-shiptest:{marker}", str(tmp_path)], env=env,
                   check=True, capture_output=True)
    ref = f"localhost/ciris-shiptest:{marker}"
    image = subprocess.run(["docker", "image", "inspect", "--format", "{{.Id}}", ref], env=env, check=True,
                           capture_output=True, text=True).stdout.strip()
    # The host's engine: Podman's CLI on a store of its own (this machine's engine is the sender's).
    store = tempfile.mkdtemp(prefix="cship-", dir="/tmp")  # Podman wants a runroot under 50 characters
    remote_docker = (f"env CONTAINERS_CONF={env['CONTAINERS_CONF']} podman --root {store}/root "
                     f"--runroot {store}/run --storage-driver vfs")

    def ship(manifest: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "ops", "ship", f"{getpass.getuser()}@127.0.0.1", "--port", str(port),
                               "--host-key", host_key, "--identity", identity, "--docker", remote_docker],
                              input=manifest, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)

    try:
        out = ship(f"{ref} {image}\n")  # the host lacks it: sent, loaded, and checked by id
        assert out.returncode == 0, out.stderr
        assert "sending 1 of 1 images" in out.stderr and "has all 1 images" in out.stderr
        loaded = subprocess.run([*remote_docker.split(), "image", "inspect", "--format", "{{.Id}}", ref], env=env,
                                capture_output=True, text=True)
        assert loaded.stdout.strip() == image.removeprefix("sha256:"), loaded.stderr
        out = ship(f"{ref} {image}\n")  # now it has it: nothing travels again
        assert out.returncode == 0, out.stderr
        assert "sending" not in out.stderr and "has all 1 images" in out.stderr
        # A wrong id for a name the host has: refused after the load, not deployed.
        out = ship(f"{ref} sha256:{'0' * 64}\n")
        assert out.returncode == 1 and "still lacks" in out.stderr, out.stderr
        # Another host key than the stack pins: nothing is asked or sent.
        other = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPU/+6BWuZJm0j8ttiTuDSHmj9RskqpHfmrH1CG6NQAY"
        out = subprocess.run([sys.executable, "-m", "ops", "ship", f"{getpass.getuser()}@127.0.0.1", "--port", str(port),
                              "--host-key", other, "--identity", identity, "--docker", remote_docker],
                             input=f"{ref} {image}\n", cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 1 and "asking the host for its images failed" in out.stderr, out.stderr
    finally:
        subprocess.run(["docker", "image", "rm", "-f", ref], env=env, capture_output=True)
        # Not `system reset`: it also deletes the network definitions this store shares with the
        # machine's engine, which broke a `make local` stack that was up (its networks gone).
        subprocess.run([*remote_docker.split(), "image", "rm", "-a", "-f"], env=env, capture_output=True)
        shutil.rmtree(store, ignore_errors=True)
