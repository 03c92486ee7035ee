"""API-key authentication: every route but `/health` answers only a request that sends the key.

The key travels as the OpenAI clients send theirs, `Authorization: Bearer <key>`, so that
`OpenAI(api_key=KEY, base_url=...)` needs nothing more. The check is an ASGI middleware in front
of the whole application, so that a route added later, and an unknown path, are covered too.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi.responses import JSONResponse

from .metrics import ServiceMetrics
from .protocol import ApiError

OPEN_PATHS = frozenset({"/health"})  # liveness answers anyone: a probe that cannot send the key still sees the process

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]


def _digest(value: bytes) -> bytes:
    # Compared as digests of equal length, so that the time taken does not reveal the key's length either.
    return hashlib.sha256(value).digest()


def presented_key(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The token of the request's `Authorization: Bearer <token>` header (the scheme in any case), or None."""
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" and token.strip() else None
    return None


class BearerAuth:
    """Refuses, with 401 and the OpenAI error body, any HTTP request outside `OPEN_PATHS` that does
    not send `key`; each refusal is counted in `moderation_auth_refusals_total`."""

    def __init__(self, app: ASGIApp, key: str, metrics: ServiceMetrics) -> None:
        self.app, self.metrics = app, metrics
        self._expected = _digest(key.encode("utf-8"))

    async def __call__(self, scope: Scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        token = presented_key(scope["headers"])
        if token is not None and hmac.compare_digest(_digest(token), self._expected):
            await self.app(scope, receive, send)
            return
        reason = "missing" if token is None else "invalid"
        self.metrics.auth_refusals.labels(reason=reason).inc()
        message = ("no API key: send it as 'Authorization: Bearer <key>'" if token is None
                   else "incorrect API key provided")
        body = ApiError(401, message, code="invalid_api_key").body().model_dump()
        await JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
