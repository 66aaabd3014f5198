"""The proxy's credential (ADR 25): role `proxy` does exactly the proxy's calls and is a 403 naming
the role everywhere else; only the generations billing is configured with are accepted."""

from __future__ import annotations

import re
import uuid

import httpx
import jwt
import pytest

from billing import auth, jwks
from tests.billing.conftest import ADMIN, KEY, PROXY, PROXY_GENERATIONS, SERVICE, balance, bearer, new_user


def test_the_proxy_role_makes_every_call_the_proxy_makes(api):
    """Each route of auth.PROXY_ROUTES, as the proxy's credit gate, resolver and reconcile call them."""
    user = new_user(api, 20)
    called = set()

    def post(template: str, path: str, body: dict | None = None, status: int = 200) -> dict:
        r = api.post(path, json=body, headers=PROXY)
        assert r.status_code == status, (path, r.text)
        called.add(("POST", template))
        return r.json()

    hold = post("/v1/credits/holds", "/v1/credits/holds", {"user_id": user, "amount": 5, "idempotency_key": "p1"}, 201)
    post("/v1/credits/holds/{hold_id}/capture", f"/v1/credits/holds/{hold['hold_id']}/capture", {"force": True})
    other = post("/v1/credits/holds", "/v1/credits/holds", {"user_id": user, "amount": 5, "idempotency_key": "p2"}, 201)
    post("/v1/credits/holds/{hold_id}/release", f"/v1/credits/holds/{other['hold_id']}/release")
    post("/v1/credits/holds/void", "/v1/credits/holds/void", {"user_id": user, "idempotency_key": "p3", "amount": 5})
    post("/v1/credits/forced-debits", "/v1/credits/forced-debits", {"user_id": user, "amount": 5, "idempotency_key": "p4"})
    items = post("/v1/credits/lookup", "/v1/credits/lookup", {"keys": [{"user_id": user, "idempotency_key": "p1"}]})["items"]
    assert items and items[0]["idempotency_key"] == "p1"
    key = api.post("/v1/admin/api-keys", json={"name": "proxy-role-test"}, headers=ADMIN).json()["api_key"]
    assert post("/v1/auth/resolve", "/v1/auth/resolve", {"api_key": key})["user_id"]
    assert called == set(auth.PROXY_ROUTES)  # the allow-list is exactly what was exercised
    assert balance(api, user) == 10


def refused_cases(user: str) -> dict[str, tuple[str, str, dict | None]]:
    """Valid requests a service or admin may make; none is the proxy's."""
    return {
        "mint a user token": ("POST", "/v1/auth/token", {"user_id": user}),
        "grant credits": ("POST", "/v1/credits/grant", {"user_id": user, "amount": 5, "idempotency_key": "g", "reason": "r"}),
        "consume": ("POST", "/v1/credits/consume", {"user_id": user, "amount": 5, "idempotency_key": "c"}),
        "read a balance": ("GET", f"/v1/credits/{user}", None),
        "read usage": ("GET", f"/v1/usage/{user}", None),
        "create a user": ("POST", "/v1/users", {"email": "proxy@example.org"}),
        "mint an API key": ("POST", "/v1/admin/api-keys", {"name": "x"}),
        "list API keys": ("GET", "/v1/admin/api-keys", None),
        "revoke an API key": ("DELETE", f"/v1/admin/api-keys/{uuid.uuid4()}", None),
        "buy credits": ("POST", "/v1/credits/purchase", {"credits": 500}),
        "CIRISBilling credit check": ("POST", "/v1/billing/credits/check", {"oauth_provider": "oauth:google", "external_id": "proxy-role"}),
        "CIRISBilling charge": ("POST", "/v1/billing/charges", {"oauth_provider": "oauth:google", "external_id": "proxy-role",
                                                               "amount_minor": 5, "currency": "USD"}),
        "CIRISBilling transactions": ("GET", "/v1/billing/transactions?oauth_provider=oauth:google&external_id=proxy-role", None),
    }


@pytest.mark.parametrize("case", list(refused_cases("x")))
def test_the_proxy_role_is_403_naming_the_role_everywhere_else(api, case):
    user = new_user(api)
    method, path, body = refused_cases(user)[case]
    r = api.request(method, path, json=body, headers=PROXY)
    assert r.status_code == 403, (case, r.status_code, r.text)
    message = r.json()["error"]["message"]
    assert message.startswith("role proxy may not call ") and "POST /v1/credits/holds" in message, message
    assert balance(api, user) == 15
    # The same request is a service's to make (what `service` may do is unchanged), except buying, which is a user's.
    if case not in ("buy credits", "mint an API key", "list API keys", "revoke an API key", "create a user", "grant credits"):
        assert api.request(method, path, json=body, headers=SERVICE).status_code < 400, case


def test_no_route_outside_the_allow_list_answers_the_proxy_role_with_success(api, billing):
    """Every route billing documents, called as the proxy: a 2xx only on the allow-list."""
    doc = httpx.get(f"{billing.url}/openapi.json").json()
    public = {"/health", "/.well-known/jwks.json", "/v1/webhooks/stripe"}
    seen = 0
    for path, methods in doc["paths"].items():
        for method in methods:
            if path in public or (method.upper(), path) in auth.PROXY_ROUTES:
                continue
            concrete = re.sub(r"\{[^}]+\}", str(uuid.uuid4()), path)
            r = api.request(method.upper(), concrete, json={}, headers=PROXY)
            assert r.status_code >= 400, (method, path, r.status_code)
            seen += 1
    assert seen >= 15


def test_a_revoked_generation_is_401_and_both_generations_work_during_a_rotation(api):
    """Billing accepts PROXY_TOKEN_GENERATIONS ("1" and "2": mid-rotation); "0" was dropped."""
    user = new_user(api)
    hold = {"user_id": user, "amount": 5, "idempotency_key": "gen"}
    for i, gen in enumerate(PROXY_GENERATIONS):
        r = api.post("/v1/credits/holds", json={**hold, "idempotency_key": f"gen-{i}"}, headers=bearer("proxy", "proxy-us-east", gen=gen))
        assert r.status_code == 201, (gen, r.text)
    for case, claims in {"revoked": {"gen": "0"}, "no generation": {}, "not a string": {"gen": ["1"]}, "empty": {"gen": ""}}.items():
        r = api.post("/v1/credits/holds", json=hold, headers=bearer("proxy", "proxy-us-east", **claims))
        assert (r.status_code, r.json()["error"]["code"]) == (401, "unauthorized"), case
        assert api.post("/v1/auth/resolve", json={"api_key": "ck_x"}, headers=bearer("proxy", "p", **claims)).status_code == 401, case
    # The runbook's check after a revocation: the token is refused before the (empty) body is.
    assert api.post("/v1/credits/lookup", json={"keys": []}, headers=bearer("proxy", "p", gen="0")).status_code == 401
    assert api.post("/v1/credits/lookup", json={"keys": []}, headers=bearer("proxy", "p", gen="1")).status_code == 422
    # A generation names nothing outside the proxy role: a service token carrying one is just a service token.
    assert api.post("/v1/credits/holds", json=hold, headers=bearer("service", "ops", gen="0")).status_code == 201


def test_mint_refuses_a_proxy_token_without_a_generation():
    keys = {jwks.thumbprint(KEY.public_key()): KEY.public_key()}
    with pytest.raises(ValueError, match="generation"):
        auth.mint(KEY, "proxy-us-east", "proxy", 60)
    with pytest.raises(ValueError, match="generation"):
        auth.mint(KEY, "ops", "service", 60, generation="1")
    minted, _ = auth.mint(KEY, "proxy-us-east", "proxy", 60, generation="2")
    assert auth.verify(keys, minted, ("2",)).role == "proxy"
    with pytest.raises(auth.AuthError, match="generation"):
        auth.verify(keys, minted, ("1",))  # "2" revoked


def test_the_proxy_generations_setting_names_a_bad_value():
    from billing.settings import SettingsError, _generations

    assert _generations({"PROXY_TOKEN_GENERATIONS": " 1, 2 "}) == ("1", "2")
    assert _generations({}) == ()
    with pytest.raises(SettingsError, match=r"PROXY_TOKEN_GENERATIONS has 'Two'"):
        _generations({"PROXY_TOKEN_GENERATIONS": "1,Two"})


def test_mint_token_gives_a_generation_to_the_proxy_role_and_to_no_other(billing):
    for args in (["--role", "proxy"], ["--role", "service", "--generation", "1"]):
        r = billing.run("mint-token", "--sub", "proxy-x", *args)
        assert r.returncode == 2 and r.stderr.strip() == "billing: mint-token: --generation goes with --role proxy, and only with it", r.stderr
    r = billing.run("mint-token", "--sub", "proxy-x", "--role", "proxy", "--generation", "1")
    assert r.returncode == 0 and jwt.decode(r.stdout.strip(), options={"verify_signature": False})["gen"] == "1", r.stderr
