"""What the ops tests share: a real OpenSSH server (the hosts' deploy user's SSH, reached as
production reaches it: keys only, host key pinned)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import require_binary, stop_process
from tests.dns.conftest import free_port


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    """A real OpenSSH server on loopback, keys only: (port, its host key line, the client's key file)."""
    sshd, keygen = require_binary("sshd"), require_binary("ssh-keygen")
    require_binary("ssh")
    d = tmp_path_factory.mktemp("sshd")
    for key in ("host", "client"):
        subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True)
    (d / "authorized_keys").write_text((d / "client.pub").read_text())
    port = free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host'}\nAuthorizedKeysFile {d / 'authorized_keys'}\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
        f"StrictModes no\nPidFile {d / 'sshd.pid'}\nUsePAM no\n")
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation
    with open(d / "sshd.log", "ab") as log:
        proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(d / "sshd_config")], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 10
    while "Server listening" not in (d / "sshd.log").read_text():
        assert proc.poll() is None and time.time() < deadline, (d / "sshd.log").read_text()
        time.sleep(0.1)
    host_key = " ".join((d / "host.pub").read_text().split()[:2])
    yield port, host_key, str(d / "client")
    stop_process(proc)
