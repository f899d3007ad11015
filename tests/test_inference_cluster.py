"""Real inference: the bundled SmolLM2 placed on real nodes and asked over the OpenAI API."""

import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from exo.models.locate import model_directory
from exo.shared.types.generation import GenerationRequest
from exo.worker.runner.generate import load_local_engine
from tests.cluster import (
    SHARED_WEIGHTS_CACHE,
    ExoNode,
    running_cluster,
    wait_converged,
    wait_until,
)

pytestmark = pytest.mark.cluster

MODEL = "SmolLM2-135M-Instruct"
QUESTION = "What is the capital of France?"


def chat_body(content: str, stream: bool = False, max_tokens: int = 40) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": stream,
    }


def ask(node: ExoNode, content: str, max_tokens: int = 40) -> httpx.Response:
    return httpx.post(
        node.url + "/v1/chat/completions",
        json=chat_body(content, max_tokens=max_tokens),
        timeout=120.0,
    )


def ask_streaming(node: ExoNode, content: str, max_tokens: int = 40) -> tuple[str, str | None]:
    text: list[str] = []
    finish: str | None = None
    with httpx.stream(
        "POST",
        node.url + "/v1/chat/completions",
        json=chat_body(content, True, max_tokens),
        timeout=120.0,
    ) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            frame = json.loads(line[len("data: ") :])
            assert "error" not in frame, frame
            choice = frame["choices"][0]
            text.append(choice["delta"].get("content", ""))
            finish = choice["finish_reason"] or finish
    return "".join(text), finish


def place(node: ExoNode, min_nodes: int, rebalance: str = "auto") -> dict[str, Any]:
    response = httpx.post(
        node.url + "/instance",
        json={"model_id": MODEL, "min_nodes": min_nodes, "rebalance": rebalance},
        timeout=30.0,
    )
    assert response.status_code == 201, response.text
    return response.json()


def runners_ready(node: ExoNode, instance: dict[str, Any]) -> bool:
    runners = node.state()["runners"]
    return all(
        runners.get(shard["runner_id"], {}).get("status") in ("ready", "running")
        for shard in instance["shards"]
    )


def test_three_node_pipeline_matches_single_node(tmp_path: Path) -> None:
    # The reference: the whole model in this process (from the nodes' weights cache), asked
    # what the API asks it.
    reference = (
        load_local_engine(model_directory(None, SHARED_WEIGHTS_CACHE))
        .complete(
            GenerationRequest(
                messages=[{"role": "user", "content": QUESTION}], max_tokens=40, temperature=0
            )
        )
        .text
    )
    assert "Paris" in reference

    with running_cluster(tmp_path / "cluster", 3) as nodes:
        wait_converged(nodes, 3, "3 nodes to agree")
        # Not healed when a runner dies below: this test shows the failure as it reaches
        # clients (tests/test_replacement_cluster.py shows healing).
        instance = place(nodes[0], 3, rebalance="off")
        shard_nodes = {shard["node_id"] for shard in instance["shards"]}
        assert len(shard_nodes) == 3
        assert sorted((s["start_layer"], s["end_layer"]) for s in instance["shards"])[0][0] == 0
        wait_until(
            lambda: all(runners_ready(node, instance) for node in nodes),
            120.0,
            "every runner ready",
        )
        response = ask(nodes[1], QUESTION)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == reference
        # The first request warms MLX up and is not reported; the next one is (≥ 4 decode
        # tokens).
        again = ask(nodes[2], QUESTION)
        assert again.json()["choices"][0]["message"]["content"] == reference
        assert again.json()["usage"]["completion_tokens"] >= 5

        # Every rank, on its own node, reported its measured time per token; the cluster
        # state keeps it beside the prediction.
        instance_id = instance["instance_id"]

        def measured() -> bool:
            placed = nodes[0].state()["instances"][instance_id]
            return (placed["measured_ms_per_token"] or 0) > 0 and all(
                (shard["measured_stage_ms"] or 0) > 0 for shard in placed["shards"]
            )

        wait_until(measured, 60.0, "every rank's measured time per token in the state")
        shown = nodes[2].get(f"/instance/{instance_id}")
        assert shown["placement"]["predicted_ms_per_token"] is not None
        assert shown["measured_ms_per_token"] > 0
        assert shown["measured_time_to_first_token_ms"] > 0
        assert shown["measured_at"] is not None
        assert all("predicted_stage_ms" in shard for shard in shown["shards"])
        assert all(shard["measured_stage_ms"] > 0 for shard in shown["shards"])
        # End to end a token passes through every stage.
        stages_ms = sum(shard["measured_stage_ms"] for shard in shown["shards"])
        assert shown["measured_ms_per_token"] > 0.5 * stages_ms
        # Where placement gave an uncalibrated prediction, the device is calibrated by it.
        calibration = nodes[0].state()["device_calibration"]
        for shard in shown["shards"]:
            if (shard["base_stage_ms"] or 0) > 0:
                device = calibration[shard["node_id"]][shard["device_id"]]
                assert device["samples"] == 1
                assert device["factor"] == pytest.approx(
                    shard["measured_stage_ms"] / shard["base_stage_ms"]
                )
        missing = httpx.get(nodes[2].url + "/instance/no-such-instance", timeout=5.0)
        assert missing.status_code == 404

        # Kill one runner process while a request streams: that request ends with an error
        # instead of hanging, the instance is marked failed, new requests get 503 fast.
        outcome: dict[str, object] = {}

        def stream_long() -> None:
            body = chat_body("Write a long story about a lighthouse keeper.", True, 400)
            with httpx.stream(
                "POST", nodes[1].url + "/v1/chat/completions", json=body, timeout=60.0
            ) as response:
                for line in response.iter_lines():
                    if line.startswith("data: {"):
                        outcome.setdefault("first_frame_at", time.monotonic())
                        if '"error"' in line:
                            outcome["error"] = line
                outcome["ended_at"] = time.monotonic()

        streamer = threading.Thread(target=stream_long)
        streamer.start()
        wait_until(lambda: "first_frame_at" in outcome, 30.0, "the long request to start streaming")
        victim_shard = next(shard for shard in instance["shards"] if shard["rank"] == 1)
        victim_node = next(node for node in nodes if node.node_id() == victim_shard["node_id"])
        assert victim_node.process is not None
        runners = [
            child
            for child in psutil.Process(victim_node.process.pid).children(recursive=True)
            if "exo.worker.runner.process" in " ".join(child.cmdline())
        ]
        assert len(runners) == 1
        killed_at = time.monotonic()
        runners[0].kill()

        def marked_failed() -> bool:
            runner = nodes[0].state()["runners"].get(victim_shard["runner_id"], {})
            return runner.get("status") == "failed"

        wait_until(marked_failed, 30.0, "the runner to be reported failed")
        print(f"the dead runner was reported {time.monotonic() - killed_at:.2f} s after the kill")
        # Reported by its own node, as what happened to it: killed by SIGKILL.
        runner = nodes[0].state()["runners"][victim_shard["runner_id"]]
        assert runner["node_id"] == victim_shard["node_id"]
        assert runner["error"].startswith("runner process exited with code -9"), runner["error"]
        failed = ask(nodes[2], QUESTION)
        assert failed.status_code == 503
        assert "failed" in failed.json()["error"]["message"]
        streamer.join(30.0)
        assert not streamer.is_alive(), "the in-flight request hung"
        assert "error" in outcome, "the in-flight request ended without saying it failed"


def test_a_model_directory_of_another_family_runs_split_over_two_nodes(
    tmp_path: Path, tiny_models: dict[tuple[str, bool], Path]
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "Tiny-Qwen3").symlink_to(tiny_models[("qwen3", True)])
    messages = [{"role": "user", "content": "Say something."}]
    expected = load_local_engine(models / "Tiny-Qwen3").complete(
        GenerationRequest(messages=messages, max_tokens=8)
    )
    with running_cluster(tmp_path / "cluster", 2, lambda _: ["--models-dir", str(models)]) as nodes:
        wait_converged(nodes, 2, "2 nodes to agree")
        listed = {model["id"]: model for model in nodes[1].get("/v1/models")["data"]}
        assert "Tiny-Qwen3" in listed, nodes[1].log_text()[-2000:]
        assert listed["Tiny-Qwen3"]["family"] == "qwen3"
        assert listed["Tiny-Qwen3"]["n_layers"] == 6
        response = httpx.post(
            nodes[0].url + "/instance",
            json={"model_id": "Tiny-Qwen3", "min_nodes": 2},
            timeout=30.0,
        )
        assert response.status_code == 201, response.text
        instance = response.json()
        assert len({shard["node_id"] for shard in instance["shards"]}) == 2
        wait_until(
            lambda: all(runners_ready(node, instance) for node in nodes), 120.0, "runners ready"
        )
        answer = httpx.post(
            nodes[1].url + "/v1/chat/completions",
            json={"model": "Tiny-Qwen3", "messages": messages, "temperature": 0, "max_tokens": 8},
            timeout=120.0,
        )
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["choices"][0]["message"]["content"] == expected.text
        assert body["usage"]["completion_tokens"] == expected.completion_tokens


def test_a_prompt_travels_to_its_runner_and_stays_out_of_the_log(tmp_path: Path) -> None:
    """The request goes to the node without the runner: its prompt reaches the runner
    point to point, and no node's log or state holds it (only its size)."""
    with running_cluster(tmp_path, 2) as nodes:
        wait_converged(nodes, 2, "2 nodes to agree")
        instance = place(nodes[0], 1)
        serving = {shard["node_id"] for shard in instance["shards"]}
        requester = next(node for node in nodes if node.node_id() not in serving)
        wait_until(lambda: runners_ready(requester, instance), 90.0, "the runner to be ready")
        marker = f"Quokka-{uuid.uuid4().hex}"
        content = f"Say hello to {marker}."
        response = ask(requester, content, max_tokens=3)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["prompt_tokens"] > 0
        tasks = [
            t
            for t in requester.state()["tasks"].values()
            if t["requested_by"] == requester.node_id()
        ]
        assert [task["params"]["prompt_chars"] for task in tasks] == [len(content)]
        for node in nodes:
            assert marker not in json.dumps(node.state())
            assert marker not in json.dumps(node.all_events())
            for path in (node.home / "events").iterdir():
                assert marker.encode() not in path.read_bytes(), path
