"""The cost model against numbers worked out by hand from datasheets and published model
configurations, so an error in the model shows here (the solver's tests use the model as
their reference and cannot see one)."""

import math

import pytest

from exo.master.cost_model import (
    BACKEND_PROFILES,
    PEER_LINKS,
    CostModel,
    CostModelConfig,
    LinkCost,
    PlacementDevice,
    StagePlan,
    device_condition,
    usable_bytes,
)
from exo.master.placement import heterogeneity_reasons
from exo.models.cards import get_model_card
from exo.shared.types.ids import DeviceId, NodeId
from exo.shared.types.memory import GIB
from exo.shared.types.models import ModelCard

# Llama 3.1 8B (config.json): 32 layers, hidden 4096, MLP 14336, 32 heads, 8 KV heads,
# vocabulary 128256, untied head. 4-bit MLX quantisation: 4.5 bits per weight.
LAYER_PARAMETERS = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096
LAYER_BYTES = LAYER_PARAMETERS * 9 // 16  # 122,688,000
EMBEDDING_BYTES = 128256 * 4096 * 9 // 16  # 295,501,824 (the head is the same size)
KV_PER_TOKEN = 32 * 2 * 8 * 128 * 2  # layers × (K, V) × KV heads × head dim × fp16 = 131,072


def llama_8b() -> ModelCard:
    card = get_model_card("Llama-3.1-8B-Instruct-4bit")
    assert card is not None
    return card


def rtx_4090(node: str = "pc", device_id: str = "cuda:0", **live: object) -> PlacementDevice:
    # NVIDIA's datasheet: 24 GB GDDR6X at 1008 GB/s, 165 fp16 TFLOPS (tensor, dense).
    return PlacementDevice.model_validate(
        {
            "node_id": node,
            "device_id": device_id,
            "name": "NVIDIA GeForce RTX 4090",
            "vendor": "NVIDIA",
            "backend": "cuda",
            "memory_total_bytes": 24 * GIB,
            "memory_free_bytes": 24 * GIB,
            "memory_bandwidth_gbps": 1008.0,
            "peak_tflops_fp16": 165.0,
            **live,
        }
    )


def test_the_card_matches_the_published_configuration() -> None:
    card = llama_8b()
    assert card.layer_bytes == LAYER_BYTES == 122_688_000
    assert card.embedding_bytes == card.lm_head_bytes == EMBEDDING_BYTES
    assert not card.tied_embeddings
    assert card.kv_cache_bytes_per_token == KV_PER_TOKEN
    assert card.parameters_per_layer == LAYER_PARAMETERS


def test_memory_need_of_llama_8b_includes_its_kv_cache() -> None:
    cost_model = CostModel(model_card=llama_8b())
    final_norm = 4096 * 9 // 16  # 2,304 bytes
    weights = 32 * LAYER_BYTES + 2 * EMBEDDING_BYTES + final_norm
    kv_cache = 4096 * KV_PER_TOKEN  # the whole 4k context: 512 MiB
    assert cost_model.memory_needed(32, True, True) == weights + kv_cache == 5_053_892_864
    # Split in two: the first stage holds the embedding, the last the head and the norm.
    assert cost_model.memory_needed(16, True, False) == 16 * LAYER_BYTES + EMBEDDING_BYTES + (
        kv_cache // 2
    )
    assert cost_model.memory_needed(16, False, True) == (
        16 * LAYER_BYTES + EMBEDDING_BYTES + final_norm + kv_cache // 2
    )


def test_a_tied_embedding_is_held_once_by_a_lone_stage_and_by_both_ends_of_a_pipeline() -> None:
    card = llama_8b().model_copy(update={"tied_embeddings": True, "lm_head_bytes": 0})
    cost_model = CostModel(model_card=card.model_copy(update={"non_layer_bytes": EMBEDDING_BYTES}))
    alone = cost_model.stage_bytes(32, True, True)
    assert alone == 32 * LAYER_BYTES + EMBEDDING_BYTES
    assert cost_model.stage_bytes(16, True, False) + cost_model.stage_bytes(16, False, True) == (
        32 * LAYER_BYTES + 2 * EMBEDDING_BYTES
    )


def test_a_card_without_embedding_facts_holds_its_non_layer_bytes_once() -> None:
    """Half at each end, as before cards said where their embedding is."""
    card = llama_8b().model_copy(
        update={"embedding_bytes": 0, "lm_head_bytes": 0, "non_layer_bytes": 1_000_001}
    )
    cost_model = CostModel(model_card=card)
    assert cost_model.stage_bytes(0, True, False) == 500_000
    assert cost_model.stage_bytes(0, False, True) == 500_001
    assert cost_model.stage_bytes(0, True, True) == 1_000_001


def test_ms_per_token_of_llama_8b_on_an_rtx_4090() -> None:
    cost_model = CostModel(model_card=llama_8b())
    # Per token at a 2k context each layer reads its weights and KV cache, streamed at
    # 1008 GB/s = 1.008e9 bytes per ms: 0.130 ms, under CUDA's 0.25 ms of kernel launches
    # per layer, which the reads hide only up to their own length: max(0.25, 0.130).
    layer_read = (LAYER_BYTES + 2048 * KV_PER_TOKEN / 32) / 1.008e9
    assert layer_read == pytest.approx(0.13004, abs=1e-5)
    # Then one embedding row and the whole LM head, and 0.6 ms per stage.
    ends = (EMBEDDING_BYTES / 128256 + EMBEDDING_BYTES) / 1.008e9
    expected = 0.6 + 32 * max(0.25, layer_read) + ends  # 0.6 + 8 + 0.293 = 8.893 ms
    stage = [StagePlan(device=rtx_4090(), n_layers=32)]
    assert cost_model.predict_ms_per_token(stage) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(8.893, abs=1e-3)


def test_on_a_slow_gpu_the_reads_hide_the_host_time() -> None:
    # A 3060 at 360 GB/s: 0.364 ms of reads per layer, longer than the launches.
    cost_model = CostModel(model_card=llama_8b())
    gpu = rtx_4090(memory_bandwidth_gbps=360.0)
    layer_read = (LAYER_BYTES + 2048 * KV_PER_TOKEN / 32) / 3.6e8
    assert cost_model.layer_ms(gpu) == pytest.approx(layer_read)
    assert cost_model.visible_host_ms_per_layer(gpu) == 0.0


def test_a_hop_over_gigabit_ethernet_and_the_ring_closure() -> None:
    cost_model = CostModel(model_card=llama_8b())
    a, b = rtx_4090("a"), rtx_4090("b")
    # An fp16 hidden state of 4096 = 8192 bytes over 1 Gbit/s with 1 ms latency.
    hop = 1.0 + 8192 * 8 / 1e6
    assert cost_model.hop_ms(a, b) == pytest.approx(hop) == pytest.approx(1.065536)
    stages = [StagePlan(device=a, n_layers=16), StagePlan(device=b, n_layers=16)]
    stage_times = sum(cost_model.stage_times_ms(stages))
    assert cost_model.predict_ms_per_token(stages) == pytest.approx(stage_times + 2 * hop)
    # A measured 10 GbE link at 0.2 ms replaces the default both ways it was measured.
    measured = {NodeId("a"): {NodeId("b"): LinkCost(latency_ms=0.2, bandwidth_mbps=10_000)}}
    faster = CostModel(model_card=llama_8b(), links=measured)
    assert faster.hop_ms(a, b) == pytest.approx(0.2 + 8192 * 8 / 1e7)
    assert faster.hop_ms(b, a) == pytest.approx(hop)


def test_same_node_hops_follow_the_reported_topology() -> None:
    cost_model = CostModel(model_card=llama_8b())
    nvlinked = rtx_4090("n", "cuda:0", peer_links={"cuda:1": "nvlink"})
    other = rtx_4090("n", "cuda:1")
    nvlink = PEER_LINKS["nvlink"]
    assert cost_model.hop_ms(nvlinked, other) == pytest.approx(
        nvlink.latency_ms + 8192 * 8 / (nvlink.bandwidth_mbps * 1e3)
    )
    # The other direction reported nothing: through host memory.
    host = PEER_LINKS["pcie_host"]
    assert cost_model.hop_ms(other, nvlinked) == pytest.approx(
        host.latency_ms + 8192 * 8 / (host.bandwidth_mbps * 1e3)
    )


def test_usable_memory_is_free_memory_less_a_fixed_reserve_per_backend() -> None:
    config = CostModelConfig()
    gpu = rtx_4090(memory_free_bytes=20 * GIB)
    assert usable_bytes(gpu, config) == 20 * GIB - BACKEND_PROFILES["cuda"].memory_reserve_bytes
    # The same reserve on an 80 GB card: not 5 % of it.
    big = rtx_4090(memory_total_bytes=80 * GIB, memory_free_bytes=80 * GIB)
    assert usable_bytes(big, config) == 79 * GIB


def test_apple_memory_is_capped_by_its_wired_limit() -> None:
    config = CostModelConfig()
    mac = rtx_4090(backend="metal", memory_free_bytes=60 * GIB, max_working_set_bytes=48 * GIB)
    assert usable_bytes(mac, config) == 48 * GIB - BACKEND_PROFILES["metal"].memory_reserve_bytes


def test_conditions_are_speed_factors() -> None:
    config = CostModelConfig()
    assert device_condition(rtx_4090(), config).speed_factor == 1.0
    assert device_condition(rtx_4090(is_thermal_throttling=True), config).speed_factor == 0.5
    near = rtx_4090(temperature_c=86.0, throttle_threshold_c=90.0)
    assert device_condition(near, config).speed_factor == 0.8
    busy = device_condition(rtx_4090(utilization_percent=60.0), config)
    assert busy.speed_factor == pytest.approx(0.4)
    assert busy.busy
    unplugged = rtx_4090(is_plugged_in=False, battery_percent=80.0)
    assert device_condition(unplugged, config).speed_factor == 0.8
    low = rtx_4090(is_plugged_in=False, battery_percent=10.0)
    assert device_condition(low, config).speed_factor == 0.25
    # A device fully used by others still counts for its minimum share, never zero.
    assert device_condition(rtx_4090(utilization_percent=100.0), config).speed_factor == 0.05


def test_throttling_halves_the_gpus_reads_but_not_the_host() -> None:
    cost_model = CostModel(model_card=llama_8b())
    cool, hot = rtx_4090(), rtx_4090(is_thermal_throttling=True)
    assert cost_model.ms_for_bytes(hot, 1e9) == pytest.approx(
        2 * cost_model.ms_for_bytes(cool, 1e9)
    )
    assert cost_model.stage_fixed_ms(hot) == cost_model.stage_fixed_ms(cool)
    assert cost_model.layer_ms(hot) == pytest.approx(
        max(0.25, 2 * (LAYER_BYTES + 2048 * KV_PER_TOKEN / 32) / 1.008e9)
    )


def test_calibration_compares_with_the_stage_in_ideal_condition() -> None:
    cost_model = CostModel(model_card=llama_8b())
    ideal = cost_model.stage_ms(rtx_4090(), 32, True, True)
    worn = rtx_4090(calibration_factor=2.0, utilization_percent=50.0, is_thermal_throttling=True)
    assert cost_model.base_stage_ms(worn, 32, True, True) == pytest.approx(ideal)
    assert cost_model.stage_ms(worn, 32, True, True) > 2 * ideal


def test_calibration_scales_the_stage() -> None:
    cost_model = CostModel(model_card=llama_8b())
    plain = cost_model.stage_time(rtx_4090(), 32, True, True)
    slow = cost_model.stage_time(rtx_4090(calibration_factor=3.0), 32, True, True)
    assert slow.uncalibrated_ms == pytest.approx(plain.uncalibrated_ms)
    assert slow.total_ms == pytest.approx(3.0 * plain.total_ms)


def test_time_to_first_token_adds_the_prompts_compute() -> None:
    cost_model = CostModel(model_card=llama_8b())
    stage = [StagePlan(device=rtx_4090(), n_layers=32)]
    flops = 2.0 * 512 * 32 * LAYER_PARAMETERS + 2.0 * 128256 * 4096
    compute_ms = flops / (165.0 * 0.5 * 1e9)  # half of peak fp16
    expected = cost_model.predict_ms_per_token(stage) + compute_ms
    assert cost_model.predict_time_to_first_token_ms(stage) == pytest.approx(expected)
    assert compute_ms == pytest.approx(86.6, abs=0.1)


def test_time_to_first_token_of_two_stages_carries_the_prompts_hidden_states() -> None:
    """Two RTX 4090s over gigabit Ethernet: each stage computes its half of the prompt, and
    the 512 prompt tokens' fp16 hidden states (512 x 8192 bytes) cross to the second."""
    cost_model = CostModel(model_card=llama_8b())
    stages = [
        StagePlan(device=rtx_4090("a"), n_layers=16),
        StagePlan(device=rtx_4090("b"), n_layers=16),
    ]
    compute_ms = (2.0 * 512 * 32 * LAYER_PARAMETERS + 2.0 * 128256 * 4096) / (165.0 * 0.5 * 1e9)
    prompt_hop_ms = 1.0 + 512 * 8192 * 8 / 1e6  # 1 ms latency + 4 MiB at 1 Gbit/s
    assert prompt_hop_ms == pytest.approx(34.55, abs=0.01)
    expected = cost_model.predict_ms_per_token(stages) + compute_ms + prompt_hop_ms
    assert cost_model.predict_time_to_first_token_ms(stages) == pytest.approx(expected)


def test_throughput_is_paced_by_the_slowest_stage_and_its_hop() -> None:
    cost_model = CostModel(model_card=llama_8b())
    a, b = rtx_4090("a"), rtx_4090("b", is_thermal_throttling=True)
    stages = [StagePlan(device=a, n_layers=16), StagePlan(device=b, n_layers=16)]
    times = cost_model.stage_times_ms(stages)
    hops = cost_model.hop_times_ms(stages)
    assert cost_model.predict_bottleneck_ms(stages) == pytest.approx(times[1] + hops[1])
    assert times[1] > times[0]


@pytest.mark.parametrize(
    ("larger_gb", "unlike"),
    [(26.4, False), (26.5, True), (30.0, True)],
)
def test_heterogeneity_tolerance_is_ten_percent(larger_gb: float, unlike: bool) -> None:
    """24 GB against 26.4 GB is 10 % apart: alike; 26.5 GB (10.4 %) and 30 GB are not."""
    small = rtx_4090("a", memory_total_bytes=24 * GIB)
    large = rtx_4090("b", memory_total_bytes=int(larger_gb * GIB))
    reasons = heterogeneity_reasons([small, large])
    assert bool(reasons) == unlike
    if unlike:
        assert "total memory differs by more than 10%" in reasons[0]


@pytest.mark.parametrize(("faster", "unlike"), [(1108.0, False), (1110.0, True)])
def test_heterogeneity_tolerance_applies_to_bandwidth(faster: float, unlike: bool) -> None:
    reasons = heterogeneity_reasons([rtx_4090("a"), rtx_4090("b", memory_bandwidth_gbps=faster)])
    assert bool(reasons) == unlike


def test_small_utilisation_differences_do_not_make_devices_unlike() -> None:
    quiet = rtx_4090("a", utilization_percent=3.0)
    blip = rtx_4090("b", utilization_percent=41.0)
    assert heterogeneity_reasons([quiet, blip]) == []
    busy = rtx_4090("b", utilization_percent=55.0)
    assert heterogeneity_reasons([quiet, busy]) != []


def test_bandwidth_alone_does_not_decide_a_cpu_node() -> None:
    """One CPU stage of the bundled-size model costs its measured host time, far more than
    its bytes at 50 GB/s (the single-threaded MLX CPU backend)."""
    card = ModelCard(
        model_id="smol",
        n_layers=30,
        layer_bytes=2_216_448,
        non_layer_bytes=31_852_800,
        hidden_size=576,
        kv_cache_bytes_per_token=46_080,
        context_length=8192,
        vocab_size=49152,
        embedding_bytes=31_850_496,
        tied_embeddings=True,
    )
    cpu = PlacementDevice(
        node_id=NodeId("laptop"),
        device_id=DeviceId("cpu:0"),
        name="CPU",
        vendor="cpu",
        backend="cpu",
        memory_total_bytes=16 * GIB,
        memory_free_bytes=12 * GIB,
        memory_bandwidth_gbps=50.0,
        peak_tflops_fp16=0.5,
        is_cpu_fallback=True,
    )
    cost_model = CostModel(model_card=card)
    time = cost_model.stage_time(cpu, 30, True, True)
    assert time.host_ms == pytest.approx(2.0 + 30 * 4.5)
    assert time.host_ms > 30 * (time.weights_ms + time.kv_cache_ms)
    assert math.isclose(time.total_ms, time.uncalibrated_ms)


@pytest.mark.parametrize(
    ("cores", "utilisation", "share"),
    [(16, 50.0, 1.0), (2, 100.0, 2 / 3), (2, 50.0, 1.0), (1, 100.0, 0.5), (4, 100.0, 0.8)],
)
def test_a_cpus_share_for_one_thread_beside_others_load(
    cores: int, utilisation: float, share: float
) -> None:
    cpu = rtx_4090(backend="cpu", cpu_cores=cores, utilization_percent=utilisation)
    assert device_condition(cpu, CostModelConfig()).speed_factor == pytest.approx(share)
    gpu = rtx_4090(utilization_percent=utilisation)
    assert device_condition(gpu, CostModelConfig()).speed_factor == pytest.approx(
        max(0.05, 1 - utilisation / 100)
    )


# --- memory fit per role, by hand for Llama 3.1 8B on a CUDA device ---------------------------
RESERVE = BACKEND_PROFILES["cuda"].memory_reserve_bytes
PER_LAYER = LAYER_BYTES + 4096 * KV_PER_TOKEN // 32  # weights + its share of the 4k KV cache
FINAL_NORM = 4096 * 9 // 16


def gpu_holding(extra_bytes: int, node: str = "pc", device_id: str = "cuda:0") -> PlacementDevice:
    """A CUDA device whose usable memory is exactly ``extra_bytes`` past its reserve."""
    return rtx_4090(node, device_id, memory_free_bytes=RESERVE + extra_bytes)


def test_max_layers_depends_on_the_role_and_counts_a_layer_that_fits_exactly() -> None:
    cost_model = CostModel(model_card=llama_8b())
    device = gpu_holding(EMBEDDING_BYTES + 10 * PER_LAYER)
    assert PER_LAYER == 139_465_216
    # First: the embedding and exactly ten layers, to the byte.
    assert cost_model.max_layers(device, True, False) == 10
    assert cost_model.fits(device, 10, True, False)
    assert not cost_model.fits(device, 11, True, False)
    # Middle: the embedding's room takes two more layers (2 x 139 MB < 296 MB < 3 x).
    assert cost_model.max_layers(device, False, False) == 12
    assert cost_model.fits(device, 12, False, False)
    assert not cost_model.fits(device, 13, False, False)
    # Last: the head is the embedding's size plus the final norm, so the tenth layer is over.
    assert cost_model.max_layers(device, False, True) == 9
    assert not cost_model.fits(device, 10, False, True)
    # Alone: both ends, (10 x 139.5 MB - 295.5 MB - 2304) / 139.5 MB = 7.9.
    assert cost_model.max_layers(device, True, True) == 7
    assert cost_model.fits(device, 7, True, True)
    assert not cost_model.fits(device, 8, True, True)


def test_max_layers_is_capped_by_the_model_and_is_zero_when_the_ends_do_not_fit() -> None:
    cost_model = CostModel(model_card=llama_8b())
    big = rtx_4090(memory_total_bytes=80 * GIB, memory_free_bytes=80 * GIB)
    for is_first, is_last in [(True, True), (True, False), (False, False), (False, True)]:
        assert cost_model.max_layers(big, is_first, is_last) == 32
    short = gpu_holding(EMBEDDING_BYTES - 1)
    assert cost_model.max_layers(short, True, False) == 0
    assert cost_model.max_layers(short, False, True) == 0
    assert cost_model.max_layers(short, False, False) == 2
    empty = rtx_4090(memory_free_bytes=RESERVE // 2)
    assert usable_bytes(empty, CostModelConfig()) == 0  # never negative
    assert cost_model.max_layers(empty, False, False) == 0


def test_an_unknown_backend_is_costed_as_the_cpu_backend() -> None:
    config = CostModelConfig()
    assert config.profile("rocm") == BACKEND_PROFILES["cpu"]
    device = rtx_4090(backend="rocm", memory_free_bytes=20 * GIB)
    assert usable_bytes(device, config) == 20 * GIB - BACKEND_PROFILES["cpu"].memory_reserve_bytes


def test_a_tied_embedding_with_a_final_norm_is_held_once_alone() -> None:
    card = llama_8b().model_copy(
        update={
            "tied_embeddings": True,
            "lm_head_bytes": 0,
            "non_layer_bytes": EMBEDDING_BYTES + FINAL_NORM,
        }
    )
    cost_model = CostModel(model_card=card)
    assert cost_model.stage_bytes(32, True, True) == 32 * LAYER_BYTES + EMBEDDING_BYTES + FINAL_NORM
    assert cost_model.stage_bytes(16, True, False) == 16 * LAYER_BYTES + EMBEDDING_BYTES
    assert cost_model.stage_bytes(16, False, True) == (
        16 * LAYER_BYTES + EMBEDDING_BYTES + FINAL_NORM
    )


def test_a_share_of_the_kv_cache_is_rounded_up_to_whole_bytes() -> None:
    card = ModelCard(
        model_id="three-layers",
        n_layers=3,
        layer_bytes=1000,
        non_layer_bytes=0,
        hidden_size=8,
        kv_cache_bytes_per_token=10,
        context_length=4096,
    )
    cost_model = CostModel(model_card=card)
    assert cost_model.kv_cache_bytes(1) == 13_654  # 40960 / 3 = 13653.3
    assert cost_model.kv_cache_bytes(2) == 27_307  # 27306.7
    assert cost_model.kv_cache_bytes(3) == 40_960


# --- violations -------------------------------------------------------------------------------
def test_a_valid_placement_has_no_violations() -> None:
    cost_model = CostModel(model_card=llama_8b())
    two_nodes = [
        StagePlan(device=rtx_4090("a"), n_layers=16),
        StagePlan(device=rtx_4090("b"), n_layers=16),
    ]
    assert cost_model.violations(two_nodes) == []
    assert cost_model.violations(two_nodes, min_nodes=2) == []
    one = [StagePlan(device=rtx_4090("a"), n_layers=32)]
    assert cost_model.violations(one) == []
    # A stage of a single layer is a stage like any other.
    three = [
        StagePlan(device=rtx_4090("a"), n_layers=1),
        StagePlan(device=rtx_4090("b"), n_layers=15),
        StagePlan(device=rtx_4090("c"), n_layers=16),
    ]
    assert cost_model.violations(three) == []


def test_violations_name_a_wrong_layer_count_a_repeated_device_and_too_few_nodes() -> None:
    cost_model = CostModel(model_card=llama_8b())
    (short,) = cost_model.violations([StagePlan(device=rtx_4090("a"), n_layers=31)])
    assert "31 layers placed" in short and "has 32" in short
    twice = cost_model.violations(
        [StagePlan(device=rtx_4090("a"), n_layers=16), StagePlan(device=rtx_4090("a"), n_layers=16)]
    )
    assert len(twice) == 1 and "more than one stage" in twice[0]
    one_node = [
        StagePlan(device=rtx_4090("a", "cuda:0"), n_layers=16),
        StagePlan(device=rtx_4090("a", "cuda:1"), n_layers=16),
    ]
    assert cost_model.violations(one_node) == []
    assert cost_model.violations(one_node, min_nodes=2) == ["fewer than 2 nodes used"]


def test_violations_judge_each_stage_in_its_own_role() -> None:
    """A device with room for 12 layers in the middle, 10 first and 9 last."""
    cost_model = CostModel(model_card=llama_8b())
    tight = gpu_holding(EMBEDDING_BYTES + 10 * PER_LAYER, "t")

    def placement(*stages: tuple[PlacementDevice, int]) -> list[StagePlan]:
        return [StagePlan(device=device, n_layers=n) for device, n in stages]

    a, c = rtx_4090("a"), rtx_4090("c")
    assert cost_model.violations(placement((a, 10), (tight, 12), (c, 10))) == []
    assert cost_model.violations(placement((tight, 10), (a, 12), (c, 10))) == []
    assert cost_model.violations(placement((a, 10), (c, 13), (tight, 9))) == []
    for stages, held in (
        (placement((tight, 12), (a, 10), (c, 10)), 12),  # 12 first: room for 10
        (placement((a, 10), (c, 10), (tight, 12)), 12),  # 12 last: room for 9
        (placement((a, 10), (tight, 13), (c, 9)), 13),  # 13 in the middle: room for 12
    ):
        assert cost_model.violations(stages) == [f"{tight.label} cannot hold {held} layers"]


# --- conditions -------------------------------------------------------------------------------
def test_the_throttle_threshold_and_the_near_margin_are_inclusive() -> None:
    config = CostModelConfig()
    at = device_condition(rtx_4090(temperature_c=90.0, throttle_threshold_c=90.0), config)
    assert at.hot and at.speed_factor == 0.5 and at.notes == ["throttling"]
    near = device_condition(rtx_4090(temperature_c=85.0, throttle_threshold_c=90.0), config)
    assert not near.hot and near.near_threshold
    assert near.speed_factor == 0.8 and near.notes == ["near its throttle threshold"]
    cool = device_condition(rtx_4090(temperature_c=84.9, throttle_threshold_c=90.0), config)
    assert cool.speed_factor == 1.0 and cool.notes == []


def test_low_battery_is_strictly_below_its_percentage() -> None:
    config = CostModelConfig()
    at = device_condition(rtx_4090(is_plugged_in=False, battery_percent=20.0), config)
    assert at.on_battery and not at.low_battery
    assert at.speed_factor == 0.8 and at.notes == ["on battery"]
    low = device_condition(rtx_4090(is_plugged_in=False, battery_percent=19.9), config)
    assert low.on_battery and low.low_battery
    assert low.speed_factor == 0.25 and low.notes == ["on low battery"]


def test_heat_battery_and_load_multiply() -> None:
    config = CostModelConfig()
    hot_unplugged = rtx_4090(is_thermal_throttling=True, is_plugged_in=False, battery_percent=80.0)
    assert device_condition(hot_unplugged, config).speed_factor == pytest.approx(0.5 * 0.8)
    near_low = rtx_4090(
        temperature_c=88.0, throttle_threshold_c=90.0, is_plugged_in=False, battery_percent=5.0
    )
    assert device_condition(near_low, config).speed_factor == pytest.approx(0.8 * 0.25)
    everything = device_condition(
        rtx_4090(
            is_thermal_throttling=True,
            is_plugged_in=False,
            battery_percent=5.0,
            utilization_percent=50.0,
        ),
        config,
    )
    assert everything.speed_factor == pytest.approx(0.5 * 0.25 * 0.5)
    assert everything.notes == ["throttling", "on low battery", "busy"]


def test_a_device_others_use_half_of_is_busy() -> None:
    config = CostModelConfig()
    assert device_condition(rtx_4090(utilization_percent=50.0), config).busy
    assert device_condition(rtx_4090(utilization_percent=50.0), config).notes == ["busy"]
    assert not device_condition(rtx_4090(utilization_percent=49.0), config).busy


# --- time -------------------------------------------------------------------------------------
def test_a_stage_reads_the_embedding_row_only_first_and_the_head_only_last() -> None:
    cost_model = CostModel(model_card=llama_8b())
    gpu = rtx_4090()
    layers = 16 * LAYER_BYTES
    row = EMBEDDING_BYTES / 128256

    def weights_ms(is_first: bool, is_last: bool) -> float:
        return cost_model.stage_time(gpu, 16, is_first, is_last).weights_ms

    assert weights_ms(False, False) == pytest.approx(layers / 1.008e9, rel=1e-12)
    assert weights_ms(True, False) == pytest.approx((layers + row) / 1.008e9, rel=1e-12)
    assert weights_ms(False, True) == pytest.approx((layers + EMBEDDING_BYTES) / 1.008e9, rel=1e-12)
    assert cost_model.first_extra_ms(gpu) == pytest.approx(row / 1.008e9, rel=1e-12)
    assert cost_model.last_extra_ms(gpu) == pytest.approx(EMBEDDING_BYTES / 1.008e9, rel=1e-12)


def test_calibration_scales_every_per_device_term() -> None:
    cost_model = CostModel(model_card=llama_8b())
    plain, slow = rtx_4090(), rtx_4090(calibration_factor=2.0)
    # On a 4090 the launches (0.25 ms) outlast the layer's reads (0.13 ms): the layer costs 0.25.
    assert cost_model.layer_ms(plain) == pytest.approx(0.25)
    assert cost_model.stage_fixed_ms(plain) == pytest.approx(0.6)
    for term in (
        cost_model.layer_ms,
        cost_model.first_extra_ms,
        cost_model.last_extra_ms,
        cost_model.stage_fixed_ms,
    ):
        assert term(slow) == pytest.approx(2.0 * term(plain))


def test_a_loaded_cpu_slows_its_own_host_work() -> None:
    """On the CPU backend the host work runs on the device, so others' load slows it: two
    cores fully used leave a third thread 2/3 of a core."""
    cost_model = CostModel(model_card=llama_8b())
    cpu = rtx_4090(backend="cpu", cpu_cores=2, utilization_percent=100.0)
    time = cost_model.stage_time(cpu, 32, True, True)
    assert time.host_ms == pytest.approx((2.0 + 32 * 4.5) * 3 / 2)
    assert cost_model.stage_fixed_ms(cpu) == pytest.approx(2.0 * 3 / 2)
    # A loaded GPU's host work runs on the CPU beside it: unchanged.
    assert cost_model.stage_fixed_ms(rtx_4090(utilization_percent=90.0)) == pytest.approx(0.6)


@pytest.mark.parametrize(("is_first", "is_last"), [(True, False), (False, True), (True, True)])
def test_the_base_stage_time_ignores_every_condition_and_the_calibration(
    is_first: bool, is_last: bool
) -> None:
    cost_model = CostModel(model_card=llama_8b())
    worn = rtx_4090(
        calibration_factor=2.0,
        utilization_percent=50.0,
        temperature_c=88.0,
        throttle_threshold_c=90.0,
        is_plugged_in=False,
        battery_percent=10.0,
    )
    ideal = cost_model.stage_ms(rtx_4090(), 16, is_first, is_last)
    assert cost_model.base_stage_ms(worn, 16, is_first, is_last) == pytest.approx(ideal, rel=1e-12)
    assert cost_model.stage_ms(worn, 16, is_first, is_last) > 2 * ideal


def ring_of_three() -> tuple[CostModel, list[StagePlan], dict[str, LinkCost]]:
    """Three nodes with each link measured one way only (a -> b -> c -> a)."""
    measured = {
        "ab": LinkCost(latency_ms=0.1, bandwidth_mbps=10_000),
        "bc": LinkCost(latency_ms=0.3, bandwidth_mbps=25_000),
        "ca": LinkCost(latency_ms=0.5, bandwidth_mbps=40_000),
    }
    links = {NodeId(pair[0]): {NodeId(pair[1]): link} for pair, link in measured.items()}
    cost_model = CostModel(model_card=llama_8b(), links=links)
    stages = [
        StagePlan(device=rtx_4090("a"), n_layers=10),
        StagePlan(device=rtx_4090("b"), n_layers=11),
        StagePlan(device=rtx_4090("c"), n_layers=11),
    ]
    return cost_model, stages, measured


def hop(link: LinkCost, n_bytes: float) -> float:
    return link.latency_ms + n_bytes * 8 / (link.bandwidth_mbps * 1e3)


def test_node_link_ms_is_the_measured_link_else_the_lan_default_else_the_local_link() -> None:
    cost_model, _, measured = ring_of_three()
    a, b = NodeId("a"), NodeId("b")
    assert cost_model.node_link_ms(a, b) == pytest.approx(hop(measured["ab"], 8192))
    assert cost_model.node_link_ms(b, a) == pytest.approx(1.0 + 8192 * 8 / 1e6)
    assert cost_model.node_link_ms(a, a) == pytest.approx(hop(PEER_LINKS["pcie_host"], 8192))


def test_each_stage_hops_to_the_next_and_the_last_back_to_the_first() -> None:
    cost_model, stages, measured = ring_of_three()
    assert cost_model.hop_times_ms(stages) == pytest.approx(
        [hop(measured["ab"], 8192), hop(measured["bc"], 8192), hop(measured["ca"], 8192)]
    )
    assert cost_model.hop_times_ms(stages[:1]) == [0.0]


def test_an_empty_placement_has_no_bottleneck() -> None:
    assert CostModel(model_card=llama_8b()).predict_bottleneck_ms([]) == 0.0


PROMPT_FLOPS = 2.0 * 512 * 32 * LAYER_PARAMETERS + 2.0 * 128256 * 4096


def test_time_to_first_token_sends_the_prompt_forward_along_the_pipeline() -> None:
    cost_model, stages, measured = ring_of_three()
    compute_ms = PROMPT_FLOPS / (165.0 * 0.5 * 1e9)
    prompt_hops = hop(measured["ab"], 512 * 8192) + hop(measured["bc"], 512 * 8192)
    expected = cost_model.predict_ms_per_token(stages) + compute_ms + prompt_hops
    assert cost_model.predict_time_to_first_token_ms(stages) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("device", "compute_scale"),
    [
        (rtx_4090(calibration_factor=2.0), 2.0),
        (rtx_4090(is_thermal_throttling=True), 2.0),
        (rtx_4090(utilization_percent=75.0), 4.0),  # a quarter of it left to us
    ],
    ids=["calibrated", "throttling", "loaded"],
)
def test_the_prompts_compute_follows_the_devices_condition_and_calibration(
    device: PlacementDevice, compute_scale: float
) -> None:
    cost_model = CostModel(model_card=llama_8b())
    stage = [StagePlan(device=device, n_layers=32)]
    compute_ms = PROMPT_FLOPS / (165.0 * 0.5 * 1e9) * compute_scale
    expected = cost_model.predict_ms_per_token(stage) + compute_ms
    assert cost_model.predict_time_to_first_token_ms(stage) == pytest.approx(expected, rel=1e-12)


def test_a_slow_or_unrated_device_computes_at_its_own_tflops() -> None:
    cost_model = CostModel(model_card=llama_8b())
    for tflops, rated in [(0.5, 0.5), (0.0, 1e-3)]:  # 0: not reported, a floor, never a zero
        stage = [StagePlan(device=rtx_4090(peak_tflops_fp16=tflops), n_layers=32)]
        expected = cost_model.predict_ms_per_token(stage) + PROMPT_FLOPS / (rated * 0.5 * 1e9)
        assert cost_model.predict_time_to_first_token_ms(stage) == pytest.approx(
            expected, rel=1e-12
        )


def test_a_card_without_a_parameter_count_counts_two_bytes_per_parameter() -> None:
    layer_bytes = LAYER_BYTES + 1  # odd: whole parameters, 61,344,000 per layer
    card = llama_8b().model_copy(update={"parameters_per_layer": 0, "layer_bytes": layer_bytes})
    cost_model = CostModel(model_card=card)
    stage = [StagePlan(device=rtx_4090(), n_layers=32)]
    flops = 2.0 * 512 * 32 * (layer_bytes // 2) + 2.0 * 128256 * 4096
    expected = cost_model.predict_ms_per_token(stage) + flops / (165.0 * 0.5 * 1e9)
    assert cost_model.predict_time_to_first_token_ms(stage) == pytest.approx(expected, rel=1e-12)
