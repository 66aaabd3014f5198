"""Alert delivery, all real processes (issue #16): the alert rules of payloads/monitoring/rules
evaluated by real Prometheus on what it scrapes and probes, delivered by real Alertmanager to a
local webhook receiver.

Two regions (staging's us-east and eu-west), each with its own edge (Caddy) and nameserver
(PowerDNS, both zones loaded by the production sync script), in front of the suite's real billing
and proxy processes. Two Prometheus vantage points (us-east, eu-west), rendered by
monitoring.prometheus_yml, scrape billing, the proxy and their own nameserver and probe every
region through the blackbox exporter; both send to two Alertmanagers peered as a cluster on
loopback (monitoring.alertmanager_args). So every page below is seen by two vantage points and
held by two Alertmanagers, and must still reach the receiver once ("one page, not four").

Scrape, probe and evaluation every INTERVAL seconds; the rules' `for:` are production's, so the
incident takes their 2 minutes. RegionDown's keep_firing_for is scaled to these intervals (KEEP_FIRING),
the one change to production's rules."""

from __future__ import annotations

import json
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from components import edge, monitoring
from tests.billing.conftest import billing, cluster, new_user, stripe_api  # noqa: F401  (the suite's real billing)
from tests.dns.conftest import API_KEY as PDNS_API_KEY, Server, free_port
from tests.dns.test_pdns import STAGING, render
from tests.edge.conftest import Edge
from tests.monitoring.conftest import Daemon, Prometheus, Webhook, on_loopback, seconds
from tests.monitoring.test_config_files import RULES
from tests.proxy.conftest import MODEL, PROVIDER_KEYS, proxy, upstreams, user_token  # noqa: F401  (and proxy)

INTERVAL = 2  # seconds: scrape, probe, rule evaluation
# group_wait covers how far apart one region's checks can start failing (one probe interval, then
# one evaluation): RegionDown must reach Alertmanager before the checks it explains are sent.
# Production's figures: probes every 60 s, evaluation 30 s, group_wait 90 s.
TIMING = monitoring.Timing(group_wait="5s", group_interval="5s", heartbeat_interval="2s", heartbeat_repeat="4s")
PEER_TIMEOUT = 3  # seconds an Alertmanager later in the cluster waits for the first one's notification
SLACK = 10  # seconds: the send to Alertmanager and to the receiver, and restarts, on two shared cores
# RegionDown held past its region's first passing check: production's 2 minutes cover a 60 s probe
# interval and a 30 s evaluation; here a region's checks pass again within its restart and one probe
# and one evaluation interval (asserted below), so 20 s hold it with room to spare.
KEEP_FIRING = "20s"
WEBHOOK_TOKEN = "CANARY-webhook-token-51c2"
HEARTBEAT_TOKEN = "CANARY-heartbeat-token-9d04"
CANARY_PROMPT = "CANARY-prompt-text-a7e3"
ZONES = list(STAGING.zones.zones)
EAST, WEST = (r.name for r in STAGING.regions)


def rule(name: str, rules: Path = RULES) -> dict:
    return next(r for g in yaml.safe_load((rules / "regions.yml").read_text())["groups"] for r in g["rules"]
                if r["alert"] == name)


def scaled_rules(tmp: Path) -> Path:
    """Production's rules with RegionDown's keep_firing_for at KEEP_FIRING, nothing else changed."""
    out = tmp / "rules"
    out.mkdir()
    for f in RULES.glob("*.yml"):
        (out / f.name).write_text(f.read_text())
    doc = yaml.safe_load((RULES / "regions.yml").read_text())
    down = next(r for g in doc["groups"] for r in g["rules"] if r["alert"] == "RegionDown")
    assert "keep_firing_for" in down, "production's RegionDown has no keep_firing_for to scale"
    down["keep_firing_for"] = KEEP_FIRING
    (out / "regions.yml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


@dataclass
class Region:
    edge: Edge
    nameserver: Server


@dataclass
class Watch:
    regions: dict[str, Region]
    prometheus: dict[str, Prometheus]  # by vantage
    alertmanagers: list[Daemon]
    webhook: Webhook
    rules: Path  # the rules the vantage points evaluate (scaled_rules)
    heartbeat: Webhook  # the dead man's switch

    def until_healthy(self, timeout: float = 60) -> None:
        """Until every vantage point has scraped every service and seen every probe succeed, then two
        more evaluations on that."""
        probes = 2 * len(self.regions) + len(ZONES) * len(self.regions)  # billing and proxy /health, every SOA
        scraped = probes + 3  # `up` of each probe, and of billing, the proxy and the vantage's nameserver
        deadline = time.time() + timeout
        while True:
            states = {v: (p.query("probe_success"), p.query("up")) for v, p in self.prometheus.items()}
            if all(len(ok) == probes and all(s["value"][1] == "1" for s in ok + up) and len(up) == scraped
                   for ok, up in states.values()):
                time.sleep(2 * INTERVAL)
                return
            assert time.time() < deadline, f"the bridge never looked healthy to Prometheus: {states}"
            time.sleep(0.5)

    def wait_for(self, want: set[tuple[str, str, str]], since: int, deadline: float) -> list[tuple[float, dict]]:
        """Notifications after the first `since`, until every (status, alertname, region) in `want`
        has arrived or `deadline` passes."""
        while True:
            got = self.webhook.received[since:]
            if want <= {key(n) for _, n in got} or time.time() > deadline:
                return got
            time.sleep(0.2)


def key(notification: dict) -> tuple[str, str, str]:
    g = notification["groupLabels"]
    return notification["status"], g["alertname"], g.get("region", "")


@pytest.fixture(scope="module")
def bridge(billing, proxy, upstreams, tmp_path_factory):  # noqa: F811
    """Each region's edge and nameserver, in front of the one billing and proxy; a paid request with
    a canary prompt has gone through the us-east edge, so any metric it could leak into exists."""
    for u in upstreams.values():  # as the proxy tests leave them, in a whole-suite run
        u.control(reset=True)
    regions: dict[str, Region] = {}
    zones = render()
    with ExitStack() as cleanup:
        for r in STAGING.regions:
            tmp = tmp_path_factory.mktemp(f"region-{r.name}")
            (tmp / "edge").mkdir(), (tmp / "dns").mkdir()
            ns = Server(tmp / "dns")
            cleanup.callback(ns.stop)
            e = Edge(tmp / "edge", edge.sites(r.domain, billing.url.removeprefix("http://"), proxy.url.removeprefix("http://")))
            cleanup.callback(e.stop)
            e.start()
            ns.sync(zones)
            regions[r.name] = Region(e, ns)
        with httpx.Client(base_url=billing.url, timeout=30) as api:
            user = new_user(api, 100)
        body = {"model": MODEL, "messages": [{"role": "user", "content": CANARY_PROMPT}]}
        resp, data = regions[EAST].edge.request(f"proxy1.{STAGING.regions[0].domain}", "/v1/chat/completions", "POST",
                                                json.dumps(body).encode(), {"Authorization": f"Bearer {user_token(user)}",
                                                                            "Content-Type": "application/json"})
        assert resp.status == 200, data
        yield regions


@pytest.fixture(scope="module")
def watch(bridge, billing, proxy, tmp_path_factory):  # noqa: F811
    tmp = tmp_path_factory.mktemp("monitoring")
    with ExitStack() as cleanup:
        hook = Webhook(WEBHOOK_TOKEN)
        cleanup.callback(hook.stop)
        beat = Webhook(HEARTBEAT_TOKEN)
        cleanup.callback(beat.stop)

        ca = tmp / "edges-ca.crt"  # each edge's own internal CA
        ca.write_text("".join(r.edge.root_ca.read_text() for r in bridge.values()))
        (tmp / "blackbox.yml").write_text(monitoring.blackbox_yml(ZONES, ca_file=str(ca)))
        blackbox_at = f"127.0.0.1:{free_port()}"
        blackbox = Daemon("prometheus-blackbox-exporter", [f"--config.file={tmp / 'blackbox.yml'}",
                          f"--web.listen-address={blackbox_at}"], int(blackbox_at.rsplit(":")[1]), tmp / "blackbox.log",
                          ready_path="/-/healthy")
        cleanup.callback(blackbox.stop)

        (tmp / "alertmanager.yml").write_text(monitoring.alertmanager_yml(None, webhook_url=hook.url, heartbeat_url=beat.url,
                                                                          timing=TIMING))
        ports, gossip = [free_port(), free_port()], [free_port(), free_port()]
        alertmanagers = []
        for i, (port, mine) in enumerate(zip(ports, gossip)):
            args = monitoring.alertmanager_args(
                config_file=str(tmp / "alertmanager.yml"), data_dir=str(tmp / f"alertmanager-{i}"),
                listen=f"127.0.0.1:{port}", cluster_listen=f"127.0.0.1:{mine}", advertise=f"127.0.0.1:{mine}",
                peers=[f"127.0.0.1:{p}" for p in gossip if p != mine], peer_timeout=f"{PEER_TIMEOUT}s")
            alertmanagers.append(Daemon("prometheus-alertmanager", args, port, tmp / f"alertmanager-{i}.log"))
            cleanup.callback(alertmanagers[-1].stop)

        rules = scaled_rules(tmp)
        targets = monitoring.region_targets(STAGING.regions)
        edges = {name: r.edge.https_port for name, r in bridge.items()}
        nameservers = {name: r.nameserver.port for name, r in bridge.items()}
        prometheus = {}
        for vantage, region in bridge.items():
            services = {"billing": (billing.url.removeprefix("http://"), "/metrics"),
                        "proxy": (proxy.url.removeprefix("http://"), "/metrics"),
                        "powerdns": (f"127.0.0.1:{region.nameserver.api_port}", "/metrics")}
            every = f"{INTERVAL}s"
            text = monitoring.prometheus_yml(
                vantage, targets, ZONES, alertmanagers=[f"127.0.0.1:{p}" for p in ports], rules_dir=str(rules),
                services=services, node=None, blackbox=blackbox_at,
                scrape_interval=every, probe_interval=every, evaluation_interval=every)
            path = tmp / f"prometheus-{vantage}.yml"
            path.write_text(on_loopback(text, edges, nameservers))
            web = free_port()
            # Firing alerts are sent again every INTERVAL (production: every minute): the first send
            # of the always-firing Heartbeat can come before the Alertmanagers are known.
            args = [f"--config.file={path}", f"--storage.tsdb.path={tmp / vantage}", f"--web.listen-address=127.0.0.1:{web}",
                    f"--rules.alert.resend-delay={INTERVAL}s"]
            prometheus[vantage] = Prometheus("prometheus", args, web, tmp / f"prometheus-{vantage}.log")
            cleanup.callback(prometheus[vantage].stop)

        # The cluster has formed: each Alertmanager knows both members.
        deadline = time.time() + 30
        while any(len(am.get("/api/v2/status")["cluster"].get("peers") or []) < 2 for am in alertmanagers):
            assert time.time() < deadline, [am.get("/api/v2/status")["cluster"] for am in alertmanagers]
            time.sleep(0.5)
        yield Watch(bridge, prometheus, alertmanagers, hook, rules, beat)
        logs = "".join(p.read_text() for p in tmp.glob("*.log"))
        assert WEBHOOK_TOKEN not in logs and HEARTBEAT_TOKEN not in logs and PDNS_API_KEY not in logs


def test_a_healthy_bridge_pages_no_one_and_its_heartbeat_reaches_the_switch(watch):
    watch.until_healthy()
    for vantage, prom in watch.prometheus.items():  # not even pending (the `for:` are minutes long)
        alerts = [(a["labels"]["alertname"], a["state"]) for a in prom.alerts()]
        assert alerts == [("Heartbeat", "firing")], vantage
    assert watch.webhook.received == []
    # The heartbeat: the two vantage points' one alert, sent by the cluster once per repeat, to the
    # switch only. Counted over a few repeats: no fewer (a silent switch pages), no duplicates.
    start, wait = len(watch.heartbeat.received), 5 * seconds(TIMING.heartbeat_repeat)
    time.sleep(wait)
    beats = watch.heartbeat.received[start:]
    assert [(n["status"], n["groupLabels"]) for _, n in beats] == [("firing", {"alertname": "Heartbeat", "severity": "heartbeat"})] * len(beats)
    assert 3 <= len(beats) <= wait / seconds(TIMING.heartbeat_repeat) + 1, [round(t, 1) for t, _ in beats]
    assert watch.webhook.received == []


def test_an_incident_pages_once_per_group_on_time_then_resolves(watch):
    watch.until_healthy()
    east, west = watch.regions[EAST], watch.regions[WEST]
    hook, since = watch.webhook, len(watch.webhook.received)
    check_failing, region_down = rule("RegionCheckFailing"), rule("RegionDown")
    wait = seconds(check_failing["for"])
    assert seconds(region_down["for"]) == wait  # one incident, one clock

    t0 = time.time()
    east.nameserver.kill()  # us-east: one kind of check fails (its SOA, for both zones)
    west.edge.kill()  # eu-west: every check fails (both services' /health, both SOAs)
    west.nameserver.kill()

    # The `up`-based rule sees the dead nameserver's metrics too (its `for:` is 5 minutes: only pending here).
    deadline = time.time() + 6 * INTERVAL
    while not any(a["labels"]["alertname"] == "ServiceMetricsDown" and a["labels"]["job"] == "powerdns"
                  for a in watch.prometheus[EAST].alerts()):
        assert time.time() < deadline, watch.prometheus[EAST].alerts()
        time.sleep(0.5)

    # Each page arrives after its rule's `for:`, within one probe and one evaluation interval plus
    # Alertmanager's group_wait of it.
    latest = t0 + wait + 2 * INTERVAL + seconds(TIMING.group_wait) + SLACK
    firing = {("firing", "RegionCheckFailing", EAST), ("firing", "RegionDown", WEST)}
    got = watch.wait_for(firing, since, latest)
    arrived = {key(n): t for t, n in got}
    print("seconds from the kill to each page:", {k: round(t - t0, 1) for k, t in arrived.items()})  # shown on failure
    assert firing <= set(arrived), f"not delivered within {latest - t0:.0f}s: {[key(n) for _, n in got]}"
    for k in firing:
        assert t0 + wait <= arrived[k] <= latest, (k, arrived[k] - t0)

    # RegionDown explains eu-west's failing checks: they reached Alertmanager and are held back.
    for am in watch.alertmanagers:
        held = am.get("/api/v2/alerts", filter=['alertname="RegionCheckFailing"', f'region="{WEST}"'])
        assert len(held) == 4 and all(a["status"]["state"] == "suppressed" and a["status"]["inhibitedBy"] for a in held), held

    # Exactly once each, whatever the two vantage points and the two Alertmanagers did; nothing else.
    time.sleep(PEER_TIMEOUT + seconds(TIMING.group_interval) + 2 * INTERVAL)
    pages = hook.received[since:]
    assert sorted(key(n) for _, n in pages) == sorted(firing)
    by_key = {key(n): n for _, n in pages}
    down = by_key[("firing", "RegionDown", WEST)]["alerts"]
    assert [a["labels"] for a in down] == [{"alertname": "RegionDown", "region": WEST, "severity": "warning"}]
    checks = by_key[("firing", "RegionCheckFailing", EAST)]["alerts"]
    assert sorted(a["labels"]["zone"] for a in checks) == sorted(ZONES)  # both zones' SOA, one notification
    for a in checks:
        assert a["labels"] == {"alertname": "RegionCheckFailing", "region": EAST, "severity": "warning",
                               "explained_by": "region_down", "instance": f"{STAGING.regions[0].nameserver_fqdn}:53",
                               "job": f"dns_soa_{a['labels']['zone']}", "zone": a["labels"]["zone"]}

    # Back: each page is resolved, once; RegionDown only after its keep_firing_for, by when every
    # check it held back passes, so they never page. The edge first: it is the slower to start.
    keep = seconds(rule("RegionDown", watch.rules)["keep_firing_for"])
    t_back, since = time.time(), len(hook.received)
    west.edge.start()
    west.nameserver.start()
    east.nameserver.start()
    t1 = time.time()
    assert t1 - t_back + 2 * INTERVAL < keep, f"the restarts took {t1 - t_back:.1f}s: too long for KEEP_FIRING"
    within = 2 * INTERVAL + seconds(TIMING.group_interval) + SLACK  # one probe, one evaluation, the flush, the sends
    windows = {("resolved", "RegionCheckFailing", EAST): (t_back, t1 + within),
               ("resolved", "RegionDown", WEST): (t_back + keep, t1 + keep + within)}
    got = watch.wait_for(set(windows), since, max(latest for _, latest in windows.values()))
    arrived = {key(n): t for t, n in got}
    print("seconds from the restart to each resolution:", {k: round(t - t_back, 1) for k, t in arrived.items()})
    for k, (earliest, latest) in windows.items():
        assert k in arrived, f"{k} not delivered within {latest - t_back:.0f}s: {list(arrived)}"
        assert earliest <= arrived[k] <= latest, (k, arrived[k] - t_back)
    for am in watch.alertmanagers:  # eu-west's checks had all passed before RegionDown resolved
        assert am.get("/api/v2/alerts", filter=['alertname="RegionCheckFailing"', f'region="{WEST}"']) == []
    time.sleep(PEER_TIMEOUT + seconds(TIMING.group_interval) + 2 * INTERVAL)
    # us-east's two zones pass a probe apart: a flush between them updates its page, one zone resolved.
    after = [n for _, n in hook.received[since:] if not (key(n) == ("firing", "RegionCheckFailing", EAST) and any(
        a["status"] == "resolved" for a in n["alerts"]))]
    assert sorted(key(n) for n in after) == sorted(windows), [(key(n), [(a["status"], a["labels"]) for a in n["alerts"]])
                                                              for n in after]

    # Nothing a client sent, and no secret, is in anything the receiver got.
    everything = "".join(hook.raw)
    for secret in ("CANARY", PDNS_API_KEY, *PROVIDER_KEYS.values(), "eyJ", "sk_test"):
        assert secret not in everything
