"""Shared test helpers. Under CI (CI=true) a test never skips for a missing tool: it fails."""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import pytest

from components import config

REPO = Path(__file__).resolve().parent.parent


def require_binary(name: str) -> str:
    path = shutil.which(name)
    if path:
        return path
    message = f"{name} is not installed (make test installs it when run as root: scripts/install-system-deps)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def stack_raw(stack: str = "staging") -> tuple[dict, set[str]]:
    """A committed stack file as the flat config map the engine would see (a deep copy to mutate)."""
    raw, secret_keys = config.read_stack_file(REPO / f"Pulumi.{stack}.yaml")
    return copy.deepcopy(raw), secret_keys


def third_region(raw: dict) -> dict:
    """`raw` with a third region added by config alone."""
    raw["ciris-bridge:regions"].append(
        {
            "name": "eu-north",
            "provider": "hetzner",
            "location": "hel1",
            "plan": "cx23",
            "domain": raw["ciris-bridge:regions"][1]["domain"].replace("-2.", "-3."),
            "nameserver": "ns3",
            "volume_gb": 10,
            "postgres": "replica",
        }
    )
    return raw
