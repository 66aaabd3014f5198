"""Witness: the bridge's third host, at a third provider (ADR 13).

A Node like the regions' (same host interface, hardening, firewall and deploy path) that serves
no one: its base firewall is SSH from the admin CIDRs only, no DNS and no edge. It runs only what
other components add to it (the consensus member; later a monitor), so that with one consensus
member per provider, losing any one provider leaves a majority.
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi

from components import services
from components.config import BridgeConfig, Witness as WitnessConfig
from components.node import Node

# Its own container network, clear of the regions' 172.30.<index>.0/24.
NETWORK = services.Network(name="ciris-witness", subnet="172.31.0.0/24")

# What the plan says of a stack without a witness.
NO_WITNESS = ("no witness: losing the primary's region needs a manual promotion (runbook); "
              "losing a replica's region degrades by itself")


@dataclass(frozen=True)
class WitnessArgs:
    witness: WitnessConfig
    config: BridgeConfig
    shared: dict | None = None  # per-stack resources the hosts share (hosts.create)


class Witness(Node):
    """Outputs: `ipv4`, `ipv6`; `spec.name` is "witness"."""

    def __init__(self, name: str, args: WitnessArgs, opts: pulumi.ResourceOptions | None = None):
        w = args.witness
        super().__init__("ciris:bridge:Witness", name, w, args.config, NETWORK,
                         public=False, labels={"role": w.name}, shared=args.shared, opts=opts)
        self.register_outputs({"ipv4": self.ipv4, "ipv6": self.ipv6})

    def summary(self) -> dict:
        """The `witness` stack output: where operators find it (clients never talk to it)."""
        return {"provider": self.spec.provider, "location": self.spec.location, "plan": self.spec.plan,
                "ipv4": self.ipv4, "ipv6": self.ipv6}
