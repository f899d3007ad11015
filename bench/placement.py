"""Placement benchmark: our decision against three baselines under two models, and solve time.

    uv run python bench/placement.py [--repeats 30] [--quick]

1. **Scenario suite** (bench/placement_scenarios.py): realistic heterogeneous clusters —
   gaming PCs, workstations and datacenter nodes with NVLink, Macs with unified memory,
   throttling or unplugged laptops, busy GPUs, CPU-only nodes, links measured on 1 GbE,
   10 GbE, Thunderbolt and Wi-Fi — × Llama 3.1 8B / 70B / 405B (4-bit planning cards);
   a combination where nothing fits is skipped.
2. **Our decision** (:func:`our_decision`, what ``place_instance`` does) against

   * *greedy*: ``greedy_stages`` (fewest devices, largest memory first, memory-proportional);
   * *mem-prop*: upstream exo's rule — every device of the cluster, in a fixed order (total
     memory, largest first), contiguous layer ranges proportional to total memory (layer
     boundaries floored; a device whose range is empty is left out);
   * *speed-prop*: fastest devices first by datasheet bandwidth, layers proportional to
     bandwidth, each capped by what fits (``CostModel.max_layers``), adding devices until
     the model fits.

   A baseline whose placement breaks a constraint (``CostModel.violations``) shows "—"
   and is left out of the ratios. Every placement is scored by two models: our
   ``CostModel.predict_ms_per_token`` and the independent :func:`first_principles` model.
   Ratios are baseline / ours (> 1: ours faster); geometric means are over the scenarios
   where the placements differ, the worst case over every scenario where the baseline fits.
3. **Solve time**: p50 / p99 of the whole decision (greedy split, scores, solver) at 16,
   64, 128 and 256 devices (seeded
   random mixes, the 405B card: the most layers), with and without measured links, and
   how many solves fell back to greedy or hit the solver's work limit.

No timing is asserted: every line is a ratio or a number from this run, with PASS/MISS
against the goals.
"""

import argparse
import gc
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.placement_scenarios import (
    MODEL_IDS,
    Links,
    Scenario,
    clusters,
    random_links,
    random_mix,
    scenarios,
)
from bench.timing import percentile
from exo.master.cost_model import (
    BackendProfile,
    CostModel,
    CostModelConfig,
    PlacementDevice,
    StagePlan,
)
from exo.master.placement import StageChoice, choose_stages, greedy_stages
from exo.models.cards import get_model_card
from exo.shared.types.instances import PlacementObjective
from exo.shared.types.models import ModelCard

BASELINES = ("greedy", "mem-prop", "speed-prop")
MODELS = ("cost model", "first principles")
GOAL_OVER_MEMORY_PROPORTIONAL = 1.6
GOAL_OVER_SPEED_PROPORTIONAL = 1.1
GOAL_WORST_CASE = 0.98
"""Ours may be at most 2 % slower than any baseline in any scenario, under either model."""
TIMING_SIZES = (16, 64, 128, 256)
TARGET_P99_MS: dict[int, float] = {16: 10.0, 64: 50.0, 256: 200.0}


def decide(
    cost_model: CostModel,
    devices: Sequence[PlacementDevice],
    min_nodes: int = 1,
    objective: PlacementObjective = "latency",
) -> StageChoice:
    """``place_instance``'s choice, from the function it uses."""
    return choose_stages(cost_model, devices, min_nodes=min_nodes, objective=objective)


def our_decision(
    cost_model: CostModel, devices: Sequence[PlacementDevice], min_nodes: int = 1
) -> list[StagePlan]:
    """The stages ``place_instance`` would choose (empty when nothing fits)."""
    return decide(cost_model, devices, min_nodes).stages


# --- baselines -------------------------------------------------------------------------------
def memory_proportional(
    cost_model: CostModel, devices: Sequence[PlacementDevice]
) -> list[StagePlan]:
    """Upstream exo: every device, ordered by total memory (largest first, ties by id,
    descending), contiguous ranges with floored boundaries ``⌊cumulative memory share ×
    layers⌋``; the last ends at the last layer; an empty range is dropped. Memory fit is
    not checked here (the caller asks ``violations``)."""
    n_layers = cost_model.model_card.n_layers
    ordered = sorted(
        devices,
        key=lambda device: (device.memory_total_bytes, device.node_id, device.device_id),
        reverse=True,
    )
    total = sum(device.memory_total_bytes for device in ordered)
    stages: list[StagePlan] = []
    cumulative = 0
    start = 0
    for index, device in enumerate(ordered):
        cumulative += device.memory_total_bytes
        end = n_layers if index == len(ordered) - 1 else int(cumulative / total * n_layers)
        if end > start:
            stages.append(StagePlan(device=device, n_layers=end - start))
            start = end
    return stages


def _capped_shares(total: int, weights: Sequence[float], caps: Sequence[int]) -> list[int] | None:
    """``total`` split proportionally to ``weights``, each in [1, cap] (water filling, then
    largest remainder); None when the caps cannot hold it."""
    count = len(weights)
    if count > total or sum(caps) < total or any(cap < 1 for cap in caps):
        return None
    ideal = [0.0] * count
    fixed: set[int] = set()
    while True:
        left = total - sum(caps[index] for index in fixed)
        free = [index for index in range(count) if index not in fixed]
        weight = sum(weights[index] for index in free)
        over = [index for index in free if left * weights[index] / weight > caps[index]]
        if not over:
            for index in free:
                ideal[index] = left * weights[index] / weight
            for index in fixed:
                ideal[index] = float(caps[index])
            break
        fixed.update(over)
    counts = [min(caps[i], max(1, math.floor(ideal[i]))) for i in range(count)]
    by_remainder = sorted(range(count), key=lambda i: (-(ideal[i] - counts[i]), i))
    while sum(counts) < total:
        grew = False
        for index in by_remainder:
            if sum(counts) < total and counts[index] < caps[index]:
                counts[index] += 1
                grew = True
        if not grew:
            return None
    while sum(counts) > total:
        index = max((i for i in range(count) if counts[i] > 1), key=lambda i: counts[i] - ideal[i])
        counts[index] -= 1
    return counts


def speed_proportional(
    cost_model: CostModel, devices: Sequence[PlacementDevice]
) -> list[StagePlan] | None:
    """Fastest first by datasheet bandwidth (ties: more usable memory, then id); take the
    first k devices for the smallest k whose capacity holds the model, layers proportional
    to bandwidth, each capped by ``max_layers`` in its role."""
    n_layers = cost_model.model_card.n_layers
    ordered = sorted(
        devices,
        key=lambda d: (
            -d.memory_bandwidth_gbps,
            -cost_model.usable_bytes(d),
            d.node_id,
            d.device_id,
        ),
    )
    for count in range(1, min(len(ordered), n_layers) + 1):
        chosen = ordered[:count]
        caps = [
            cost_model.max_layers(device, index == 0, index == count - 1)
            for index, device in enumerate(chosen)
        ]
        if sum(caps) < n_layers or min(caps) < 1:
            continue
        shares = _capped_shares(n_layers, [d.memory_bandwidth_gbps for d in chosen], caps)
        if shares is not None:
            return [
                StagePlan(device=device, n_layers=share)
                for device, share in zip(chosen, shares, strict=True)
            ]
    return None


# --- the independent model -----------------------------------------------------------------
FP_BANDWIDTH_FRACTION = 0.8
"""Share of datasheet bandwidth a decode kernel sustains (streaming reads of 4-bit weights)."""
FP_CONTEXT_TOKENS = 2048
"""Tokens in the KV cache each generated token reads."""
FP_THROTTLED = 0.5
"""Speed of a throttling device (clocks halve), or one at or past its threshold."""
FP_TOKEN_ID_BYTES = 4
"""What the last stage sends back to the first: the sampled token id."""
FP_SAME_NODE_LINKS: dict[str, tuple[float, float]] = {
    # (latency ms, GB/s): a device-to-device copy and its synchronisation.
    "nvlink": (0.005, 300.0),  # NVLink 3/4: 300-450 GB/s per direction
    "pcie_p2p": (0.01, 20.0),  # PCIe 4 x16 peer reads
    "pcie_host": (0.02, 10.0),  # staged through host memory: two copies
}
FP_UNMEASURED_LINK = (1.0, 1000.0)
"""(latency ms, Mbps) between nodes when the scenario measured nothing (never in the suite)."""


@dataclass
class FirstPrinciples:
    weights_ms: list[float]
    kv_ms: list[float]
    hop_ms: list[float]
    """The hop out of each stage (the last one's: the token id back to the first)."""
    fits: bool

    @property
    def total_ms(self) -> float:
        return sum(self.weights_ms) + sum(self.kv_ms) + sum(self.hop_ms)

    @property
    def bottleneck_ms(self) -> float:
        return max(
            (w + k + h for w, k, h in zip(self.weights_ms, self.kv_ms, self.hop_ms, strict=True)),
            default=0.0,
        )


def _fp_speed(device: PlacementDevice) -> float:
    hot = device.is_thermal_throttling or (
        device.temperature_c > 0 and device.temperature_c >= device.throttle_threshold_c
    )
    return (FP_THROTTLED if hot else 1.0) * max(0.01, 1.0 - device.utilization_percent / 100.0)


def _fp_hop_ms(
    source: PlacementDevice, destination: PlacementDevice, n_bytes: float, links: Links
) -> float:
    if source.node_id == destination.node_id:
        kind = source.peer_links.get(destination.device_id, "pcie_host")
        latency_ms, gbps = FP_SAME_NODE_LINKS[kind]
        return latency_ms + n_bytes / (gbps * 1e6)
    link = links.get(source.node_id, {}).get(destination.node_id)
    latency_ms, mbps = (
        (link.latency_ms, link.bandwidth_mbps) if link is not None else FP_UNMEASURED_LINK
    )
    return latency_ms + n_bytes * 8 / (mbps * 1e3)


def first_principles(stages: Sequence[StagePlan], card: ModelCard, links: Links) -> FirstPrinciples:
    """An independent estimate of decode time per token, from the card's and the devices'
    fields only (nothing of the cost model). Assumptions:

    * decode is memory-bound: per token a stage reads its layers' weights, its layers' KV
      cache at ``FP_CONTEXT_TOKENS`` (2k) of context, the first stage one embedding row,
      the last stage the whole LM head (the embedding when tied) — at
      ``FP_BANDWIDTH_FRACTION`` (80 %) of datasheet bandwidth; no host/launch time, no
      compute time;
    * a throttling device (or one at/past its threshold) runs at half speed; a device
      others use at utilisation u leaves (1 − u); heat below the threshold and battery
      cost nothing;
    * each hop between consecutive stages costs the link's latency plus ``2 × hidden_size``
      bytes (fp16 hidden state) over its bandwidth — measured links between nodes, fixed
      NVLink / PCIe figures within a node; the last stage sends the token id (4 bytes) back;
    * a stage fits when its weights plus the KV cache of the card's full context fit the
      device's free memory, on Apple silicon capped at the GPU working set; no reserve.
    """
    n_layers = card.n_layers
    kv_per_layer_token = card.kv_cache_bytes_per_token / n_layers
    embedding = card.embedding_bytes or card.non_layer_bytes // 2
    head = card.lm_head_bytes or (
        embedding
        if card.tied_embeddings or card.embedding_bytes
        else card.non_layer_bytes - embedding
    )
    row = embedding / card.vocab_size if card.vocab_size else 2.0 * card.hidden_size
    weights_ms: list[float] = []
    kv_ms: list[float] = []
    hop_ms: list[float] = []
    fits = True
    last = len(stages) - 1
    for index, stage in enumerate(stages):
        device = stage.device
        bytes_per_ms = (
            device.memory_bandwidth_gbps * 1e6 * FP_BANDWIDTH_FRACTION * _fp_speed(device)
        )
        read = (
            stage.n_layers * card.layer_bytes
            + (row if index == 0 else 0.0)
            + (head if index == last else 0.0)
        )
        weights_ms.append(read / bytes_per_ms)
        kv_ms.append(
            stage.n_layers
            * kv_per_layer_token
            * min(FP_CONTEXT_TOKENS, card.context_length)
            / bytes_per_ms
        )
        held = stage.n_layers * (card.layer_bytes + kv_per_layer_token * card.context_length)
        held += embedding if index == 0 else 0
        held += head if index == last and not (index == 0 and card.tied_embeddings) else 0
        capacity = device.memory_free_bytes
        if device.max_working_set_bytes is not None:
            capacity = min(capacity, device.max_working_set_bytes)
        fits = fits and held <= capacity
        if len(stages) > 1:
            following = stages[(index + 1) % len(stages)].device
            n_bytes = FP_TOKEN_ID_BYTES if index == last else 2 * card.hidden_size
            hop_ms.append(_fp_hop_ms(device, following, n_bytes, links))
        else:
            hop_ms.append(0.0)
    return FirstPrinciples(weights_ms, kv_ms, hop_ms, fits)


# --- the suite -------------------------------------------------------------------------------
@dataclass
class Row:
    scenario: Scenario
    cost_model: CostModel
    decision: StageChoice
    placements: dict[str, list[StagePlan] | None]
    """"ours" and each baseline; None: the baseline does not fit."""
    ms: dict[str, dict[str, float | None]] = field(
        default_factory=dict[str, dict[str, float | None]]
    )
    """model -> placement -> ms/token."""
    fp: dict[str, FirstPrinciples] = field(default_factory=dict[str, FirstPrinciples])

    @property
    def label(self) -> str:
        return f"{self.scenario.name} [{self.scenario.model_key}]"


def _signature(stages: Sequence[StagePlan] | None) -> tuple[tuple[str, str, int], ...] | None:
    if stages is None:
        return None
    return tuple((str(s.device.node_id), str(s.device.device_id), s.n_layers) for s in stages)


def evaluate(scenario: Scenario) -> Row | None:
    cost_model = CostModel(model_card=scenario.card, links=scenario.links)
    decision = decide(cost_model, scenario.devices)
    candidates: dict[str, list[StagePlan] | None] = {
        "ours": decision.stages,
        "greedy": greedy_stages(cost_model, scenario.devices),
        "mem-prop": memory_proportional(cost_model, scenario.devices),
        "speed-prop": speed_proportional(cost_model, scenario.devices),
    }
    placements = {
        name: stages if stages and not cost_model.violations(stages) else None
        for name, stages in candidates.items()
    }
    if not decision.stages:
        fitting = [name for name, stages in placements.items() if stages is not None]
        if fitting:
            print(f"!! nothing placed in {scenario.name} [{scenario.model_key}] but {fitting} fit")
        return None
    if placements["ours"] is None:
        problems = cost_model.violations(decision.stages)
        print(f"!! our decision breaks a constraint in {scenario.name}: {problems}")
        return None
    row = Row(scenario, cost_model, decision, placements)
    row.ms = {"cost model": {}, "first principles": {}}
    for name, stages in placements.items():
        if stages is None:
            row.ms["cost model"][name] = None
            row.ms["first principles"][name] = None
            continue
        fp = first_principles(stages, scenario.card, scenario.links)
        row.fp[name] = fp
        row.ms["cost model"][name] = cost_model.predict_ms_per_token(stages)
        row.ms["first principles"][name] = fp.total_ms
    return row


def _cell(value: float | None, width: int = 7) -> str:
    if value is None:
        return f"{'—':>{width}}"
    return f"{value:>{width}.1f}" if value >= 10 else f"{value:>{width}.2f}"


def print_table(rows: Sequence[Row]) -> None:
    names = ("ours", *BASELINES)
    short = {"ours": "ours", "greedy": "greedy", "mem-prop": "mem", "speed-prop": "speed"}
    header = (
        f"{'scenario':<52} {'model':>4} {'dev':>3} {'how':>4} {'st':>2} | "
        + " ".join(f"{short[n]:>7}" for n in names)
        + " | "
        + " ".join(f"{short[n]:>7}" for n in names)
    )
    print("ms/token: cost model (left) | first principles (right); — = does not fit;")
    print(
        "how: csp = solver, grd = greedy (alike / CPU only), fb = solver fell back; st = our stages"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        how = {"csp": "csp", "greedy": "grd", "greedy_fallback": "fb"}[row.decision.strategy]
        fits = "" if row.fp["ours"].fits else "  ! first principles: ours does not fit"
        print(
            f"{row.scenario.name[:52]:<52} {row.scenario.model_key:>4} "
            f"{len(row.scenario.devices):>3} {how:>4} {len(row.decision.stages):>2} | "
            + " ".join(_cell(row.ms["cost model"][n]) for n in names)
            + " | "
            + " ".join(_cell(row.ms["first principles"][n]) for n in names)
            + fits
        )


def _geomean(values: Sequence[float]) -> float:
    return math.exp(sum(math.log(value) for value in values) / len(values)) if values else math.nan


@dataclass
class Ratios:
    differing: list[float]
    everywhere: list[tuple[float, Row]]

    @property
    def worst(self) -> tuple[float, Row] | None:
        return min(self.everywhere, key=lambda pair: pair[0]) if self.everywhere else None


def ratios(
    rows: Sequence[Row], baseline: str, model: str, keep: Callable[[Row], bool] = lambda _row: True
) -> Ratios:
    found = Ratios([], [])
    for row in rows:
        if not keep(row):
            continue
        ours, theirs = row.ms[model]["ours"], row.ms[model][baseline]
        if ours is None or theirs is None:
            continue
        ratio = theirs / ours
        found.everywhere.append((ratio, row))
        if _signature(row.placements["ours"]) != _signature(row.placements[baseline]):
            found.differing.append(ratio)
    return found


def _verdict(passed: bool) -> str:
    return "PASS" if passed else "MISS"


def print_summary(rows: Sequence[Row]) -> bool:
    print("\nratio = baseline ms/token / ours (> 1: ours faster); geomean over scenarios where")
    print("the placements differ (n = how many, of those where the baseline fits)")
    header = f"{'baseline':<11} {'model':<17} {'n':>8} {'geomean':>8} {'8B':>6} {'70B':>6} {'405B':>6}   worst case"
    print(header)
    print("-" * len(header))
    table: dict[tuple[str, str], Ratios] = {}
    for baseline in BASELINES:
        for model in MODELS:
            found = ratios(rows, baseline, model)
            table[(baseline, model)] = found
            per_model = [
                _geomean(
                    ratios(
                        rows, baseline, model, lambda r, k=key: r.scenario.model_key == k
                    ).differing
                )
                for key in MODEL_IDS
            ]
            worst = found.worst
            worst_text = f"{worst[0]:.3f} ({worst[1].label})" if worst else "—"
            print(
                f"{baseline:<11} {model:<17} {len(found.differing):>3}/{len(found.everywhere):<4} "
                f"{_geomean(found.differing):>8.3f} "
                + " ".join(f"{value:>6.2f}" for value in per_model)
                + f"   {worst_text}"
            )
    print()
    all_pass = True
    for baseline, goal in (
        ("mem-prop", GOAL_OVER_MEMORY_PROPORTIONAL),
        ("speed-prop", GOAL_OVER_SPEED_PROPORTIONAL),
    ):
        for model in MODELS:
            value = _geomean(table[(baseline, model)].differing)
            passed = value >= goal
            all_pass = all_pass and passed
            print(
                f"{_verdict(passed)}  geomean over {baseline} ({model}): {value:.3f}x (goal >= {goal}x)"
            )
    for model in MODELS:
        worst_pairs = [(baseline, table[(baseline, model)].worst) for baseline in BASELINES]
        found = [(baseline, pair) for baseline, pair in worst_pairs if pair is not None]
        lowest = min(found, key=lambda item: item[1][0]) if found else None
        passed = lowest is None or lowest[1][0] >= GOAL_WORST_CASE
        all_pass = all_pass and passed
        detail = f"{lowest[1][0]:.3f} vs {lowest[0]} in {lowest[1][1].label}" if lowest else "—"
        print(f"{_verdict(passed)}  never > 2 % worse than any baseline ({model}): worst {detail}")
    return all_pass


def _describe(stages: Sequence[StagePlan], cost_model: CostModel) -> str:
    parts: list[str] = []
    for stage in stages:
        notes = cost_model.condition(stage.device).notes
        tag = f"[{','.join(notes)}]" if notes else ""
        parts.append(
            f"{stage.device.node_id}/{stage.device.device_id}({stage.device.name}){tag}:{stage.n_layers}"
        )
    return " → ".join(parts)


def _cost_terms(stages: Sequence[StagePlan], cost_model: CostModel) -> dict[str, float]:
    last = len(stages) - 1
    times = [
        cost_model.stage_time(s.device, s.n_layers, i == 0, i == last) for i, s in enumerate(stages)
    ]
    return {
        "weights": sum(t.weights_ms * t.calibration_factor for t in times),
        "kv": sum(t.kv_cache_ms * t.calibration_factor for t in times),
        "host": sum(t.host_ms * t.calibration_factor for t in times),
        "hops": sum(cost_model.hop_times_ms(stages)),
    }


def _fp_terms(fp: FirstPrinciples) -> dict[str, float]:
    return {"weights": sum(fp.weights_ms), "kv": sum(fp.kv_ms), "hops": sum(fp.hop_ms)}


def _terms_text(terms: dict[str, float]) -> str:
    return " ".join(f"{name} {value:.2f}" for name, value in terms.items())


def _variants(config: CostModelConfig) -> dict[str, CostModelConfig]:
    """The cost model with one of its rules switched off, to name the rule behind a loss."""
    cuda = config.profile("cuda")

    def backends(layer_ms: float | None, stage_ms: float | None) -> dict[str, BackendProfile]:
        return {
            name: profile.model_copy(
                update={
                    "host_ms_per_layer": profile.host_ms_per_layer
                    if layer_ms is None
                    else layer_ms,
                    "host_ms_per_stage": profile.host_ms_per_stage
                    if stage_ms is None
                    else stage_ms,
                }
            )
            for name, profile in config.backends.items()
        }

    no_factors = {"near_threshold_factor": 1.0, "on_battery_factor": 1.0, "low_battery_factor": 1.0}
    return {
        "no host time": config.model_copy(update={"backends": backends(0.0, 0.0)}),
        "CUDA's host time on every backend": config.model_copy(
            update={"backends": backends(cuda.host_ms_per_layer, cuda.host_ms_per_stage)}
        ),
        "no near-threshold / battery factors": config.model_copy(update=no_factors),
        "neither host time nor those factors": config.model_copy(
            update={**no_factors, "backends": backends(0.0, 0.0)}
        ),
    }


def _flipping_rules(row: Row, stages: Sequence[StagePlan]) -> list[str]:
    """The variants of the cost model under which ``stages`` is at least as fast as ours."""
    flips: list[str] = []
    for name, config in _variants(row.cost_model.config).items():
        variant = row.cost_model.model_copy(update={"config": config})
        ours = variant.predict_ms_per_token(row.decision.stages)
        if variant.predict_ms_per_token(stages) <= ours * (1 + 1e-9):
            flips.append(name)
    return flips


def _path_note(row: Row) -> str:
    """Why ours is not the cost model's optimum: the decision path it took."""
    if row.decision.strategy == "greedy":
        if all(device.is_cpu_fallback for device in row.scenario.devices):
            return (
                "place_instance took the greedy path (no GPU telemetry: only CPU nodes), so "
                "the solver never ran; greedy ranks devices by memory, not speed"
            )
        return "place_instance took the greedy path (devices alike), so the solver never ran"
    if row.decision.strategy == "greedy_fallback":
        return "the solver ran out of budget and fell back to greedy"
    return "the solver is not optimal under its own model here"


def print_losses(rows: Sequence[Row]) -> int:
    """Every scenario where ours is more than 2 % slower than a baseline, with the terms of
    both placements and, for a first-principles loss, the cost-model rule that made ours
    look faster (the variants of the cost model without it rank the baseline ahead)."""
    print(f"\nscenarios where ours is more than {1 - GOAL_WORST_CASE:.0%} slower than a baseline:")
    count = 0
    for row in rows:
        losses: list[tuple[str, str, float]] = []
        for baseline in BASELINES:
            for model in MODELS:
                ours, theirs = row.ms[model]["ours"], row.ms[model][baseline]
                if ours is not None and theirs is not None and theirs / ours < GOAL_WORST_CASE:
                    losses.append((baseline, model, theirs / ours))
        if not losses:
            continue
        count += 1
        cost_model = row.cost_model
        print(f"\n* {row.label} ({row.decision.strategy})")
        print(f"    ours        : {_describe(row.decision.stages, cost_model)}")
        for baseline in dict.fromkeys(baseline for baseline, _, _ in losses):
            stages = row.placements[baseline]
            assert stages is not None
            print(f"    {baseline:<12}: {_describe(stages, cost_model)}")
        for baseline, model, ratio in losses:
            stages = row.placements[baseline]
            assert stages is not None
            ours_cm = _cost_terms(row.decision.stages, cost_model)
            theirs_cm = _cost_terms(stages, cost_model)
            print(f"    {baseline} / ours = {ratio:.3f} under the {model}; ms/token by term:")
            if model == "cost model":
                print(f"      ours  {_terms_text(ours_cm)}")
                print(f"      {baseline:<5} {_terms_text(theirs_cm)}")
                print(f"      {_path_note(row)}")
                continue
            ours_fp, theirs_fp = _fp_terms(row.fp["ours"]), _fp_terms(row.fp[baseline])
            print(f"      first principles  ours  {_terms_text(ours_fp)}")
            print(f"                        {baseline:<5} {_terms_text(theirs_fp)}")
            print(f"      cost model        ours  {_terms_text(ours_cm)}")
            print(f"                        {baseline:<5} {_terms_text(theirs_cm)}")
            lead = sum(theirs_cm.values()) - sum(ours_cm.values())
            if lead < 0:
                print(
                    f"      the cost model agrees ({baseline} {-lead:.2f} ms faster under it): "
                    + _path_note(row)
                )
                continue
            deltas = {name: ours_cm[name] - theirs_cm[name] for name in ours_cm}
            saving = min(deltas, key=lambda name: deltas[name])
            flips = _flipping_rules(row, stages)
            print(
                f"      the cost model ranks ours ahead by {lead:.2f} ms, its largest saving "
                f"in '{saving}' ({deltas[saving]:+.2f} ms); ranking flips with: "
                + ("; ".join(flips) if flips else "none of the variants")
            )
    if not count:
        print("  none")
    return count


def print_throughput(rows: Sequence[Row]) -> None:
    print("\nthroughput objective (bottleneck = slowest stage + its outgoing hop, ms):")
    gains_cm: list[float] = []
    gains_fp: list[float] = []
    worse: list[str] = []
    changed: list[str] = []
    for row in rows:
        if row.decision.strategy == "greedy":
            continue
        try:
            decision = decide(row.cost_model, row.scenario.devices, objective="throughput")
        except TypeError as error:  # the interface moved under us
            print(f"  objective='throughput' failed: {error}")
            return
        if not decision.stages:
            continue
        cost_model = row.cost_model
        latency_cm = cost_model.predict_bottleneck_ms(row.decision.stages)
        throughput_cm = cost_model.predict_bottleneck_ms(decision.stages)
        latency_fp = row.fp["ours"].bottleneck_ms
        throughput_fp = first_principles(
            decision.stages, row.scenario.card, row.scenario.links
        ).bottleneck_ms
        gains_cm.append(latency_cm / throughput_cm)
        gains_fp.append(latency_fp / throughput_fp)
        if throughput_cm > latency_cm * (1 + 1e-9):
            worse.append(f"{row.label}: {throughput_cm:.2f} > {latency_cm:.2f}")
        if _signature(decision.stages) != _signature(row.decision.stages):
            changed.append(
                f"  {row.label[:60]:<60} latency plan {latency_cm:7.2f} / {latency_fp:7.2f}  "
                f"throughput plan {throughput_cm:7.2f} / {throughput_fp:7.2f}  "
                f"({cost_model.predict_ms_per_token(decision.stages):.1f} ms/token)"
            )
    print(f"  solved by the solver: {len(gains_cm)}; throughput plan differs in {len(changed)}")
    print("  (bottleneck: cost model / first principles)")
    for line in changed:
        print(line)
    print(
        f"  geomean bottleneck latency plan / throughput plan: cost model {_geomean(gains_cm):.3f}x, "
        f"first principles {_geomean(gains_fp):.3f}x"
    )
    print(
        f"{_verdict(not worse)}  throughput plan's bottleneck never above the latency plan's (cost model)"
    )
    for line in worse:
        print(f"    {line}")


# --- solve time ------------------------------------------------------------------------------
def print_timing(repeats: int, card: ModelCard) -> bool:
    print(
        f"\nsolve time: solver alone (as place_instance builds it), {card.model_id}, "
        f"{repeats} seeded random mixes per row, {os.cpu_count()} CPUs"
    )
    header = (
        f"{'devices':>7} {'links':>10} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'cpu p99':>8} "
        f"{'fallback':>8} "
        f"{'work-lim':>8} {'timeout':>7} {'no fit':>6} {'target':>8}  verdict"
    )
    print(header)
    print("-" * len(header))
    all_pass = True
    decide(CostModel(model_card=card), random_mix(16, 0))  # warm-up
    for size in TIMING_SIZES:
        for measured in (False, True):
            timings: list[float] = []
            cpu_timings: list[float] = []
            fallback = work_limited = timed_out = no_fit = 0
            for repeat in range(repeats):
                seed = size * 1000 + repeat
                devices = random_mix(size, seed)
                links = random_links(devices, seed) if measured else {}
                cost_model = CostModel(model_card=card, links=links)
                gc.collect()  # the bench's own garbage is not the solver's time
                started, cpu_started = time.perf_counter(), time.thread_time()
                choice = decide(cost_model, devices)
                timings.append((time.perf_counter() - started) * 1000.0)
                cpu_timings.append((time.thread_time() - cpu_started) * 1000.0)
                result = choice.solver_result
                fallback += int(choice.strategy == "greedy_fallback")
                work_limited += int(result is not None and result.work_limited)
                timed_out += int(result is not None and result.timed_out)
                no_fit += int(not choice.stages)
            p50, p99 = percentile(timings, 0.5), percentile(timings, 0.99)
            target = TARGET_P99_MS.get(size)
            verdict = ""
            if target is not None:
                passed = p99 < target and fallback == 0 and work_limited == 0
                all_pass = all_pass and passed
                verdict = _verdict(passed)
            print(
                f"{size:>7} {'measured' if measured else 'unmeasured':>10} {p50:>8.2f} {p99:>8.2f} "
                f"{max(timings):>8.2f} {percentile(cpu_timings, 0.99):>8.2f} {fallback:>8} {work_limited:>8} {timed_out:>7} {no_fit:>6} "
                f"{'< ' + format(target, 'g') if target else '—':>8}  {verdict}"
            )
    print("verdict: p99 under the target and no solve fell back or hit the work limit;")
    print("cpu p99: this thread's CPU time (wall time less what other processes took)")
    return all_pass


# --- main ------------------------------------------------------------------------------------
def _cards() -> dict[str, ModelCard]:
    cards: dict[str, ModelCard] = {}
    for key, model_id in MODEL_IDS.items():
        card = get_model_card(model_id)
        if card is None:
            raise SystemExit(f"no card for {model_id}")
        cards[key] = card
    return cards


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=30, help="solves per timing row")
    parser.add_argument("--quick", action="store_true", help="5 solves per timing row (CI smoke)")
    arguments = parser.parse_args()
    repeats = 5 if arguments.quick else max(1, arguments.repeats)
    cards = _cards()

    suite = scenarios(cards)
    rows: list[Row] = []
    skipped = dict.fromkeys(cards, 0)
    for scenario in suite:
        row = evaluate(scenario)
        if row is None:
            skipped[scenario.model_key] += 1
        else:
            rows.append(row)
    print(
        f"{len(clusters())} clusters × {len(cards)} models: {len(rows)} scenarios; skipped "
        "(nothing fits): " + ", ".join(f"{key} {count}" for key, count in skipped.items()) + "\n"
    )
    print_table(rows)
    print_summary(rows)
    print_losses(rows)
    print_throughput(rows)
    print_timing(repeats, cards["405B"])


if __name__ == "__main__":
    main()
