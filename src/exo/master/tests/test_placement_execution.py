"""Placement puts layers only where a node's MLX can compute: a GPU its MLX cannot use is
telemetry only (and the decision says why), the node offers its CPU instead, and the
prediction is the CPU's."""

import pytest

from exo.master.placement import NoCandidateDevicesError, find_candidates, place_instance
from exo.master.tests.placement_helpers import gpu_info, gpu_state, node_info, small_model
from exo.shared.types.commands import PlaceInstance
from exo.shared.types.execution import ComputeDevice, ExecutionCapability
from exo.shared.types.ids import DeviceId, NodeId
from exo.shared.types.state import State

CPU = ComputeDevice(device_id=DeviceId("cpu:0"), backend="cpu", name="x86_64")
CPU_ONLY = ExecutionCapability(mlx_version="0.32.4", mlx_build="mlx-cpu", devices=[CPU])
WITH_CUDA = ExecutionCapability(
    mlx_version="0.32.4",
    mlx_build="mlx-cuda-13",
    devices=[CPU, ComputeDevice(device_id=DeviceId("cuda:0"), backend="cuda", name="RTX 4090")],
)
NO_MLX = ExecutionCapability(mlx_build="mlx-cuda-13", error="libcuda.so.1: cannot open")


def cluster(**capabilities: ExecutionCapability | None) -> State:
    """One RTX 4090 (cuda:0) on every named node, each node with the given MLX."""
    nodes = {
        NodeId(name): node_info(name).model_copy(update={"execution": capability})
        for name, capability in capabilities.items()
    }
    return State(
        nodes=nodes,
        gpu_device_state={NodeId(name): {DeviceId("cuda:0"): gpu_state(name)} for name in nodes},
        gpu_device_info={NodeId(name): {DeviceId("cuda:0"): gpu_info(name)} for name in nodes},
    )


def placed_devices(state: State, min_nodes: int = 1) -> list[tuple[str, str]]:
    instance = place_instance(PlaceInstance(model_id="m", min_nodes=min_nodes), state, MODEL)
    return [(shard.node_id, shard.device_id) for shard in instance.shards]


MODEL = small_model(16, layer_mb=100.0)


def test_a_gpu_the_nodes_mlx_cannot_use_gets_no_layers_and_the_cpu_stands_in() -> None:
    state = cluster(gamer=CPU_ONLY)
    candidates = find_candidates(state)
    assert [(d.node_id, d.device_id, d.backend) for d in candidates.devices] == [
        ("gamer", "cpu:0", "cpu")
    ]
    assert candidates.left_out == [
        "cuda:0 on gamer: MLX on this node has no CUDA — start it with --extra cuda13"
    ]
    instance = place_instance(PlaceInstance(model_id="m"), state, MODEL)
    assert [(s.node_id, s.device_id) for s in instance.shards] == [("gamer", "cpu:0")]
    reasons = instance.placement.reasons
    assert reasons[0] == (
        "telemetry only: cuda:0 on gamer: MLX on this node has no CUDA — start it with "
        "--extra cuda13"
    )
    # The prediction is the CPU's, where the layers really run: 16 × 100 MiB at CPU speed.
    on_gpu = place_instance(PlaceInstance(model_id="m"), cluster(gamer=WITH_CUDA), MODEL)
    assert instance.placement.predicted_ms_per_token > 10 * on_gpu.placement.predicted_ms_per_token


def test_a_node_whose_mlx_has_cuda_gets_its_gpu() -> None:
    assert placed_devices(cluster(gamer=WITH_CUDA)) == [("gamer", "cuda:0")]


def test_no_layers_ever_land_on_a_device_its_node_cannot_compute_on() -> None:
    state = cluster(cuda_node=WITH_CUDA, cpu_node=CPU_ONLY, broken=NO_MLX)
    for min_nodes in (1, 2):
        for node, device in placed_devices(state, min_nodes):
            capability = state.nodes[NodeId(node)].execution
            assert capability is not None and capability.can_run_on(device), (node, device)
    left_out = find_candidates(state).left_out
    assert any(reason.startswith("cuda:0 on broken: MLX does not load") for reason in left_out)


def test_a_cluster_where_no_mlx_loads_says_why() -> None:
    with pytest.raises(NoCandidateDevicesError, match=r"libcuda\.so\.1"):
        place_instance(PlaceInstance(model_id="m"), cluster(broken=NO_MLX), MODEL)


def test_simulated_gpus_and_silent_nodes_are_taken_at_their_word() -> None:
    # A simulated device computes on its node's CPU; a node that reported no capability
    # (an older node, a hand-built state) is trusted as before.
    simulated = cluster(demo=CPU_ONLY)
    reading = simulated.gpu_device_state[NodeId("demo")][DeviceId("cuda:0")]
    simulated = simulated.model_copy(
        update={
            "gpu_device_state": {
                NodeId("demo"): {
                    DeviceId("cuda:0"): reading.model_copy(update={"is_simulated": True})
                }
            }
        }
    )
    assert placed_devices(simulated) == [("demo", "cuda:0")]
    assert placed_devices(cluster(old=None)) == [("old", "cuda:0")]
