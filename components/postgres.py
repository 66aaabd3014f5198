"""ReplicatedPostgres: the billing database, primary in one region and synchronous replicas in others.

This is the component's frame: which region is primary, its replicas, the replication mode and the
peer-only 5432 openings. Containers, configs, TLS and backups come with the Postgres issue (#4).
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi

from components.firewall import peer_rule
from components.postgres_config import standby_names
from components.region import Region

PORT = 5432


@dataclass(frozen=True)
class ReplicatedPostgresArgs:
    primary: Region
    replicas: list[Region]


class ReplicatedPostgres(pulumi.ComponentResource):
    """Outputs: `summary` (the `database` stack output)."""

    def __init__(self, name: str, args: ReplicatedPostgresArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("ciris:bridge:ReplicatedPostgres", name, None, opts)
        members = [args.primary, *args.replicas]
        # Every member accepts every other one, so a promoted replica can stream to the old primary.
        for member in members:
            peers = [(m.ipv4, m.ipv6) for m in members if m is not member]
            if peers:
                member.open("postgres", [peer_rule("postgres", PORT, peers, "Postgres replication from peer regions")])

        self.summary = {
            "primary": args.primary.spec.name,
            "replicas": [r.spec.name for r in args.replicas],
            "mode": "synchronous" if args.replicas else "standalone",
            "synchronous_standby_names": standby_names([r.spec.name for r in args.replicas]),
            "port": PORT,
        }
        self.register_outputs({"summary": self.summary})
