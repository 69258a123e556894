"""What stands in front of the endpoints: the API key and the CORS allow-list.

Both read the replica's config at request time (`get_config()`; None while
the replica is being built), because the FastAPI app is made before Serve
hands a replica its config. They are plain ASGI middleware, so streamed
answers pass through untouched. The queue cap is not here: it needs the
engine's request count at the moment of admission (streaming.start_requests).
"""
from __future__ import annotations

import secrets
from typing import Callable

from fastapi.responses import JSONResponse
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from raytp.config import EngineConfig
from raytp.serve.protocol import APIError

GetConfig = Callable[[], EngineConfig | None]

# Paths that need the key (below the app's route prefix); /health, /docs and /openapi.json stay open.
_GUARDED_EXACT = ("/tokenize", "/detokenize")
_GUARDED_PREFIX = "/v1/"


def _guarded(scope: Scope) -> bool:
    root, path = scope.get("root_path", ""), scope["path"]
    if root and path.startswith(root):  # a route prefix (Serve's root_path) comes before our paths
        path = path[len(root):]
    return path.startswith(_GUARDED_PREFIX) or path in _GUARDED_EXACT


def _bearer(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


class ApiKeyGuard:
    """401 with OpenAI's error body on /v1/*, /tokenize and /detokenize unless `Authorization: Bearer <api_key>`."""

    def __init__(self, app: ASGIApp, get_config: GetConfig):
        self.app, self.get_config = app, get_config

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        config = self.get_config() if scope["type"] == "http" else None
        if config is not None and config.api_key is not None:
            if _guarded(scope):
                given = _bearer(scope)
                if given is None or not secrets.compare_digest(given.encode(), config.api_key.encode()):
                    err = APIError(401, "Incorrect or missing API key: send `Authorization: Bearer <key>`.",
                                   "invalid_request_error", None, "invalid_api_key")
                    await JSONResponse(err.body(), status_code=401)(scope, receive, send)
                    return
        await self.app(scope, receive, send)


class ConfiguredCORS:
    """Starlette's CORSMiddleware with the replica's `cors_allow_origins` (none: no CORS headers at all).

    Outside the key check, so that a browser's preflight (which carries no key) is answered, and a 401 carries
    the CORS headers the browser needs to show it.
    """

    def __init__(self, app: ASGIApp, get_config: GetConfig):
        self.app, self.get_config = app, get_config
        self._cors: CORSMiddleware | None = None
        self._origins: list[str] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        config = self.get_config() if scope["type"] == "http" else None
        origins = config.cors_allow_origins if config is not None else []
        if not origins:
            await self.app(scope, receive, send)
            return
        if self._cors is None or origins != self._origins:
            self._cors = CORSMiddleware(self.app, allow_origins=origins, allow_methods=["*"],
                                        allow_headers=["*"], allow_credentials="*" not in origins)
            self._origins = list(origins)
        await self._cors(scope, receive, send)
