"""The API key guard and the body size limit, as ASGI middleware around a tiny app (no
network, no node): which requests get through, and what the refused ones are told."""

from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI, Request

from exo.api.guard import (
    ApiExposureError,
    ApiKeyGuard,
    ASGIApp,
    Message,
    Receive,
    Scope,
    Send,
    check_api_exposure,
    guarded,
    is_loopback,
)

KEY = "k3y-for-the-guard-tests"


async def echo_app(scope: Scope, receive: Receive, send: Send) -> None:
    """Answers 200 with the number of body bytes it read."""
    read = 0
    while True:
        message = await receive()
        read += len(message.get("body", b""))
        if not message.get("more_body", False):
            break
    body = str(read).encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


def client(api_key: str | None, max_bytes: int = 1024) -> httpx.AsyncClient:
    app = guarded(echo_app, api_key, max_bytes)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://node")


@pytest.mark.anyio
@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer ",
        "Bearer",
        f"Bearer {KEY[:-1]}",  # a prefix of the right key
        f"Bearer {KEY}x",  # the right key and more
        f"Bearer  {KEY}",
        f"bearer {KEY}",
        f"Basic {KEY}",
        KEY,
        f"Bearer {KEY.upper()}",
    ],
)
async def test_anything_but_the_exact_key_is_refused_with_401(authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    async with client(KEY) as http:
        response = await http.get("/state", headers=headers)
    assert response.status_code == 401, authorization
    assert response.headers["www-authenticate"] == "Bearer"
    assert "Authorization: Bearer <key>" in response.text
    assert KEY not in response.text


@pytest.mark.anyio
async def test_the_exact_key_gets_through_on_every_path() -> None:
    async with client(KEY) as http:
        for method, path in [("GET", "/state"), ("POST", "/instance"), ("GET", "/dashboard/")]:
            response = await http.request(
                method, path, headers={"Authorization": f"Bearer {KEY}"}, content=b"abc"
            )
            assert response.status_code == 200, (method, path)


@pytest.mark.anyio
@pytest.mark.parametrize("path", ["/", "/dashboard/", "/dashboard/app.js"])
async def test_the_page_and_its_files_need_no_key(path: str) -> None:
    async with client(KEY) as http:
        assert (await http.get(path)).status_code == 200


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/"),  # only reading the page is free
        ("DELETE", "/dashboard/app.js"),
        ("GET", "/dashboard"),  # not under /dashboard/
        ("GET", "/dashboardx/state"),
        ("GET", "/state"),
        ("GET", "/v1/models"),
        ("GET", "/metrics"),
        ("GET", "/gpus/"),
    ],
)
async def test_data_paths_are_never_taken_for_the_page(method: str, path: str) -> None:
    async with client(KEY) as http:
        assert (await http.request(method, path)).status_code == 401, (method, path)


@pytest.mark.anyio
async def test_without_a_key_everything_gets_through() -> None:
    async with client(None) as http:
        assert (await http.get("/state")).status_code == 200
        assert (await http.post("/instance", content=b"x")).status_code == 200


@pytest.mark.anyio
async def test_a_websocket_or_lifespan_scope_passes_the_key_guard_untouched() -> None:
    seen: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])

    async def receive() -> dict[str, object]:
        return {}

    async def send(message: object) -> None:
        raise AssertionError("the guard answered a scope that is not HTTP")

    await ApiKeyGuard(app, KEY)({"type": "lifespan"}, receive, send)
    assert seen == ["lifespan"]


@pytest.mark.anyio
async def test_a_body_over_the_limit_is_refused_by_its_length_or_as_it_streams() -> None:
    async with client(None, max_bytes=1024) as http:
        assert (await http.post("/instance", content=b"x" * 1024)).text == "1024"
        declared = await http.post("/instance", content=b"x" * 1025)
        assert declared.status_code == 413
        assert "larger than" in declared.text

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(3):
                yield b"y" * 600  # no Content-Length: counted as it comes

        with pytest.raises(Exception, match="413"):
            # The tiny app does not turn the HTTPException into a response as FastAPI
            # does; that it is raised while reading is the limit working.
            await http.post("/instance", content=chunks())


MIB = 1024 * 1024


def refused_by_length(max_bytes: int) -> bytes:
    return b"x" * (max_bytes + 1)


@pytest.mark.anyio
async def test_a_refused_request_on_v1_gets_openais_error_shape_with_its_code() -> None:
    async with client(KEY, max_bytes=1024) as http:
        no_key = await http.get("/v1/models")
        too_large = await http.post(
            "/v1/chat/completions",
            content=refused_by_length(1024),
            headers={"Authorization": f"Bearer {KEY}"},
        )
    assert no_key.status_code == 401
    error = no_key.json()["error"]
    assert error["type"] == "authentication_error"
    assert error["code"] == "invalid_api_key"
    assert error["param"] is None
    assert "Authorization: Bearer <key>" in error["message"]

    assert too_large.status_code == 413
    error = too_large.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "request_too_large"
    assert "larger than" in error["message"]


@pytest.mark.anyio
async def test_a_refused_request_on_a_cluster_path_gets_only_a_detail() -> None:
    async with client(KEY, max_bytes=1024) as http:
        no_key = await http.get("/state")
        too_large = await http.post(
            "/instance", content=refused_by_length(1024), headers={"Authorization": f"Bearer {KEY}"}
        )
    assert list(no_key.json()) == ["detail"]
    assert "Authorization: Bearer <key>" in no_key.json()["detail"]
    assert list(too_large.json()) == ["detail"]
    assert "larger than" in too_large.json()["detail"]


@pytest.mark.anyio
@pytest.mark.parametrize("path", ["/state", "/v1/models"])
async def test_a_refusal_is_a_well_formed_json_response(path: str) -> None:
    async with client(KEY, max_bytes=1024) as http:
        responses = [
            await http.get(path),
            await http.post(
                path, content=refused_by_length(1024), headers={"Authorization": f"Bearer {KEY}"}
            ),
        ]
    for response in responses:
        assert response.status_code in (401, 413)
        assert response.headers["content-type"] == "application/json"
        assert response.headers["content-length"] == str(len(response.content))
        assert response.json()


@pytest.mark.anyio
@pytest.mark.parametrize("limit_mib", [1, 3])
async def test_the_413_names_the_limit_in_mib(limit_mib: int) -> None:
    async with client(None, max_bytes=limit_mib * MIB) as http:
        response = await http.post("/instance", content=refused_by_length(limit_mib * MIB))
    assert response.status_code == 413
    assert f"larger than {limit_mib} MiB" in response.json()["detail"]


@pytest.mark.anyio
async def test_the_default_limit_is_4_mib() -> None:
    app = guarded(echo_app, None)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://node"
    ) as http:
        assert (await http.post("/instance", content=b"x" * (4 * MIB))).status_code == 200
        response = await http.post("/instance", content=refused_by_length(4 * MIB))
    assert response.status_code == 413
    assert "larger than 4 MiB" in response.json()["detail"]


@pytest.mark.anyio
async def test_a_streamed_body_over_the_limit_is_answered_413_by_fastapi() -> None:
    api = FastAPI()

    @api.post("/instance")
    async def read_all(request: Request) -> dict[str, int]:
        return {"read": len(await request.body())}

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(3):
            yield b"y" * (MIB // 2)  # no Content-Length: counted as it comes

    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=guarded(api, KEY, max_bytes=MIB)),
        base_url="http://node",
        headers={"Authorization": f"Bearer {KEY}"},
    ) as http:
        assert (await http.post("/instance", content=b"z" * MIB)).json() == {"read": MIB}
        response = await http.post("/instance", content=chunks())
    assert response.status_code == 413
    assert "larger than 1 MiB" in response.json()["detail"]


@pytest.mark.anyio
@pytest.mark.parametrize("api_key", [KEY, None])
@pytest.mark.parametrize("scope_type", ["websocket", "lifespan"])
async def test_a_scope_that_is_not_http_reaches_the_app_with_its_own_channels(
    api_key: str | None, scope_type: str
) -> None:
    scope: Scope = {"type": scope_type, "path": "/state", "headers": []}
    seen: list[object] = []
    sent: list[object] = []

    async def app(app_scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(app_scope)
        await send(await receive())

    async def receive() -> dict[str, object]:
        return {"type": f"{scope_type}.connect"}

    async def send(message: object) -> None:
        sent.append(message)

    await guarded(app, api_key, max_bytes=1)(scope, receive, send)
    assert seen == [scope] and seen[0] is scope
    assert sent == [{"type": f"{scope_type}.connect"}]


async def call_bare(app: ASGIApp, scope: Scope) -> list[Message]:
    """Runs ``app`` on ``scope`` with an empty body; the messages it sent."""
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


@pytest.mark.anyio
async def test_an_http_scope_without_headers_is_judged_like_one_without_a_key() -> None:
    # The ASGI servers always send headers; a bare scope (a test harness's) still works.
    scope: Scope = {"type": "http", "method": "GET", "path": "/state"}
    refused = await call_bare(guarded(echo_app, KEY), dict(scope))
    assert refused[0]["status"] == 401
    passed = await call_bare(guarded(echo_app, None), dict(scope))
    assert passed[0]["status"] == 200


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "127.8.9.10", "::1"])
def test_loopback_needs_no_key_and_gets_no_warning(host: str) -> None:
    assert is_loopback(host)
    assert check_api_exposure(host, None, insecure=False) is None
    assert check_api_exposure(host, None, insecure=True) is None


@pytest.mark.parametrize(
    "host", ["0.0.0.0", "::", "192.168.1.20", "10.0.0.1", "LOCALHOST", "my-node.local", ""]
)
def test_any_other_host_needs_a_key_or_the_insecure_flag(host: str) -> None:
    assert not is_loopback(host)
    assert check_api_exposure(host, KEY, insecure=False) is None
    assert check_api_exposure(host, KEY, insecure=True) is None
    with pytest.raises(ApiExposureError) as refused:
        check_api_exposure(host, None, insecure=False)
    message = str(refused.value)
    assert f"listen on {host} without a key" in message
    for remedy in ("--api-key", "EXO_API_KEY", "--insecure-api"):
        assert remedy in message
    with pytest.raises(ApiExposureError):
        check_api_exposure(host, "", insecure=False)  # an empty key is no key
    warning = check_api_exposure(host, None, insecure=True)
    assert warning is not None
    assert f"listens on {host} without a key (--insecure-api)" in warning
