"""Bearer-token auth: when a token is configured, writes (and optionally reads) must carry it."""

from __future__ import annotations

import hmac

from aiohttp import web

READ_METHODS = ("GET", "HEAD", "OPTIONS")
OPEN_PATHS = ("/api/v1/health", "/api/v1/ready", "/metrics")
ALWAYS_PROTECTED = ("/secret",)  # path endings that need the token even as reads: a run's secret


def make_auth_middleware(token: str | None, protect_reads: bool):
    expected = f"Bearer {token}".encode() if token else None

    @web.middleware
    async def auth_middleware(request: web.Request, handler) -> web.StreamResponse:
        page = request.path == "/" or request.path.startswith("/static/")  # the page itself holds no data
        guarded = protect_reads or request.method not in READ_METHODS or request.path.endswith(ALWAYS_PROTECTED)
        needs_token = expected is not None and request.path not in OPEN_PATHS and not page and guarded
        if needs_token and expected is not None:
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):  # constant time: the token does not leak through timing
                raise web.HTTPUnauthorized(
                    text="missing or wrong bearer token: send 'Authorization: Bearer <MESH_API_TOKEN>'",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        return await handler(request)

    return auth_middleware
