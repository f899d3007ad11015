"""GPU telemetry across real nodes with simulated devices."""

import time
from pathlib import Path

import httpx
import pytest

from tests.cluster import running_cluster, wait_converged, wait_until
from tests.simulated import device, write_devices

pytestmark = pytest.mark.cluster


def test_every_node_sees_every_device_and_live_changes(tmp_path: Path) -> None:
    files = [
        write_devices(tmp_path / "gpus0.json", [device("cuda:0", "Sim RTX 4090", 24, 1008)]),
        write_devices(
            tmp_path / "gpus1.json",
            [device("cuda:0", "Sim A100", 80, 2039), device("cuda:1", "Sim T4", 16, 320)],
        ),
        write_devices(tmp_path / "gpus2.json", [device("cuda:0", "Sim H100", 80, 3350)]),
    ]

    def args(index: int) -> list[str]:
        return ["--simulate-gpus", str(files[index]), "--telemetry-interval", "0.2"]

    with running_cluster(tmp_path, 3, args) as nodes:
        ids = [node.node_id() for node in nodes]

        def all_devices_everywhere() -> bool:
            for node in nodes:
                state = node.state()["gpu_device_state"]
                counts = [len(state.get(node_id, {})) for node_id in ids]
                if counts != [1, 2, 1]:
                    return False
            return True

        wait_until(all_devices_everywhere, 60.0, "every node to show all 4 devices")
        gpus = nodes[0].get_list("/gpus")
        names = sorted(entry["info"]["name"] for entry in gpus)
        assert names == ["Sim A100", "Sim H100", "Sim RTX 4090", "Sim T4"]
        assert all(entry["state"]["is_simulated"] for entry in gpus)
        # The same device id on two nodes is two devices.
        assert sum(1 for entry in gpus if entry["device_id"] == "cuda:0") == 3

        # Make node 1's T4 throttle: every node sees it within 3 s.
        written_at = time.monotonic()
        write_devices(
            files[1],
            [
                device("cuda:0", "Sim A100", 80, 2039),
                device(
                    "cuda:1",
                    "Sim T4",
                    16,
                    320,
                    is_thermal_throttling=True,
                    thermal_temperature_c=91,
                ),
            ],
        )

        def throttling_seen() -> bool:
            return all(
                node.state()["gpu_device_state"][ids[1]]["cuda:1"]["is_thermal_throttling"]
                for node in nodes
            )

        wait_until(throttling_seen, 60.0, "every node to see the throttling T4")
        # How fast is bench/telemetry_cluster.py's to say (goal: 3 s); here, that it arrives.
        print(f"the throttling T4 reached every node {time.monotonic() - written_at:.2f} s later")
        # Every node holds the new reading, and only that device changed.
        for node in nodes:
            devices = node.state()["gpu_device_state"]
            t4 = devices[ids[1]]["cuda:1"]
            assert t4["thermal_temperature_c"] == 91
            assert t4["node_id"] == ids[1]
            others = [
                reading
                for node_id, by_device in devices.items()
                for device_id, reading in by_device.items()
                if (node_id, device_id) != (ids[1], "cuda:1")
            ]
            assert len(others) == 3
            assert not any(reading["is_thermal_throttling"] for reading in others)

        # A node that dies takes its devices with it.
        nodes[2].kill()
        survivors = nodes[:2]

        def devices_gone() -> bool:
            return all(ids[2] not in node.state()["gpu_device_state"] for node in survivors)

        wait_until(devices_gone, 60.0, "the dead node's devices to disappear")
        wait_converged(survivors, 2, "survivors to agree")
        assert all(entry["node_id"] != ids[2] for entry in survivors[0].get_list("/gpus"))


def test_a_model_placed_on_a_simulated_gpu_computes_on_the_nodes_cpu(tmp_path: Path) -> None:
    # The simulated GPU is a placement target; its runner computes on what the node really
    # has, and says so. A node's own execution report lists only real devices.
    gpus = write_devices(tmp_path / "gpus.json", [device("cuda:0", "Sim RTX 4090", 24, 1008)])
    with running_cluster(tmp_path, 1, lambda _: ["--simulate-gpus", str(gpus)]) as (node,):
        wait_converged([node], 1, "the node to elect itself")
        wait_until(
            lambda: bool(node.state()["gpu_device_state"]), 60.0, "the simulated GPU to appear"
        )
        created = httpx.post(
            node.url + "/instance", json={"model_id": "SmolLM2-135M-Instruct"}, timeout=30.0
        )
        assert created.status_code == 201, created.text
        shard = created.json()["shards"][0]
        assert shard["device_id"] == "cuda:0"

        def runner_ready() -> bool:
            runner = node.state()["runners"].get(shard["runner_id"], {})
            return runner.get("status") == "ready"

        wait_until(runner_ready, 90.0, "the runner to be ready")
        state = node.state()
        assert state["runners"][shard["runner_id"]]["compute_device"]["device_id"] == "cpu:0"
        execution = state["nodes"][node.node_id()]["execution"]
        assert "cuda:0" not in {entry["device_id"] for entry in execution["devices"]}
