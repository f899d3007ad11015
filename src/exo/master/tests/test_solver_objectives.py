"""The throughput objective (the slowest stage plus its outgoing hop) against a brute force,
and how the two objectives relate."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exo.master import placement_csp
from exo.master.cost_model import CostModel, PlacementDevice, StagePlan
from exo.master.placement import greedy_stages
from exo.master.placement_csp import ConstraintSatisfactionPlacement, SolveResult
from exo.master.tests.placement_helpers import (
    FAST,
    NODES,
    SMALL_RESERVES,
    SlowClock,
    brute_force,
    cost_model_strategy,
    device,
    devices_strategy,
    small_model,
)
from exo.shared.types.ids import DeviceId, NodeId


def throughput(
    cost_model: CostModel,
    devices: list[PlacementDevice],
    *,
    min_nodes: int = 1,
    fallback: list[StagePlan] | None = None,
    work_limit: int | None = None,
    budget_ms: float | None = None,
) -> SolveResult:
    return ConstraintSatisfactionPlacement(
        cost_model,
        devices,
        min_nodes=min_nodes,
        fallback=fallback,
        objective="throughput",
        budget_ms=budget_ms,
        work_limit=work_limit,
        even_split_margin=0.0,
    ).solve()


def check_exact(
    cost_model: CostModel, devices: list[PlacementDevice], min_nodes: int, result: SolveResult
) -> None:
    optimum = brute_force(cost_model, devices, min_nodes, objective="throughput")
    if optimum is None:
        assert result.stages == []
        assert result.predicted_bottleneck_ms is None
        return
    assert not cost_model.violations(result.stages, min_nodes)
    assert result.predicted_bottleneck_ms is not None
    assert result.predicted_bottleneck_ms == cost_model.predict_bottleneck_ms(result.stages)
    assert result.predicted_ms_per_token == cost_model.predict_ms_per_token(result.stages)
    assert math.isclose(result.predicted_bottleneck_ms, optimum[0], rel_tol=1e-9, abs_tol=1e-9)
    assert result.proven_optimal
    assert result.lower_bound_bottleneck_ms is not None
    assert result.lower_bound_bottleneck_ms <= optimum[0] * (1 + 1e-9)
    assert result.lower_bound_ms_per_token is None


@FAST
@given(
    devices=devices_strategy(),
    cost_model=cost_model_strategy("uniform"),
    min_nodes=st.sampled_from([1, 1, 2]),
    with_fallback=st.booleans(),
)
def test_throughput_matches_brute_force_with_uniform_links(
    devices: list[PlacementDevice], cost_model: CostModel, min_nodes: int, with_fallback: bool
) -> None:
    fallback = greedy_stages(cost_model, devices, min_nodes) if with_fallback else None
    result = throughput(cost_model, devices, min_nodes=min_nodes, fallback=fallback)
    assert result.objective == "throughput"
    assert not result.work_limited and not result.timed_out
    check_exact(cost_model, devices, min_nodes, result)


@FAST
@given(
    devices=devices_strategy(min_devices=2, max_devices=6, roomy=True),
    cost_model=cost_model_strategy("none", min_layers=2, max_layers=5),
    min_nodes=st.sampled_from([1, 2, 3]),
)
def test_throughput_is_exact_with_few_layers_and_many_devices(
    devices: list[PlacementDevice], cost_model: CostModel, min_nodes: int
) -> None:
    """More devices than layers: at most one stage per layer, with every node's exit and
    the first and last stages kept (the cases where the capacities alone would mislead)."""
    check_exact(
        cost_model, devices, min_nodes, throughput(cost_model, devices, min_nodes=min_nodes)
    )


@FAST
@given(
    devices=devices_strategy(max_devices=4),
    cost_model=cost_model_strategy("uneven"),
)
def test_throughput_bound_brackets_brute_force_with_uneven_links(
    devices: list[PlacementDevice], cost_model: CostModel
) -> None:
    """Uneven links: each hop is charged its cheapest possible value, so the search's
    answer is a lower bound; the placement built from it is valid and no better than the
    optimum."""
    optimum = brute_force(cost_model, devices, objective="throughput")
    result = throughput(cost_model, devices)
    if optimum is None:
        assert result.stages == []
        return
    assert result.predicted_bottleneck_ms is not None
    assert result.lower_bound_bottleneck_ms is not None
    assert not cost_model.violations(result.stages)
    assert result.lower_bound_bottleneck_ms <= optimum[0] * (1 + 1e-9)
    assert result.predicted_bottleneck_ms >= optimum[0] * (1 - 1e-9)
    if result.proven_optimal:
        assert math.isclose(result.predicted_bottleneck_ms, optimum[0], rel_tol=1e-9)
    # The stated tolerance: within (dearest hop − cheapest hop) of the bound.
    hops = [cost_model.node_link_ms(NodeId(a), NodeId(b)) for a in NODES for b in NODES]
    spread = max(hops) - min(hops)
    assert result.predicted_bottleneck_ms <= result.lower_bound_bottleneck_ms + spread + 1e-9


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    devices=devices_strategy(roomy=True),
    cost_model=cost_model_strategy("uniform"),
)
def test_each_objective_wins_its_own_measure(
    devices: list[PlacementDevice], cost_model: CostModel
) -> None:
    for_throughput = throughput(cost_model, devices)
    for_latency = ConstraintSatisfactionPlacement(
        cost_model, devices, budget_ms=None, work_limit=None, even_split_margin=0.0
    ).solve()
    assert bool(for_throughput.stages) == bool(for_latency.stages)
    if not for_latency.stages:
        return
    assert for_throughput.predicted_bottleneck_ms is not None
    assert for_latency.predicted_bottleneck_ms is not None
    assert for_throughput.predicted_ms_per_token is not None
    assert for_latency.predicted_ms_per_token is not None
    assert for_throughput.predicted_bottleneck_ms <= for_latency.predicted_bottleneck_ms + 1e-9
    assert for_latency.predicted_ms_per_token <= for_throughput.predicted_ms_per_token + 1e-9


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    devices=devices_strategy(),
    cost_model=cost_model_strategy("uniform"),
    limit=st.integers(0, 3_000),
)
def test_a_work_limited_throughput_search_is_valid_and_no_worse_than_the_fallback(
    devices: list[PlacementDevice], cost_model: CostModel, limit: int
) -> None:
    fallback = greedy_stages(cost_model, devices)
    result = throughput(cost_model, devices, fallback=fallback, work_limit=limit)
    assert result.work_done <= limit
    if fallback is None:
        return
    assert result.stages and not cost_model.violations(result.stages)
    assert result.predicted_bottleneck_ms is not None
    assert result.predicted_bottleneck_ms <= cost_model.predict_bottleneck_ms(fallback) + 1e-9
    if result.used_fallback:
        assert result.stages == fallback
    if result.work_limited:
        assert not result.proven_optimal and result.lower_bound_bottleneck_ms is None


def test_throughput_spreads_a_model_over_equal_gpus_latency_keeps_it_whole() -> None:
    """One GPU holds the model: latency keeps it there (no hops); throughput splits it so a
    token leaves the pipeline every quarter of the time (plus a hop)."""
    devices = [device(f"n{index}", memory_gb=8.0, bandwidth_gbps=500.0) for index in range(4)]
    cost_model = CostModel(model_card=small_model(32, layer_mb=100.0), config=SMALL_RESERVES)
    latency = ConstraintSatisfactionPlacement(cost_model, devices).solve()
    spread = ConstraintSatisfactionPlacement(cost_model, devices, objective="throughput").solve()
    assert len(latency.stages) == 1
    assert sorted(stage.n_layers for stage in spread.stages) == [8, 8, 8, 8]
    assert spread.proven_optimal
    assert spread.predicted_bottleneck_ms is not None and latency.predicted_bottleneck_ms
    assert spread.predicted_bottleneck_ms < latency.predicted_bottleneck_ms / 2


def test_throughput_with_nvlink_peers_stays_valid_and_bounded() -> None:
    """Peer topology makes hops within a node uneven: the bound charges the cheapest one."""
    peers = {DeviceId("cuda:1"): "nvlink"}
    devices = [
        device("a", "cuda:0", memory_gb=1.0, bandwidth_gbps=900.0).model_copy(
            update={"peer_links": peers}
        ),
        device("a", "cuda:1", memory_gb=1.0, bandwidth_gbps=900.0).model_copy(
            update={"peer_links": {DeviceId("cuda:0"): "nvlink"}}
        ),
        device("a", "cuda:2", memory_gb=1.0, bandwidth_gbps=300.0),
        device("b", "cuda:0", memory_gb=1.0, bandwidth_gbps=600.0),
    ]
    cost_model = CostModel(model_card=small_model(10, layer_mb=100.0), config=SMALL_RESERVES)
    result = throughput(cost_model, devices)
    optimum = brute_force(cost_model, devices, objective="throughput")
    assert optimum is not None
    assert result.predicted_bottleneck_ms is not None
    assert result.lower_bound_bottleneck_ms is not None
    assert not cost_model.violations(result.stages)
    assert result.lower_bound_bottleneck_ms <= optimum[0] * (1 + 1e-9)
    assert result.predicted_bottleneck_ms >= optimum[0] * (1 - 1e-9)


def test_a_slower_clock_does_not_change_the_throughput_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    devices = [
        device(
            f"n{index % 7}", f"cuda:{index // 7}", memory_gb=2.0, bandwidth_gbps=100.0 + 37 * index
        )
        for index in range(20)
    ]
    cost_model = CostModel(model_card=small_model(40), config=SMALL_RESERVES)
    fallback = greedy_stages(cost_model, devices)
    complete = throughput(cost_model, devices, fallback=fallback)
    for limit in (complete.work_done // 2, None):
        normal = throughput(cost_model, devices, fallback=fallback, work_limit=limit)
        with monkeypatch.context() as patch:
            patch.setattr(placement_csp, "_clock", SlowClock(1000.0))
            slow = throughput(
                cost_model, devices, fallback=fallback, work_limit=limit, budget_ms=60_000.0
            )
        assert not slow.timed_out
        assert slow.stages == normal.stages
        assert slow.work_done == normal.work_done
        assert slow.work_limited == normal.work_limited == (limit is not None)
