"""A local OpenID Connect issuer standing in for Google and Apple: real RSA keys, a JWKS and a
discovery document per provider over HTTPS (its own CA), and ID tokens signed like theirs.

    issuer = LocalIssuer(directory)               # serves https://127.0.0.1:<port>/google, /apple
    env = issuer.env()                            # billing's OIDC_* settings trusting it
    token = issuer.id_token("google", "sub-1")    # an ID token billing accepts
"""

from __future__ import annotations

import ssl
import time
from collections import Counter
from pathlib import Path

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from tests.json_server import JsonHandler, serve
from tests.postgres.conftest import make_ca

PROVIDERS = ("google", "apple")
CLIENT_IDS = {"google": "ciris-test.apps.googleusercontent.com", "apple": "ai.ciris.test"}


def new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


class LocalIssuer:
    def __init__(self, directory: Path, host: str = "127.0.0.1", port: int = 0):
        self.ca_file, certs = make_ca(directory, addrs=(host,))
        crt, key = certs[host]
        # Each provider's published keys by kid; new tokens are signed with the last one.
        self.keys: dict[str, dict[str, rsa.RSAPrivateKey]] = {p: {f"{p}-1": new_key()} for p in PROVIDERS}
        self.jwks_requests: Counter[str] = Counter()
        self.down = False  # True: every request answers 503 (an issuer outage)
        outer = self

        class Handler(JsonHandler):
            def do_GET(self):
                provider, _, rest = self.path.strip("/").partition("/")
                if outer.down or provider not in PROVIDERS:
                    return self.reply(503 if outer.down else 404, {"error": "unavailable" if outer.down else "not found"})
                if rest == "jwks":
                    outer.jwks_requests[provider] += 1
                    return self.reply(200, outer.jwks(provider))
                if rest == ".well-known/openid-configuration":
                    return self.reply(200, {"issuer": outer.issuer(provider), "jwks_uri": outer.jwks_url(provider),
                                             "id_token_signing_alg_values_supported": ["RS256"]})
                self.reply(404, {"error": "not found"})

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(crt, key)
        self.server, self.base = serve(Handler, host, port, tls=context)

    def issuer(self, provider: str) -> str:
        return f"{self.base}/{provider}"

    def jwks_url(self, provider: str) -> str:
        return f"{self.base}/{provider}/jwks"

    def jwks(self, provider: str) -> dict:
        return {"keys": [{**RSAAlgorithm.to_jwk(k.public_key(), as_dict=True), "kid": kid, "use": "sig", "alg": "RS256"}
                         for kid, k in self.keys[provider].items()]}

    def env(self) -> dict[str, str]:
        """Billing's settings to trust this issuer for both providers."""
        env = {"OIDC_CA_FILE": str(self.ca_file)}
        for p in PROVIDERS:
            env |= {f"OIDC_{p.upper()}_CLIENT_IDS": CLIENT_IDS[p], f"OIDC_{p.upper()}_ISSUERS": self.issuer(p),
                    f"OIDC_{p.upper()}_JWKS_URL": self.jwks_url(p)}
        return env

    def rotate(self, provider: str) -> str:
        """Publish a new signing key (the old ones stay published); its kid."""
        kid = f"{provider}-{len(self.keys[provider]) + 1}"
        self.keys[provider][kid] = new_key()
        return kid

    def id_token(self, provider: str, sub: str, *, email: str | None = None, ttl: int = 3600, kid: str | None = None,
                 key=None, **claims) -> str:
        """An ID token as the provider signs it; `claims` override or (as None) remove any claim."""
        kid = kid or list(self.keys[provider])[-1]
        key = key or self.keys[provider].get(kid) or new_key()
        now = int(time.time())
        body = {"iss": self.issuer(provider), "aud": CLIENT_IDS[provider], "sub": sub, "iat": now, "exp": now + ttl,
                **({"email": email, "email_verified": True} if email else {}), **claims}
        return jwt.encode({k: v for k, v in body.items() if v is not None}, key, algorithm="RS256", headers={"kid": kid})

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
