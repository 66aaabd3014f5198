"""The deploy script itself (components/deploy.py), on a small bundle of its own under Podman:
what it unpacks, and that it fails when a container does not become healthy."""

from __future__ import annotations

import base64
import io
import os
import shlex
import signal
import subprocess
import tarfile
import time

import yaml

from components import deploy, local
from components.region import bundle
from tests.e2e.conftest import engine_env

PROJECT = "ciris-deploy-test"


def compose(healthy: bool, ports: list[str] | None = None) -> str:
    return yaml.safe_dump({"name": PROJECT, "services": {"app": {
        "image": "localhost/ciris-base:bookworm", "command": ["sleep", "600"], "restart": "unless-stopped",
        "labels": {"ciris.region": "deploy-test", "ciris.service": "app"}, **({"ports": ports} if ports else {}),
        "healthcheck": {"test": ["CMD", "true" if healthy else "false"], "interval": "2s", "timeout": "2s", "retries": 1},
    }}})


def run_deploy(tmp_path, files: dict[str, str], private: dict[str, int]) -> subprocess.CompletedProcess:
    env = engine_env()
    return subprocess.run(deploy.local(deploy.DEPLOY, str(tmp_path / "srv")), input=bundle(files, private),
                          capture_output=True, text=True, env=env, timeout=400)


def test_the_deploy_unpacks_with_modes_and_waits_for_health(tmp_path):
    env = engine_env()
    try:
        (tmp_path / "srv/postgres").mkdir(parents=True)
        (tmp_path / "srv/postgres/env").write_text("BILLING_PASSWORD=an-earlier-bundles\n")  # deploy.RETIRED_FILES
        out = run_deploy(tmp_path, {"compose.yaml": compose(True), "app/code.py": "print()\n", "app/env": "SECRET=1\n",
                                    "app/key.pem": "k\n"}, {"app/env": 0, "app/key.pem": 10001})
        assert out.returncode == 0, out.stderr[-2000:]
        srv = tmp_path / "srv"
        assert not (srv / "postgres/env").exists(), "a secrets file earlier bundles shipped was left on the host"
        modes = {p: ((srv / p).stat().st_mode & 0o777, (srv / p).stat().st_uid) for p in ("app/code.py", "app/env", "app/key.pem")}
        assert modes == {"app/code.py": (0o644, 0), "app/env": (0o600, 0), "app/key.pem": (0o600, 10001)}

        # A container that never becomes healthy fails the deploy (and so `pulumi up`).
        out = run_deploy(tmp_path, {"compose.yaml": compose(False)}, {})
        assert out.returncode != 0
        assert "unhealthy" in (out.stdout + out.stderr).lower(), out.stderr[-2000:]
    finally:
        subprocess.run(["docker", "compose", "-p", PROJECT, "down", "-t", "1"], env=env, capture_output=True)


def test_a_host_with_nothing_to_run_deploys_and_stops_what_ran_before(tmp_path):
    """A witness before anything is added to it: compose refuses `up` without services, so the
    deploy stops the project's containers instead and succeeds."""
    env = engine_env()
    try:
        out = run_deploy(tmp_path, {"compose.yaml": compose(True)}, {})
        assert out.returncode == 0, out.stderr[-2000:]
        running = lambda: subprocess.run(["docker", "compose", "-p", PROJECT, "ps", "-q"], env=env,  # noqa: E731
                                         capture_output=True, text=True).stdout.split()
        assert running()
        out = run_deploy(tmp_path, {"compose.yaml": yaml.safe_dump({"name": PROJECT, "services": {}})}, {})
        assert out.returncode == 0, out.stderr[-2000:]
        assert running() == []
    finally:
        subprocess.run(["docker", "compose", "-p", PROJECT, "down", "-t", "1"], env=env, capture_output=True)


def test_a_container_whose_processes_died_with_the_machine_is_replaced(tmp_path):
    """Killing every process (a machine restart, a sandbox cut off) leaves Podman listing the
    container as running; Compose would leave it so and it would never become healthy again.
    `make local` removes such containers first, and the deploy brings them back healthy."""
    env = engine_env()
    try:
        assert run_deploy(tmp_path, {"compose.yaml": compose(True)}, {}).returncode == 0
        name = f"{PROJECT}-app-1"
        pids = subprocess.run(["podman", "inspect", "--format", "{{.State.ConmonPid}} {{.State.Pid}}", name], env=env,
                              capture_output=True, text=True, check=True).stdout.split()
        for pid in pids:  # conmon first, so nothing records the exit
            os.kill(int(pid), signal.SIGKILL)
        time.sleep(1)
        running = subprocess.run(["podman", "ps", "-q", "--filter", f"name={name}"], env=env, capture_output=True,
                                 text=True).stdout.split()
        assert running, "Podman noticed the kill: this test no longer reproduces a stale container"
        assert local.remove_dead(env, "ciris.region=deploy-test") == [name]
        assert local.remove_dead(env, "ciris.region=deploy-test") == []
        out = run_deploy(tmp_path, {"compose.yaml": compose(True)}, {})
        assert out.returncode == 0, out.stderr[-2000:]
        pid = subprocess.run(["podman", "inspect", "--format", "{{.State.Pid}}", name], env=env, capture_output=True,
                             text=True, check=True).stdout.strip()
        assert local.alive(int(pid))
    finally:
        subprocess.run(["docker", "compose", "-p", PROJECT, "down", "-t", "1"], env=env, capture_output=True)


def test_networking_left_by_containers_that_are_gone_is_removed(tmp_path):
    """When Podman forgets its containers without tearing their networks down (seen after the
    session's processes were killed: Podman's run directory started afresh, the kernel's rules and
    netavark's files did not), their name records answer a service's name with addresses nobody
    holds, and their DNAT rules stay first in the network's chain and send a host's published port
    there. `make local` removes both and keeps the living containers'."""
    env = engine_env()
    try:
        assert run_deploy(tmp_path, {"compose.yaml": compose(True, ["127.0.0.1:18099:8099"])}, {}).returncode == 0
        name = f"{PROJECT}-app-1"
        live = address(name, env)
        gone = live.rsplit(".", 1)[0] + ".250"  # inside the network, held by nothing

        records = local.AARDVARK / f"{PROJECT}_default"
        mine = next(line for line in records.read_text().splitlines() if line.endswith(",app," + line.split()[0][:12]))
        records.write_text(records.read_text() + mine.replace(live, gone).replace(mine[:64], "f" * 64) + "\n")
        os.kill(int((local.AARDVARK / "aardvark.pid").read_text()), signal.SIGHUP)
        resolve = lambda: sorted({line.split()[0] for line in subprocess.run(  # noqa: E731
            ["podman", "exec", name, "getent", "hosts", "app"], env=env, capture_output=True, text=True).stdout.splitlines()})
        assert resolve() == sorted([live, gone])
        local.remove_stale_name_records(env)
        assert resolve() == [live]

        rule = next(r for r in nat_rules() if f"--to-destination {live}:8099" in r)
        chain = rule.split()[1]
        stale = shlex.split(rule.replace(live, gone))[2:]
        insert = ["iptables", "-t", "nat", "-I", chain, "1", *stale]
        subprocess.run(insert, check=True)
        assert any(f"--to-destination {gone}:8099" in r for r in nat_rules())
        local.remove_stale_port_rules(env)
        assert not any(f"--to-destination {gone}:8099" in r for r in nat_rules())
        assert rule in nat_rules()
        # A stale rule keeps its chain when the network goes, and the network's name (so the chain)
        # comes back with it: a chain nothing jumps to is cleaned too.
        subprocess.run(insert, check=True)
        subprocess.run(["docker", "compose", "-p", PROJECT, "down", "-t", "1"], env=env, capture_output=True)
        assert any(f"--to-destination {gone}:8099" in r for r in nat_rules())
        local.remove_stale_port_rules(env)
        assert not any(f"--to-destination {gone}:8099" in r for r in nat_rules())
    finally:
        subprocess.run(["docker", "compose", "-p", PROJECT, "down", "-t", "1"], env=env, capture_output=True)


def address(name: str, env: dict[str, str]) -> str:
    return subprocess.run(["podman", "inspect", "--format", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
                           name], env=env, capture_output=True, text=True, check=True).stdout.strip()


def nat_rules() -> list[str]:
    return subprocess.run(["iptables", "-t", "nat", "-S"], capture_output=True, text=True, check=True).stdout.splitlines()


def test_the_bundle_is_the_same_bytes_for_the_same_files():
    files = {"b.txt": "2", "a.txt": "1"}
    assert bundle(files, {"a.txt": 0}) == bundle(dict(reversed(list(files.items()))), {"a.txt": 0})
    with tarfile.open(fileobj=io.BytesIO(base64.b64decode(bundle(files))), mode="r:gz") as tar:
        assert tar.getnames() == ["a.txt", "b.txt"]


def test_live_files_reach_the_running_container_through_its_reload_and_a_failed_reload_fails_the_deploy(tmp_path):
    """ContainerSpec.reload (ADR 26): a changed live file, in a directory the container mounts, is
    taken by the reload command the deploy runs inside it; the container is not recreated."""
    env = engine_env()

    def files(value: str, take: str = "cp /etc/app/live.conf /tmp/taken\n") -> dict[str, str]:
        svc = yaml.safe_load(compose(True))
        svc["services"]["app"]["volumes"] = ["./app/etc:/etc/app:ro"]
        return {"compose.yaml": "# ciris.reload app sh /etc/app/take.sh\n" + yaml.safe_dump(svc),
                "app/etc/live.conf": value, "app/etc/take.sh": take}

    try:
        out = run_deploy(tmp_path, files("first\n"), {})
        assert out.returncode == 0, out.stderr[-2000:]
        ps = lambda: subprocess.run(["docker", "compose", "-p", PROJECT, "ps", "-q"], env=env,  # noqa: E731
                                    capture_output=True, text=True).stdout.split()
        taken = lambda: subprocess.run(["docker", "compose", "-p", PROJECT, "exec", "-T", "app", "cat", "/tmp/taken"],  # noqa: E731
                                       env=env, capture_output=True, text=True).stdout
        first = ps()
        assert taken() == "first\n"
        out = run_deploy(tmp_path, files("second\n"), {})
        assert out.returncode == 0, out.stderr[-2000:]
        assert ps() == first and taken() == "second\n"
        out = run_deploy(tmp_path, files("third\n", "exit 3\n"), {})
        assert out.returncode != 0 and "app could not take its new files" in out.stderr, out.stderr[-2000:]
    finally:
        subprocess.run(["docker", "compose", "-p", PROJECT, "down", "-t", "1"], env=env, capture_output=True)
