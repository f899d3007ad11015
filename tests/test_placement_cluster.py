"""Placement dry runs on real nodes with simulated devices."""

from pathlib import Path

import httpx
import pytest

from tests.cluster import ExoNode, running_cluster, wait_until
from tests.simulated import device, write_devices

pytestmark = pytest.mark.cluster


def _devices_reported(nodes: list[ExoNode], count: int) -> bool:
    state = nodes[0].state()["gpu_device_info"]
    return sum(len(devices) for devices in state.values()) == count


def test_heterogeneous_cluster_takes_the_solver(tmp_path: Path) -> None:
    files = [
        # Greedy fills the largest memory first: the whole model on the slow 64 GB device.
        write_devices(
            tmp_path / "a.json", [device("gpu:0", "Sim 64 GB iGPU", 64, 200, vendor="Apple")]
        ),
        write_devices(tmp_path / "b.json", [device("cuda:0", "Sim RTX 4090", 24, 1008)]),
        write_devices(tmp_path / "c.json", [device("cuda:0", "Sim RTX 4090", 24, 1008)]),
    ]
    with running_cluster(tmp_path, 3, lambda i: ["--simulate-gpus", str(files[i])]) as nodes:
        wait_until(lambda: _devices_reported(nodes, 3), 60.0, "all devices reported")
        response = httpx.get(
            nodes[1].url + "/instance/placement",
            params={"model_id": "Llama-3.1-70B-Instruct-4bit"},
            timeout=10.0,
        )
        assert response.status_code == 200, response.text
        decision = response.json()["placement"]
        assert decision["strategy"] == "csp"
        assert decision["heterogeneous"] is True
        assert decision["predicted_ms_per_token"] < decision["greedy_ms_per_token"]
        assert decision["reasons"]
        # A dry run creates nothing.
        assert nodes[0].state()["instances"] == {}
        # Creating it gives the same kind of decision and it appears everywhere.
        created = httpx.post(
            nodes[2].url + "/instance",
            json={"model_id": "Llama-3.1-70B-Instruct-4bit", "allow_planning_only": True},
            timeout=10.0,
        )
        assert created.status_code == 201, created.text
        instance_id = created.json()["instance_id"]
        assert created.json()["placement"]["strategy"] == "csp"
        wait_until(
            lambda: all(instance_id in node.state()["instances"] for node in nodes),
            60.0,
            "instance everywhere",
        )
        shards = created.json()["shards"]
        assert sum(shard["end_layer"] - shard["start_layer"] for shard in shards) == 80

        # Its weights are not on these machines: a runner says so instead of running (the
        # others may never start: a set with a failed runner is not started further), and
        # since no device has the weights, no heal can serve it: the instance ends failed
        # with that reason.
        def a_runner_failed_clearly() -> bool:
            runners = nodes[0].state()["runners"]
            return any(
                runners.get(shard["runner_id"], {}).get("status") == "failed"
                and "planning only" in (runners[shard["runner_id"]]["error"] or "")
                for shard in shards
            )

        wait_until(a_runner_failed_clearly, 60.0, "a runner to fail with a reason")

        def instance_failed_clearly() -> bool:
            body = httpx.get(nodes[1].url + f"/instance/{instance_id}", timeout=5.0).json()
            return "planning only" in (body["failure"] or "")

        wait_until(instance_failed_clearly, 30.0, "the instance to fail with the reason")
        assert (
            httpx.delete(nodes[0].url + f"/instance/{instance_id}", timeout=10.0).status_code == 200
        )
        assert (
            httpx.delete(nodes[0].url + f"/instance/{instance_id}", timeout=10.0).status_code == 404
        )


def test_identical_cluster_takes_greedy(tmp_path: Path) -> None:
    files = [
        write_devices(tmp_path / f"{index}.json", [device("cuda:0", "Sim A100", 80, 2039)])
        for index in range(3)
    ]
    with running_cluster(tmp_path, 3, lambda i: ["--simulate-gpus", str(files[i])]) as nodes:
        wait_until(lambda: _devices_reported(nodes, 3), 60.0, "all devices reported")
        response = httpx.get(
            nodes[0].url + "/instance/placement",
            params={"model_id": "Llama-3.1-70B-Instruct-4bit", "min_nodes": 2},
            timeout=10.0,
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["placement"]["strategy"] == "greedy"
        assert len({shard["node_id"] for shard in body["shards"]}) >= 2


def test_placement_errors(tmp_path: Path) -> None:
    files = [write_devices(tmp_path / "a.json", [device("cuda:0", "Sim T4", 16, 320)])]
    with running_cluster(tmp_path, 1, lambda i: ["--simulate-gpus", str(files[i])]) as nodes:
        wait_until(lambda: _devices_reported(nodes, 1), 60.0, "device reported")
        url = nodes[0].url
        unknown = httpx.post(url + "/instance", json={"model_id": "no-such-model"}, timeout=10.0)
        assert unknown.status_code == 404
        assert "SmolLM2-135M-Instruct" in unknown.json()["detail"]
        planning_only = {"model_id": "Llama-3.1-405B-Instruct-4bit"}
        refused = httpx.post(url + "/instance", json=planning_only, timeout=10.0)
        assert refused.status_code == 422 and "planning-only" in refused.json()["detail"]
        too_big = httpx.post(
            url + "/instance", json={**planning_only, "allow_planning_only": True}, timeout=10.0
        )
        assert too_big.status_code == 409
        assert too_big.json()["needed_bytes"] > too_big.json()["available_bytes"]
        assert httpx.post(url + "/instance", json={"min_nodes": 1}, timeout=10.0).status_code == 422
        assert (
            httpx.post(
                url + "/instance", json={"model_id": "x", "min_nodes": 0}, timeout=10.0
            ).status_code
            == 422
        )
        assert (
            httpx.get(
                url + "/instance/placement",
                params={"model_id": "x", "min_nodes": "a"},
                timeout=10.0,
            ).status_code
            == 422
        )
        assert httpx.get(url + "/events", params={"since": -5}, timeout=10.0).status_code == 422
        assert httpx.delete(url + "/instance/nope", timeout=10.0).status_code == 404
        assert nodes[0].state()["instances"] == {}
