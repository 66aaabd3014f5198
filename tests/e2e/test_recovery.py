"""Both regions and the witness lost (issue #25 item 1, ADR 24), on the local stack: paid traffic
through both regions; every container and volume of every host gone; `make local` with
`--restore latest` builds a fresh stack whose database is created from the local bucket's backups
(pgBackRest's full backup and archived WAL). Every movement acknowledged before the last archived
WAL is there, `verify-ledger` passes, the replica clones again and new money moves.

It rebuilds the stack every other end-to-end test shares, so it runs after them (conftest.py)."""

from __future__ import annotations

import time

import pytest

from components import local
from tests.e2e.conftest import leader, wait_sync
from tests.e2e.traffic import PRICE, paying_user, traffic, wait_balance

pytestmark = pytest.mark.rebuilds_the_stack


def archive_now(stack, region: str, timeout: float = 120) -> None:
    """The WAL holding every movement so far reaches the bucket (`archive_timeout` would within 5 min)."""
    def archived() -> int:
        return int(stack.psql(region, "SELECT archived_count FROM pg_stat_archiver"))
    before = archived()
    stack.psql(region, "SELECT pg_switch_wal()")
    deadline = time.time() + timeout
    while archived() <= before:
        assert time.time() < deadline, stack.psql(region, "SELECT * FROM pg_stat_archiver")
        time.sleep(1)


def test_both_regions_lost_the_bridge_comes_back_from_the_bucket_with_every_archived_movement(stack, monkeypatch):
    for key, value in stack.env.items():  # the engine, as make local runs it
        monkeypatch.setenv(key, value)
    starts = {r["name"]: paying_user(stack, r) for r in stack.regions}
    with traffic(stack, {name: (u, t) for name, (u, t, _) in starts.items()}) as flows:
        time.sleep(8)
    expected = {}
    for region in stack.regions:
        user, _, start = starts[region["name"]]
        flow = flows[region["name"]]
        assert flow.paid > 5 and not [f for f in flow.failed if not f.startswith("billing health")], flow.failed[:5]
        expected[user] = start - PRICE * flow.paid
        assert wait_balance(stack, region, user, expected[user]) == expected[user], region["name"]
    archive_now(stack, leader(stack))

    local.wipe()
    assert not stack.podman("ps", "-aq", "--filter", "label=ciris.region").split(), "a container outlived the wipe"
    assert not [v for v in stack.podman("volume", "ls", "--format", "{{.Name}}").split() if v.endswith("_pgdata")]
    started = time.monotonic()
    local.up(restore="latest")
    print(f"restored and serving in {time.monotonic() - started:.0f} s")

    for region in stack.regions:  # every acknowledged movement, read through each region's billing
        for user, balance in expected.items():
            assert wait_balance(stack, region, user, balance, timeout=30) == balance, (region["name"], user)
    report = stack.podman("exec", "ciris-us-east-billing-1", "python", "-m", "billing", "verify-ledger")
    assert report.startswith("ledger ok:"), report
    wait_sync(stack, timeout=180)  # the other region cloned the restored primary and streams synchronously
    for region in stack.regions:  # and money moves again
        user, _, start = paying_user(stack, region)
        assert start > 0, region["name"]
