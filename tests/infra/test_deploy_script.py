"""The deploy script's own shell (components/deploy.py), run here without a container engine."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from components import deploy


@pytest.mark.skipif(Path("/run/cloud-init").exists(), reason="cloud-init ran on this machine")
def test_a_host_where_cloud_init_is_installed_but_never_ran_does_not_wait_for_it(tmp_path):
    """Its `cloud-init status --wait` would wait forever (make local hung at "deploying witness")."""
    fake = tmp_path / "cloud-init"
    fake.write_text("#!/bin/sh\nsleep 600\n")
    fake.chmod(0o755)
    started = time.monotonic()
    out = subprocess.run(["sh", "-c", "set -eu\n" + deploy.CLOUD_INIT_DONE + "echo ready"], capture_output=True,
                         text=True, timeout=30, env={**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"})
    assert out.returncode == 0 and out.stdout == "ready\n", out.stderr
    assert time.monotonic() - started < 5
