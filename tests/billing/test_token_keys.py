"""Billing's token keys (ADR 21), in-process with real keys: the published set, the kid that picks
a key, the settings that load them. Billing as a process: test_security.py and test_api.py."""

from __future__ import annotations

import base64
import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from tests.billing.conftest import KEY, KEY_PEM, PREVIOUS_KEY, jwks_file, kid, token
from tests.billing.test_security import forged_tokens

from billing import auth, jwks, settings  # noqa: E402  (the payload, on the path conftest set)

ENV = {"DATABASE_URL": "postgresql://billing@127.0.0.1:1/cirisbilling", "BILLING_JWT_PRIVATE_KEY": KEY_PEM}


def keys() -> dict[str, Ed25519PublicKey]:
    return settings.from_env({**ENV, "BILLING_JWKS_FILE": str(jwks_file())}).jwt_keys


def test_the_kid_is_the_rfc_7638_thumbprint():
    x = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"  # RFC 8037, appendix A.2 and A.3
    key = Ed25519PublicKey.from_public_bytes(base64.urlsafe_b64decode(x + "="))
    assert jwks.thumbprint(key) == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
    assert jwks.jwk(key) == {"kty": "OKP", "crv": "Ed25519", "x": x, "kid": jwks.thumbprint(key), "alg": "EdDSA", "use": "sig"}


def test_the_set_loads_in_its_order_and_round_trips():
    loaded = keys()
    assert list(loaded) == [kid(PREVIOUS_KEY), kid(KEY)]
    assert jwks.render(loaded.values()) == jwks_file().read_text()
    # PyJWT reads it as any JWKS client would.
    assert [k.key_id for k in jwt.PyJWKSet.from_json(jwks_file().read_text()).keys] == list(loaded)


def test_without_a_published_set_the_signing_key_alone_verifies():
    assert list(settings.from_env(ENV).jwt_keys) == [kid(KEY)]


def test_a_token_names_its_key_and_the_previous_key_still_verifies():
    mine, exp = auth.mint(KEY, "u1", "user", 600)
    assert jwt.get_unverified_header(mine)["kid"] == kid(KEY)
    assert auth.verify(keys(), mine) == auth.Principal("u1", "user", exp)
    for headers in (None, {}):  # with its kid, and from before kids
        assert auth.verify(keys(), token("user", "u2", key=PREVIOUS_KEY, headers=headers)).sub == "u2"


def test_the_kid_picks_one_key_and_a_token_without_one_tries_each_once():
    assert auth.candidates(keys(), token(key=PREVIOUS_KEY)) == [keys()[kid(PREVIOUS_KEY)]]
    assert len(auth.candidates(keys(), token(headers={}))) == len(keys()) == 2
    with pytest.raises(auth.AuthError, match="unknown key id"):
        auth.candidates(keys(), token(headers={"kid": "retired"}))


@pytest.mark.parametrize("kind", list(forged_tokens("x")))
def test_forged_tokens_are_refused_whatever_their_kid(kind):
    with pytest.raises(auth.AuthError):
        auth.verify(keys(), forged_tokens("x")[kind])
    cache = auth.TokenCache(keys())
    with pytest.raises(auth.AuthError):
        cache.verify(forged_tokens("x")[kind])


def test_a_removed_key_no_longer_verifies():
    only_new = jwks.parse(jwks.render([KEY.public_key()]))
    with pytest.raises(auth.AuthError, match="unknown key id"):
        auth.verify(only_new, token(key=PREVIOUS_KEY))
    with pytest.raises(auth.AuthError):
        auth.verify(only_new, token(key=PREVIOUS_KEY, headers={}))


def _entry(**change) -> str:
    entry = {**jwks.jwk(KEY.public_key()), **change}
    return json.dumps({"keys": [{k: v for k, v in entry.items() if v is not None}]})


@pytest.mark.parametrize("text, problem", [
    ("not json", "BILLING_JWKS is not a JWK Set"),
    ('{"keys": []}', "BILLING_JWKS holds no keys"),
    (_entry(kty="RSA"), "BILLING_JWKS key 1 is not an Ed25519 public key"),
    (_entry(alg="HS256"), "BILLING_JWKS key 1 is not an Ed25519 public key"),
    (_entry(d="c2VjcmV0"), "BILLING_JWKS key 1 is not an Ed25519 public key (kty OKP, crv Ed25519, no d)"),
    (_entry(x="short"), "BILLING_JWKS key 1 has no valid x"),
    (_entry(kid="1"), "BILLING_JWKS key 1: kid must be the key's RFC 7638 thumbprint"),
    (jwks.render([PREVIOUS_KEY.public_key()]), f"BILLING_JWKS does not hold the signing key (kid {kid(KEY)})"),
])
def test_a_bad_key_set_is_one_clear_setting_error(text, problem):
    with pytest.raises(settings.SettingsError) as e:
        settings.from_env({**ENV, "BILLING_JWKS": text})
    assert str(e.value).startswith(problem) and "\n" not in str(e.value)


def test_a_missing_key_set_file_names_the_variable():
    with pytest.raises(settings.SettingsError, match="BILLING_JWKS_FILE cannot be read"):
        settings.from_env({**ENV, "BILLING_JWKS_FILE": "/nonexistent/jwks.json"})


def test_an_expired_previous_key_token_is_refused_as_expired():
    old = token("user", "u", key=PREVIOUS_KEY, iat=int(time.time()) - 7200, exp=int(time.time()) - 3600)
    with pytest.raises(auth.AuthError, match="expired"):
        auth.verify(keys(), old)


def test_secret_settings_come_from_the_env_file_it_names_and_a_bad_line_is_named_not_shown(tmp_path):
    """Secrets reach the container as a file it mounts (CIRIS_ENV_FILE), not its environment."""
    given = tmp_path / "given.env"
    given.write_text(f"# billing's secrets\n\nDATABASE_URL=postgresql://billing:p%3D1@db/ciris\nBILLING_JWT_PRIVATE_KEY_FILE={tmp_path}/k.pem\n")
    (tmp_path / "k.pem").write_text(KEY_PEM)
    env = {settings.ENV_FILE_VAR: str(given), "DATABASE_URL": "postgresql://overridden@x/y"}
    settings.load_env_file(env)
    assert settings.from_env(env).database_url == "postgresql://billing:p%3D1@db/ciris"  # the file's, '=' kept
    given.write_text("DATABASE_URL=postgresql://x@y/z\nCANARY-a-secret-without-a-key\n")
    with pytest.raises(settings.SettingsError) as e:
        settings.load_env_file({settings.ENV_FILE_VAR: str(given)})
    assert str(e.value) == f"CIRIS_ENV_FILE line 2 of {given} is not KEY=value" and "CANARY" not in str(e.value)
    settings.load_env_file({})  # nothing named: the environment alone, as in the tests
