"""The API key guard and the body size limit, as ASGI middleware around a tiny app (no
network, no node): which requests get through, and what the refused ones are told."""

from collections.abc import AsyncIterator

import httpx
import pytest

from exo.api.guard import ApiKeyGuard, Receive, Scope, Send, guarded

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
