"""The OpenAI surface against one real node serving the bundled model: chat answers, streams
and cancels over plain HTTP; through the official ``openai`` SDK every parameter works as
OpenAI defines it, or is a 400 naming it.

All tests share one node (placed once, module-scoped); completions are a few tokens each
because the model runs on the CPU."""

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from tests.cluster import ExoNode, running_cluster, wait_converged, wait_until
from tests.test_inference_cluster import QUESTION, ask, ask_streaming, chat_body

pytestmark = pytest.mark.cluster

MODEL = "SmolLM2-135M-Instruct"
PLANNING_ONLY = "Llama-3.1-8B-Instruct-4bit"
HELLO: Any = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExoNode]:
    base: Path = tmp_path_factory.mktemp("openai")
    with running_cluster(base, 1) as (started,):
        wait_converged([started], 1, "the node to elect itself")
        placed: list[dict[str, Any]] = []

        def place() -> bool:
            # The first placement imports the bundled model into the node's fresh weights
            # cache; on a busy machine the command can outlast the API's wait (503) and
            # still take effect.
            instances = started.state()["instances"].values()
            placed.extend(i for i in instances if i["model_id"] == MODEL)
            if not placed:
                response = httpx.post(
                    started.url + "/instance", json={"model_id": MODEL}, timeout=30.0
                )
                assert response.status_code in (201, 503), response.text
                if response.status_code == 201:
                    placed.append(response.json())
            return bool(placed)

        wait_until(place, 60.0, "the model to be placed")
        shards = placed[0]["shards"]

        def ready() -> bool:
            runners = started.state()["runners"]
            return all(
                runners.get(shard["runner_id"], {}).get("status") == "ready" for shard in shards
            )

        wait_until(ready, 90.0, "the runner to be ready")
        yield started


@pytest.fixture(scope="module")
def client(node: ExoNode) -> OpenAI:
    return OpenAI(base_url=node.url + "/v1", api_key="unused", timeout=120.0, max_retries=0)


def _bad_request(error: openai.BadRequestError) -> dict[str, Any]:
    assert error.status_code == 400
    body: Any = error.body
    assert set(body) == {"message", "type", "param", "code"}, body
    assert body["type"] == "invalid_request_error"
    return body


def test_n_choices_and_seeds(client: OpenAI) -> None:
    """``n`` choices, indexed; choice i is seeded seed + i, so a seeded request repeats
    and its choices differ from each other."""
    both = client.chat.completions.create(
        model=MODEL, messages=HELLO, n=2, seed=11, temperature=1.0, max_tokens=5
    )
    assert [choice.index for choice in both.choices] == [0, 1]
    texts = [choice.message.content or "" for choice in both.choices]
    assert all(texts) and all(choice.finish_reason for choice in both.choices)
    assert both.usage is not None and both.usage.completion_tokens == 10
    first = client.chat.completions.create(
        model=MODEL, messages=HELLO, seed=11, temperature=1.0, max_tokens=5
    )
    assert first.choices[0].message.content == texts[0]  # the same seed, the same output
    assert texts[0] != texts[1]  # seeds 11 and 12 (for this prompt and model)

    # Streamed: every frame names its choice; each choice's text is the unstreamed one, and
    # stream_options.include_usage adds a last frame with no choices and the usage.
    stream = client.chat.completions.create(
        model=MODEL,
        messages=HELLO,
        n=2,
        seed=11,
        temperature=1.0,
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
    )
    streamed = {0: "", 1: ""}
    finished: set[int] = set()
    usage = None
    for frame in stream:
        if not frame.choices:
            usage = frame.usage
            continue
        for choice in frame.choices:
            streamed[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished.add(choice.index)
    assert streamed == {0: texts[0], 1: texts[1]}
    assert finished == {0, 1}
    assert usage is not None and usage.completion_tokens == 10


def test_logprobs_in_openais_shape(client: OpenAI) -> None:
    answer = client.chat.completions.create(
        model=MODEL, messages=HELLO, temperature=0, max_tokens=3, logprobs=True, top_logprobs=2
    )
    choice = answer.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    entries = choice.logprobs.content
    assert len(entries) == 3
    joined = b"".join(bytes(entry.bytes or []) for entry in entries).decode()
    assert joined.strip() == (choice.message.content or "").strip()
    for entry in entries:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].token == entry.token  # greedy: the most likely
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL, messages=HELLO, top_logprobs=2)
    assert _bad_request(refused.value)["param"] == "top_logprobs"


def test_penalties_change_the_output(client: OpenAI) -> None:
    repeat: Any = [{"role": "user", "content": "Write the word 'cat' ten times."}]
    plain = client.chat.completions.create(
        model=MODEL, messages=repeat, temperature=0, max_tokens=8
    )
    penalised = client.chat.completions.create(
        model=MODEL,
        messages=repeat,
        temperature=0,
        max_tokens=8,
        presence_penalty=1.5,
        frequency_penalty=1.5,
    )
    plain_text = plain.choices[0].message.content or ""
    penalised_text = penalised.choices[0].message.content or ""
    assert plain_text.lower().count("cat") > penalised_text.lower().count("cat")
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=MODEL, messages=repeat, presence_penalty=3.0, max_tokens=1
        )
    assert _bad_request(refused.value)["param"] == "presence_penalty"


def test_json_object_response_format(client: OpenAI) -> None:
    answer = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Describe a cat as JSON."}],
        temperature=0,
        max_tokens=12,
        response_format={"type": "json_object"},
    )
    parsed: object = json.loads(answer.choices[0].message.content or "")
    assert isinstance(parsed, dict)
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=MODEL,
            messages=HELLO,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "cat", "schema": {"type": "object"}},
            },
        )
    body = _bad_request(refused.value)
    assert body["param"] == "response_format.type" and body["code"] == "unsupported_parameter"


@pytest.mark.parametrize(
    ("parameters", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"function_call": "auto"}, "function_call"),
        ({"logit_bias": {"42": 5}}, "logit_bias"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({"store": True}, "store"),
        ({"reasoning_effort": "low"}, "reasoning_effort"),
        ({"extra_body": {"top_k": 5}}, "top_k"),  # not OpenAI's at all
        ({"temperature": 3.0}, "temperature"),
        ({"n": 0}, "n"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream
    ],
)
def test_what_is_not_supported_is_a_400_naming_it(
    client: OpenAI, node: ExoNode, parameters: dict[str, Any], param: str
) -> None:
    before = len(node.state()["tasks"])
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=1, **parameters)
    body = _bad_request(refused.value)
    assert body["param"] == param, body
    assert param in body["message"]
    assert len(node.state()["tasks"]) == before  # nothing ran


def test_defaults_clients_send_are_accepted(client: OpenAI) -> None:
    answer = client.chat.completions.create(
        model=MODEL,
        messages=HELLO,
        max_tokens=1,
        temperature=0,
        user="someone",
        metadata={"purpose": "test"},
        store=False,
        parallel_tool_calls=True,
        tool_choice="none",
        service_tier="auto",
    )
    assert answer.choices[0].finish_reason == "length"


def test_models_list_and_retrieve(client: OpenAI) -> None:
    listed = {model.id for model in client.models.list()}
    assert MODEL in listed and PLANNING_ONLY not in listed
    model = client.models.retrieve(MODEL)
    assert model.id == MODEL and model.object == "model"
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("no-such-model")
    body: Any = missing.value.body
    assert body["code"] == "model_not_found" and body["param"] == "model"


def test_cluster_endpoints_have_one_error_shape(node: ExoNode) -> None:
    def detail(response: httpx.Response, status: int) -> str:
        assert response.status_code == status, response.text
        body = response.json()
        assert isinstance(body["detail"], str) and "error" not in body, body
        return body["detail"]

    # A planning-only card is refused by POST /instance, and still planned by the dry run.
    refused = httpx.post(node.url + "/instance", json={"model_id": PLANNING_ONLY}, timeout=30.0)
    reason = detail(refused, 422)
    assert "planning-only" in reason and "--models-dir" in reason
    assert PLANNING_ONLY not in {i["model_id"] for i in node.state()["instances"].values()}
    planned = httpx.get(
        node.url + "/instance/placement", params={"model_id": PLANNING_ONLY}, timeout=30.0
    )
    assert planned.status_code in (200, 409, 503), planned.text  # planned, or doesn't fit
    if planned.status_code != 200:
        detail(planned, planned.status_code)
    assert "no instance" in detail(httpx.get(node.url + "/instance/nope", timeout=10.0), 404)
    assert "min_nodes" in detail(
        httpx.post(node.url + "/instance", json={"model_id": MODEL, "min_nodes": 0}), 422
    )
    assert "since" in detail(httpx.get(node.url + "/events", params={"since": -5}), 422)
    detail(httpx.delete(node.url + "/instance/nope", timeout=10.0), 404)


def test_chat_answers_paris_streams_and_cancels(node: ExoNode) -> None:
    """The bundled model answers, streams the same text, keeps concurrent streams apart,
    and a client that goes away cancels its task."""
    # A model that no instance serves is a 404.
    unplaced = httpx.post(
        node.url + "/v1/chat/completions",
        json={**chat_body(QUESTION), "model": PLANNING_ONLY},
        timeout=10.0,
    )
    assert unplaced.status_code == 404, unplaced.text
    instance = next(i for i in node.state()["instances"].values() if i["model_id"] == MODEL)
    # The node said where its MLX computes; the runner says where it does.
    state = node.state()
    execution = state["nodes"][node.node_id()]["execution"]
    assert {device["device_id"] for device in execution["devices"]} >= {"cpu:0"}
    runner = state["runners"][instance["shards"][0]["runner_id"]]
    assert runner["compute_device"]["device_id"] == instance["shards"][0]["device_id"]
    response = ask(node, QUESTION)
    assert response.status_code == 200, response.text
    body = response.json()
    text = body["choices"][0]["message"]["content"]
    assert "Paris" in text
    assert body["usage"]["completion_tokens"] > 0
    assert (
        body["usage"]["total_tokens"]
        == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    )
    streamed, finish = ask_streaming(node, QUESTION)
    assert streamed == text
    assert finish == body["choices"][0]["finish_reason"]

    # Two concurrent streamed requests complete with their own, unmixed text.
    other_question = "Name a primary color."
    expected_other = ask(node, other_question).json()["choices"][0]["message"]["content"]
    results: dict[str, str] = {}

    def run(question: str) -> None:
        results[question] = ask_streaming(node, question)[0]

    threads = [threading.Thread(target=run, args=(q,)) for q in (QUESTION, other_question)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    assert results == {QUESTION: text, other_question: expected_other}

    bad = httpx.post(node.url + "/v1/chat/completions", json={"model": MODEL}, timeout=10.0)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages"

    # A client that disconnects mid-stream cancels its task; the runner serves the next.
    long_request = chat_body("Write a long story about a lighthouse keeper.", True, 400)
    with httpx.stream(
        "POST", node.url + "/v1/chat/completions", json=long_request, timeout=60.0
    ) as response:
        frames = 0
        for line in response.iter_lines():
            frames += line.startswith("data: {")
            if frames >= 3:
                break

    def cancelled() -> bool:
        tasks = node.state()["tasks"].values()
        return any(
            task["params"]["max_tokens"] == 400 and task["status"] == "cancelled" for task in tasks
        )

    wait_until(cancelled, 60.0, "the abandoned task to be cancelled")
    assert ask(node, QUESTION).json()["choices"][0]["message"]["content"] == text

    # The same for a non-streaming client that gives up.
    impatient = chat_body("Write a long poem about the moon.", False, 401)
    with pytest.raises(httpx.TimeoutException):
        httpx.post(node.url + "/v1/chat/completions", json=impatient, timeout=3.0)

    def impatient_cancelled() -> bool:
        tasks = node.state()["tasks"].values()
        return any(
            task["params"]["max_tokens"] == 401 and task["status"] == "cancelled" for task in tasks
        )

    wait_until(impatient_cancelled, 60.0, "the non-streaming task to be cancelled")
