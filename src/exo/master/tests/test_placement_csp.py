"""The solver against a brute force on small instances, plus budget and determinism."""

import math

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exo.master.placement_csp import (
    ConstraintSatisfactionPlacement,
    CostModel,
    LinkCost,
    PlacementDevice,
    _window_mins,
    exclusion_reason,
    greedy_stages,
)
from exo.master.tests.placement_helpers import brute_force, device, small_model
from exo.shared.types.ids import NodeId

NODES = ["n0", "n1", "n2"]


@st.composite
def devices_strategy(draw: st.DrawFn, max_devices: int = 5) -> list[PlacementDevice]:
    count = draw(st.integers(1, max_devices))
    devices: list[PlacementDevice] = []
    for index in range(count):
        memory_gb = draw(st.sampled_from([0.15, 0.25, 0.5, 1.0]))
        devices.append(
            device(
                draw(st.sampled_from(NODES)),
                f"cuda:{index}",
                memory_gb=memory_gb,
                free_gb=memory_gb * draw(st.sampled_from([0.5, 1.0])),
                bandwidth_gbps=draw(st.sampled_from([40.0, 100.0, 400.0, 1000.0])),
                utilization=draw(st.sampled_from([0.0, 0.0, 60.0])),
                temperature_c=draw(st.sampled_from([50.0, 87.0, 95.0])),
                throttling=draw(st.booleans()) and draw(st.booleans()),
                battery_percent=draw(st.sampled_from([10.0, 100.0])),
                plugged_in=draw(st.booleans()) or draw(st.booleans()),
            )
        )
    return devices


@st.composite
def cost_model_strategy(draw: st.DrawFn, uniform_links: bool) -> CostModel:
    n_layers = draw(st.integers(2, 12))
    card = small_model(
        n_layers,
        layer_mb=draw(st.sampled_from([50.0, 100.0])),
        non_layer_mb=draw(st.sampled_from([0.0, 40.0, 400.0])),
    )
    links: dict[NodeId, dict[NodeId, LinkCost]] = {}
    if uniform_links:
        if draw(st.booleans()):
            shared = LinkCost(
                latency_ms=draw(st.sampled_from([0.1, 2.0])),
                bandwidth_mbps=draw(st.sampled_from([100.0, 10_000.0])),
            )
            links = {NodeId(a): {NodeId(b): shared for b in NODES if b != a} for a in NODES}
    else:
        for a in NODES:
            for b in NODES:
                if a != b:
                    links.setdefault(NodeId(a), {})[NodeId(b)] = LinkCost(
                        latency_ms=draw(st.sampled_from([0.2, 1.0, 3.0])),
                        bandwidth_mbps=draw(st.sampled_from([100.0, 1000.0, 10_000.0])),
                    )
    return CostModel(model_card=card, links=links)


FAST = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)


@FAST
@given(
    devices=devices_strategy(),
    cost_model=cost_model_strategy(uniform_links=True),
    min_nodes=st.sampled_from([1, 1, 2]),
)
def test_solver_matches_brute_force_with_uniform_links(
    devices: list[PlacementDevice], cost_model: CostModel, min_nodes: int
) -> None:
    optimum = brute_force(cost_model, devices, min_nodes)
    result = ConstraintSatisfactionPlacement(
        cost_model, devices, min_nodes=min_nodes, budget_ms=60_000
    ).solve()
    if optimum is None:
        assert result.stages == []
        assert result.predicted_ms_per_token is None
        return
    assert result.predicted_ms_per_token is not None
    assert math.isclose(result.predicted_ms_per_token, optimum[0], rel_tol=1e-9, abs_tol=1e-9)
    assert result.proven_optimal
    assert not cost_model.violations(result.stages, min_nodes)
    assert math.isclose(
        cost_model.predict_ms_per_token(result.stages), result.predicted_ms_per_token
    )
    # The exclusion rule: flagged devices only when no healthy placement exists.
    healthy_optimum_uses_flagged = any(
        exclusion_reason(stage.device, cost_model.config) is not None for stage in optimum[1]
    )
    uses_flagged = any(
        exclusion_reason(stage.device, cost_model.config) is not None for stage in result.stages
    )
    assert uses_flagged == healthy_optimum_uses_flagged


@FAST
@given(
    devices=devices_strategy(max_devices=4),
    cost_model=cost_model_strategy(uniform_links=False),
)
def test_solver_bound_brackets_brute_force_with_uneven_links(
    devices: list[PlacementDevice], cost_model: CostModel
) -> None:
    optimum = brute_force(cost_model, devices)
    result = ConstraintSatisfactionPlacement(cost_model, devices, budget_ms=60_000).solve()
    if optimum is None:
        assert result.stages == []
        return
    assert result.predicted_ms_per_token is not None
    assert result.lower_bound_ms_per_token is not None
    assert not cost_model.violations(result.stages)
    assert result.lower_bound_ms_per_token <= optimum[0] + 1e-9
    assert result.predicted_ms_per_token >= optimum[0] - 1e-9
    if result.proven_optimal:
        assert math.isclose(result.predicted_ms_per_token, optimum[0], rel_tol=1e-9)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    devices=devices_strategy(),
    cost_model=cost_model_strategy(uniform_links=True),
)
def test_exhausted_budget_returns_the_valid_fallback(
    devices: list[PlacementDevice], cost_model: CostModel
) -> None:
    fallback = greedy_stages(cost_model, devices)
    result = ConstraintSatisfactionPlacement(
        cost_model, devices, budget_ms=0.0, fallback=fallback
    ).solve()
    assert result.timed_out
    if fallback is None:
        assert result.stages == []
    else:
        assert result.used_fallback
        assert result.stages == fallback
        assert not cost_model.violations(result.stages)


def test_exhausted_budget_on_a_large_instance_never_raises() -> None:
    devices = [
        device(f"n{index}", "cuda:0", memory_gb=2.0, bandwidth_gbps=100.0 + 50 * index)
        for index in range(40)
    ]
    cost_model = CostModel(model_card=small_model(60))
    fallback = greedy_stages(cost_model, devices)
    assert fallback is not None
    result = ConstraintSatisfactionPlacement(
        cost_model, devices, budget_ms=1e-6, fallback=fallback
    ).solve()
    assert result.timed_out and result.used_fallback
    assert not cost_model.violations(result.stages)


@settings(max_examples=20, deadline=None, derandomize=True)
@given(
    devices=devices_strategy(),
    cost_model=cost_model_strategy(uniform_links=False),
)
def test_solver_is_deterministic(devices: list[PlacementDevice], cost_model: CostModel) -> None:
    first = ConstraintSatisfactionPlacement(cost_model, devices, budget_ms=60_000).solve()
    second = ConstraintSatisfactionPlacement(cost_model, list(devices), budget_ms=60_000).solve()
    assert first.stages == second.stages
    assert first.predicted_ms_per_token == second.predicted_ms_per_token


def test_layers_go_to_the_fastest_device_up_to_its_memory() -> None:
    card = small_model(10, layer_mb=100.0, non_layer_mb=0.0)
    cost_model = CostModel(model_card=card)
    fast = device("a", "cuda:0", memory_gb=0.6, bandwidth_gbps=1000.0)
    slow = device("a", "cuda:1", memory_gb=4.0, bandwidth_gbps=100.0)
    result = ConstraintSatisfactionPlacement(cost_model, [slow, fast]).solve()
    by_device = {str(stage.device.device_id): stage.n_layers for stage in result.stages}
    assert by_device["cuda:0"] == cost_model.max_layers(fast, True, False) or by_device[
        "cuda:0"
    ] == cost_model.max_layers(fast, False, True)
    assert sum(by_device.values()) == 10


def test_equal_devices_share_layers_evenly_at_the_same_cost() -> None:
    """Devices of equal effective bandwidth tie on ms/token for any split; the solver then
    spreads layers evenly instead of leaving one layer on a stage."""
    devices = [
        device(f"node-{index}", vendor=vendor, memory_gb=24, bandwidth_gbps=500)
        for index, vendor in enumerate(["NVIDIA", "AMD", "Intel"])
    ]
    cost_model = CostModel(model_card=small_model(30, layer_mb=200))
    result = ConstraintSatisfactionPlacement(cost_model, devices, min_nodes=3).solve()
    assert sorted(stage.n_layers for stage in result.stages) == [10, 10, 10]
    assert result.predicted_ms_per_token is not None
    assert math.isclose(
        cost_model.predict_ms_per_token(result.stages), result.predicted_ms_per_token, rel_tol=1e-9
    )
    assert not cost_model.violations(result.stages, min_nodes=3)


def test_window_minimum_matches_a_direct_scan() -> None:
    rng = np.random.default_rng(7)
    values = rng.uniform(0.0, 10.0, size=(2, 3, 17))
    values[0, 1, :5] = np.inf
    layer_ms = 0.37
    windows = [1, 2, 3, 5, 8, 16]
    reached = _window_mins(values, windows, layer_ms)
    for window in windows:
        expected = np.full_like(values, np.inf)
        for n in range(values.shape[-1]):
            for k in range(1, min(window, n) + 1):
                expected[..., n] = np.minimum(expected[..., n], values[..., n - k] + k * layer_ms)
        np.testing.assert_allclose(reached[window], expected, rtol=1e-12)


def test_inter_node_links_cheaper_than_local_ones_state_no_infinite_gap() -> None:
    """The programme's bound assumes the local link is the cheapest; when a measured link
    between nodes beats it there is no bound, and the reason must not claim an infinite gap."""
    fast = LinkCost(latency_ms=0.01, bandwidth_mbps=40_000.0)
    links = {NodeId(a): {NodeId(b): fast for b in ("a", "b") if b != a} for a in ("a", "b")}
    cost_model = CostModel(model_card=small_model(8), links=links)
    devices = [
        device("a", "cuda:0", memory_gb=0.5, bandwidth_gbps=100.0),
        device("a", "cuda:1", memory_gb=0.5, bandwidth_gbps=200.0),
        device("b", "cuda:0", memory_gb=0.5, bandwidth_gbps=300.0),
    ]
    result = ConstraintSatisfactionPlacement(cost_model, devices).solve()
    optimum = brute_force(cost_model, devices)
    assert optimum is not None and result.predicted_ms_per_token is not None
    assert result.predicted_ms_per_token >= optimum[0] - 1e-9
    assert not result.proven_optimal
    assert not any("inf" in reason for reason in result.reasons)
    assert any("optimality not proven" in reason for reason in result.reasons)
