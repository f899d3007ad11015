"""Reads that tell the truth: ``GET /events`` says where the kept log starts once it was
compacted (and ``GET /snapshot`` serves the state before it); an unknown query parameter
is an error naming it, not ignored; a path without an id, or with one too long, is a 4xx
that says so; an error quotes at most a short prefix of an id."""

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
from fastapi.testclient import TestClient

from exo.api.app import NO_INSTANCE_ID, create_app
from exo.api.context import ApiContext
from exo.api.validation import MAX_ID_LENGTH
from exo.master.commands import handle_command
from exo.shared.echo import MAX_ECHOED_LENGTH
from exo.shared.event_store import EventStore
from exo.shared.types.commands import Command, CommandResult
from exo.shared.types.events import IndexedEvent, MemberJoined
from exo.shared.types.ids import NodeId, TaskId
from exo.shared.types.tasks import ChatMessage

COMPACTED = 5
"""Events the store compacts into its snapshot before the ones it keeps."""
KEPT = 3
HERE = NodeId("n0")


@dataclass
class FakePrompts:
    held: dict[TaskId, list[ChatMessage]] = field(default_factory=dict[TaskId, list[ChatMessage]])

    def hold(self, task_id: TaskId, messages: list[ChatMessage]) -> None:
        self.held[task_id] = messages

    def release(self, task_id: TaskId) -> None:
        self.held.pop(task_id, None)


@dataclass
class FakeContext:
    """A node without a cluster: its store, and a master that decides on the spot."""

    store: EventStore
    node_id: NodeId = HERE
    prompts: FakePrompts = field(default_factory=FakePrompts)
    sent: list[Command] = field(default_factory=list[Command])

    async def send_command(self, command: Command) -> CommandResult:
        self.sent.append(command)
        outcome = handle_command(command, self.store.state)
        if isinstance(outcome, CommandResult):
            return outcome
        return CommandResult(ok=True)


def compacted_store() -> EventStore:
    """Events 0..4 compacted into a snapshot at 4; events 5..7 held."""
    store = EventStore(None)
    store.compact_after = COMPACTED
    for idx in range(COMPACTED + KEPT):
        store.append(IndexedEvent(idx=idx, term=1, event=MemberJoined(node_id=NodeId(f"n{idx}"))))
        store.compact_if_due(commit_idx=idx)
    assert (store.base, store.last_idx) == (COMPACTED, COMPACTED + KEPT - 1)
    return store


@pytest.fixture
def context() -> FakeContext:
    return FakeContext(store=compacted_store())


@pytest.fixture
def client(context: FakeContext) -> Iterator[TestClient]:
    with TestClient(create_app(cast(ApiContext, context)), follow_redirects=False) as client:
        yield client


def indices(page: dict[str, Any]) -> list[int]:
    return [entry["idx"] for entry in page["events"]]


# ---------------------------------------------------------------- /events after compaction


def test_a_page_from_before_the_kept_log_starts_at_its_first_event(client: TestClient) -> None:
    page = client.get("/events", params={"since": -1, "limit": 2}).json()
    assert indices(page) == [5, 6]  # not empty: the compacted events are not waited for
    assert page["last_event_idx"] == 7
    assert page["first_kept_idx"] == COMPACTED
    assert page["snapshot_idx"] == COMPACTED - 1
    assert page["compacted_skipped"] == COMPACTED
    assert "GET /snapshot" in page["note"] and "0..4" in page["note"]


def test_a_page_inside_the_kept_log_is_unchanged(client: TestClient) -> None:
    page = client.get("/events", params={"since": 5}).json()
    assert indices(page) == [6, 7]
    assert (page["first_kept_idx"], page["compacted_skipped"], page["note"]) == (5, 0, None)
    assert client.get("/events", params={"since": 7}).json()["events"] == []


def test_paging_until_an_empty_page_reads_every_kept_event(client: TestClient) -> None:
    # tests/cluster.py's all_events, with a page smaller than what was compacted.
    seen: list[int] = []
    since = -1
    while page := client.get("/events", params={"since": since, "limit": 2}).json()["events"]:
        seen += [entry["idx"] for entry in page]
        since = page[-1]["idx"]
    assert seen == [5, 6, 7]


def test_the_snapshot_is_the_state_before_the_first_kept_event(client: TestClient) -> None:
    snapshot = client.get("/snapshot").json()
    assert (snapshot["idx"], snapshot["term"]) == (COMPACTED - 1, 1)
    assert snapshot["state"]["members"] == [f"n{idx}" for idx in range(COMPACTED)]
    assert snapshot["state"]["last_event_applied_idx"] == COMPACTED - 1


def test_before_any_compaction_there_is_no_snapshot() -> None:
    store = EventStore(None)
    store.append(IndexedEvent(idx=0, term=1, event=MemberJoined(node_id=NodeId("n0"))))
    with TestClient(create_app(cast(ApiContext, FakeContext(store=store)))) as client:
        page = client.get("/events", params={"since": -1, "limit": 1}).json()
        assert indices(page) == [0]
        assert (page["first_kept_idx"], page["snapshot_idx"], page["compacted_skipped"]) == (
            0,
            None,
            0,
        )
        missing = client.get("/snapshot")
        assert missing.status_code == 404
        assert "nothing was compacted" in missing.json()["detail"]


# ---------------------------------------------------------------- unknown query parameters

CLUSTER_GETS = [
    "/state",
    "/gpus",
    "/node_id",
    "/events",
    "/snapshot",
    "/metrics",
    "/instance/placement?model_id=m",
    "/instance/some-id",
]
"""(``/state/stream`` is refused the same way; a test client cannot read a stream that only
ends when it disconnects, so it is not here.)"""


@pytest.mark.parametrize("path", CLUSTER_GETS)
def test_an_unknown_query_parameter_is_refused_naming_it(client: TestClient, path: str) -> None:
    separator = "&" if "?" in path else "?"
    response = client.get(f"{path}{separator}sincee=3")
    assert response.status_code == 400, response.text
    detail = response.json()["detail"]
    assert "unknown query parameter sincee" in detail, detail


def test_the_refusal_lists_what_the_endpoint_takes(client: TestClient) -> None:
    assert client.get("/events?since=5&limit=1").status_code == 200  # declared: fine
    detail = client.get("/events?since=1&limits=2").json()["detail"]
    assert detail == "unknown query parameter limits (this endpoint takes: limit, since)"
    detail = client.get("/node_id?x=1").json()["detail"]
    assert "(this endpoint takes: none)" in detail
    detail = client.get("/instance/placement?model_id=m&min_node=2").json()["detail"]
    assert "min_node " in detail and "min_nodes, model_id, objective" in detail


@pytest.mark.parametrize("path", ["/v1/models", "/v1/models/some-model"])
def test_on_v1_an_unknown_query_parameter_is_openai_s_400(client: TestClient, path: str) -> None:
    response = client.get(f"{path}?limit=3")
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "unknown_parameter"
    assert error["param"] == "query.limit"
    assert error["type"] == "invalid_request_error"
    assert "unknown query parameter" in error["message"]


def test_a_write_with_an_unknown_query_parameter_is_refused_before_it_is_sent(
    client: TestClient, context: FakeContext
) -> None:
    response = client.delete("/instance/some-id?force=true")
    assert response.status_code == 400
    assert "force" in response.json()["detail"]
    assert context.sent == []


def test_only_the_dashboard_page_ignores_query_parameters(client: TestClient) -> None:
    assert client.get("/?utm_source=x").status_code == 200
    assert client.get("/dashboard/dashboard.js?v=2").status_code == 200
    assert client.get("/gpus?utm_source=x").status_code == 400


def test_many_unknown_names_give_a_bounded_answer(client: TestClient) -> None:
    query = "&".join(f"{'q' * 500}{index}=1" for index in range(100))
    response = client.get(f"/gpus?{query}")
    assert response.status_code == 400
    assert len(response.content) < 2048
    assert "and 95 more" in response.json()["detail"]


# ---------------------------------------------------------------- a path without an id


@pytest.mark.parametrize(
    ("method", "path"),
    [("DELETE", "/instance/"), ("GET", "/instance/"), ("POST", "/instance//replace")],
)
def test_an_instance_path_without_an_id_says_so(client: TestClient, method: str, path: str) -> None:
    response = client.request(method, path)
    assert response.status_code == 404, (response.status_code, response.headers)
    assert response.json() == {"detail": NO_INSTANCE_ID}


def test_a_post_to_instance_with_a_slash_is_still_redirected_but_a_delete_is_not(
    client: TestClient,
) -> None:
    response = client.post("/instance/", json={"model_id": "m"})
    assert response.status_code == 307
    assert response.headers["location"].endswith("/instance")
    assert client.delete("/instance/").status_code == 404


def test_a_model_path_without_an_id_says_so(client: TestClient) -> None:
    response = client.get("/v1/models/")
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["message"].startswith("no model id given")
    assert error["code"] == "model_not_found"


# ---------------------------------------------------------------- long ids

HUGE_ID = "x" * 60_000
LONG_ID = "y" * MAX_ID_LENGTH


def echoes_at_most_a_prefix(content: bytes, character: bytes) -> bool:
    return character * (MAX_ECHOED_LENGTH + 1) not in content


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", f"/instance/{HUGE_ID}"),
        ("DELETE", f"/instance/{HUGE_ID}"),
        ("POST", f"/instance/{HUGE_ID}/replace"),
    ],
)
def test_an_over_long_instance_id_is_refused_as_too_long(
    client: TestClient, context: FakeContext, method: str, path: str
) -> None:
    response = client.request(method, path)
    assert response.status_code == 422, response.content[:300]
    detail = response.json()["detail"]
    assert detail == (
        f"invalid request: path.instance_id: String should have at most {MAX_ID_LENGTH} characters"
    )
    assert context.sent == []


def test_an_over_long_model_id_is_openai_s_400(client: TestClient) -> None:
    response = client.get(f"/v1/models/{HUGE_ID}")
    assert response.status_code == 400, response.content[:300]
    error = response.json()["error"]
    assert error["param"] == "path.model_id"
    assert f"at most {MAX_ID_LENGTH} characters" in error["message"]
    assert echoes_at_most_a_prefix(response.content, b"x")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", f"/instance/{LONG_ID}"),
        ("DELETE", f"/instance/{LONG_ID}"),
        ("POST", f"/instance/{LONG_ID}/replace"),
        ("GET", f"/v1/models/{LONG_ID}"),
        ("GET", f"/instance/placement?model_id={LONG_ID}"),
    ],
)
def test_an_unknown_id_is_quoted_by_a_short_prefix(
    client: TestClient, method: str, path: str
) -> None:
    response = client.request(method, path)
    assert response.status_code == 404, response.content[:300]
    assert echoes_at_most_a_prefix(response.content, b"y"), response.content[:300]
    assert f"({MAX_ID_LENGTH} characters)".encode() in response.content


def test_a_chat_for_an_unserved_model_quotes_a_short_prefix(client: TestClient) -> None:
    response = client.post(
        "/v1/chat/completions",
        json={"model": LONG_ID, "messages": [{"role": "user", "content": "hi"}]},
    )
    assert response.status_code == 404, response.content[:300]
    error = response.json()["error"]
    assert error["code"] == "model_not_found"
    assert error["message"].startswith("no instance serves model 'yyy")
    assert echoes_at_most_a_prefix(response.content, b"y"), error["message"]
