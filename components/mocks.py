"""Pulumi's mock runtime for the offline plan and the tests: the real program, fake clouds.

Resources get the computed outputs their providers would return, with addresses from the
documentation ranges (RFC 5737, RFC 3849), so no plan output can be mistaken for a real host.
"""

from __future__ import annotations

import asyncio
import itertools
import zlib
from dataclasses import dataclass
from typing import Any

import pulumi
from pulumi.runtime import settings
from pulumi.runtime.mocks import MockMonitor

from components import config, mock_tls

IPV4_RANGES = ("192.0.2", "198.51.100", "203.0.113")
SECRET_SIG = "4dabf18193072939515e22adb298388d"  # how the RPC layer marks a secret value


def is_secret_value(value: Any) -> bool:
    return isinstance(value, dict) and value.get(SECRET_SIG) == "1b47061264138c4ac30d75fd1eb44270"


def scrub(value: Any) -> Any:
    """Inputs with every secret replaced by "[secret]"."""
    if is_secret_value(value):
        return "[secret]"
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrub(v) for v in value]
    return value


def unwrap(value: Any) -> Any:
    if is_secret_value(value):
        return unwrap(value["value"])
    if isinstance(value, dict):
        return {k: unwrap(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [unwrap(v) for v in value]
    return value


class BridgeMocks(pulumi.runtime.Mocks):
    def __init__(self) -> None:
        self._ids = itertools.count(1001)

    def new_resource(self, args: pulumi.runtime.MockResourceArgs):
        state = dict(args.inputs)
        # Hetzner's and DigitalOcean's IDs are numbers (their inputs take them as such).
        rid = str(next(self._ids)) if args.typ.startswith(("hcloud:", "digitalocean:")) else f"{args.name}-id"
        if args.typ in ("vultr:index/instance:Instance", "hcloud:index/server:Server", "digitalocean:index/droplet:Droplet"):
            # Derived from the name, not the (concurrent) registration order, so plans are stable.
            n = zlib.crc32(args.name.encode())
            ipv4 = f"{IPV4_RANGES[n % 3]}.{10 + n // 3 % 240}"
            ipv6 = f"2001:db8:{n % 0xFFFF:x}::10"
            if args.typ.startswith("vultr:"):
                state.update(mainIp=ipv4, v6MainIp=ipv6, status="active")
            elif args.typ.startswith("digitalocean:"):
                state.update(ipv4Address=ipv4, ipv6Address=ipv6, status="active")
            else:
                state.update(ipv4Address=ipv4, ipv6Address=ipv6, status="running")
        elif args.typ == "digitalocean:index/sshKey:SshKey":
            state["fingerprint"] = ":".join(f"{b:02x}" for b in zlib.crc32(args.name.encode()).to_bytes(4, "big") * 4)
        elif args.typ == "hcloud:index/volume:Volume":
            state["linuxDevice"] = f"/dev/disk/by-id/scsi-0HC_Volume_{rid}"
        elif args.typ == "vultr:index/blockStorage:BlockStorage":
            state["mountId"] = f"ewr-{rid}"
        elif args.typ == "random:index/randomPassword:RandomPassword":
            state["result"] = f"mock-{args.name}-{'x' * 16}"
        elif args.typ == "tls:index/privateKey:PrivateKey":
            state.update(mock_tls.private_key(args.name, unwrap(args.inputs)))
        elif args.typ == "tls:index/selfSignedCert:SelfSignedCert":
            state.update(mock_tls.self_signed_cert(args.name, unwrap(args.inputs)))
        elif args.typ == "tls:index/certRequest:CertRequest":
            state.update(mock_tls.cert_request(unwrap(args.inputs)))
        elif args.typ == "tls:index/locallySignedCert:LocallySignedCert":
            state.update(mock_tls.locally_signed_cert(args.name, unwrap(args.inputs)))
        elif args.typ == "command:remote:Command":
            state.update(stdout="", stderr="")
        return rid, state

    def call(self, args: pulumi.runtime.MockCallArgs):
        raise NotImplementedError(f"the bridge program made an unexpected invoke: {args.token}")


@dataclass
class Registration:
    type: str
    name: str
    urn: str
    parent: str | None  # parent's URN; None for the stack itself
    custom: bool
    inputs: dict
    dependencies: tuple[str, ...] = ()  # URNs it waits for (depends_on)


class RecordingMonitor(MockMonitor):
    """MockMonitor that also keeps every registration in order, with its parent."""

    def __init__(self, mocks: pulumi.runtime.Mocks):
        super().__init__(mocks)
        self.registrations: list[Registration] = []

    def RegisterResource(self, request):
        response = super().RegisterResource(request)
        if request.type != "pulumi:pulumi:Stack":
            inputs = pulumi.runtime.rpc.deserialize_properties(request.object)
            self.registrations.append(
                Registration(request.type, request.name, response.urn, request.parent or None, bool(request.custom), inputs,
                             tuple(request.dependencies))
            )
        return response


def install(stack: str, raw: dict[str, Any], secret_keys: set[str]) -> RecordingMonitor:
    """Point the Pulumi runtime at fresh mocks, with `raw` as the stack config the engine hands over."""
    pulumi.runtime.set_all_config(config.engine_config(raw), sorted(secret_keys))
    try:  # Pulumi's runtime uses the thread's current loop; asyncio.run() elsewhere leaves none
        asyncio.get_event_loop_policy().get_event_loop()
    except RuntimeError:
        asyncio.set_event_loop(asyncio.new_event_loop())
    monitor = RecordingMonitor(BridgeMocks())
    settings.ROOT.set(None)  # a fresh stack resource for every program run
    pulumi.runtime.set_mocks(monitor.mocks, project=config.PROJECT, stack=stack, preview=False, monitor=monitor)
    return monitor
