"""`make local`: the whole bridge on this machine, deployed the way `pulumi up` deploys the hosts.

    python -m components.local up        # build a release, render Pulumi.local.yaml with the real program, deploy each host
    python -m components.local rollback  # deploy the release before the current one (local/releases.json)
    python -m components.local down      # remove every container, network and volume it made

The program runs under the mock runtime (the clouds are the only thing faked: a `local` host is
this machine, serving on its own address of the loopback interface). For each host -- the witness
first, then the regions in config order -- the bundle the program ships is piped into the same
deploy script (components/deploy.py) that its `*-deploy` command runs over SSH; then each region's
zones are synced the same way. The container engine is Podman behind Docker's API
(scripts/container-engine, which `make local` runs first). What clients need is written to
local/: client_config.json (the `client_config` stack output), outputs.json (every output, as
`pulumi stack output --json` gives them), ca.crt (the CA of every edge),
admin.token (a billing admin token, valid 24 h).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from components import config, deploy, local_oidc, local_s3, plan as plan_mod, postgres_config, services, witness as witness_mod
from components import release as release_mod
from components.billing import mint
from components.mocks import unwrap

ROOT = Path(__file__).resolve().parent.parent
LOCAL = ROOT / "local"
STACK_FILE = ROOT / "Pulumi.local.yaml"
RELEASES = LOCAL / "releases.json"  # every release built here, and the current one (components/release.py)
# Real provider keys are used when given in the environment; otherwise the stack's fake upstream.
PROVIDER_ENV = {"together_api_key": "TOGETHER_API_KEY", "groq_api_key": "GROQ_API_KEY",
                "openrouter_api_key": "OPENROUTER_API_KEY"}


class LocalError(RuntimeError):
    pass


def local_secrets() -> dict[str, str]:
    """Stripe test-mode keys and the backup keys, made once per checkout (kept in local/secrets.json,
    so a second run renders the same bundle), and provider keys from the environment when set."""
    path = LOCAL / "secrets.json"
    made = json.loads(path.read_text()) if path.exists() else {}
    new = {"stripe_secret_key": lambda: f"sk_test_local{secrets.token_hex(12)}",
           # One endpoint secret per region, as Stripe signs each region's endpoint (README, Stripe).
           "stripe_webhook_secret": lambda: ",".join(f"whsec_{secrets.token_hex(16)}" for _ in range(2)),
           "backup_s3_access_key": lambda: f"local{secrets.token_hex(8)}",
           "backup_s3_secret_key": lambda: secrets.token_hex(20),
           "backup_encryption_key": lambda: base64.b64encode(secrets.token_bytes(32)).decode()}
    if set(new) - set(made):
        made = {key: made.get(key) or make() for key, make in new.items()}
        LOCAL.mkdir(exist_ok=True)
        path.write_text(json.dumps(made, indent=2) + "\n")
        path.chmod(0o600)
    given = {key: os.environ[var] for key, var in PROVIDER_ENV.items() if os.environ.get(var)}
    return {**made, **given}


def render(stack_file: Path = STACK_FILE, s3_ca: str | None = None, restore: str | None = None) -> plan_mod.Plan:
    """The plan of the local stack. `restore` (latest or an ISO time): the database is created from
    the local bucket's backups instead of empty (`backup.restore`, ADR 24)."""
    raw, secret_keys = config.read_stack_file(stack_file)
    raw[f"{config.PROJECT}:releases_file"] = str(RELEASES.relative_to(ROOT))  # what `up` built here
    keys = local_secrets()
    if s3_ca:  # backups to this machine's S3 (components/local_s3.py)
        raw[f"{config.PROJECT}:backup"] = {
            "s3_endpoint": local_s3.ENDPOINT, "region": local_s3.REGION, "ca_cert": s3_ca,
            "bucket": local_s3.bucket(keys["backup_encryption_key"]),
            **({"restore": {"target_time": restore}} if restore else {})}
        # Sign-in with this machine's Google and Apple, behind the same address (components/local_oidc.py).
        raw[f"{config.PROJECT}:sign_in"] = local_oidc.sign_in(s3_ca)
    for key, value in keys.items():
        raw[f"{config.PROJECT}:{key}"] = value
        secret_keys.add(f"{config.PROJECT}:{key}")
    if any(key in PROVIDER_ENV for key in keys):  # real providers instead of the fake
        raw[f"{config.PROJECT}:services"] = {**raw.get(f"{config.PROJECT}:services", {}), "fake_llm_upstream": False}
    config.parse(raw, secret_keys)
    return plan_mod.run("local", raw, secret_keys)


def commands(plan: plan_mod.Plan, suffix: str) -> dict[str, dict]:
    """Host name (a region, the witness) -> inputs of its `<host>-<suffix>` remote command, secrets
    unwrapped."""
    found = {}
    for r in plan.registrations:
        if r.type == "command:remote:Command" and r.name.endswith(f"-{suffix}"):
            found[r.name[: -len(suffix) - 1]] = unwrap(r.inputs)
    return found


def engine_env() -> dict[str, str]:
    env = dict(os.environ)
    if "DOCKER_HOST" not in env:
        raise LocalError("no container engine: run `eval \"$(scripts/container-engine setup)\"` first (make local does)")
    env["BASE"] = env.get("CIRIS_BASE_IMAGE", "")
    extra = sorted(Path("/usr/local/share/ca-certificates").glob("*.crt"))
    if extra and "EXTRA_CA_CERTS" not in env:
        env["EXTRA_CA_CERTS"] = "".join(p.read_text() for p in extra)
    return env


def run_script(script: str, args: list[str], stdin: str, env: dict[str, str], what: str) -> str:
    proc = subprocess.run(deploy.local(script, *args), input=stdin, text=True, capture_output=True, env=env)
    if proc.returncode != 0:
        raise LocalError(f"{what} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    for line in proc.stderr.splitlines():  # what the deploy says it did (a twin, a drain), not compose's chatter
        if line.startswith("deploy: "):
            say(f"local: {what}: {line.removeprefix('deploy: ')}")
    return proc.stdout


def add_address(address: str) -> None:
    """The region's own address on this machine (on `lo`: no dummy interfaces needed)."""
    shown = subprocess.run(["ip", "-4", "addr", "show", "dev", "lo"], capture_output=True, text=True).stdout
    if f" {address}/" not in shown:
        subprocess.run(["ip", "addr", "add", f"{address}/32", "dev", "lo"], check=True)


def hosts(plan: plan_mod.Plan) -> list[dict]:
    """Every host this machine plays, in deploy order: the witness first (etcd needs two of its
    three members before the primary's database starts), then the regions in config order (the
    primary first). Each: name, ipv4 (its address on `lo`) and network (its container network)."""
    found = []
    if plan.outputs.get("witness"):
        found.append({"name": "witness", "ipv4": plan.outputs["witness"]["ipv4"], "network": witness_mod.NETWORK})
    for i, region in enumerate(plan.outputs["client_config"]["regions"]):
        found.append({"name": region["name"], "ipv4": region["ipv4"],
                      "network": services.Network.for_region(region["name"], i)})
    return found


NAT_TABLE = "ciris_local"  # our own nftables table: Podman's netavark never rewrites it


def route_like_hosts(hosts: list[dict], env: dict[str, str]) -> None:
    """Make traffic between hosts here look as it does between real ones, in a way that survives
    any container restart (netavark rewrites its own iptables rules whenever it sets up a network;
    rules of ours placed among them ended up below its DROPs and NATs, and regions lost each other).

    - Each host's network is made here, before compose sees it, without Podman's `isolate` option
      (Podman's Docker API sets it on every network it makes, and netavark then drops traffic between
      networks): a connection to another host's published port crosses like one from outside.
    - It leaves with its own host's address as source, which is what the other host's pg_hba and
      firewall expect of a peer: an SNAT in a table of our own, at a priority just before the
      iptables NAT chains; the first NAT chain that decides wins, so netavark's MASQUERADE never
      sees these connections."""
    forget_stale_addresses(env)
    for host in hosts:
        ensure_network(host["network"], env)
        pin_bridge(host["network"], env)
    rules = "".join(f"    ip saddr {h['network'].subnet} ip daddr != {h['network'].subnet} ct status dnat "
                    f"snat to {h['ipv4']}\n" for h in hosts)
    nft(f"table ip {NAT_TABLE}\ndelete table ip {NAT_TABLE}\ntable ip {NAT_TABLE} {{\n"
        f"  chain postrouting {{\n    type nat hook postrouting priority srcnat - 1; policy accept;\n{rules}  }}\n}}\n")
    remove_iptables_rules()
    remove_stale_port_rules(env)
    remove_stale_name_records(env)


def nft(script: str) -> None:
    out = subprocess.run(["nft", "-f", "-"], input=script, capture_output=True, text=True)
    if out.returncode != 0:
        raise LocalError(f"nft refused the local routing rules: {out.stderr.strip()}")


def ensure_network(network: services.Network, env: dict[str, str]) -> None:
    """The host's container network as its compose file declares it (same name, subnet, range and
    compose's own labels, so compose adopts it), made with Podman's CLI: no isolation. A network an
    earlier version made through the Docker API (isolated) is made again: its containers go with it
    (the deploy recreates them; volumes stay)."""
    shown = subprocess.run(["podman", "network", "inspect", network.name], env=env, capture_output=True, text=True)
    if shown.returncode == 0:
        if json.loads(shown.stdout)[0].get("options", {}).get("isolate") != "true":
            return
        print(f"local: making {network.name} again without isolation (its containers are recreated)",
              file=sys.stderr, flush=True)
        subprocess.run(["podman", "network", "rm", "-f", network.name], env=env, capture_output=True, check=True)
    remove_stale_bridge(network)
    labels = {"com.docker.compose.network": network.name, "com.docker.compose.project": network.name}
    made = subprocess.run(["podman", "network", "create", "--subnet", network.subnet, "--ip-range",
                           network.dynamic_range, *(f"--label={k}={v}" for k, v in labels.items()), network.name],
                          env=env, capture_output=True, text=True)
    if made.returncode != 0:
        raise LocalError(f"could not make the network {network.name}: {made.stderr.strip()}")


ANCHOR_LABEL = "ciris.anchor"


def pin_bridge(network: services.Network, env: dict[str, str]) -> None:
    """Keep the network's bridge, and its hardware address, for as long as the stack is up.

    A Linux bridge whose address nobody set takes the lowest of its ports' addresses, so it changes
    as containers come and go; a container that learnt the gateway's old address (and keeps it
    fresh with its own traffic) can then no longer reach the host itself (seen: Postgres stopped
    archiving to the local S3). And netavark deletes the bridge with its last container. An anchor
    container (sleeping, in no region) keeps the bridge; its address is set once, which the kernel
    then keeps; containers that learnt another address forget it."""
    name = f"{network.name}-anchor"
    running = subprocess.run(["podman", "ps", "-q", "--filter", f"name=^{name}$"], env=env, capture_output=True,
                             text=True).stdout.strip()
    if not running:
        subprocess.run(["podman", "rm", "-f", name], env=env, capture_output=True)
        started = subprocess.run(["podman", "run", "-d", "--name", name, "--network", network.name, "--restart", "always",
                                  f"--label={ANCHOR_LABEL}={network.name}", env["BASE"] or "localhost/ciris-base:bookworm",
                                  "sleep", "infinity"], env=env, capture_output=True, text=True)
        if started.returncode != 0:
            raise LocalError(f"could not start {name}: {started.stderr.strip()}")
    bridge = subprocess.run(["podman", "network", "inspect", "--format", "{{.NetworkInterface}}", network.name],
                            env=env, capture_output=True, text=True, check=True).stdout.strip()
    sys_dir = Path("/sys/class/net") / bridge
    if (sys_dir / "addr_assign_type").read_text().strip() == "3":  # NET_ADDR_SET: already pinned
        return
    subprocess.run(["ip", "link", "set", "dev", bridge, "address", (sys_dir / "address").read_text().strip()], check=True)
    gateway = network.gateway
    ids = subprocess.run(["podman", "ps", "-q", "--filter", f"network={network.name}"], env=env, capture_output=True,
                         text=True).stdout.split()
    pids = subprocess.run(["podman", "inspect", "--format", "{{.State.Pid}}", *ids], env=env, capture_output=True,
                          text=True).stdout.split() if ids else []
    for pid in pids:
        subprocess.run(["nsenter", "-t", pid, "-n", "ip", "neigh", "del", gateway, "dev", "eth0"], capture_output=True)


IPAM_DB = Path("/run/containers/networks/ipam.db")  # Podman's record of which address each container holds


def forget_stale_addresses(env: dict[str, str]) -> None:
    """With no container at all on this machine, no address is in use: Podman's address records
    are dropped. They can outlive the containers they name (seen after a teardown whose containers
    were already gone), and Podman then refuses a fixed address to the next container ("requested ip
    address ... is already allocated to container ID ..."). Podman makes the file again."""
    if IPAM_DB.exists() and not subprocess.run(["podman", "ps", "-aq"], env=env, capture_output=True,
                                               text=True).stdout.strip():
        IPAM_DB.unlink()


def remove_stale_bridge(network: services.Network) -> None:
    """A bridge netavark left behind when its network was removed (seen after `compose down`):
    it still holds the network's gateway address, and Podman refuses to make a network on a subnet
    a host interface uses. Called only when no network of that name exists."""
    gateway = network.gateway
    shown = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True).stdout
    for line in shown.splitlines():
        parts = line.split()
        if len(parts) > 3 and parts[1].startswith("podman") and parts[3] == f"{gateway}/24":
            print(f"local: removing the bridge {parts[1]} left behind with {gateway}", file=sys.stderr, flush=True)
            subprocess.run(["ip", "link", "del", parts[1]], capture_output=True)


def remove_stale_port_rules(env: dict[str, str]) -> None:
    """Port-forwarding rules netavark left for containers that are gone (their processes were killed
    with the machine or the session, so nothing tore their network down). Netavark keeps one DNAT
    chain per network; the stale rules stay first in it and send a host's published port to an
    address no container holds (or another one holds now): seen as a region unable to reach even its
    own etcd. In our networks' chains, a rule stays only if it forwards to a port an existing
    container publishes."""
    ids = subprocess.run(["podman", "ps", "-aq", "--no-trunc"], env=env, capture_output=True, text=True).stdout.split()
    published: set[tuple[str, str]] = set()  # (container address, container port)
    if ids:
        shown = subprocess.run(["podman", "inspect", "--format", "{{json .NetworkSettings}}", *ids], env=env,
                               capture_output=True, text=True).stdout
        for settings in map(json.loads, filter(None, shown.splitlines())):
            for net in (settings.get("Networks") or {}).values():
                published |= {(net.get("IPAddress", ""), port.split("/")[0]) for port in settings.get("Ports") or {}}
    rules = [shlex.split(r) for r in subprocess.run(["iptables", "-t", "nat", "-S"], capture_output=True,
                                                     text=True).stdout.splitlines()]
    ours = [r for r in rules if r[:2] == ["-A", "NETAVARK-HOSTPORT-DNAT"] and "-j" in r and
            any(a.startswith("dnat name: ciris-") for a in r)]
    # Our networks' chains, and chains nothing jumps to any more (a network whose last container
    # went: its name, and so its chain, comes back with the network).
    jumped = {r[r.index("-j") + 1] for r in rules if r[:2] == ["-A", "NETAVARK-HOSTPORT-DNAT"] and "-j" in r}
    chains = {r[r.index("-j") + 1] for r in ours} | {r[1] for r in rules if r[:1] == ["-N"] and
                                                      r[1].startswith("NETAVARK-DN-") and r[1] not in jumped}
    stale = [r for r in ours if next(a for a in r if a.startswith("dnat name: ")).split(" id: ")[-1] not in ids]
    for r in rules:
        if r[:1] == ["-A"] and r[1] in chains and "--to-destination" in r:
            address, ports = r[r.index("--to-destination") + 1].split(":", 1)
            if (address, ports.split("-")[0].split("/")[0]) not in published:
                stale.append(r)
    if stale:
        say(f"local: removing {len(stale)} port-forwarding rule(s) of containers that are gone")
    for r in stale:
        subprocess.run(["iptables", "-t", "nat", "-D", *r[1:]], capture_output=True)


AARDVARK = Path("/run/containers/networks/aardvark-dns")  # netavark's name records, one file per network


def remove_stale_name_records(env: dict[str, str]) -> None:
    """Name records netavark left for containers that are gone, for the same reason as their port
    rules: the container network's DNS then answers a service's name with addresses nobody holds
    (seen: the edge's calls to the proxy timed out). In our networks' files, only running
    containers' records stay; aardvark-dns re-reads them on SIGHUP."""
    running = set(subprocess.run(["podman", "ps", "-q", "--no-trunc"], env=env, capture_output=True,
                                 text=True).stdout.split())
    changed = False
    for path in sorted(AARDVARK.glob("ciris-*")):
        lines = path.read_text().splitlines()
        kept = lines[:1] + [line for line in lines[1:] if line.split(" ", 1)[0] in running]
        if kept != lines:
            say(f"local: removing {len(lines) - len(kept)} name record(s) of containers that are gone ({path.name})")
            path.write_text("".join(f"{line}\n" for line in kept))
            changed = True
    pid = AARDVARK / "aardvark.pid"
    if changed and pid.exists():
        try:
            os.kill(int(pid.read_text().strip()), signal.SIGHUP)
        except (ValueError, ProcessLookupError):
            pass  # not running: it reads the files when it starts


def remove_iptables_rules() -> None:
    """The iptables rules earlier versions of `make local` inserted (comment ciris-local)."""
    for table, chain in (("filter", "NETAVARK_ISOLATION_2"), ("nat", "POSTROUTING")):
        rules = subprocess.run(["iptables", "-t", table, "-S", chain], capture_output=True, text=True).stdout
        for rule in rules.splitlines():
            if "ciris-local" in rule:
                subprocess.run(["iptables", "-t", table, "-D", *shlex.split(rule)[1:]], check=False)


def bundle_file(payload: str, path: str) -> str:
    with tarfile.open(fileobj=io.BytesIO(base64.b64decode(payload)), mode="r:gz") as tar:
        return tar.extractfile(path).read().decode()


def admin_token(jwt_pem: str, hours: int = 24) -> str:
    return mint(jwt_pem, "local-admin", "admin", hours * 3600)


def alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie nobody reaped does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return pid > 0 and stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def remove_dead(env: dict[str, str], label: str = "ciris.region") -> list[str]:
    """Remove our containers that Podman still lists as running although their processes are gone
    (the machine restarted, or every process was killed): Compose would leave them as they are, and
    they would never become healthy. Their named volumes stay."""
    ids = subprocess.run(["podman", "ps", "-q", "--filter", f"label={label}"], env=env, capture_output=True,
                         text=True).stdout.split()
    if not ids:
        return []
    shown = subprocess.run(["podman", "inspect", "--format", "{{.Name}} {{.State.Pid}}", *ids], env=env,
                           capture_output=True, text=True).stdout.split("\n")
    dead = [name for name, pid in (line.split() for line in shown if line.strip()) if not alive(int(pid))]
    if dead:
        print(f"local: removing {len(dead)} container(s) whose processes are gone: {', '.join(dead)}",
              file=sys.stderr, flush=True)
        for _ in range(3):  # Podman sometimes refuses the first removal ("container not running")
            rm = subprocess.run(["podman", "rm", "-f", *dead], env=env, capture_output=True, text=True)
            left = subprocess.run(["podman", "ps", "-aq", *(f"--filter=name=^{n}$" for n in dead)], env=env,
                                  capture_output=True, text=True).stdout.split()
            if not left:
                break
            time.sleep(1)
        else:
            raise LocalError(f"could not remove the dead containers {', '.join(dead)}: {rm.stderr.strip()[-500:]}")
    return dead


def kill_orphans(env: dict[str, str]) -> list[str]:
    """Kill the processes of our containers that Podman no longer knows, and drop their network
    namespaces. Seen after a teardown on this machine: the containers were removed from Podman's
    records while their conmon and processes ran on, holding the published ports (the next deploy:
    "address already in use") and the containers' addresses on the bridge."""
    known = set(subprocess.run(["podman", "ps", "-aq", "--no-trunc"], env=env, capture_output=True,
                               text=True).stdout.split())
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid, ppid = int(stat.parent.name), int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(pid)
    killed = []
    for conmon in sorted({p for ps in children.values() for p in ps}):
        try:
            args = Path(f"/proc/{conmon}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not args[0].endswith(b"conmon") or b"-c" not in args or b"-n" not in args:
            continue
        cid, name = args[args.index(b"-c") + 1].decode(), args[args.index(b"-n") + 1].decode()
        if cid in known or not name.startswith("ciris-") or name in killed:
            continue
        tree, i = [conmon], 0
        while i < len(tree):
            tree += children.get(tree[i], [])
            i += 1
        for pid in reversed(tree):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        killed.append(name)
    if killed:
        say(f"local: killed the processes of {len(killed)} container(s) Podman no longer knows: {', '.join(sorted(set(killed)))}")
        time.sleep(1)
    # Their network namespaces (the veth on our bridge with the container's address): those no
    # known container and no process uses.
    used = set(subprocess.run(["podman", "inspect", "--format", "{{.NetworkSettings.SandboxKey}}", *known], env=env,
                              capture_output=True, text=True).stdout.split()) if known else set()
    inodes = set()
    for ns in Path("/proc").glob("[0-9]*/ns/net"):
        try:
            inodes.add(ns.stat().st_ino)
        except OSError:
            pass
    for path in Path("/run/netns").glob("netns-*"):
        try:
            if str(path) not in used and path.stat().st_ino not in inodes:
                subprocess.run(["ip", "netns", "delete", path.name], capture_output=True)
        except OSError:
            pass
    return killed


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def up(stack_file: Path = STACK_FILE, cold: bool = False, labels: dict[str, dict[str, str]] | None = None,
       restore: str | None = None) -> dict:
    """Build a release of every payload (each image once; `cold`: from no cached layer, as a fresh
    machine builds) and deploy it. `labels` (payload -> labels) go on those payloads' images: a
    test's way to ship changed code. `restore`: see render()."""
    env = engine_env()
    remove_dead(env)
    kill_orphans(env)
    if cold:
        release_mod.forget_builds(env, release_mod.LOCAL_PAYLOADS, say)
    made = release_mod.build(release_mod.LOCAL_PAYLOADS, env, base=env["BASE"] or None, cold=cold, labels=labels,
                             say=say)
    history = release_mod.History.load(RELEASES)
    history.add(made)
    history.save(RELEASES)
    return deploy_current(stack_file, env, restore)


def rollback(stack_file: Path = STACK_FILE) -> dict:
    """The release before the current one, deployed through the same path (its images are still here)."""
    history = release_mod.History.load(RELEASES)
    previous = history.previous()
    history.current = previous.id
    history.save(RELEASES)
    say(f"local: rolling back to release {previous.id} (built {previous.built})")
    return deploy_current(stack_file, engine_env())


def deploy_current(stack_file: Path, env: dict[str, str], restore: str | None = None) -> dict:
    started = time.monotonic()
    add_address(local_s3.ADDRESS)
    keys = local_secrets()
    s3_ca = local_s3.up(LOCAL / "s3", str(Path(sys.executable).parent / "moto_server"), shutil.which("caddy") or "caddy",
                        keys["backup_s3_access_key"], keys["backup_s3_secret_key"], keys["backup_encryption_key"])
    local_oidc.up(LOCAL / "oidc", shutil.which("caddy") or "caddy")
    plan = render(stack_file, s3_ca, restore)
    deploys, syncs = commands(plan, "deploy"), commands(plan, "dns-sync")
    regions = plan.outputs["client_config"]["regions"]
    every = hosts(plan)
    for host in every:
        add_address(host["ipv4"])
    route_like_hosts(every, env)
    for host in every:  # one after the other: the witness, then the regions (the primary first)
        name = host["name"]
        t = time.monotonic()
        print(f"local: deploying {name} on {host['ipv4']} ...", file=sys.stderr, flush=True)
        with release_mod.Heartbeat(lambda: f"local: still deploying {name} ({time.monotonic() - t:.0f} s)", say):
            run_script(deploy.DEPLOY, [str(LOCAL / name)], deploys[name]["stdin"], env, f"deploying {name}")
        print(f"local: {name} is up and healthy ({time.monotonic() - t:.0f} s)", file=sys.stderr, flush=True)
    # As `pulumi up` does when `postgres: primary` moves: the declared primary leads (a redeploy that
    # restarted it handed the lock to the other member).
    declared = plan.outputs["database"]["primary"]
    if plan.outputs["database"]["replicas"]:
        print(run_script(deploy.SWITCHOVER, [str(LOCAL / declared), postgres_config.member_name(declared)], "", env,
                         f"making {declared} the primary").strip(), file=sys.stderr, flush=True)
    for region in regions:
        name = region["name"]
        run_script(deploy.DNS_SYNC, [str(LOCAL / name)], syncs[name]["stdin"], env, f"syncing {name}'s zones")
    first = regions[0]["name"]
    payload = deploys[first]["stdin"]
    (LOCAL / "client_config.json").write_text(json.dumps(plan.outputs["client_config"], indent=2) + "\n")
    (LOCAL / "outputs.json").write_text(json.dumps(plan.outputs, indent=2) + "\n")  # python -m ops status local
    (LOCAL / "ca.crt").write_text(plan.artifacts[f"{first}/edge/ca/root.crt"])
    wait_for_edges(regions, LOCAL / "ca.crt")
    token = LOCAL / "admin.token"
    token.write_text(admin_token(bundle_file(payload, "billing/jwt.pem")) + "\n")
    token.chmod(0o600)
    write_agent_env(regions[0], LOCAL / "ca.crt", token.read_text().strip())
    print(f"local: the bridge is up in {time.monotonic() - started:.0f} s (release {history_current()}); "
          "see local/client_config.json",
          file=sys.stderr, flush=True)
    return plan.outputs["client_config"]


def history_current() -> str | None:
    return release_mod.History.load(RELEASES).current


class EdgeConnection(http.client.HTTPSConnection):
    """HTTPS to `address` for the name `host` (SNI, certificate and Host), verified against `ca`:
    the local names resolve through the bridge's own DNS only."""

    def __init__(self, address: str, host: str, ca: Path, timeout: float = 10):
        super().__init__(host, 443, context=ssl.create_default_context(cafile=str(ca)), timeout=timeout)
        self.address = address

    def connect(self) -> None:
        self.sock = self._context.wrap_socket(socket.create_connection((self.address, self.port), self.timeout),
                                              server_hostname=self.host)


def edge_call(address: str, host: str, ca: Path, method: str, path: str, body: dict | None = None,
              token: str | None = None) -> tuple[int, dict]:
    conn = EdgeConnection(address, host, ca)
    try:
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
        conn.request(method, path, json.dumps(body) if body is not None else None, headers)
        r = conn.getresponse()
        data = r.read()
        return r.status, (json.loads(data) if data.startswith(b"{") else {})
    finally:
        conn.close()


def edge_health(address: str, host: str, ca: Path, timeout: float = 5) -> str:
    """The status line of `GET https://<host>/health` sent to `address`, verified against `ca`."""
    conn = EdgeConnection(address, host, ca, timeout)
    try:
        conn.request("GET", "/health")
        r = conn.getresponse()
        return f"HTTP/1.1 {r.status} {r.reason}"
    finally:
        conn.close()


AGENT_ENV = LOCAL / "agent.env"
AGENT_CREDITS = 10_000  # cents granted once to the local agent's own account (its LLM calls)


def write_agent_env(region: dict, ca: Path, admin: str) -> None:
    """local/agent.env: the environment a server-mode CIRIS agent needs to use this bridge. Its
    billing API key is made once (again when the database no longer knows it); its LLM calls go as
    the account of the local Google user `local-agent` (the proxy takes no API key yet: issue #24)."""
    billing, proxy = f"billing1.{region['domain']}", f"proxy1.{region['domain']}"
    def call(method: str, path: str, body: dict | None = None, token: str | None = admin) -> tuple[int, dict]:
        for _ in range(5):  # billing answers 503 for a moment while its database settles after a deploy
            status, answer = edge_call(region["ipv4"], billing, ca, method, path, body, token)
            if status != 503:
                break
            time.sleep(2)
        return status, answer

    old = dict(line.split("=", 1) for line in AGENT_ENV.read_text().splitlines()
               if "=" in line and not line.startswith("#")) if AGENT_ENV.exists() else {}
    key = old.get("CIRIS_BILLING_API_KEY", "")
    status, listed = call("GET", "/v1/admin/api-keys")
    if status != 200:
        raise LocalError(f"listing billing's API keys answered {status}: {listed}")
    if not any(k["prefix"] == key[:len(k["prefix"])] and not k["revoked_at"] for k in listed["items"] if key):
        status, made = call("POST", "/v1/admin/api-keys", {"name": "local agent (make local)"})
        if status != 201:
            raise LocalError(f"making the local agent's API key answered {status}: {made}")
        key = made["api_key"]
    status, signed = call("POST", "/v1/auth/token", {"id_token": local_oidc.id_token("google", "local-agent"),
                                                      "ttl_seconds": 7 * 86_400}, token=None)
    if status != 200:
        raise LocalError(f"signing the local agent in answered {status}: {signed}")
    status, granted = call("POST", "/v1/credits/grant", {"user_id": signed["user_id"], "amount": AGENT_CREDITS,
                                                          "idempotency_key": f"local-agent-credits-{signed['user_id']}",
                                                          "reason": "make local: the local agent's LLM calls"})
    if status not in (200, 201):
        raise LocalError(f"granting the local agent's credits answered {status}: {granted}")
    AGENT_ENV.write_text(
        "# What a server-mode CIRIS agent needs to use this local bridge (make local writes it; valid 7 days).\n"
        "# The names resolve through the bridge's DNS only: map them to the regions' addresses (README).\n"
        f"CIRIS_BILLING_API_URL=https://{billing}\nCIRIS_BILLING_API_KEY={key}\n"
        f"OPENAI_API_BASE=https://{proxy}/v1\nOPENAI_API_KEY={signed['access_token']}\nOPENAI_MODEL_NAME=default\n"
        f"CIRIS_PROXY_URL=https://{proxy}\nSSL_CERT_FILE={ca.resolve()}\n")
    AGENT_ENV.chmod(0o600)


def wait_for_edges(regions: list[dict], ca: Path, budget: float = 120) -> None:
    """Until every edge serves every site's certificate and its /health answers 200. A healthy edge
    container only says Caddy answers TLS: on a fresh data volume it makes its intermediate and the
    sites' certificates after it starts (seen taking seconds on a busy machine)."""
    deadline = time.monotonic() + budget
    for region in regions:
        for service in ("billing", "proxy"):
            host = f"{service}1.{region['domain']}"
            while True:
                try:
                    status = edge_health(region["ipv4"], host, ca)
                    if " 200 " in f"{status} ":
                        break
                except (OSError, ssl.SSLError) as e:
                    status = str(e)
                if time.monotonic() > deadline:
                    raise LocalError(f"https://{host}/health on {region['ipv4']} did not answer 200 within "
                                     f"{budget:.0f} s (last: {status})")
                time.sleep(1)


def wipe(env: dict[str, str] | None = None) -> None:
    """Every host's containers and volumes gone, as if both regions and the witness were lost; the
    backups stay (the local bucket is this machine's, not a host's)."""
    env = env or engine_env()
    # Every host deployed here, the witness (local/witness) as much as the regions.
    for compose in sorted(LOCAL.glob("*/compose.yaml")):
        subprocess.run(["docker", "compose", "-f", str(compose), "down", "--volumes", "--remove-orphans", "-t", "5"],
                       env=env, check=False, capture_output=True)
    # Anything left with our labels (a region renamed since it was deployed, say; the witness's
    # containers carry ciris.region=witness).
    # Podman sometimes cannot remove a container at once ("unlinkat .../userdata/shm: device or
    # resource busy" while its last process exits); one left here would be recreated by the next
    # `up`, which then fails on it. So: again, a few times, and say which stayed.
    for attempt in range(4):
        left = subprocess.run(["podman", "ps", "-aq", "--filter", "label=ciris.region"], env=env,
                              capture_output=True, text=True).stdout.split()
        if not left:
            break
        if attempt:
            time.sleep(3)
        removed = subprocess.run(["podman", "rm", "-f", *left], env=env, check=False, capture_output=True, text=True)
    else:
        if subprocess.run(["podman", "ps", "-aq", "--filter", "label=ciris.region"], env=env,
                          capture_output=True, text=True).stdout.split():
            print(f"local: could not remove container(s) {' '.join(left)}: {removed.stderr.strip()[-500:]}", file=sys.stderr)
    anchors = subprocess.run(["podman", "ps", "-aq", "--filter", f"label={ANCHOR_LABEL}"], env=env,
                             capture_output=True, text=True).stdout.split()
    if anchors:
        subprocess.run(["podman", "rm", "-f", "-t", "0", *anchors], env=env, check=False, capture_output=True)
    remove_compose_objects("volume", env)


def remove_compose_objects(kind: str, env: dict[str, str]) -> None:
    """The stack's compose-made volumes or networks that are left."""
    names = subprocess.run(["podman", kind, "ls", "-q", "--filter", "label=com.docker.compose.project"],
                           env=env, capture_output=True, text=True).stdout.split()
    for name in names:
        if name.startswith("ciris-"):
            subprocess.run(["podman", kind, "rm", "-f", name], env=env, check=False, capture_output=True)


def down() -> None:
    env = engine_env()
    wipe(env)
    local_s3.down(LOCAL / "s3")
    local_oidc.down(LOCAL / "oidc")
    kill_orphans(env)
    subprocess.run(["nft", "delete", "table", "ip", NAT_TABLE], capture_output=True)  # route_like_hosts()'s
    remove_iptables_rules()
    remove_stale_port_rules(env)
    remove_compose_objects("network", env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m components.local", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["up", "down", "rollback"])
    parser.add_argument("--stack-file", type=Path, default=STACK_FILE)
    parser.add_argument("--cold", action="store_true", help="build every image from no cached layer (CI)")
    parser.add_argument("--restore", metavar="TIME", help="up: create the database from the local bucket's backups "
                        "(latest, or an ISO time with its zone) instead of empty: after both regions were lost")
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            up(args.stack_file, cold=args.cold, restore=args.restore)
        elif args.command == "rollback":
            rollback(args.stack_file)
        else:
            down()
    except config.ConfigError as e:
        print(f"invalid config: {e}", file=sys.stderr)
        return 2
    except (LocalError, release_mod.ReleaseError) as e:
        print(f"local: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
