"""Releases in the program (components/release.py, ADR 10): a stack with a current release deploys
exactly its images, by id, ships them to each host first, and builds nothing on a host; rolling
services get their twins (ADR 16)."""

from __future__ import annotations

import json

import pytest
import yaml

from components import cloud_init, config, plan, release
from tests.conftest import REPO

P = config.PROJECT
IMAGES = {p: "sha256:" + (f"{i:x}" * 64)[:64] for i, p in enumerate(release.LOCAL_PAYLOADS, 1)}


def a_release(images=IMAGES) -> release.Release:
    return release.Release(id=release.release_id(images), images=images, built="2026-12-06T00:00:00Z")


def with_releases(tmp_path, stack: str, history: release.History | None):
    raw, secret_keys = config.read_stack_file(REPO / f"Pulumi.{stack}.yaml")
    path = tmp_path / "releases.json"
    if history:
        history.save(path)
    raw[f"{P}:releases_file"] = str(path)
    return raw, secret_keys


def test_a_stack_with_a_release_runs_its_images_by_id_and_ships_them_before_each_deploy(tmp_path):
    made = a_release()
    history = release.History()
    history.add(made)
    raw, keys = with_releases(tmp_path, "production", history)
    p = plan.run("production", raw, keys)
    regs = {r.name: r for r in p.registrations}
    for host in ("us-east", "eu-west", "witness"):
        compose = yaml.safe_load(p.artifacts[f"{host}/compose.yaml"])
        for name, svc in compose["services"].items():
            assert "build" not in svc, (host, name)  # nothing is built on a host
            assert svc["image"].startswith("localhost/ciris-"), (host, name)  # every image is the release's
            if svc["image"].startswith("localhost/ciris-"):
                payload = svc["image"].split("/ciris-")[1].split(":")[0]
                assert svc["image"] == made.ref(payload) and svc["pull_policy"] == "never"
                assert made.images[payload].removeprefix("sha256:").startswith(svc["image"].rsplit(":", 1)[1])
        assert p.artifacts[f"{host}/release.images"] == made.manifest()
        ship = regs[f"{host}-images"]
        assert ship.type == "command:local:Command"
        assert ship.inputs["create"].startswith(f"python -m ops ship {cloud_init.DEPLOY_USER}@")
        assert ship.inputs["stdin"] == made.manifest() and ship.inputs["triggers"] == [made.id]
        assert ship.urn in regs[f"{host}-deploy"].dependencies  # the images are there before the deploy
    # The plan and the stack outputs name it.
    assert p.outputs["release"] == {"id": made.id, "built": made.built,
                                    "images": {payload: made.ref(payload) for payload in sorted(IMAGES)}}


def test_without_a_release_the_hosts_build_as_before(tmp_path):
    raw, keys = with_releases(tmp_path, "staging", None)
    p = plan.run("staging", raw, keys)
    compose = yaml.safe_load(p.artifacts["us-east/compose.yaml"])
    assert compose["services"]["billing"]["build"]["context"] == "./billing"
    assert not [r for r in p.registrations if r.name.endswith("-images")]
    assert p.outputs["release"] is None


def test_the_local_stack_ships_nothing_its_host_built_the_images(tmp_path):
    history = release.History()
    history.add(a_release())
    raw, keys = with_releases(tmp_path, "local", history)
    p = plan.run("local", raw, keys)
    assert not [r for r in p.registrations if r.name.endswith("-images")]
    assert "build" not in yaml.safe_load(p.artifacts["us-east/compose.yaml"])["services"]["fake-llm"]


def test_a_releases_file_naming_a_missing_current_release_is_refused(tmp_path):
    history = release.History(current="0123456789ab", releases=[a_release()])
    raw, keys = with_releases(tmp_path, "staging", history)
    with pytest.raises(config.ConfigError, match="names 0123456789ab as current, but has no such release"):
        config.parse(raw, keys)
    (tmp_path / "releases.json").write_text("{not json")
    with pytest.raises(config.ConfigError, match="releases.json: not a releases file"):
        config.parse(raw, keys)


def test_rollback_goes_to_the_release_built_before_the_current_one(tmp_path):
    first, second = a_release(), a_release({**IMAGES, "billing": "sha256:" + "e" * 64})
    history = release.History()
    with pytest.raises(release.ReleaseError, match="no release before"):
        history.previous()
    history.add(first)
    history.add(second)
    assert history.current == second.id and history.previous() == first
    history.current = first.id
    with pytest.raises(release.ReleaseError, match=f"no release before {first.id}"):
        history.previous()
    history.add(second)  # built again: kept once, newest last
    assert [r.id for r in history.releases] == [first.id, second.id]
    with pytest.raises(release.ReleaseError, match="has no image for the payload 'nope'"):
        first.ref("nope")


def test_rolling_services_have_twins_that_only_a_deploy_starts(tmp_path):
    raw, keys = with_releases(tmp_path, "staging", None)
    p = plan.run("staging", raw, keys)
    services = yaml.safe_load(p.artifacts["eu-west/compose.yaml"])["services"]
    billing, twin = services["billing"], services["billing-twin"]
    assert twin["profiles"] == ["twin"] and "profiles" not in billing
    assert twin["networks"] == {"ciris-eu-west": {"ipv4_address": "172.30.1.13", "aliases": ["billing"]}}
    # Its own name, which the twin never answers to: the edge asks each whether it serves (ADR 16).
    assert billing["networks"] == {"ciris-eu-west": {"ipv4_address": "172.30.1.10", "aliases": ["billing-main"]}}
    assert services["proxy"]["networks"] == {"ciris-eu-west": {"aliases": ["proxy-main"]}}
    caddyfile = p.artifacts["eu-west/Caddyfile"]
    for upstreams in ("billing-main:8000 billing-twin:8000", "proxy-main:4000 proxy-twin:4000"):
        block = caddyfile.split(f"reverse_proxy {upstreams} {{", 1)[1].split("}", 1)[0]
        assert {"lb_policy first", "health_uri /serving", "health_interval 1s"} <= {x.strip() for x in block.splitlines()}
    assert twin["image"] == billing["image"] and twin["environment"] == billing["environment"]
    assert "./billing/env:/run/secrets/ciris.env:ro" in twin["volumes"] == billing["volumes"]
    assert billing["stop_grace_period"] == "30s" and twin["stop_grace_period"] == "30s"
    proxy = services["proxy-twin"]
    assert "proxy-journal-twin:/var/lib/ciris-proxy" in proxy["volumes"]  # a journal is one process's
    assert "proxy-journal:/var/lib/ciris-proxy" in services["proxy"]["volumes"]
    assert services["proxy"]["stop_grace_period"] == "180s"
    assert {"postgres-twin", "edge-twin", "dns-twin"}.isdisjoint(services)
    assert json.dumps(services).count('"twin"') == 2
    # The deploy tells a changed rolling service by its rendered config, named at the top of the file.
    text = p.artifacts["eu-west/compose.yaml"]
    for name in ("billing", "proxy"):
        assert f"# ciris.config-sha256 {name} {services[name]['labels']['ciris.config-sha256']}\n" in text
