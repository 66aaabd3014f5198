"""Errors as OpenAI sends them: {"error": {"message", "type", "param", "code"}}, with the HTTP status.
Messages name what is wrong and never quote what the client (or a provider) sent."""

from __future__ import annotations

TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "insufficient_credits",
         403: "permission_denied", 404: "not_found_error", 405: "invalid_request_error",
         413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 502: "upstream_error",
         503: "service_unavailable", 504: "upstream_timeout"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: tuple[tuple[bytes, bytes], ...] = ()):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": TYPES.get(self.status, "api_error"),
                          "param": self.param, "code": self.code or self.status}}
