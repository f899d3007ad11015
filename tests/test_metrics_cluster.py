"""A real node with simulated GPUs and ``--log-format json``: ``/metrics`` has what ``/gpus``
has, a runner's load progress reaches the state, and a chat request shows in the request
metrics and in one JSON log line."""

import json
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.cluster import running_cluster, wait_converged, wait_until
from tests.simulated import device, write_devices

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    response = httpx.get(url + "/metrics", timeout=5.0)
    response.raise_for_status()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def test_metrics_of_a_running_node(tmp_path: Path) -> None:
    gpus = write_devices(
        tmp_path / "gpus.json",
        [
            device("cuda:0", "Sim RTX 4090", 24, 1008, memory_used_bytes=3 * 2**30),
            device(
                "cuda:1",
                "Sim RTX 3060",
                12,
                360,
                compute_utilization_percent=40,
                is_thermal_throttling=True,
                thermal_temperature_c=91,
            ),
        ],
    )
    args = ["--simulate-gpus", str(gpus), "--log-format", "json"]
    with running_cluster(tmp_path, 1, lambda _: args) as (node,):
        wait_converged([node], 1, "the node to elect itself")
        wait_until(lambda: len(node.get_list("/gpus")) == 2, 60.0, "the simulated GPUs")
        listed: list[dict[str, Any]] = node.get_list("/gpus")
        found = scrape(node.url)
        node_id = node.node_id()
        for gpu in listed:
            labels = {"node": node_id, "device": gpu["device_id"], "name": gpu["info"]["name"]}
            reading = gpu["state"]

            def at(metric: str, labels: dict[str, str] = labels) -> float | None:
                return found.get((metric, tuple(sorted(labels.items()))))

            assert at("exo_gpu_memory_used_bytes") == reading["memory_used_bytes"]
            assert at("exo_gpu_memory_total_bytes") == reading["memory_total_bytes"]
            assert at("exo_gpu_utilization_ratio") == reading["compute_utilization_percent"] / 100
            assert at("exo_gpu_temperature_celsius") == reading["thermal_temperature_c"]
            assert at("exo_gpu_thermal_throttling") == float(reading["is_thermal_throttling"])
        assert found[("exo_node_is_master", (("node", node_id),))] == 1
        assert found[("exo_cluster_nodes", ())] == 1

        placed: list[httpx.Response] = []

        def place() -> bool:
            # The first placement waits for the node to import the bundled model's weights,
            # which can outlast a command's timeout on a busy machine: then it asks again.
            placed.append(
                httpx.post(
                    node.url + "/instance", json={"model_id": "SmolLM2-135M-Instruct"}, timeout=30
                )
            )
            return placed[-1].status_code != 503

        wait_until(place, 60.0, "the model to be placed")
        assert placed[-1].status_code == 201, placed[-1].text
        instance = placed[-1].json()
        runner_id = instance["shards"][0]["runner_id"]

        def runner() -> dict[str, Any]:
            return node.state()["runners"].get(runner_id, {})

        wait_until(lambda: runner().get("status") == "ready", 90.0, "the runner to be ready")
        loaded = runner()
        assert loaded["total_bytes"] and loaded["loaded_bytes"] == loaded["total_bytes"]
        reply = httpx.post(
            node.url + "/v1/chat/completions",
            json={
                "model": "SmolLM2-135M-Instruct",
                "messages": [{"role": "user", "content": "Say hi"}],
                "max_tokens": 5,
            },
            timeout=60.0,
        )
        assert reply.status_code == 200, reply.text
        usage = reply.json()["usage"]
        labels = (("instance", instance["instance_id"]), ("model", "SmolLM2-135M-Instruct"))

        def counted() -> bool:
            return (
                scrape(node.url).get(("exo_requests_total", (*labels, ("status", "complete")))) == 1
            )

        wait_until(counted, 60.0, "the request to be counted")
        after = scrape(node.url)
        assert after[("exo_request_duration_seconds_count", labels)] == 1
        assert after[("exo_request_completion_tokens_total", labels)] == usage["completion_tokens"]
        assert (
            after[
                (
                    "exo_runner_weights_loaded_bytes",
                    (
                        ("instance", instance["instance_id"]),
                        ("node", node_id),
                        ("runner", runner_id),
                    ),
                )
            ]
            == loaded["total_bytes"]
        )
        lines = [line for line in node.log_text().splitlines() if line.strip()]
        records = [json.loads(line) for line in lines]  # every line is one JSON object
        messages = [record["message"] for record in records]
        assert any(f"runner {runner_id} " in m and " ready " in m for m in messages), messages
        done = [m for m in messages if m.startswith("request ")]
        assert len(done) == 1, messages
        assert f"{usage['completion_tokens']} completion tokens" in done[0]
