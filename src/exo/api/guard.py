"""The API's front door: a size limit on request bodies and, when set, an API key.

Both are plain ASGI middleware around the FastAPI app:

* :class:`BodySizeLimit` answers 413 to a body over the limit, by its ``Content-Length``
  or, for a streamed body, as soon as the bytes read pass it; nothing of it is echoed;
* :class:`ApiKeyGuard` answers 401 to a request without ``Authorization: Bearer <key>``
  (compared in constant time).

Both answer in the error shape of the path's endpoints (:mod:`exo.api.errors`).

Where the API listens and whether a key is required is decided at start
(:func:`check_api_exposure`): loopback needs no key; any other address needs one, or the
operator's explicit ``--insecure-api``.
"""

import ipaddress
import json
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.exceptions import HTTPException

from exo.api.errors import error_body

MAX_BODY_BYTES = 4 * 1024 * 1024
"""Largest request body the API reads (4 MiB); a larger one gets 413."""

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class ApiExposureError(ValueError):
    """The API would be open to the network without a key; the message is for the user."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_api_exposure(host: str, api_key: str | None, insecure: bool) -> str | None:
    """None when the API may listen on ``host`` as configured, a warning to log when it
    may but should not, or :class:`ApiExposureError`."""
    if is_loopback(host) or api_key:
        return None
    if insecure:
        return (
            f"the API listens on {host} without a key (--insecure-api): anyone who reaches "
            "its port can place, delete and use models"
        )
    raise ApiExposureError(
        f"the API would listen on {host} without a key: give --api-key KEY (or EXO_API_KEY), "
        "or --insecure-api to accept that anyone who reaches the port controls the cluster"
    )


async def _answer(
    scope: Scope,
    send: Send,
    status: int,
    reason: str,
    headers: list[tuple[bytes, bytes]],
    code: str | None = None,
) -> None:
    body = json.dumps(error_body(str(scope.get("path", "")), status, reason, code)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> str:
        return f"the request body is larger than {self.max_bytes // (1024 * 1024)} MiB"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", []))
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await _answer(scope, send, 413, self._too_large(), [], code="request_too_large")
            return
        received = 0

        async def limited_receive() -> Message:
            # Raised while the app reads the body, FastAPI answers it as the 413 it is.
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(status_code=413, detail=self._too_large())
            return message

        await self.app(scope, limited_receive, send)


PAGE_PATHS = ("/", "/dashboard/")
"""The dashboard page and its files: served without the key (they hold no cluster data);
everything the page shows comes from requests that carry it."""


def _is_page(scope: Scope) -> bool:
    path = str(scope.get("path", ""))
    return scope.get("method") == "GET" and (
        path == PAGE_PATHS[0] or path.startswith(PAGE_PATHS[1])
    )


class ApiKeyGuard:
    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers", [])).get(b"authorization", b"")
        if _is_page(scope):
            await self.app(scope, receive, send)  # the page holds no data; it asks for the key
            return
        if not secrets.compare_digest(given, self._expected):
            await _answer(
                scope,
                send,
                401,
                "this API needs a key: send Authorization: Bearer <key>",
                [(b"www-authenticate", b"Bearer")],
                code="invalid_api_key",
            )
            return
        await self.app(scope, receive, send)


def guarded(app: ASGIApp, api_key: str | None, max_bytes: int = MAX_BODY_BYTES) -> ASGIApp:
    """``app`` behind the key check (when a key is set) and the body size limit."""
    limited = BodySizeLimit(app, max_bytes)
    return ApiKeyGuard(limited, api_key) if api_key else limited
