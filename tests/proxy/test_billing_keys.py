"""The proxy verifies billing's user tokens with the key set billing publishes (ADR 21), read from the
JWKS file as the program ships it: in-process with real keys. Through the running proxy: test_gate.py."""

from __future__ import annotations

import sys
import uuid

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.billing.conftest import KEY, PREVIOUS_KEY, kid, token
from tests.billing.test_security import b64, signed
from tests.proxy.conftest import PAYLOAD, jwks_file

sys.path.insert(0, str(PAYLOAD))
from ciris_proxy import settings  # noqa: E402
from ciris_proxy.auth import Tokens  # noqa: E402
from ciris_proxy.errors import ApiError  # noqa: E402

USER = str(uuid.uuid4())
CLAIMS = {"sub": USER, "role": "user", "iss": "ciris-billing", "aud": "ciris-bridge", "iat": 1, "exp": 4_000_000_000}


def tokens() -> Tokens:
    env = {"BILLING_URL": "http://billing:8000", "BILLING_SERVICE_TOKEN": "t", "BILLING_JWKS_FILE": str(jwks_file())}
    return Tokens(settings.from_env(env).billing_keys)


def test_the_proxy_reads_every_key_of_the_file_by_kid():
    assert list(tokens().keys) == [kid(PREVIOUS_KEY), kid(KEY)]


@pytest.mark.parametrize("key, headers", [(KEY, None), (PREVIOUS_KEY, None), (PREVIOUS_KEY, {}), (KEY, {})],
                         ids=["signer", "previous", "previous_without_kid", "signer_without_kid"])
def test_each_published_key_verifies_with_or_without_a_kid(key, headers):
    assert tokens().verify(token("user", USER, key=key, headers=headers)) == USER


def test_a_kid_not_in_the_set_is_401_even_when_a_key_would_fit():
    t = tokens()
    assert t.candidates(token("user", USER, headers={"kid": "retired"})) == []
    assert len(t.candidates(token("user", USER, headers={}))) == len(t.keys)  # a kid-less token: each key once


def hs256_naming(kid_: str) -> str:
    import base64
    import hashlib
    import hmac

    signing = b64({"alg": "HS256", "typ": "JWT", "kid": kid_}) + "." + b64(CLAIMS)
    secret = (jwks_file().read_text()).encode()  # whatever public material an attacker has
    return signing + "." + base64.urlsafe_b64encode(hmac.new(secret, signing.encode(), hashlib.sha256).digest()).rstrip(b"=").decode()


OTHER = Ed25519PrivateKey.generate()
FORGED = {
    "unknown_kid": token("user", USER, headers={"kid": "retired"}),
    "other_key_naming_ours": token("user", USER, key=OTHER, headers={"kid": kid(KEY)}),
    "other_key_without_kid": token("user", USER, key=OTHER, headers={}),
    "other_key_own_kid": token("user", USER, key=OTHER),
    "alg_none_naming_ours": b64({"alg": "none", "typ": "JWT", "kid": kid(KEY)}) + "." + b64(CLAIMS) + ".",
    "hs256_naming_ours": hs256_naming(kid(KEY)),
    "odd_kid": signed({"alg": "EdDSA", "typ": "JWT", "kid": [kid(KEY)]}, CLAIMS),
}


@pytest.mark.parametrize("case", list(FORGED))
def test_forged_tokens_are_401_whatever_their_kid(case):
    with pytest.raises(ApiError) as e:
        tokens().verify(FORGED[case])
    assert e.value.status == 401 and "invalid token" in str(e.value.message)
