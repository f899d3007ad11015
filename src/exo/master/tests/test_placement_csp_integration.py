"""place_instance on States built from the real shared types."""

import itertools
from collections.abc import Sequence

import pytest

from exo.master.cost_model import CostModel
from exo.master.placement import (
    ModelDoesNotFitError,
    NoCandidateDevicesError,
    NotEnoughNodesError,
    _compute_device_scores,
    _has_heterogeneous_gpus,
    candidate_devices,
    find_candidates,
    get_shard_assignments,
    place_instance,
)
from exo.master.tests.placement_helpers import NOW, gpu_info, gpu_state, node_info
from exo.models.cards import get_model_card
from exo.shared.types.commands import PlaceInstance
from exo.shared.types.gpu import DeviceGPUState, GPUDeviceInfo, GPULink
from exo.shared.types.ids import DeviceId, InstanceId, NodeId
from exo.shared.types.instances import Instance, Shard
from exo.shared.types.models import ModelCard
from exo.shared.types.state import State

GIB = 1024**3


def card(model_id: str) -> ModelCard:
    found = get_model_card(model_id)
    assert found is not None
    return found


LLAMA_8B = "Llama-3.1-8B-Instruct-4bit"
LLAMA_70B = "Llama-3.1-70B-Instruct-4bit"
LLAMA_405B = "Llama-3.1-405B-Instruct-4bit"


def _states(
    *pairs: tuple[DeviceGPUState, GPUDeviceInfo | None],
) -> tuple[
    dict[NodeId, dict[DeviceId, DeviceGPUState]], dict[NodeId, dict[DeviceId, GPUDeviceInfo]]
]:
    """The nested node → device maps of live states and static infos."""
    states: dict[NodeId, dict[DeviceId, DeviceGPUState]] = {}
    infos: dict[NodeId, dict[DeviceId, GPUDeviceInfo]] = {}
    for state, info in pairs:
        states.setdefault(state.node_id, {})[state.device_id] = state
        if info is not None:
            infos.setdefault(info.node_id, {})[info.device_id] = info
    return states, infos


def build_state(
    node_ids: Sequence[str],
    gpus: Sequence[tuple[DeviceGPUState, GPUDeviceInfo | None]] = (),
    *,
    ram_available_gb: float = 12.0,
    links: Sequence[GPULink] = (),
) -> State:
    gpu_device_state, gpu_device_info = _states(*gpus)
    gpu_links: dict[NodeId, dict[NodeId, GPULink]] = {}
    for link in links:
        gpu_links.setdefault(link.source_node_id, {})[link.dest_node_id] = link
    return State(
        nodes={
            NodeId(node): node_info(
                node,
                ram_total_gb=max(16.0, ram_available_gb * 1.25),
                ram_available_gb=ram_available_gb,
            )
            for node in node_ids
        },
        gpu_device_state=gpu_device_state,
        gpu_device_info=gpu_device_info,
        gpu_links=gpu_links,
    )


def gpu(
    node: str,
    device_id: str = "cuda:0",
    *,
    name: str = "NVIDIA RTX 4090",
    memory_gb: float = 24.0,
    bandwidth_gbps: float = 1008.0,
    tflops: float = 165.0,
    backend: str = "cuda",
    vendor: str = "NVIDIA",
    **live: float | bool,
) -> tuple[DeviceGPUState, GPUDeviceInfo]:
    return (
        gpu_state(node, device_id, memory_gb=memory_gb, **live),  # type: ignore[arg-type]
        gpu_info(
            node,
            device_id,
            name=name,
            vendor=vendor,
            backend=backend,  # type: ignore[arg-type]
            memory_gb=memory_gb,
            bandwidth_gbps=bandwidth_gbps,
            tflops=tflops,
        ),
    )


def place(
    state: State, model_id: str, *, min_nodes: int = 1, budget_ms: float = 1000.0
) -> Instance:
    return place_instance(
        PlaceInstance(model_id=model_id, min_nodes=min_nodes),
        state,
        card(model_id),
        csp_budget_ms=budget_ms,
        instance_id=InstanceId("instance-1"),
    )


def layers_by_device(instance: Instance) -> dict[tuple[str, str], int]:
    return {(shard.node_id, shard.device_id): shard.n_layers for shard in instance.shards}


def assert_well_formed(instance: Instance, n_layers: int) -> None:
    shards = instance.shards
    assert [shard.rank for shard in shards] == list(range(len(shards)))
    assert all(shard.world_size == len(shards) for shard in shards)
    assert shards[0].start_layer == 0
    assert shards[-1].end_layer == n_layers
    for previous, following in itertools.pairwise(shards):
        assert previous.end_layer == following.start_layer
    assert all(shard.n_layers >= 1 for shard in shards)
    assert len({shard.runner_id for shard in shards}) == len(shards)
    assert len({(shard.node_id, shard.device_id) for shard in shards}) == len(shards)


def without_runner_ids(shards: Sequence[Shard]) -> list[tuple[object, ...]]:
    return [
        (s.node_id, s.device_id, s.rank, s.world_size, s.start_layer, s.end_layer) for s in shards
    ]


# --- decision tree -------------------------------------------------------------------------
def test_homogeneous_cluster_takes_the_greedy_path_unchanged() -> None:
    state = build_state(["a", "b", "c"], [gpu("a", memory_gb=24), gpu("b"), gpu("c")])
    instance = place(state, LLAMA_70B)
    decision = instance.placement
    assert decision.strategy == "greedy"
    assert not decision.heterogeneous
    assert decision.predicted_ms_per_token == decision.greedy_ms_per_token
    expected = get_shard_assignments(card(LLAMA_70B), candidate_devices(state))
    assert without_runner_ids(instance.shards) == without_runner_ids(expected)
    assert instance.instance_id == "instance-1"
    assert len(decision.device_scores) == 3
    assert_well_formed(instance, 80)


def test_without_gpu_telemetry_the_cpus_get_the_greedy_split() -> None:
    state = build_state(["a", "b"], ram_available_gb=5.0)
    instance = place(state, LLAMA_8B)
    assert instance.placement.strategy == "greedy"
    assert {shard.device_id for shard in instance.shards} == {"cpu:0"}
    assert "no GPU telemetry" in instance.placement.reasons[0]
    assert_well_formed(instance, 32)


def test_issue_2180_cuda_gpu_beside_a_cpu_node_takes_every_layer_it_can() -> None:
    state = build_state(
        ["gpu-box", "cpu-box"],
        [gpu("gpu-box", memory_gb=12, name="NVIDIA RTX 3060", bandwidth_gbps=360)],
        ram_available_gb=48,
    )
    instance = place(state, LLAMA_8B)
    decision = instance.placement
    assert decision.heterogeneous and decision.strategy == "csp"
    assert layers_by_device(instance) == {("gpu-box", "cuda:0"): 32}
    # Greedy (largest free memory first) would have put it all on the CPU.
    assert decision.greedy_ms_per_token > 5 * decision.predicted_ms_per_token
    assert any("backends differ" in reason for reason in decision.reasons)


def test_issue_2180_a_model_too_big_for_the_gpu_fills_the_gpu_first() -> None:
    state = build_state(["gpu-box", "cpu-box"], [gpu("gpu-box", memory_gb=24)], ram_available_gb=48)
    instance = place(state, LLAMA_70B)
    layers = layers_by_device(instance)
    gpu_device = next(d for d in candidate_devices(state) if d.device_id == "cuda:0")
    cost_model = CostModel(model_card=card(LLAMA_70B))
    gpu_shard = next(s for s in instance.shards if s.device_id == "cuda:0")
    is_first = gpu_shard.rank == 0
    is_last = gpu_shard.rank == gpu_shard.world_size - 1
    assert layers[("gpu-box", "cuda:0")] == cost_model.max_layers(gpu_device, is_first, is_last)
    assert instance.placement.predicted_ms_per_token < instance.placement.greedy_ms_per_token
    assert_well_formed(instance, 80)


def test_equal_memory_twice_the_bandwidth_gets_more_layers() -> None:
    state = build_state(
        ["mac-fast", "mac-slow"],
        [
            gpu(
                "mac-fast",
                "metal:0",
                name="Apple M2 Ultra",
                vendor="Apple",
                backend="metal",
                memory_gb=32,
                bandwidth_gbps=800,
            ),
            gpu(
                "mac-slow",
                "metal:0",
                name="Apple M2 Max",
                vendor="Apple",
                backend="metal",
                memory_gb=32,
                bandwidth_gbps=400,
            ),
        ],
    )
    instance = place(state, LLAMA_70B)
    layers = layers_by_device(instance)
    assert instance.placement.strategy == "csp"
    assert layers[("mac-fast", "metal:0")] > layers[("mac-slow", "metal:0")]
    assert instance.placement.predicted_ms_per_token < instance.placement.greedy_ms_per_token
    assert_well_formed(instance, 80)


def test_a_throttling_device_is_left_out_when_the_optimum_does_without_it() -> None:
    state = build_state(
        ["a", "b", "c"],
        [gpu("a"), gpu("b", throttling=True, temperature_c=93.0), gpu("c")],
    )
    instance = place(state, LLAMA_8B)
    assert "b" not in {shard.node_id for shard in instance.shards}
    assert any("not used" in r and "[throttling]" in r for r in instance.placement.reasons)
    scores = {score.node_id: score for score in instance.placement.device_scores}
    assert scores[NodeId("b")].thermal_score == 0.0


def test_a_throttling_fast_device_is_still_used_when_it_wins() -> None:
    """An H100 at half speed (1675 GB/s) still beats a cool RTX 3060 (360 GB/s)."""
    state = build_state(
        ["dc", "pc"],
        [
            gpu("dc", name="NVIDIA H100", memory_gb=80, bandwidth_gbps=3350, throttling=True),
            gpu("pc", name="NVIDIA RTX 3060", memory_gb=12, bandwidth_gbps=360),
        ],
    )
    instance = place(state, LLAMA_8B)
    assert layers_by_device(instance) == {("dc", "cuda:0"): 32}
    reason = next(r for r in instance.placement.reasons if "used although throttling" in r)
    assert "still" in reason and "faster than the best placement without it" in reason


def test_a_throttling_device_is_used_when_nothing_else_fits() -> None:
    state = build_state(
        ["a", "b"],
        [gpu("a", memory_gb=4.5), gpu("b", memory_gb=4.5, throttling=True)],
    )
    instance = place(state, LLAMA_8B)
    assert {shard.node_id for shard in instance.shards} == {"a", "b"}
    assert any(
        "used although throttling: nothing fits without it" in r for r in instance.placement.reasons
    )
    assert_well_formed(instance, 32)


def test_an_unplugged_laptop_on_low_battery_is_left_out_while_others_fit() -> None:
    state = build_state(
        ["desk", "laptop"],
        [
            gpu("desk", memory_gb=16),
            gpu("laptop", memory_gb=24, plugged_in=False, battery_percent=15.0),
        ],
    )
    instance = place(state, LLAMA_8B)
    assert {shard.node_id for shard in instance.shards} == {"desk"}
    assert any("on low battery" in r for r in instance.placement.reasons)


def test_noisy_utilisation_does_not_unbalance_equal_devices() -> None:
    """Three equal CPU-class GPUs whose momentary readings differ (busy 55 % on one makes
    the cluster uneven, so the solver runs): the two quiet ones still share evenly."""
    slow = {"name": "Slow GPU", "memory_gb": 4.0, "bandwidth_gbps": 60.0, "tflops": 2.0}
    state = build_state(
        ["a", "b", "c"],
        [
            gpu("a", utilization=4.0, **slow),  # type: ignore[arg-type]
            gpu("b", utilization=55.0, **slow),  # type: ignore[arg-type]
            gpu("c", utilization=9.0, **slow),  # type: ignore[arg-type]
        ],
    )
    instance = place(state, LLAMA_8B)
    layers = layers_by_device(instance)
    quiet = [layers.get(("a", "cuda:0"), 0), layers.get(("c", "cuda:0"), 0)]
    assert abs(quiet[0] - quiet[1]) <= 1, layers


def test_the_devices_running_our_shards_do_not_count_our_load() -> None:
    state = build_state(["a", "b"], [gpu("a", utilization=90.0), gpu("b", utilization=90.0)])
    first = place(state, LLAMA_8B)
    assert first.placement.heterogeneous is False
    busy_other = build_state(["a", "b"], [gpu("a", utilization=90.0), gpu("b", utilization=5.0)])
    placed = place(busy_other, LLAMA_8B)
    assert {shard.node_id for shard in placed.shards} == {"b"}
    # Now node a runs our instance: its 90 % is ours, not a stranger's.
    ours = busy_other.model_copy(update={"instances": {first.instance_id: first_on("a", first)}})
    candidates = {d.node_id: d for d in find_candidates(ours).devices}
    assert candidates[NodeId("a")].utilization_percent == 0.0
    assert candidates[NodeId("b")].utilization_percent == 5.0


def first_on(node: str, instance: Instance) -> Instance:
    shard = instance.shards[0].model_copy(
        update={"node_id": NodeId(node), "device_id": DeviceId("cuda:0")}
    )
    return instance.model_copy(update={"shards": [shard]})


def test_a_node_with_two_unlike_gpus_is_placed_per_device() -> None:
    state = build_state(
        ["box"],
        [
            gpu("box", "cuda:0", name="NVIDIA RTX 4060", memory_gb=8, bandwidth_gbps=272),
            gpu("box", "cuda:1", name="NVIDIA RTX 4080", memory_gb=16, bandwidth_gbps=717),
        ],
    )
    model = ModelCard(
        model_id="test-18g",
        n_layers=40,
        layer_bytes=450 * 1024 * 1024,
        non_layer_bytes=200 * 1024 * 1024,
        hidden_size=5120,
        kv_cache_bytes_per_token=40 * 2 * 8 * 128 * 2,
        context_length=2048,
    )
    instance = place_instance(PlaceInstance(model_id="test-18g"), state, model)
    assert instance.placement.strategy == "csp"
    layers = layers_by_device(instance)
    assert set(layers) == {("box", "cuda:0"), ("box", "cuda:1")}
    assert layers[("box", "cuda:1")] > layers[("box", "cuda:0")]
    assert_well_formed(instance, 40)


@pytest.mark.parametrize("alike", [True, False])
def test_min_nodes_is_honoured(alike: bool) -> None:
    second = gpu("b") if alike else gpu("b", name="NVIDIA RTX 3090", bandwidth_gbps=936)
    state = build_state(["a", "b"], [gpu("a"), second])
    instance = place(state, LLAMA_8B, min_nodes=2)
    assert {shard.node_id for shard in instance.shards} == {"a", "b"}
    assert instance.placement.strategy == ("greedy" if alike else "csp")
    with pytest.raises(NotEnoughNodesError) as raised:
        place(state, LLAMA_8B, min_nodes=3)
    assert raised.value.required_nodes == 3 and raised.value.available_nodes == 2
    assert raised.value.status_code == 409


def test_a_model_that_fits_nowhere_reports_the_numbers() -> None:
    state = build_state(["a", "b"], [gpu("a"), gpu("b", memory_gb=48, name="NVIDIA A6000")])
    with pytest.raises(ModelDoesNotFitError) as raised:
        place(state, LLAMA_405B)
    error = raised.value
    assert error.needed_bytes > 228e9
    assert 0 < error.available_bytes < 72 * GIB
    assert "GiB" in error.message and LLAMA_405B in error.message
    assert error.detail["needed_bytes"] == error.needed_bytes
    assert error.status_code == 409


def test_an_empty_cluster_has_no_candidates() -> None:
    with pytest.raises(NoCandidateDevicesError):
        place(State(), LLAMA_8B)


def test_only_nodes_in_state_are_candidates() -> None:
    state = build_state(["a"], [gpu("a"), gpu("ghost")])
    assert [device.node_id for device in candidate_devices(state)] == ["a"]


def test_an_exhausted_budget_falls_back_to_greedy() -> None:
    state = build_state(["gpu-box", "cpu-box"], [gpu("gpu-box", memory_gb=24)], ram_available_gb=48)
    instance = place(state, LLAMA_70B, budget_ms=0.0)
    assert instance.placement.strategy == "greedy_fallback"
    assert instance.placement.predicted_ms_per_token == instance.placement.greedy_ms_per_token
    assert_well_formed(instance, 80)


def test_measured_links_steer_the_ring_away_from_a_slow_link() -> None:
    nodes = ["a", "b", "c"]
    # b is the fastest device, but its links are slow: the pair a, c is cheaper.
    gpus = [gpu("a"), gpu("b", name="NVIDIA fast 24G", bandwidth_gbps=2000), gpu("c")]
    links = [
        GPULink(
            source_node_id=NodeId(s),
            dest_node_id=NodeId(d),
            bandwidth_mbps=10.0 if "b" in (s, d) else 10_000.0,
            latency_ms=20.0 if "b" in (s, d) else 0.2,
            measurement_count=3,
            measured_at=NOW,
        )
        for s in nodes
        for d in nodes
        if s != d
    ]
    state = build_state(nodes, gpus, links=links)
    instance = place(state, LLAMA_70B)
    assert {shard.node_id for shard in instance.shards} == {"a", "c"}
    unmeasured = place(build_state(nodes, gpus), LLAMA_70B)
    assert "b" in {shard.node_id for shard in unmeasured.shards}


# --- unit: heterogeneity and scores --------------------------------------------------------
@pytest.mark.parametrize(
    ("second", "expected"),
    [
        (gpu("b"), False),
        (gpu("b", memory_gb=25.0), False),  # within 10 %
        (gpu("b", memory_gb=16.0), True),
        (gpu("b", bandwidth_gbps=700.0), True),
        (gpu("b", name="NVIDIA RTX 4090 D"), True),
        (gpu("b", vendor="AMD"), True),
        (gpu("b", backend="metal"), True),
        (gpu("b", throttling=True), True),
        (gpu("b", temperature_c=95.0), True),
        (gpu("b", plugged_in=False, battery_percent=80.0), True),
        (gpu("b", utilization=60.0), True),
        (gpu("b", utilization=30.0), False),
    ],
)
def test_has_heterogeneous_gpus(
    second: tuple[DeviceGPUState, GPUDeviceInfo], expected: bool
) -> None:
    states, infos = _states(gpu("a"), second)
    assert _has_heterogeneous_gpus(states, infos) is expected


def test_has_heterogeneous_gpus_without_static_info_compares_memory_and_condition() -> None:
    states, _ = _states(gpu("a"), gpu("b", bandwidth_gbps=100.0))
    assert _has_heterogeneous_gpus(states) is False
    states, _ = _states(gpu("a"), gpu("b", memory_gb=8.0))
    assert _has_heterogeneous_gpus(states) is True
    states, _ = _states(gpu("a"))
    assert _has_heterogeneous_gpus(states) is False


def test_compute_device_scores() -> None:
    states, infos = _states(
        gpu("a", bandwidth_gbps=1000.0, tflops=100.0),
        gpu("b", bandwidth_gbps=500.0, tflops=50.0, memory_gb=8.0),
        gpu("c", throttling=True),
        gpu("d"),
    )
    slow = GPULink(
        source_node_id=NodeId("b"),
        dest_node_id=NodeId("a"),
        bandwidth_mbps=10.0,
        latency_ms=30.0,
        measurement_count=1,
        measured_at=NOW,
    )
    scores = _compute_device_scores(
        [NodeId("a"), NodeId("b"), NodeId("c")],
        states,
        shard_size_bytes=12 * GIB,
        topology={NodeId("b"): {NodeId("a"): slow}},
        gpu_device_info=infos,
    )
    by_node = {score.node_id: score for score in scores}
    assert set(by_node) == {"a", "b", "c"}
    for score in scores:
        for part in (
            score.compute_score,
            score.memory_score,
            score.network_score,
            score.thermal_score,
            score.bandwidth_score,
        ):
            assert 0.0 <= part <= 1.0
        assert 0.0 <= score.weighted_score <= 1.0
    assert by_node[NodeId("a")].bandwidth_score == 1.0
    assert by_node[NodeId("b")].bandwidth_score == pytest.approx(0.5)
    assert by_node[NodeId("b")].compute_score == pytest.approx(50.0 / 165.0)
    assert by_node[NodeId("b")].memory_score < 1.0 == by_node[NodeId("a")].memory_score
    # c's links are all the default LAN; a and b share the slow b → a link.
    assert by_node[NodeId("c")].network_score == 1.0 > by_node[NodeId("b")].network_score
    assert by_node[NodeId("c")].thermal_score == 0.0
    assert by_node[NodeId("a")].weighted_score > by_node[NodeId("b")].weighted_score
