"""A stack's outputs as `ops` reads them: `pulumi stack output --json` for a deployed stack, the files
`make local` writes for the local one, or a saved copy (`--outputs FILE`)."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

LOCAL = Path(__file__).resolve().parent.parent / "local"


class OutputsError(Exception):
    pass


@dataclass
class Stack:
    name: str
    outputs: dict
    ca_file: str | None  # the CA the edges' certificates chain to; None: the system's


def load(stack: str, outputs_file: str | None = None) -> Stack:
    if outputs_file:
        return Stack(stack, _read(Path(outputs_file)), None)
    if stack == "local":
        if not (LOCAL / "client_config.json").exists():
            raise OutputsError("the local stack is not up (no local/client_config.json): run `make local`")
        saved = LOCAL / "outputs.json"  # every output; older local stacks wrote only client_config.json
        outputs = _read(saved) if saved.exists() else {"client_config": _read(LOCAL / "client_config.json")}
        return Stack(stack, outputs, str(LOCAL / "ca.crt"))
    pulumi = shutil.which("pulumi")
    if pulumi is None:
        raise OutputsError("the pulumi CLI is not on PATH: install it, or save the outputs elsewhere "
                           "(`pulumi stack output --json > outputs.json`) and pass --outputs outputs.json")
    out = subprocess.run([pulumi, "stack", "output", "--json", "--stack", stack], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise OutputsError(f"pulumi stack output --stack {stack} failed: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
    return Stack(stack, json.loads(out.stdout), None)


def _read(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
    except OSError as e:
        raise OutputsError(f"cannot read {path}: {e.strerror}") from None
    except ValueError:
        raise OutputsError(f"{path} is not JSON") from None
    if not isinstance(doc, dict) or "client_config" not in doc and "regions" not in doc:
        raise OutputsError(f"{path} holds no stack outputs (no client_config)")
    return doc if "client_config" in doc else {"client_config": doc}
