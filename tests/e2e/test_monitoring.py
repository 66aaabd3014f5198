"""The monitoring stack of `make local` (issue #16): every host (the regions and the witness) runs
Prometheus, Alertmanager and the exporters from the shipped image and compose files; each probes
every region; the Alertmanagers form one cluster; a region gone dark becomes one alert, without the
vantage point that saw it, and it resolves when the region is back; so does a lost etcd member."""

from __future__ import annotations

import json
import time
from urllib.parse import quote

import httpx

from tests.e2e.conftest import LOCAL


def hosts() -> dict[str, str]:
    """Host name -> its address here (where its loopback-only ports are published)."""
    outputs = json.loads((LOCAL / "outputs.json").read_text())
    found = {r["name"]: r["ipv4"] for r in outputs["client_config"]["regions"]}
    if outputs.get("witness"):
        found["witness"] = outputs["witness"]["ipv4"]
    return found


def api(address: str, port: int, path: str):
    r = httpx.get(f"http://{address}:{port}{path}", timeout=10)
    r.raise_for_status()
    return r.json()


def targets(address: str) -> list[dict]:
    return api(address, 9090, "/api/v1/targets?state=active")["data"]["activeTargets"]


def firing(address: str, heartbeat: bool = False) -> list[dict]:
    """The firing alerts, but for the always-firing Heartbeat (unless asked for)."""
    return [a for a in api(address, 9090, "/api/v1/alerts")["data"]["alerts"]
            if a["state"] == "firing" and (a["labels"]["alertname"] == "Heartbeat") == heartbeat]


def wait(what: str, check, budget: float, every: float = 5):
    deadline = time.monotonic() + budget
    while True:
        try:
            result = check()
        except httpx.HTTPError as e:
            result = None
            last = repr(e)
        else:
            last = repr(result)
        if result:
            return result
        assert time.monotonic() < deadline, f"{what}: not within {budget:.0f} s (last: {last[-2000:]})"
        time.sleep(every)


def test_every_host_watches_every_region_and_its_alertmanagers_are_one_cluster(stack):
    every = hosts()
    assert set(every) == {*(r["name"] for r in stack.regions), "witness"}
    zones = stack.client_config["dns"]["zones"]
    for name, address in every.items():
        # Every target up: its own services (a region's), and every region's health and SOA probes.
        def all_up(address=address):
            ts = targets(address)
            down = [(t["labels"]["job"], t["labels"]["instance"], t["lastError"]) for t in ts if t["health"] != "up"]
            return ts if ts and not down else None
        ts = wait(f"{name}: every target up", all_up, budget=240)
        jobs = {t["labels"]["job"] for t in ts}
        own = {"node", "etcd"} if name == "witness" else {"billing", "proxy", "powerdns", "node", "etcd"}
        assert own | {"health"} | {f"dns_soa_{z}" for z in zones} <= jobs, jobs
        if name == "witness":
            assert not jobs & {"billing", "proxy", "powerdns"}
        health = {t["labels"]["instance"] for t in ts if t["labels"]["job"] == "health"}
        assert health == {f"https://{s}1.{r['domain']}{p}" for r in stack.regions for s, p in (("billing", "/health"), ("proxy", "/ready"))}
        # Its Alertmanager knows every host's as a peer.
        status = wait(f"{name}: Alertmanager cluster ready", lambda address=address: (
            s if (s := api(address, 9093, "/api/v2/status"))["cluster"]["status"] == "ready"
            and len(s["cluster"]["peers"]) == len(every) else None), budget=120)
        assert {p["address"].rsplit(":", 1)[0] for p in status["cluster"]["peers"]} == set(every.values())
    for name, address in every.items():
        assert not firing(address), f"{name}: alerts fire on a healthy bridge: {firing(address)}"
        # The dead man's switch's ping: every host's Prometheus fires it (one alert once its vantage is dropped).
        assert [a["labels"] for a in firing(address, heartbeat=True)] == [{"alertname": "Heartbeat", "severity": "heartbeat"}]


def test_a_region_gone_dark_and_a_lost_etcd_member_each_page_and_resolve(stack):
    """Two faults at once (their alerts' waits overlap; each is checked as if alone):
    - a region's edge and DNS go dark: one RegionDown per Alertmanager, without the vantage point
      that saw it, what it explains inhibited; it resolves when the region is back;
    - the witness's etcd stops: the regions' members see their peer go (EtcdMemberMissing,
      critical) and the witness's own Prometheus cannot scrape it (EtcdMemberDown); both end when
      it is back."""
    every = hosts()
    region = stack.regions[-1]
    dark = [f"ciris-{region['name']}-{service}-1" for service in ("edge", "dns")]
    etcd = "ciris-witness-etcd-1"
    observers = {name: address for name, address in every.items() if name != region["name"]}

    def named(address, alertname):
        return [a for a in firing(address) if a["labels"]["alertname"] == alertname]

    def region_down(address):
        return [a for a in named(address, "RegionDown") if a["labels"]["region"] == region["name"]]

    stack.podman("stop", "-t", "2", *dark, etcd)
    try:
        # Probes every 60 s, scrapes every 30 s, `for: 2m`, evaluated every 30 s.
        for name, address in observers.items():
            wait(f"{name} sees RegionDown for {region['name']}", lambda address=address: region_down(address), budget=300)
        for r in stack.regions:
            missing = wait(f"{r['name']} sees EtcdMemberMissing", lambda r=r: named(every[r["name"]], "EtcdMemberMissing"),
                           budget=300)
            assert [a["labels"]["severity"] for a in missing] == ["critical"], missing
            assert not named(every[r["name"]], "EtcdNoLeader")  # two of three members: still a majority
        wait("the witness sees EtcdMemberDown", lambda: named(every["witness"], "EtcdMemberDown"), budget=120)
        for name, address in observers.items():
            sent = wait(f"{name}'s Alertmanager has the alert", lambda address=address: [
                a for a in api(address, 9093, "/api/v2/alerts?filter=alertname%3D%22RegionDown%22")
                if a["labels"].get("region") == region["name"]], budget=90)
            # One alert per Alertmanager however many hosts saw it: the vantage label is dropped.
            assert len(sent) == 1 and "vantage" not in sent[0]["labels"], sent
            assert sent[0]["labels"]["severity"] == "warning"
            # What RegionDown explains is inhibited, not sent as well.
            checks = [a for a in api(address, 9093, "/api/v2/alerts?filter=alertname%3D%22RegionCheckFailing%22")
                      if a["labels"].get("region") == region["name"]]
            assert all(a["status"]["state"] == "suppressed" for a in checks), checks
        assert not any(a["labels"]["alertname"] == "AllRegionsDown" for a in firing(every["witness"]))
    finally:
        stack.podman("start", *dark, etcd)
    for name, address in observers.items():
        # A probe (60 s) and an evaluation (30 s) after it is back, plus RegionDown's keep_firing_for (2 m).
        wait(f"{name}: RegionDown resolves", lambda address=address: not region_down(address), budget=420)
    for name, address in every.items():
        wait(f"{name}: the etcd alerts resolve", lambda address=address: not [
            a for a in firing(address) if a["labels"]["alertname"].startswith("Etcd")], budget=240)
    wait("the witness's etcd container is healthy again", lambda: stack.podman(
        "inspect", "--format", "{{.State.Health.Status}}", etcd).strip() == "healthy", budget=120)
    # Every probe of it passes again before the next test (Podman may leave UDP to a restarted
    # container unanswered for a minute).
    for name, address in every.items():
        wait(f"{name}: every probe of {region['name']} passes", lambda address=address: all(
            t["health"] == "up" for t in targets(address)) and not [
            r for r in api(address, 9090, "/api/v1/query?query=" + quote(f'probe_success{{region="{region["name"]}"}} == 0'))["data"]["result"]],
            budget=300)
