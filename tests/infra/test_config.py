"""Config validation: every mistake a person can make gives one message naming the key."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from components import config, release
from tests.conftest import REPO, stack_raw

P = "ciris-bridge"


def regions(raw):
    return raw[f"{P}:regions"]


def _unknown_provider(raw):
    regions(raw)[1]["provider"] = "aws"


def _duplicate_region(raw):
    regions(raw)[1]["name"] = regions(raw)[0]["name"]


def _duplicate_domain(raw):
    regions(raw)[1]["domain"] = regions(raw)[0]["domain"]


def _no_primary(raw):
    regions(raw)[0]["postgres"] = "replica"


def _two_primaries(raw):
    regions(raw)[1]["postgres"] = "primary"


def _ssh_world_v4(raw):
    raw[f"{P}:admin_ssh_cidrs"] = ["203.0.113.10/32", "0.0.0.0/0"]


def _ssh_world_v6(raw):
    raw[f"{P}:admin_ssh_cidrs"] = ["::/0"]


def _unknown_plan(raw):
    regions(raw)[1]["plan"] = "cx22"  # retired by Hetzner


def _unknown_location(raw):
    regions(raw)[0]["location"] = "mars1"


def _over_ceiling(raw):
    regions(raw)[0]["plan"] = "vc2-4c-8gb"


def _plaintext_secret(raw):
    raw[f"{P}:stripe_secret_key"] = "sk_live_plaintext"


def _plaintext_provider_token(raw):
    raw["hcloud:token"] = "plaintext-token"


def _typo(raw):
    raw[f"{P}:regoins"] = []


def _private_key(raw):
    raw[f"{P}:ssh_public_key"] = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbn...\n-----END OPENSSH PRIVATE KEY-----"


def _missing_budget(raw):
    del raw[f"{P}:budget"]


def _bad_cidr(raw):
    raw[f"{P}:admin_ssh_cidrs"] = ["203.0.113.10/8"]


def _bad_domain(raw):
    regions(raw)[0]["domain"] = "Not A Domain"


def _local_region_in_staging(raw):
    regions(raw)[1].update(provider="local", location="10.77.2.1", plan="local", volume_gb=0)


def _cloud_region_in_local(raw):
    raw[f"{P}:environment"] = "local"


def _fake_upstream_in_staging(raw):
    raw[f"{P}:services"] = {**raw.get(f"{P}:services", {}), "fake_llm_upstream": True}


def witness(raw):
    return raw[f"{P}:witness"]


def _witness_unknown_provider(raw):
    witness(raw)["provider"] = "aws"


def _witness_unknown_location(raw):
    witness(raw)["location"] = "mars1"


def _witness_unknown_plan(raw):
    witness(raw)["plan"] = "s-8vcpu-16gb"


def _witness_at_a_region_provider(raw):
    witness(raw).update(provider="hetzner", location="hel1", plan="cx23")


def _witness_volume(raw):
    witness(raw)["volume_gb"] = 10


def _witness_without_location(raw):
    raw[f"{P}:witness"] = {"provider": "digitalocean", "plan": "s-1vcpu-1gb"}


def _local_witness_in_staging(raw):
    witness(raw).update(provider="local", location="10.77.3.1", plan="local")


def _region_named_witness(raw):
    regions(raw)[1]["name"] = "witness"


def _witness_over_ceiling(raw):
    witness(raw)["plan"] = "s-1vcpu-2gb"  # $12: staging's $14.32 + 12 > $20


def _backup_at(endpoint):
    def mutate(raw):
        raw[f"{P}:backup"] = {"s3_endpoint": endpoint, "bucket": "ciris-bridge-backups"}
    mutate.__name__ = "_backup_at_" + endpoint.split("//")[1].split(".", 1)[1].split(".")[0]
    return mutate


def _restore_to(target):
    def mutate(raw):
        raw[f"{P}:backup"] = {"s3_endpoint": "https://s3.eu-central-003.backblazeb2.com", "bucket": "ciris-bridge-backups",
                              "restore": {"target_time": target}}
    mutate.__name__ = "_restore_to_" + target.replace("-", "").replace(":", "")
    return mutate


def _services(**settings):
    def mutate(raw):
        raw[f"{P}:services"] = {**raw.get(f"{P}:services", {}), **settings}
    mutate.__name__ = "_" + "_".join(f"{k}_{v}" for k, v in settings.items()).replace("'", "").replace("[", "").replace("]", "").replace(", ", "_")
    return mutate


CASES = [
    (_unknown_provider, f"{P}:regions[1].provider", "unknown provider 'aws'"),
    (_duplicate_region, f"{P}:regions[1].name", "duplicate name 'us-east'"),
    (_duplicate_domain, f"{P}:regions[1].domain", "duplicate domain"),
    (_no_primary, f"{P}:regions", "no region has `postgres: primary`"),
    (_two_primaries, f"{P}:regions[1].postgres", "two primaries (us-east and eu-west)"),
    (_ssh_world_v4, f"{P}:admin_ssh_cidrs", "0.0.0.0/0 opens SSH to the whole internet"),
    (_ssh_world_v6, f"{P}:admin_ssh_cidrs", "::/0 opens SSH to the whole internet"),
    (_unknown_plan, f"{P}:regions[1].plan", "does not know hetzner plan 'cx22'"),
    (_unknown_location, f"{P}:regions[0].location", "does not know vultr location 'mars1'"),
    (_over_ceiling, f"{P}:budget.ceiling_usd", "exceeds the hard ceiling $20.00"),
    (_plaintext_secret, f"{P}:stripe_secret_key", "is a secret but is given in plain text"),
    (_plaintext_provider_token, "hcloud:token", "is a secret but is given in plain text"),
    (_typo, f"{P}:regoins", "unknown setting"),
    (_private_key, f"{P}:ssh_public_key", "this is a private key"),
    (_missing_budget, f"{P}:budget", "is required but not set"),
    (_bad_cidr, f"{P}:admin_ssh_cidrs", "is not a CIDR"),
    (_bad_domain, f"{P}:regions[0].domain", "not a valid lower-case domain name"),
    (_local_region_in_staging, f"{P}:regions[1].provider", "only for environment: local, not staging"),
    (_cloud_region_in_local, f"{P}:regions[0].provider", "environment local runs every region on this machine"),
    (_fake_upstream_in_staging, f"{P}:services.fake_llm_upstream", "is for environment local only, not staging"),
    (_witness_unknown_provider, f"{P}:witness.provider", "unknown provider 'aws'"),
    (_witness_unknown_location, f"{P}:witness.location", "does not know digitalocean location 'mars1'"),
    (_witness_unknown_plan, f"{P}:witness.plan", "does not know digitalocean plan 's-8vcpu-16gb'"),
    (_witness_at_a_region_provider, f"{P}:witness.provider", "hetzner already hosts a region; the witness must be at a third provider"),
    (_witness_volume, f"{P}:witness.volume_gb", "unknown setting"),
    (_witness_without_location, f"{P}:witness.location", "is required but not set"),
    (_local_witness_in_staging, f"{P}:witness.provider", "only for environment: local, not staging"),
    (_region_named_witness, f"{P}:regions[1].name", "'witness' is the name of the third host"),
    (_witness_over_ceiling, f"{P}:budget.ceiling_usd", "witness: digitalocean s-1vcpu-2gb in lon1 $12.00"),
    (_backup_at("https://fsn1.your-objectstorage.com"), f"{P}:backup.s3_endpoint",
     "is hetzner's, which also runs eu-west's database: losing that provider would take the backups too"),
    (_backup_at("https://ewr1.vultrobjects.com"), f"{P}:backup.s3_endpoint", "is vultr's, which also runs us-east's database"),
    (_restore_to("yesterday"), f"{P}:backup.restore.target_time",
     "'yesterday' is neither \"latest\" nor an ISO 8601 time (e.g. 2026-11-22T14:05:00Z)"),
    (_restore_to("2026-11-22T14:05:00"), f"{P}:backup.restore.target_time",
     "'2026-11-22T14:05:00' has no time zone; add one (e.g. 2026-11-22T14:05:00Z)"),
    (_services(jwt_keys=["1", "1"]), f"{P}:services.jwt_keys[1]", "duplicate key name '1'"),
    (_services(jwt_keys=["1", "2", "3"]), f"{P}:services.jwt_keys", "at most 2 items"),
    (_services(jwt_keys=[]), f"{P}:services.jwt_keys", "at least 1 item"),
    (_services(jwt_keys=["1", "Key_2"]), f"{P}:services.jwt_keys[1]", "should match pattern"),
    (_services(jwt_keys=["1", "-2"]), f"{P}:services.jwt_keys[1]", "(got '-2')"),
    (_services(jwt_keys=["1", "2"], jwt_signing_key="3"), f"{P}:services.jwt_signing_key", "'3' is not one of services.jwt_keys (1, 2)"),
    (_services(jwt_signing_key="2"), f"{P}:services.jwt_signing_key", "'2' is not one of services.jwt_keys (1)"),
    (_services(proxy_tokens=["1", "1"]), f"{P}:services.proxy_tokens[1]", "duplicate generation '1'"),
    (_services(proxy_tokens=["1", "2", "3"]), f"{P}:services.proxy_tokens", "at most 2 items"),
    (_services(proxy_tokens=[]), f"{P}:services.proxy_tokens", "at least 1 item"),
    (_services(proxy_tokens=["1", "Gen_2"]), f"{P}:services.proxy_tokens[1]", "(got 'Gen_2')"),
    (_services(proxy_tokens=["1", "2"], proxy_token="3"), f"{P}:services.proxy_token", "'3' is not one of services.proxy_tokens (1, 2)"),
    (_services(proxy_token="2"), f"{P}:services.proxy_token", "'2' is not one of services.proxy_tokens (1); add it there and deploy first"),
    (_services(proxy_token_role="admin"), f"{P}:services.proxy_token_role", "'admin'"),
]


@pytest.mark.parametrize("mutate,key,text", CASES, ids=[c[0].__name__.strip("_") for c in CASES])
def test_bad_config_gives_one_clear_message(mutate, key, text):
    raw, secret_keys = stack_raw("staging")
    mutate(raw)
    with pytest.raises(config.ConfigError) as info:
        config.parse(raw, secret_keys)
    assert info.value.key == key
    assert text in info.value.message
    assert str(info.value).startswith(key + ": ")
    assert "\n" not in str(info.value)


def test_plaintext_secret_value_is_not_echoed():
    raw, secret_keys = stack_raw("staging")
    raw[f"{P}:groq_api_key"] = "gsk_canary_value_123"
    with pytest.raises(config.ConfigError) as info:
        config.parse(raw, secret_keys)
    assert "gsk_canary_value_123" not in str(info.value)


@pytest.mark.parametrize("stack", ["staging", "production"])
def test_committed_stacks_are_valid(stack):
    raw, secret_keys = stack_raw(stack)
    cfg = config.parse(raw, secret_keys)
    assert cfg.environment == stack
    assert [r.provider for r in cfg.regions] == ["vultr", "hetzner"]
    assert cfg.primary.provider == "vultr" and [r.provider for r in cfg.replicas] == ["hetzner"]


def test_secure_values_in_a_stack_file_are_secrets(tmp_path):
    src = REPO / "Pulumi.staging.yaml"
    stack_file = tmp_path / "Pulumi.staging.yaml"
    stack_file.write_text(src.read_text() + "  ciris-bridge:stripe_secret_key:\n    secure: v1:abc:def\n")
    cfg = config.load_stack_file(stack_file)
    assert cfg.secret("stripe_secret_key") == config.OFFLINE_SECRET
    assert "stripe_secret_key" in repr(cfg.secrets) and config.OFFLINE_SECRET not in repr(cfg)


def test_engine_json_values_parse_like_file_values():
    """Under `pulumi up` structured values arrive as JSON text; the result must be identical."""
    raw, secret_keys = stack_raw("production")
    assert config.parse(config.engine_config(raw), secret_keys) == config.parse(raw, secret_keys)


def test_a_real_deploy_refuses_the_committed_placeholders():
    """`pulumi up` (the real engine) raises on these; the offline plan only warns (from_engine)."""
    raw, secret_keys = stack_raw("production")
    problems = dict(config.placeholders(config.parse(raw, secret_keys)))
    assert "documentation placeholder" in problems["ciris-bridge:admin_ssh_cidrs"]
    assert "placeholder" in problems["ciris-bridge:ssh_public_key"]
    raw["ciris-bridge:admin_ssh_cidrs"] = ["8.8.8.8/32"]
    raw["ciris-bridge:ssh_public_key"] = raw["ciris-bridge:ssh_public_key"].replace("replace-me@ciris-bridge", "ops@ciris.ai")
    # Nor does production go out with pages that reach no one ...
    assert "production has no alert channel" in dict(config.placeholders(config.parse(raw, secret_keys)))["ciris-bridge:alerts"]
    raw["ciris-bridge:alerts"] = {"email": {"smtp_host": "smtp.example.org", "from": "a@example.org", "to": ["b@example.org"]}}
    # ... nor without a release (the hosts build nothing): `python -m ops release production`.
    raw["ciris-bridge:releases_file"] = "releases/none-here.json"
    assert [(k, "python -m ops release production" in m) for k, m in config.placeholders(config.parse(raw, secret_keys))] \
        == [("ciris-bridge:releases_file", True)]
    with tempfile.TemporaryDirectory() as tmp:
        history = release.History()
        history.add(release.Release(id="0123456789ab", images={"billing": "sha256:" + "a" * 64}))
        history.save(Path(tmp) / "releases.json")
        raw["ciris-bridge:releases_file"] = str(Path(tmp) / "releases.json")
        assert config.placeholders(config.parse(raw, secret_keys)) == []
    local_raw, local_secrets = config.read_stack_file(REPO / "Pulumi.local.yaml")
    assert [k for k, _ in config.placeholders(config.parse(local_raw, local_secrets))] == ["ciris-bridge:environment"]


def test_stripe_webhook_secrets_are_a_list_checked_without_showing_them():
    """One endpoint secret per region's Stripe endpoint, comma-separated; a wrong item is named by
    its position, never shown."""
    raw, secret_keys = stack_raw("staging")
    key = f"{P}:stripe_webhook_secret"
    secret_keys = {*secret_keys, key}
    raw[key] = "whsec_us, whsec_eu"
    assert config.parse(raw, secret_keys).secret("stripe_webhook_secret") == "whsec_us, whsec_eu"
    raw[key] = "whsec_us,sk_live_CANARY"
    with pytest.raises(config.ConfigError) as info:
        config.parse(raw, secret_keys)
    assert info.value.key == key and "item 2 is not a Stripe endpoint secret" in info.value.message
    assert "CANARY" not in str(info.value)
