"""The latency solver against a brute force on small instances, plus its work limit, its
anytime answers and its determinism. Throughput: test_solver_objectives.py."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exo.master import placement_csp
from exo.master.cost_model import CostModel, DeviceKey, LinkCost, PlacementDevice, StagePlan
from exo.master.placement import greedy_stages
from exo.master.placement_csp import ConstraintSatisfactionPlacement, _window_mins
from exo.master.tests.placement_helpers import (
    FAST,
    SMALL_RESERVES,
    SlowClock,
    brute_force,
    cost_model_strategy,
    device,
    devices_strategy,
    small_model,
)
from exo.shared.types.ids import NodeId


def exact(
    cost_model: CostModel,
    devices: list[PlacementDevice],
    *,
    min_nodes: int = 1,
    fallback: list[StagePlan] | None = None,
) -> ConstraintSatisfactionPlacement:
    """A solver without limits and without the even-split margin: the exact optimum."""
    return ConstraintSatisfactionPlacement(
        cost_model,
        devices,
        min_nodes=min_nodes,
        fallback=fallback,
        budget_ms=None,
        work_limit=None,
        even_split_margin=0.0,
    )


def test_the_solver_relies_on_stage_time_being_linear_in_layers() -> None:
    """The programme and the threshold check charge a stage ``stage_fixed_ms`` + the role's
    extras + ``n × layer_ms``; the cost model's stage time must be exactly that."""
    cost_model = CostModel(model_card=small_model(12, non_layer_mb=400.0), config=SMALL_RESERVES)
    devices = [
        device("a", bandwidth_gbps=40.0),
        device("a", "cuda:1", bandwidth_gbps=1000.0, utilization=60.0, throttling=True),
        device("b", backend="cpu", bandwidth_gbps=50.0, plugged_in=False, battery_percent=10.0),
        device("c", backend="metal", bandwidth_gbps=400.0, temperature_c=87.0),
    ]
    for placed in devices:
        for n in (1, 5, 12):
            for is_first in (False, True):
                for is_last in (False, True):
                    expected = (
                        cost_model.stage_fixed_ms(placed)
                        + n * cost_model.layer_ms(placed)
                        + (cost_model.first_extra_ms(placed) if is_first else 0.0)
                        + (cost_model.last_extra_ms(placed) if is_last else 0.0)
                    )
                    actual = cost_model.stage_ms(placed, n, is_first, is_last)
                    assert math.isclose(actual, expected, rel_tol=1e-12)


@FAST
@given(
    devices=devices_strategy(),
    cost_model=cost_model_strategy("uniform"),
    min_nodes=st.sampled_from([1, 1, 2]),
    with_fallback=st.booleans(),
)
def test_solver_matches_brute_force_with_uniform_links(
    devices: list[PlacementDevice], cost_model: CostModel, min_nodes: int, with_fallback: bool
) -> None:
    optimum = brute_force(cost_model, devices, min_nodes)
    # A fallback gives the programme an upper bound that lets it skip devices.
    fallback = greedy_stages(cost_model, devices, min_nodes) if with_fallback else None
    result = exact(cost_model, devices, min_nodes=min_nodes, fallback=fallback).solve()
    assert not result.work_limited and not result.timed_out
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
    assert result.predicted_bottleneck_ms == cost_model.predict_bottleneck_ms(result.stages)
    assert result.work_done > 0


@FAST
@given(
    devices=devices_strategy(max_devices=4),
    cost_model=cost_model_strategy("uneven"),
)
def test_solver_bound_brackets_brute_force_with_uneven_links(
    devices: list[PlacementDevice], cost_model: CostModel
) -> None:
    optimum = brute_force(cost_model, devices)
    result = exact(cost_model, devices).solve()
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


def _processing_order(
    cost_model: CostModel, devices: list[PlacementDevice], scores: dict[DeviceKey, float]
) -> list[PlacementDevice]:
    """The solver's documented order: nodes by their best device's score, devices by score
    within their node; devices that cannot hold a layer are no candidates."""
    by_node: dict[str, list[PlacementDevice]] = {}
    for placed in devices:
        by_node.setdefault(placed.node_id, []).append(placed)
    groups = [sorted(group, key=lambda d: -scores[d.key]) for group in by_node.values()]
    groups.sort(key=lambda group: -scores[group[0].key])
    return [d for group in groups for d in group if cost_model.max_layers(d, False, False) >= 1]


@settings(max_examples=80, deadline=None, derandomize=True)
@given(
    devices=devices_strategy(),
    cost_model=cost_model_strategy("uniform"),
    limit=st.integers(0, 2_000),
    seed=st.integers(0, 1_000),
)
def test_a_work_limited_answer_is_the_optimum_over_the_candidates_seen(
    devices: list[PlacementDevice], cost_model: CostModel, limit: int, seed: int
) -> None:
    """Anytime: cut short after k candidates, the answer is the best placement over the
    first k in score order (two nodes required and no fallback, so no single-device answer
    and no upper bound that would let the solver skip a device)."""
    rng = np.random.default_rng(seed)
    scores = {d.key: float(rng.uniform()) for d in devices}
    result = ConstraintSatisfactionPlacement(
        cost_model,
        devices,
        min_nodes=2,
        budget_ms=None,
        work_limit=limit,
        scores=scores,
        even_split_margin=0.0,
    ).solve()
    assert result.work_done <= limit
    assert not result.timed_out
    seen = _processing_order(cost_model, devices, scores)[: result.candidates_processed]
    optimum = brute_force(cost_model, seen, min_nodes=2)
    if optimum is None:
        assert result.stages == []
        return
    assert result.predicted_ms_per_token is not None
    assert math.isclose(result.predicted_ms_per_token, optimum[0], rel_tol=1e-9)
    assert not cost_model.violations(result.stages, min_nodes=2)
    if result.work_limited:
        assert not result.proven_optimal
        assert result.lower_bound_ms_per_token is None


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    devices=devices_strategy(),
    cost_model=cost_model_strategy("uniform"),
)
def test_more_work_never_gives_a_worse_answer_nor_worse_than_the_fallback(
    devices: list[PlacementDevice], cost_model: CostModel
) -> None:
    fallback = greedy_stages(cost_model, devices)
    fallback_ms = cost_model.predict_ms_per_token(fallback) if fallback else math.inf
    previous = math.inf
    for limit in (0, 50, 200, 1_000, 5_000, None):
        result = ConstraintSatisfactionPlacement(
            cost_model,
            devices,
            budget_ms=None,
            work_limit=limit,
            fallback=fallback,
            even_split_margin=0.0,
        ).solve()
        value = result.predicted_ms_per_token if result.stages else math.inf
        assert value is not None
        assert value <= previous + 1e-9
        assert value <= fallback_ms + 1e-9
        assert not cost_model.violations(result.stages) or not result.stages
        if result.used_fallback:
            assert result.stages == fallback
        previous = value
    optimum = brute_force(cost_model, devices)
    assert previous == (math.inf if optimum is None else pytest.approx(optimum[0], rel=1e-9))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    devices=devices_strategy(),
    cost_model=cost_model_strategy("uniform"),
)
def test_exhausted_budget_returns_the_valid_fallback(
    devices: list[PlacementDevice], cost_model: CostModel
) -> None:
    fallback = greedy_stages(cost_model, devices)
    result = ConstraintSatisfactionPlacement(
        cost_model, devices, budget_ms=0.0, fallback=fallback
    ).solve()
    if fallback is None:
        assert result.stages == []
    else:
        assert result.timed_out
        assert result.used_fallback
        assert result.stages == fallback
        assert not cost_model.violations(result.stages)
        assert any("exhausted" in reason for reason in result.reasons)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    devices=devices_strategy(),
    cost_model=cost_model_strategy("uniform"),
)
def test_a_zero_work_limit_returns_the_fallback_deterministically(
    devices: list[PlacementDevice], cost_model: CostModel
) -> None:
    fallback = greedy_stages(cost_model, devices)
    result = ConstraintSatisfactionPlacement(
        cost_model, devices, work_limit=0, fallback=fallback
    ).solve()
    assert not result.timed_out
    assert result.work_done == 0
    if fallback is None:
        assert result.stages == []
    else:
        assert result.work_limited and result.used_fallback
        assert result.stages == fallback
        assert any("work limit" in reason for reason in result.reasons)


def _large_instance() -> tuple[CostModel, list[PlacementDevice], list[StagePlan]]:
    devices = [
        device(f"n{index}", "cuda:0", memory_gb=2.0, bandwidth_gbps=100.0 + 50 * index)
        for index in range(40)
    ]
    cost_model = CostModel(model_card=small_model(60), config=SMALL_RESERVES)
    fallback = greedy_stages(cost_model, devices)
    assert fallback is not None
    return cost_model, devices, fallback


def test_exhausted_budget_on_a_large_instance_never_raises() -> None:
    cost_model, devices, fallback = _large_instance()
    result = ConstraintSatisfactionPlacement(
        cost_model, devices, budget_ms=1e-6, fallback=fallback
    ).solve()
    assert result.timed_out and result.used_fallback
    assert not cost_model.violations(result.stages)


def test_a_work_limit_midway_keeps_the_best_placement_so_far() -> None:
    cost_model, devices, fallback = _large_instance()
    full = ConstraintSatisfactionPlacement(cost_model, devices, fallback=fallback).solve()
    assert not full.work_limited and full.proven_optimal
    cut = ConstraintSatisfactionPlacement(
        cost_model, devices, fallback=fallback, work_limit=full.work_done // 3
    ).solve()
    assert cut.work_limited and not cut.proven_optimal
    assert 0 < cut.candidates_processed < cut.candidates_total
    assert cut.predicted_ms_per_token is not None and full.predicted_ms_per_token is not None
    greedy_ms = cost_model.predict_ms_per_token(fallback)
    assert full.predicted_ms_per_token <= cut.predicted_ms_per_token <= greedy_ms
    assert not cost_model.violations(cut.stages)
    assert any("work limit" in reason for reason in cut.reasons)


@pytest.mark.parametrize("budget_ms", [None, 60_000.0])
@pytest.mark.parametrize("fraction", [0.3, 1.0])
def test_a_1000_times_slower_clock_gives_the_same_placement(
    monkeypatch: pytest.MonkeyPatch, budget_ms: float | None, fraction: float
) -> None:
    """The work limit, not the clock, decides where the search stops: with the wall cap out
    of reach, a machine 1000× slower gets the identical answer (cut short or not)."""
    cost_model, devices, fallback = _large_instance()
    complete = ConstraintSatisfactionPlacement(cost_model, devices, fallback=fallback).solve()
    limit = int(complete.work_done * fraction)

    def solve() -> placement_csp.SolveResult:
        return ConstraintSatisfactionPlacement(
            cost_model, devices, fallback=fallback, budget_ms=budget_ms, work_limit=limit
        ).solve()

    normal = solve()
    monkeypatch.setattr(placement_csp, "_clock", SlowClock(1000.0))
    slow = solve()
    assert not slow.timed_out and not normal.timed_out
    assert slow.stages == normal.stages
    assert slow.work_done == normal.work_done
    assert slow.work_limited == normal.work_limited == (fraction < 1.0)
    assert slow.predicted_ms_per_token == normal.predicted_ms_per_token
    assert slow.reasons == normal.reasons
    assert slow.solve_ms > normal.solve_ms


def test_a_slow_clock_past_the_wall_cap_still_answers_validly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cost_model, devices, fallback = _large_instance()
    monkeypatch.setattr(placement_csp, "_clock", SlowClock(1e6))
    result = ConstraintSatisfactionPlacement(
        cost_model, devices, fallback=fallback, budget_ms=0.5
    ).solve()
    assert result.timed_out
    assert result.stages and not cost_model.violations(result.stages)
    assert result.predicted_ms_per_token is not None
    assert result.predicted_ms_per_token <= cost_model.predict_ms_per_token(fallback) + 1e-9


@settings(max_examples=20, deadline=None, derandomize=True)
@given(
    devices=devices_strategy(),
    cost_model=cost_model_strategy("uneven"),
)
def test_solver_is_deterministic(devices: list[PlacementDevice], cost_model: CostModel) -> None:
    first = ConstraintSatisfactionPlacement(cost_model, devices, budget_ms=60_000).solve()
    second = ConstraintSatisfactionPlacement(cost_model, list(devices), budget_ms=60_000).solve()
    assert first.stages == second.stages
    assert first.predicted_ms_per_token == second.predicted_ms_per_token
    assert first.work_done == second.work_done


def test_layers_go_to_the_fastest_device_up_to_its_memory() -> None:
    card = small_model(10, layer_mb=100.0, non_layer_mb=0.0)
    cost_model = CostModel(model_card=card, config=SMALL_RESERVES)
    fast = device("a", "cuda:0", memory_gb=0.6, bandwidth_gbps=1000.0)
    slow = device("a", "cuda:1", memory_gb=4.0, bandwidth_gbps=100.0)
    result = ConstraintSatisfactionPlacement(cost_model, [slow, fast]).solve()
    by_device = {str(stage.device.device_id): stage.n_layers for stage in result.stages}
    assert by_device["cuda:0"] == cost_model.max_layers(fast, True, False) or by_device[
        "cuda:0"
    ] == cost_model.max_layers(fast, False, True)
    assert 1 <= by_device["cuda:0"] < 10
    assert sum(by_device.values()) == 10


def test_a_throttling_device_is_used_when_it_still_wins() -> None:
    """Throttling halves a device's speed (a cost, not an exclusion): a device four times
    faster still wins at half speed; an equal one no longer does."""
    cost_model = CostModel(model_card=small_model(8, layer_mb=100.0), config=SMALL_RESERVES)
    steady = device("a", "cuda:0", memory_gb=2.0, bandwidth_gbps=250.0)
    hot_fast = device("b", "cuda:0", memory_gb=2.0, bandwidth_gbps=1000.0, throttling=True)
    hot_equal = device("b", "cuda:0", memory_gb=2.0, bandwidth_gbps=250.0, throttling=True)
    wins = ConstraintSatisfactionPlacement(cost_model, [steady, hot_fast]).solve()
    assert [stage.device.key for stage in wins.stages] == [hot_fast.key]
    loses = ConstraintSatisfactionPlacement(cost_model, [steady, hot_equal]).solve()
    assert [stage.device.key for stage in loses.stages] == [steady.key]


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
    windows = [1, 2, 3, 5, 8, 15, 16, 17, 40]
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
    cost_model = CostModel(model_card=small_model(8), links=links, config=SMALL_RESERVES)
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
