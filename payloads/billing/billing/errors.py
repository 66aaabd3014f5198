"""The one error shape of the API: {"error": {"code", "message", ...}}."""

from __future__ import annotations


class Problem(Exception):
    """`headers`: extra response headers (e.g. Retry-After); 401s always carry WWW-Authenticate."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None, **extra):
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra
        self.headers = {**(headers or {}), **({"WWW-Authenticate": "Bearer"} if status == 401 else {})}

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message, **self.extra}}


def not_found(what: str) -> Problem:
    return Problem(404, "not_found", f"{what} not found")


def conflict(message: str) -> Problem:
    return Problem(409, "conflict", message)


def insufficient(balance: int, needed: int) -> Problem:
    return Problem(402, "insufficient_credits", f"balance {balance} is below the {needed} needed", balance=balance)


def invalid(errors: list) -> Problem:
    """422 from FastAPI/pydantic validation errors: the first one, naming the field, not its value."""
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return Problem(422, "invalid_request", "body is not valid JSON")
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
    return Problem(422, "invalid_request", f"{where}: {first.get('msg', 'invalid')}")
