"""`make local`'s sign-in issuer: Google and Apple stand-ins whose ID tokens the local bridge trusts.

Google and Apple cannot be reached here, so each is an OpenID Connect issuer at
`https://10.77.0.1:9002/<provider>` (the local S3's address and certificate, components/local_s3.py):
a real ES256 key per provider (Google and Apple sign RS256; billing's algorithm is config), derived
from a fixed name like every local key, so every checkout on a machine signs alike (an issuer left
running by another checkout serves the same keys), its JWKS and discovery document served by Caddy. The stack config's `sign_in` names these issuers (components/local.py), and

    make -s id-token PROVIDER=google SUB=alice [EMAIL=alice@example.com]

prints an ID token for that user, as the provider would sign it (one hour), for the mobile flow
with curl (README, "Sign-in").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from jwt.algorithms import ECAlgorithm

from components import local_s3, mock_tls

PORT = 9002
BASE = f"https://{local_s3.ADDRESS}:{PORT}"
PROVIDERS = ("google", "apple")
# The client ids the local bridge accepts (the app's, in production: sign_in.<provider>.client_ids).
CLIENT_IDS = {"google": "ciris-local.apps.googleusercontent.com", "apple": "ai.ciris.local"}


def issuer(provider: str) -> str:
    return f"{BASE}/{provider}"


def key(provider: str) -> ec.EllipticCurvePrivateKey:
    """The provider's signing key: the same on every `make local` (and checkout) of this machine."""
    pem = mock_tls.private_key(f"local-oidc-{provider}", {"algorithm": "ECDSA", "ecdsaCurve": "P256"})["privateKeyPem"]
    return load_pem_private_key(pem.encode(), password=None)


def kid(provider: str) -> str:
    return f"local-{provider}-1"


def sign_in(ca: str) -> dict:
    """The stack config's `sign_in`: both providers at this issuer, trusted through the local CA."""
    return {p: {"client_ids": [CLIENT_IDS[p]], "algorithm": "ES256", "issuer": issuer(p), "jwks_url": f"{issuer(p)}/jwks",
                "ca_cert": ca} for p in PROVIDERS}


def up(root: Path, caddy: str) -> None:
    """Write each provider's JWKS and discovery document and serve them (kept running if it is)."""
    _, cert, server_key = local_s3.certificates(root.parent / "s3")
    www = root / "www"
    for p in PROVIDERS:
        public = {**ECAlgorithm.to_jwk(key(p).public_key(), as_dict=True), "kid": kid(p), "use": "sig", "alg": "ES256"}
        (www / p / ".well-known").mkdir(parents=True, exist_ok=True)
        (www / p / "jwks").write_text(json.dumps({"keys": [public]}))
        (www / p / ".well-known" / "openid-configuration").write_text(json.dumps(
            {"issuer": issuer(p), "jwks_uri": f"{issuer(p)}/jwks", "id_token_signing_alg_values_supported": ["ES256"]}))
    caddyfile = root / "Caddyfile"
    caddyfile.write_text(
        f"{{\n  admin off\n  auto_https off\n  default_sni {local_s3.ADDRESS}\n}}\n"
        f"https://{local_s3.ADDRESS}:{PORT} {{\n  tls {cert} {server_key}\n  header Content-Type application/json\n"
        f"  root * {www}\n  file_server\n}}\n")
    local_s3.start_daemon(root, "caddy", [caddy, "run", "--config", str(caddyfile), "--adapter", "caddyfile"],
                          env={**os.environ, "XDG_DATA_HOME": str(root / "caddy-data"),
                               "XDG_CONFIG_HOME": str(root / "caddy-config")})


def down(root: Path) -> None:
    local_s3.stop_daemon(root, "caddy")


def id_token(provider: str, sub: str, email: str | None = None, ttl: int = 3600) -> str:
    now = int(time.time())
    claims = {"iss": issuer(provider), "aud": CLIENT_IDS[provider], "sub": sub, "iat": now, "exp": now + ttl,
              **({"email": email, "email_verified": True} if email else {})}
    return jwt.encode(claims, key(provider), algorithm="ES256", headers={"kid": kid(provider)})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m components.local_oidc",
                                     description="print an ID token the local bridge trusts (make id-token)")
    parser.add_argument("provider", choices=PROVIDERS)
    parser.add_argument("sub", help="the user's id at the provider (any string of 1-255 characters)")
    parser.add_argument("email", nargs="?", default=None)
    args = parser.parse_args(argv)
    if not 1 <= len(args.sub) <= 255:
        parser.error(f"SUB must be 1-255 characters, got {len(args.sub)}")
    print(id_token(args.provider, args.sub, args.email or None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
