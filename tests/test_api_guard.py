"""The HTTP API's front door on a real node: every bad input is a 4xx with a reason and is
never echoed back, bodies over 4 MiB get 413, and a node with a key refuses requests
without it."""

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.cluster import ExoNode, running_cluster, wait_converged

pytestmark = pytest.mark.cluster

CHAT = {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "hi"}]}


def post_raw(node: ExoNode, path: str, body: str) -> httpx.Response:
    """POST a JSON text as written (Python's json module would refuse to write some)."""
    return httpx.post(
        node.url + path,
        content=body.encode("utf-8", "surrogatepass"),
        headers={"content-type": "application/json", **node.headers},
        timeout=30.0,
    )


BAD_INPUTS: list[tuple[str, str, str]] = [
    ("/instance", '{"model_id": "\\ud800"}', "model_id"),
    ("/instance", '{"model_id": "SmolLM2-135M-Instruct", "min_nodes": true}', "min_nodes"),
    ("/instance", '{"model_id": "SmolLM2-135M-Instruct", "min_nodes": 1.0}', "min_nodes"),
    ("/instance", '{"model_id": "SmolLM2-135M-Instruct", "min_nodes": "2"}', "min_nodes"),
    ("/instance", '{"model_id": "SmolLM2-135M-Instruct", "extra": 1}', "extra"),
    ("/instance", '{"model_id": "' + "m" * 300 + '"}', "model_id"),
    (
        "/v1/chat/completions",
        json.dumps({**CHAT, "model": "x"})[:-1] + ', "temperature": NaN}',
        "temperature",
    ),
    ("/v1/chat/completions", json.dumps(CHAT)[:-1] + ', "top_p": Infinity}', "top_p"),
    ("/v1/chat/completions", json.dumps(CHAT)[:-1] + ', "max_tokens": true}', "max_tokens"),
    ("/v1/chat/completions", json.dumps(CHAT)[:-1] + ', "stream": "yes"}', "stream"),
    (
        "/v1/chat/completions",
        '{"model": "x", "messages": [{"role": "user", "content": "\\udc00 alone"}]}',
        "messages.0.content",
    ),
    ("/v1/chat/completions", '{"model": "\\ud83d", "messages": []}', "model"),
]


def test_every_bad_input_is_a_4xx_with_a_reason(tmp_path: Path) -> None:
    with running_cluster(tmp_path, 1) as (node,):
        wait_converged([node], 1, "the node to elect itself")
        before = len(node.all_events())
        for path, body, field in BAD_INPUTS:
            response = post_raw(node, path, body)
            expected = 400 if path.startswith("/v1/") else 422  # OpenAI's status on /v1
            assert response.status_code == expected, (
                body[:80],
                response.status_code,
                response.text,
            )
            assert field in response.text, (body[:80], response.text)
        placement = httpx.get(
            node.url + "/instance/placement",
            params={"model_id": "SmolLM2-135M-Instruct", "min_nodes": "true"},
            timeout=10.0,
        )
        assert placement.status_code == 422 and "min_nodes" in placement.text
        # Nothing reached the cluster.
        assert len(node.all_events()) == before
        assert node.state()["instances"] == {} and node.state()["tasks"] == {}


def test_large_bodies_get_413_and_nothing_is_echoed(tmp_path: Path) -> None:
    with running_cluster(tmp_path, 1) as (node,):
        wait_converged([node], 1, "the node to elect itself")
        declared = post_raw(node, "/instance", '{"model_id": "' + "a" * (5 << 20) + '"}')
        assert declared.status_code == 413 and len(declared.content) < 200

        def streamed() -> Iterator[bytes]:
            yield b'{"model_id": "'
            for _ in range(5):
                yield b"a" * (1 << 20)
            yield b'"}'

        chunked = httpx.post(
            node.url + "/instance",
            content=streamed(),
            headers={"content-type": "application/json"},
            timeout=30.0,
        )
        assert chunked.status_code == 413 and len(chunked.content) < 200
        assert "larger than 4 MiB" in chunked.json()["detail"]
        # On /v1 the same refusal comes in OpenAI's shape, whichever way the size showed.
        big_chat = json.dumps({**CHAT, "model": "b" * (5 << 20)})
        for content in (big_chat.encode(), iter([big_chat.encode()])):
            refused = httpx.post(
                node.url + "/v1/chat/completions",
                content=content,
                headers={"content-type": "application/json"},
                timeout=30.0,
            )
            assert refused.status_code == 413 and len(refused.content) < 300
            error = refused.json()["error"]
            assert error["type"] == "invalid_request_error" and "4 MiB" in error["message"]
        # Under the limit but invalid: the answer names the field, not the 3 MiB value.
        echoed = post_raw(
            node, "/v1/chat/completions", json.dumps({**CHAT, "model": "m" * (3 << 20)})
        )
        assert echoed.status_code == 400 and len(echoed.content) < 500
        unknown = post_raw(node, "/instance", json.dumps({"model_id": "u" * 250}))
        assert unknown.status_code == 404 and len(unknown.content) < 2000


def test_a_node_with_a_key_refuses_requests_without_it(tmp_path: Path) -> None:
    keyed = ExoNode(tmp_path / "keyed", [], api_key="k3y-for-tests")
    keyed.start()
    try:
        keyed.wait_ready()
        requests: list[tuple[str, str, dict[str, Any] | None]] = [
            ("GET", "/state", None),
            ("GET", "/v1/models", None),
            ("POST", "/instance", {"model_id": "SmolLM2-135M-Instruct"}),
            ("POST", "/v1/chat/completions", CHAT),
            ("DELETE", "/instance/x", None),
            ("GET", "/state/stream", None),
            ("GET", "/metrics", None),
        ]
        for method, path, body in requests:
            for headers in (
                {},
                {"Authorization": "Bearer wrong"},
                {"Authorization": "k3y-for-tests"},
            ):
                response = httpx.request(
                    method, keyed.url + path, json=body, headers=headers, timeout=10.0
                )
                assert response.status_code == 401, (method, path, headers, response.text)
                assert response.headers["www-authenticate"] == "Bearer"
                if path.startswith("/v1/"):
                    error = response.json()["error"]
                    assert error["type"] == "authentication_error"
                    assert error["code"] == "invalid_api_key" and "Bearer" in error["message"]
                else:
                    assert "needs a key" in response.json()["detail"]
        assert keyed.node_id()  # with the key, it answers
        assert keyed.state()["instances"] == {}  # and nothing refused reached the cluster
        # The dashboard page itself holds no data: it loads, then asks for the key.
        page = httpx.get(keyed.url + "/", timeout=10.0)
        assert page.status_code == 200 and "<html" in page.text.lower()
        outside = httpx.get(keyed.url + "/dashboard/../state", timeout=10.0)
        assert outside.status_code in (401, 404)
    finally:
        keyed.kill()
