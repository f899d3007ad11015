"""A 422 names the problem in a bounded reason, whatever the body: unknown keys are their
own error location, so a huge key or a huge number of them must not come back."""

import json
from typing import cast

from fastapi.testclient import TestClient

from exo.api.app import create_app
from exo.api.context import ApiContext
from exo.api.guard import MAX_BODY_BYTES, guarded
from exo.api.validation import describe_errors

MAX_REASON_BYTES = 2048


def client() -> TestClient:
    # A body that fails validation never reaches a handler, so no node is needed behind it.
    return TestClient(guarded(create_app(cast(ApiContext, object())), None))


def post(body: str) -> tuple[int, bytes]:
    response = client().post(
        "/instance", content=body.encode(), headers={"content-type": "application/json"}
    )
    return response.status_code, response.content


def test_one_huge_unknown_key_gives_a_small_422() -> None:
    key = "k" * (3 << 20)
    status, content = post(json.dumps({"model_id": "m", key: 1}))
    assert status == 422, content[:200]
    assert len(content) <= MAX_REASON_BYTES, len(content)
    assert b"kkkk" in content and b"Extra inputs are not permitted" in content


def test_many_unknown_keys_give_a_small_422_that_counts_them() -> None:
    count = 200_000
    body = json.dumps({"model_id": "m", **{f"x{index}": 0 for index in range(count)}})
    assert len(body) < MAX_BODY_BYTES  # past the size guard, so validation answers
    status, content = post(body)
    assert status == 422, content[:200]
    assert len(content) <= MAX_REASON_BYTES, len(content)
    assert f"and {count - 5} more".encode() in content, content


def test_a_short_error_is_described_in_full() -> None:
    reason = describe_errors(
        [{"loc": ("body", "min_nodes"), "msg": "Input should be a valid integer"}]
    )
    assert reason == "min_nodes: Input should be a valid integer"
