"""Bad settings stop the proxy with one line naming the variable, and no secret in it."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys

import json

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from tests.proxy.conftest import PAYLOAD, jwks_file

RSA_JWKS = json.dumps({"keys": [{**json.loads(RSAAlgorithm.to_jwk(rsa.generate_private_key(65537, 2048).public_key())), "kid": "r"}]})
OUR_KEY = json.loads(jwks_file().read_text())["keys"][-1]
GOOD = {
    "CAPTURE_JOURNAL": "/tmp/ciris-proxy-settings-test/captures.jsonl",
    "BILLING_URL": "http://127.0.0.1:8000",
    "BILLING_SERVICE_TOKEN": "svc-token-CANARY",
    "BILLING_JWKS_FILE": str(jwks_file()),
}


def run(*args: str, **env: str) -> subprocess.CompletedProcess:
    merged = {k: v for k, v in {**GOOD, **env}.items() if v is not None}
    return subprocess.run([sys.executable, "-m", "ciris_proxy", *args], cwd=PAYLOAD, env={"PATH": "/usr/bin:/bin", **merged},
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("env, message", [
    ({"BILLING_URL": None}, "proxy: BILLING_URL is not set"),
    ({"BILLING_URL": "billing:8000"}, "proxy: BILLING_URL must be an http(s) URL, got 'billing:8000'"),
    ({"BILLING_JWKS": "CANARY-not-a-key-set"}, 'proxy: BILLING_JWKS is not a JWK Set ({"keys": [...]})'),
    ({"BILLING_JWKS": RSA_JWKS}, "proxy: BILLING_JWKS key 1 is not billing's: an Ed25519 public key (kty OKP, crv Ed25519, no d)"),
    ({"BILLING_JWKS": json.dumps({"keys": [{**OUR_KEY, "d": "CANARY"}]})},
     "proxy: BILLING_JWKS key 1 is not billing's: an Ed25519 public key (kty OKP, crv Ed25519, no d)"),
    ({"BILLING_JWKS": json.dumps({"keys": [OUR_KEY, OUR_KEY]})}, "proxy: BILLING_JWKS key 2 has no kid of its own"),
    ({"BILLING_JWKS": json.dumps({"keys": []})}, "proxy: BILLING_JWKS holds no keys"),
    ({"BILLING_JWKS_FILE": "/nonexistent/jwks.json"},
     "proxy: BILLING_JWKS_FILE cannot be read (No such file or directory: /nonexistent/jwks.json)"),
    ({"BILLING_JWKS_FILE": None}, "proxy: BILLING_JWKS is not set (nor BILLING_JWKS_FILE)"),
    ({"BILLING_SERVICE_TOKEN": None}, "proxy: BILLING_SERVICE_TOKEN is not set (nor BILLING_SERVICE_TOKEN_FILE)"),
    ({"MAX_OUTPUT_TOKENS": "lots"}, "proxy: MAX_OUTPUT_TOKENS must be an integer, got 'lots'"),
    ({"MAX_N": "0"}, "proxy: MAX_N must be between 1 and 128, got 0"),
    ({"MAX_BODY_BYTES": "10"}, "proxy: MAX_BODY_BYTES must be between 1024 and 67108864, got 10"),
    ({"PORT": "eighty"}, "proxy: PORT must be an integer, got 'eighty'"),
    ({"HOLD_TTL_SECONDS": "4"}, "proxy: HOLD_TTL_SECONDS must be between 5 and 86400, got 4"),
    ({"STANDIN_USER_CAP_CENTS": "-1"}, "proxy: STANDIN_USER_CAP_CENTS must be between 0 and 1000000, got -1"),
    ({"HOLD_PLACEMENT_TIMEOUT_MS": "1.5"}, "proxy: HOLD_PLACEMENT_TIMEOUT_MS must be an integer, got '1.5'"),
    ({"CAPTURE_JOURNAL": "/proc/ciris/captures.jsonl"},
     "proxy: CAPTURE_JOURNAL cannot be written (No such file or directory: /proc/ciris/captures.jsonl)"),
    ({"PROXY_CONFIG": "/nonexistent/config.yaml"}, "proxy: PROXY_CONFIG names no file: /nonexistent/config.yaml"),
])
def test_bad_setting_is_one_clear_line(env, message):
    r = run("serve", **env)
    assert r.returncode == 2 and r.stderr.strip() == message, r.stderr
    assert "CANARY" not in r.stderr + r.stdout


def test_a_journal_another_process_uses_stops_the_start(tmp_path):
    """A new container started before the old one stopped must not compact away what the old one owes."""
    journal = tmp_path / "captures.jsonl"
    journal.write_text('{"op": "capture", "id": "h1", "hold": "h1"}\n')
    lock = os.open(f"{journal}.lock", os.O_WRONLY | os.O_CREAT)
    fcntl.flock(lock, fcntl.LOCK_EX)  # as the running proxy holds it
    try:
        r = run("serve", CAPTURE_JOURNAL=str(journal))
    finally:
        os.close(lock)
    assert r.returncode == 2 and r.stderr.strip() == (
        f"proxy: CAPTURE_JOURNAL {journal} is in use by another process (it holds {journal}.lock); "
        "stop the other proxy first"), r.stderr
    assert journal.read_text() == '{"op": "capture", "id": "h1", "hold": "h1"}\n'


def test_render_prints_the_config_the_program_ships():
    r = run("render")
    assert r.returncode == 0, r.stderr
    config = yaml.safe_load(r.stdout)
    orders = [(d["model_name"], d["litellm_params"]["model"].split("/")[0], d["litellm_params"]["order"])
              for d in config["model_list"] if "order" in d["litellm_params"]]
    assert [o for o in orders if o[0] == "llama-3.3-70b"] == [
        ("llama-3.3-70b", "together_ai", 1), ("llama-3.3-70b", "groq", 2), ("llama-3.3-70b", "openrouter", 3)]
    assert config["router_settings"]["num_retries"] == 0  # the next provider is the retry
    openrouter = next(d for d in config["model_list"] if d["model_info"]["id"] == "llama-3.3-70b@openrouter")
    assert openrouter["litellm_params"]["extra_body"] == {"provider": {"data_collection": "deny", "zdr": True}}


def test_settings_come_from_the_env_file_and_a_bad_line_is_named_not_shown(tmp_path):
    """Secrets reach the container as a file it mounts (CIRIS_ENV_FILE), not its environment."""
    given = tmp_path / "given.env"
    given.write_text("# the proxy's secret settings\n\nBILLING_URL=billing:8000\n")  # the file's value is the one used
    r = run("serve", CIRIS_ENV_FILE=str(given))
    assert r.returncode == 2 and r.stderr.strip() == "proxy: BILLING_URL must be an http(s) URL, got 'billing:8000'", r.stderr
    given.write_text("BILLING_URL=http://127.0.0.1:8000\nCANARY-secret-without-a-key\n")
    r = run("serve", CIRIS_ENV_FILE=str(given))
    assert r.returncode == 2 and r.stderr.strip() == f"proxy: CIRIS_ENV_FILE line 2 of {given} is not KEY=value", r.stderr
    r = run("serve", CIRIS_ENV_FILE=str(tmp_path / "gone.env"))
    assert r.stderr.strip() == f"proxy: CIRIS_ENV_FILE names {tmp_path / 'gone.env'}, which cannot be read (No such file or directory)"
    assert "CANARY" not in r.stderr + r.stdout
