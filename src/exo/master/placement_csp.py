"""``ConstraintSatisfactionPlacement``: the solver used when the candidate devices differ.

Pure: values in, values out. It minimises what ``cost_model.py`` predicts; ``placement.py``
builds the candidate devices, decides between the greedy split and this solver, and turns
the result into shards. See docs/placement.md.

Decision: an ordered list of pipeline stages (devices) with a contiguous layer range each.
The cost of a stage is additive in its layers (``CostModel.layer_ms`` per layer, plus the
first stage's embedding row, the last stage's LM head and a fixed time per stage), and the
hops are the consecutive stages *and* the ring closure from the last stage back to the
first (the sampled token returns to rank 0 before the next token can start).

Latency objective (``predict_ms_per_token``, the default): an exact dynamic programme over
the devices (grouped by node) whose state is (layers placed so far, which of the first/last
roles are taken, nodes used, whether the current node is already used). With uniform
inter-node link costs (always the case when nothing is measured) the hop cost of the best
ring order depends only on how many devices and nodes are used, so the programme is exact
over every subset, order and split. With measured non-uniform links the programme uses each
node's cheapest incoming link (a lower bound), then orders the chosen nodes exactly
(Held–Karp, up to 8 intermediate nodes) or by nearest neighbour; the result carries its
lower bound, so the optimality gap is known. Before the programme runs, a device is dropped
when a lower bound on every multi-stage placement that uses it (its own fixed time and one
layer, the remaining layers at the fastest devices' speed up to their memory, the cheapest
first and last extras, another stage's fixed time, two of the cheapest hops) already
exceeds a placement in hand (the best single device or the fallback): such a device is in no
optimal placement, so the answer is unchanged.

Throughput objective (``predict_bottleneck_ms``): a parametric search over the bottleneck
``T``. For a given ``T`` each device, in each role (middle, first, last) and with each
outgoing hop (within its node, or out of its node), can take at most the layers whose stage
time plus hop stays ≤ ``T`` (and that fit its memory). With devices grouped by node every
node used has exactly one *exit* device paying the inter-node hop, the last stage exits its
node unless the first stage shares that node, and the first stage exits its node only when
it is alone there; the check picks roles and exits per node in closed form (vectorised over
nodes) and asks whether the devices' capacities reach ``n_layers`` with at most
``n_layers`` stages and at least ``min_nodes`` nodes. The smallest feasible ``T`` is found by
bisection over the finite set of stage-time-plus-hop values. The layers are then given to
the fastest devices first (the least latency at that bottleneck). With uniform links, no
NVML peer topology and the link within a node no dearer than between nodes this is exact
(no ring order beats the grouped one: it has at least one exit per node, and grouping lets
the cheaper hop fall on every other device). Otherwise each hop is charged its cheapest
possible value, so the search's ``T`` is a lower bound on the optimum, carried in the
result, and the placement built for it is within (dearest hop − cheapest hop) of it, since
every stage's time stays ≤ ``T`` − its charged hop. "At most ``n_layers`` stages": a
placement with more devices than layers can drop devices one by one (each keeps ≥ 1 layer)
down to its core — the first and last stages, the exits they need and one exit per node
``min_nodes`` requires — so the check also bounds that core by ``n_layers``.

The even split of ``balance_equal_stages`` applies to the latency objective only: for
throughput, equal devices in the first or last role should hold fewer layers, and the
search already evens out equally fast devices.

Limits: the search stops on a deterministic amount of work (``work_limit`` — table cells of
the programme, array cells of the threshold checks), so the same inputs give the same
placement however loaded the machine is. Candidates are processed in score order, so a
programme cut short still holds the best placement over the devices it has seen; that
best-so-far (or the fallback, when better) is returned. Wall-clock time is only a safety
cap at ``WALL_CAP_FACTOR × budget_ms``, which normal operation never reaches.
"""

import functools
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field

from exo.master.cost_model import CostModel, DeviceKey, PlacementDevice, StagePlan, link_ms
from exo.shared.types.ids import NodeId
from exo.shared.types.instances import PlacementObjective

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.intp]

EVEN_SPLIT_MARGIN = 0.03
"""Equal devices get an uneven split only when it is predicted this much faster."""

DEFAULT_WORK_LIMIT = 2_000_000
"""Table cells the solver may fill per solve. The latency programme fills
``8 × (max(2, min_nodes) + 1) × (n_layers + 1)`` cells per candidate device (1 944 for an
80-layer model, 3 048 for 126 layers), so 256 devices finish well within it (0.5–0.8 M) and
about a thousand are cut short, at 150–200 ms on a loaded 2-core machine. The throughput
search uses a small fraction of it."""

WALL_CAP_FACTOR = 10.0
"""The wall-clock safety cap is this many times ``budget_ms``."""

ALTERNATIVE_PLAN_GAP = 0.05
"""With uneven measured links, a second programme (planned against each node's mean
incoming link) runs only when the first plan may be this far (relative) from optimal. On
60 seeded mixes of 16 and 64 devices with uneven links (bench/placement.py's) the answers
at 0.005 and at 0.05 were the same, and the 16-device p99 fell from 12.5 to 8.5 ms."""

_TOLERANCE = 1e-9


def _clock() -> float:
    """The solver's only clock (seconds): read for ``solve_ms`` and the safety cap, never
    for a decision the work limit governs."""
    return time.perf_counter()


class SolveResult(BaseModel):
    """What the solver found; ``stages`` empty when nothing fits."""

    model_config = ConfigDict(frozen=True)

    stages: list[StagePlan]
    predicted_ms_per_token: float | None
    """Latency of ``stages``, whatever the objective."""
    lower_bound_ms_per_token: float | None
    """Latency objective: no placement is predicted faster (None when the search stopped
    early or for the throughput objective)."""
    proven_optimal: bool
    """``stages`` are optimal for the objective under the cost model."""
    timed_out: bool
    """The wall-clock safety cap stopped the search (not deterministic)."""
    used_fallback: bool
    """``stages`` are the fallback split given to the solver."""
    solve_ms: float
    reasons: list[str] = Field(default_factory=list)
    objective: PlacementObjective = "latency"
    predicted_bottleneck_ms: float | None = None
    """Slowest stage plus its outgoing hop of ``stages``."""
    lower_bound_bottleneck_ms: float | None = None
    """Throughput objective: no placement has a smaller bottleneck (None when the search
    stopped early or for the latency objective)."""
    work_limited: bool = False
    """The work limit stopped the search: ``stages`` are the best found so far."""
    work_done: int = 0
    """Work spent against ``work_limit``: table cells of the latency programme; thresholds
    and array cells of the throughput search (deterministic for the same inputs)."""
    candidates_processed: int = 0
    """Devices the search went through (all of ``candidates_total`` unless the latency
    programme was cut short; devices that cannot beat a placement in hand are skipped and
    not counted)."""
    candidates_total: int = 0


_ROLE_MIDDLE = 0
_ROLE_FIRST = 1
_ROLE_LAST = 2


@dataclass(frozen=True, slots=True)
class _Candidate:
    device: PlacementDevice
    node_index: int
    layer_ms: float
    first_extra_ms: float
    last_extra_ms: float
    stage_fixed_ms: float
    cap_middle: int
    cap_first: int
    cap_last: int
    fits_alone: bool


@dataclass(frozen=True, slots=True)
class _Found:
    stages: list[StagePlan]
    cost: float
    """The objective's value of ``stages``."""
    lower_bound: float
    """No placement over the devices searched beats this (-inf: unknown)."""


@dataclass(frozen=True, slots=True)
class _Context:
    candidates: list[_Candidate]
    """Devices that can hold a layer, grouped by node, in processing order."""
    node_ids: list[NodeId]
    local_ms: float
    """The cheapest hop between two devices of one node."""
    cheapest_entry: list[float]
    mean_entry: list[float]
    cheapest_exit: list[float]
    uniform: bool
    """Every inter-node link costs the same."""


def _window_mins(
    values: FloatArray, windows: Sequence[int], layer_ms: float
) -> dict[int, FloatArray]:
    """For each ``window`` (≥ 1): ``out[..., n] = min_{k in 1..window} values[..., n - k] +
    k * layer_ms`` (inf where n - k < 0 for every k). Windows covering the whole axis are a
    running minimum; the others share one sparse table over ``values[..., i] - i *
    layer_ms``."""
    if not windows:
        return {}
    length = values.shape[-1]
    offsets = np.arange(length, dtype=np.float64) * layer_ms
    shifted = values - offsets
    result: dict[int, FloatArray] = {}
    narrow = sorted({window for window in windows if window < length - 1})
    if any(window >= length - 1 for window in windows):
        running = np.minimum.accumulate(shifted, axis=-1)
        full = np.empty_like(values)
        full[..., 0] = np.inf
        full[..., 1:] = running[..., :-1] + offsets[1:]
        for window in windows:
            if window >= length - 1:
                result[window] = full
    if not narrow:
        return result
    widest = narrow[-1]
    padding = np.full((*values.shape[:-1], widest), np.inf)
    # levels[j][..., i]: the minimum of the padded, shifted values over [i, i + 2**j).
    levels = [np.concatenate([padding, shifted], axis=-1)]
    while 2 ** len(levels) <= widest:
        span = 2 ** (len(levels) - 1)
        levels.append(np.minimum(levels[-1][..., :-span], levels[-1][..., span:]))
    for window in narrow:
        # values[n - window .. n - 1] sit at padded positions widest - window + n .. widest - 1 + n.
        level = window.bit_length() - 1
        span = 1 << level
        low = widest - window
        high = widest - span
        result[window] = (
            np.minimum(
                levels[level][..., low : low + length], levels[level][..., high : high + length]
            )
            + offsets
        )
    return result


_IDENTITY_EXCLUDED = frozenset({"node_id", "device_id", "peer_links"})


def _identity(device: PlacementDevice) -> tuple[object, ...] | None:
    """Everything but where the device is: devices alike in this cost the same."""
    key = tuple(value for name, value in vars(device).items() if name not in _IDENTITY_EXCLUDED)
    try:
        hash(key)
    except TypeError:
        return None
    return key


class ConstraintSatisfactionPlacement:
    """Minimise the objective over ordered device subsets and contiguous layer splits.

    ``objective="latency"``: predicted ms/token (``CostModel.predict_ms_per_token``);
    ``objective="throughput"``: the slowest stage plus its outgoing hop
    (``CostModel.predict_bottleneck_ms``). Hard constraints: every layer exactly once,
    ≥ 1 layer per stage, each stage fits its device's usable memory (weights + KV cache for
    the context), and at least ``min_nodes`` distinct nodes. A device's heat, battery and
    load are costs in the model, never exclusions.

    Deterministic for the same inputs: the search stops after ``work_limit`` table cells
    (None: no limit) and returns the best placement found so far, or ``fallback`` (normally
    the greedy split) when that is better — never worse than the fallback. ``budget_ms`` is
    only a safety cap: the wall clock stops the search at ``WALL_CAP_FACTOR × budget_ms``
    (None: never). A limit is never an exception.
    """

    def __init__(
        self,
        cost_model: CostModel,
        devices: Sequence[PlacementDevice],
        *,
        min_nodes: int = 1,
        budget_ms: float | None = 100.0,
        scores: Mapping[DeviceKey, float] | None = None,
        fallback: Sequence[StagePlan] | None = None,
        objective: PlacementObjective = "latency",
        even_split_margin: float = EVEN_SPLIT_MARGIN,
        work_limit: int | None = DEFAULT_WORK_LIMIT,
    ) -> None:
        self.cost_model = cost_model
        self.devices = list(devices)
        self.min_nodes = min_nodes
        self.budget_ms = budget_ms
        self.scores = dict(scores or {})
        self.fallback = list(fallback) if fallback is not None else None
        self.objective: PlacementObjective = objective
        self.even_split_margin = even_split_margin
        self.work_limit = work_limit
        self._deadline: float | None = None
        self._work = 0
        self._work_limited = False
        self._timed_out = False
        self._processed = 0
        self._total = 0
        self._fallback_cache: tuple[float | None] | None = None

    # --- public ------------------------------------------------------------------------
    def solve(self) -> SolveResult:
        started = _clock()
        self._deadline = (
            None if self.budget_ms is None else started + self.budget_ms * WALL_CAP_FACTOR / 1000.0
        )
        self._work = 0
        self._work_limited = False
        self._timed_out = False
        self._processed = 0
        self._total = 0
        self._fallback_cache = None
        context = self._context()
        if context is None:
            found = None
        elif self.objective == "throughput":
            found = self._solve_throughput(context)
        else:
            found = self._solve_latency(context)
        return self._result(found, started)

    # --- common ------------------------------------------------------------------------
    def _value(self, stages: Sequence[StagePlan]) -> float:
        if self.objective == "throughput":
            return self.cost_model.predict_bottleneck_ms(stages)
        return self.cost_model.predict_ms_per_token(stages)

    def _fallback_value(self) -> float | None:
        """The objective's value of the fallback split; None without a valid one."""
        if self._fallback_cache is None:
            fallback = self.fallback
            valid = bool(fallback) and not self.cost_model.violations(
                fallback or [], self.min_nodes
            )
            self._fallback_cache = (self._value(fallback or []) if valid else None,)
        return self._fallback_cache[0]

    def _spend(self, amount: int) -> bool:
        """Account ``amount`` cells of work; False (and the reason recorded) when the work
        limit or the wall-clock safety cap forbids it."""
        if self._work_limited or self._timed_out:
            return False
        if self.work_limit is not None and self._work + amount > self.work_limit:
            self._work_limited = True
            return False
        if self._deadline is not None and _clock() >= self._deadline:
            self._timed_out = True
            return False
        self._work += amount
        return True

    @property
    def _complete(self) -> bool:
        return not (self._work_limited or self._timed_out)

    def _result(self, found: _Found | None, started: float) -> SolveResult:
        cost_model = self.cost_model
        reasons: list[str] = []
        used_fallback = False
        fallback = self.fallback
        fallback_value = self._fallback_value()
        if (
            fallback
            and fallback_value is not None
            and (found is None or fallback_value < found.cost - 1e-12 * max(1.0, abs(found.cost)))
        ):
            lower_bound = found.lower_bound if found is not None else -math.inf
            found = _Found(list(fallback), fallback_value, lower_bound)
            used_fallback = True
        if self._work_limited:
            reasons.append(
                f"work limit of {self.work_limit:,} table cells reached "
                f"({self._processed} of {self._total} candidate devices searched): "
                + ("the fallback split is better" if used_fallback else "best placement so far")
            )
        if self._timed_out:
            cap = (self.budget_ms or 0.0) * WALL_CAP_FACTOR
            reasons.append(
                f"solver budget of {self.budget_ms:g} ms exhausted (wall-clock cap {cap:g} ms): "
                + ("using the fallback split" if used_fallback else "best placement so far")
            )
        if found is None:
            if self._complete:
                reasons.append("no placement satisfies the memory and node constraints")
            else:
                reasons.append("no placement found so far and no valid fallback split given")
            return SolveResult(
                stages=[],
                predicted_ms_per_token=None,
                lower_bound_ms_per_token=None,
                proven_optimal=self._complete,
                timed_out=self._timed_out,
                used_fallback=False,
                solve_ms=(_clock() - started) * 1000.0,
                reasons=reasons,
                objective=self.objective,
                work_limited=self._work_limited,
                work_done=self._work,
                candidates_processed=self._processed,
                candidates_total=self._total,
            )
        stages = found.stages
        value = found.cost
        if not used_fallback and self.objective == "latency":
            # Throughput: equal devices in different roles should not hold equal layers
            # (the head's stage takes fewer); the search already evens out equal speeds.
            balanced = balance_equal_stages(stages, cost_model, self.even_split_margin)
            if balanced != stages:
                evened = self._value(balanced)
                if evened > value + 1e-9 * max(1.0, value):
                    reasons.append(
                        f"equal devices split evenly: {evened:.3f} ms against {value:.3f} for "
                        f"the uneven optimum, within the {self.even_split_margin:.0%} margin"
                    )
                stages, value = balanced, evened
        lower_bound = found.lower_bound
        proven = math.isfinite(lower_bound) and value <= lower_bound + _TOLERANCE * max(
            1.0, abs(value)
        )
        searched_proven = found.cost <= lower_bound + _TOLERANCE * max(1.0, abs(found.cost))
        if not searched_proven and math.isfinite(lower_bound):
            reasons.append(
                "measured links or the devices' peer topology are uneven: within "
                f"{found.cost - lower_bound:.3f} ms of optimal"
            )
        elif not searched_proven and self._complete:
            reasons.append(
                "a measured link between nodes is cheaper than the link within a node: "
                "optimality not proven"
            )
        latency = cost_model.predict_ms_per_token(stages)
        bottleneck = cost_model.predict_bottleneck_ms(stages)
        bound = lower_bound if math.isfinite(lower_bound) else None
        return SolveResult(
            stages=stages,
            predicted_ms_per_token=latency,
            lower_bound_ms_per_token=bound if self.objective == "latency" else None,
            proven_optimal=proven,
            timed_out=self._timed_out,
            used_fallback=used_fallback,
            solve_ms=(_clock() - started) * 1000.0,
            reasons=reasons,
            objective=self.objective,
            predicted_bottleneck_ms=bottleneck,
            lower_bound_bottleneck_ms=bound if self.objective == "throughput" else None,
            work_limited=self._work_limited,
            work_done=self._work,
            candidates_processed=self._processed,
            candidates_total=self._total,
        )

    def _context(self) -> _Context | None:
        """The candidate devices (those that can hold a layer) with their costs, in
        processing order: devices within a node by score (high first), then layer time,
        then id; nodes by their first device's score, then its layer time, then node id.
        Devices alike but for their place share one set of cost-model calls. None when the
        devices span too few nodes."""
        cost_model = self.cost_model
        if len({device.node_id for device in self.devices}) < self.min_nodes:
            return None
        cache: dict[tuple[object, ...], tuple[float, float, float, float, int, int, int, bool]] = {}
        n_layers = cost_model.model_card.n_layers

        def costs(
            device: PlacementDevice,
        ) -> tuple[float, float, float, float, int, int, int, bool]:
            key = _identity(device)
            known = cache.get(key) if key is not None else None
            if known is not None:
                return known
            computed = (
                cost_model.layer_ms(device),
                cost_model.first_extra_ms(device),
                cost_model.last_extra_ms(device),
                cost_model.stage_fixed_ms(device),
                cost_model.max_layers(device, False, False),
                cost_model.max_layers(device, True, False),
                cost_model.max_layers(device, False, True),
                cost_model.fits(device, n_layers, True, True),
            )
            if key is not None:
                cache[key] = computed
            return computed

        by_node: dict[
            NodeId,
            list[tuple[PlacementDevice, tuple[float, float, float, float, int, int, int, bool]]],
        ] = {}
        for device in self.devices:
            device_costs = costs(device)
            if device_costs[4] >= 1:
                by_node.setdefault(device.node_id, []).append((device, device_costs))
        if len(by_node) < self.min_nodes or not by_node:
            return None

        def score(device: PlacementDevice) -> float:
            return self.scores.get(device.key, 0.0)

        groups = [
            sorted(group, key=lambda item: (-score(item[0]), item[1][0], item[0].device_id))
            for group in by_node.values()
        ]
        groups.sort(key=lambda group: (-score(group[0][0]), group[0][1][0], group[0][0].node_id))
        candidates = [
            _Candidate(
                device=device,
                node_index=node_index,
                layer_ms=device_costs[0],
                first_extra_ms=device_costs[1],
                last_extra_ms=device_costs[2],
                stage_fixed_ms=device_costs[3],
                cap_middle=device_costs[4],
                cap_first=device_costs[5],
                cap_last=device_costs[6],
                fits_alone=device_costs[7],
            )
            for node_index, group in enumerate(groups)
            for device, device_costs in group
        ]
        node_ids = [group[0][0].node_id for group in groups]
        local_ms = cost_model.cheapest_local_hop_ms([candidate.device for candidate in candidates])
        cheapest_entry, mean_entry, cheapest_exit, uniform = self._link_costs(node_ids, local_ms)
        return _Context(
            candidates=candidates,
            node_ids=node_ids,
            local_ms=local_ms,
            cheapest_entry=cheapest_entry,
            mean_entry=mean_entry,
            cheapest_exit=cheapest_exit,
            uniform=uniform,
        )

    def _link_costs(
        self, node_ids: Sequence[NodeId], local_ms: float
    ) -> tuple[list[float], list[float], list[float], bool]:
        """Per node: its cheapest and its mean incoming inter-node link cost and its
        cheapest outgoing one (the local link for a lone node), and whether every
        inter-node link costs the same. Linear in nodes plus measured links: an unmeasured pair costs
        the default link."""
        cost_model = self.cost_model
        count = len(node_ids)
        if count < 2:
            return [local_ms] * count, [local_ms] * count, [local_ms] * count, True
        hop_bytes = cost_model.model_card.hop_bytes_per_token
        default_ms = link_ms(cost_model.config.default_link, hop_bytes)
        index = {node: position for position, node in enumerate(node_ids)}
        incoming: list[list[float]] = [[] for _ in node_ids]
        outgoing: list[list[float]] = [[] for _ in node_ids]
        for source, targets in cost_model.links.items():
            source_index = index.get(source)
            if source_index is None:
                continue
            for destination, link in targets.items():
                destination_index = index.get(destination)
                if destination_index is None or destination_index == source_index:
                    continue
                cost = link_ms(link, hop_bytes)
                incoming[destination_index].append(cost)
                outgoing[source_index].append(cost)
        cheapest: list[float] = []
        mean: list[float] = []
        cheapest_out: list[float] = []
        inter_costs: set[float] = set()
        for position in range(count):
            measured_in = incoming[position]
            defaults_in = count - 1 - len(measured_in)
            cheapest.append(min([*measured_in, *([default_ms] if defaults_in else [])]))
            mean.append((sum(measured_in) + defaults_in * default_ms) / (count - 1))
            measured_out = outgoing[position]
            defaults_out = count - 1 - len(measured_out)
            cheapest_out.append(min([*measured_out, *([default_ms] if defaults_out else [])]))
            inter_costs.update(measured_in)
            if defaults_in:
                inter_costs.add(default_ms)
        uniform = max(inter_costs) - min(inter_costs) <= 1e-12 * max(inter_costs)
        return cheapest, mean, cheapest_out, uniform

    # --- latency -----------------------------------------------------------------------
    def _solve_latency(self, context: _Context) -> _Found | None:
        """The best single device and the best pipeline of ≥ 2 stages; the cheaper one,
        with a lower bound over every placement when the search was complete."""
        cost_model = self.cost_model
        candidates = context.candidates
        n_layers = cost_model.model_card.n_layers
        self._total = len(candidates)
        if not self._spend(len(candidates)):
            return None
        solo: _Found | None = None
        if self.min_nodes <= 1:
            alone = [candidate for candidate in candidates if candidate.fits_alone]
            if alone:
                times = [
                    c.stage_fixed_ms + c.first_extra_ms + c.last_extra_ms + n_layers * c.layer_ms
                    for c in alone
                ]
                best = alone[int(np.argmin(times))]
                stages = [StagePlan(device=best.device, n_layers=n_layers)]
                cost = cost_model.predict_ms_per_token(stages)
                solo = _Found(stages, cost, cost)
        multi: _Found | None = None
        bounds: list[float] = [solo.cost] if solo is not None else []
        if len(candidates) >= 2 and n_layers >= 2:
            upper = solo.cost if solo is not None else math.inf
            fallback_value = self._fallback_value()
            if fallback_value is not None:
                upper = min(upper, fallback_value)
            kept, pruned_bound = self._prune(candidates, context, upper)
            self._total = len(kept)
            bounds.append(pruned_bound)
            multi, complete = self._solve_pipeline(kept, context, context.cheapest_entry)
            if not complete:
                bounds.append(-math.inf)
            elif multi is not None:
                bounds.append(multi.lower_bound)
            if (
                multi is not None
                and complete
                and not context.uniform
                and multi.cost > multi.lower_bound + ALTERNATIVE_PLAN_GAP * multi.cost
            ):
                # Uneven measured links: also plan against each node's mean incoming link
                # (a heuristic, not a bound) and keep the cheaper realised placement. The
                # first pass's bound stands even if this pass is cut short.
                processed = self._processed
                # Only devices that can take part in a placement cheaper than the first
                # pass's realised one matter here.
                promising, _bound = self._prune(kept, context, multi.cost)
                alternative, _complete = self._solve_pipeline(
                    promising, context, context.mean_entry
                )
                self._processed = processed
                if alternative is not None and alternative.cost < multi.cost:
                    multi = _Found(alternative.stages, alternative.cost, multi.lower_bound)
        options = [found for found in (solo, multi) if found is not None]
        if not options:
            return None
        best_found = min(options, key=lambda found: found.cost)
        return _Found(best_found.stages, best_found.cost, min(bounds))

    def _prune(
        self, candidates: Sequence[_Candidate], context: _Context, upper: float
    ) -> tuple[list[_Candidate], float]:
        """Drop the devices every multi-stage placement with them costs more than ``upper``
        (a placement in hand); also the least of those devices' bounds."""
        if not math.isfinite(upper) or len(candidates) < 2:
            return list(candidates), math.inf
        n_layers = self.cost_model.model_card.n_layers
        layer_ms = np.array([c.layer_ms for c in candidates])
        fixed = np.array([c.stage_fixed_ms for c in candidates])
        caps = np.array([c.cap_middle for c in candidates], dtype=np.float64)
        order = np.argsort(layer_ms, kind="stable")
        sorted_caps = caps[order]
        cumulative = np.cumsum(sorted_caps)
        need = n_layers - 1
        if cumulative[-1] < need:
            fill = math.inf
        else:
            full = int(np.searchsorted(cumulative, need))
            before = float(cumulative[full - 1]) if full > 0 else 0.0
            fill = float(np.dot(sorted_caps[:full], layer_ms[order][:full])) + (
                need - before
            ) * float(layer_ms[order][full])
        first_extras = [c.first_extra_ms for c in candidates if c.cap_first >= 1]
        last_extras = [c.last_extra_ms for c in candidates if c.cap_last >= 1]
        if not first_extras or not last_extras or not math.isfinite(fill):
            return [], math.inf
        hop = min(context.local_ms, min(context.cheapest_entry))
        floor = fill + min(first_extras) + min(last_extras) + float(fixed.min()) + 2 * hop
        bounds = fixed + layer_ms + floor
        keep = bounds <= upper + 1e-9 * max(1.0, abs(upper))
        kept = [candidate for candidate, kept in zip(candidates, keep, strict=True) if kept]
        pruned = bounds[~keep]
        return kept, float(pruned.min()) if pruned.size else math.inf

    def _solve_pipeline(
        self, candidates: Sequence[_Candidate], context: _Context, entry_ms: Sequence[float]
    ) -> tuple[_Found | None, bool]:
        """The programme over ≥ 2 stages, charging a node ``entry_ms[node]`` for the
        inter-node link into it. State rows ``(roles taken (bit 0 first, bit 1 last), nodes
        used (capped), current node used)`` by columns ``layers placed``. Stops before a
        candidate the work limit forbids and answers from the devices seen so far; also
        whether every candidate was seen."""
        if len(candidates) < 2:
            return None, True
        cost_model = self.cost_model
        n_layers = cost_model.model_card.n_layers
        local_ms = context.local_ms
        min_entry = min(entry_ms)
        max_nodes = max(2, self.min_nodes)
        table = _table(max_nodes)
        node_adds: dict[int, FloatArray] = {}
        adds_by_entry: dict[float, FloatArray] = {}
        terms = [self._role_terms(candidate, n_layers) for candidate in candidates]
        values = np.full((table.rows, n_layers + 1), np.inf)
        values[table.row(0, 0, 0), 0] = 0.0
        history: list[FloatArray] = []
        merged_from: dict[int, FloatArray] = {}
        previous_node = -1
        cells = table.rows * (n_layers + 1)
        reach = np.empty((3, table.rows, n_layers + 1))
        for index, candidate in enumerate(candidates):
            if not self._spend(cells):
                break
            node = candidate.node_index
            if node != previous_node:
                previous_node = node
                merged_from[index] = values
                values = table.merge(values)
            history.append(values)
            if node not in node_adds:
                entry = entry_ms[node]
                if entry not in adds_by_entry:
                    add = self._entry_add(entry, min_entry, local_ms, max_nodes)
                    adds_by_entry[entry] = table.node_adds(add, local_ms)
                node_adds[node] = adds_by_entry[entry]
            extras, windows = terms[index]
            by_window = _window_mins(values, sorted(set(windows)), candidate.layer_ms)
            for role in range(3):
                reach[role] = by_window[windows[role]]
            adds = node_adds[node] + extras[table.combo_role]
            gathered = reach.reshape(3 * table.rows, n_layers + 1)[table.combo_flat]
            gathered += adds[:, :, None]
            best = gathered.min(axis=1)
            values = table.update(values, best)
        processed = len(history)
        complete = processed == len(candidates)
        self._processed = processed
        lowest_nodes = max(1, self.min_nodes)
        best_value = np.inf
        best_row = -1
        for nodes_used in range(lowest_nodes, max_nodes + 1):
            for current in (0, 1):
                row = table.row(3, nodes_used, current)
                value = float(values[row, n_layers])
                if value < best_value - 1e-12:
                    best_value = value
                    best_row = row
        if best_row < 0 or not math.isfinite(best_value):
            return None, complete
        assignment = self._backtrack(
            candidates[:processed], history, merged_from, values, best_row, table, node_adds, terms
        )
        stages = self._arrange(assignment, candidates, context.node_ids, context.uniform)
        cost = cost_model.predict_ms_per_token(stages)
        lower_bound = best_value if local_ms <= min_entry and complete else -math.inf
        return _Found(stages, cost, min(lower_bound, cost)), complete

    @staticmethod
    def _role_terms(candidate: _Candidate, n_layers: int) -> tuple[FloatArray, list[int]]:
        """Per role (middle, first, last): the stage's fixed cost (inf where not one layer
        fits) and the most layers it can take."""
        caps = (candidate.cap_middle, candidate.cap_first, candidate.cap_last)
        fixed = candidate.stage_fixed_ms
        terms = (fixed, fixed + candidate.first_extra_ms, fixed + candidate.last_extra_ms)
        extras = np.array(
            [term if cap >= 1 else np.inf for term, cap in zip(terms, caps, strict=True)]
        )
        windows = [max(1, min(cap, n_layers)) for cap in caps]
        return extras, windows

    @staticmethod
    def _entry_add(entry: float, min_entry: float, local_ms: float, max_nodes: int) -> FloatArray:
        """Extra hop cost for using a new node when ``nodes used`` so far is the index:
        the first node costs nothing extra; the second pays its own entry and (as a lower
        bound, exact when links are uniform) the cheapest entry back into the first."""
        add = np.full(max_nodes + 1, entry - local_ms)
        add[0] = 0.0
        add[1] = (entry - local_ms) + (min_entry - local_ms)
        return add

    def _backtrack(
        self,
        candidates: Sequence[_Candidate],
        history: Sequence[FloatArray],
        merged_from: Mapping[int, FloatArray],
        final_values: FloatArray,
        best_row: int,
        table: "_Table",
        node_adds: Mapping[int, FloatArray],
        terms: Sequence[tuple[FloatArray, list[int]]],
    ) -> list[tuple[int, int, int]]:
        """(candidate index, role, layers) for every used device, from the stored tables."""
        n_layers = final_values.shape[-1] - 1
        row = best_row
        layers = n_layers
        value = float(final_values[row, layers])
        chosen: list[tuple[int, int, int]] = []
        for index in range(len(candidates) - 1, -1, -1):
            candidate = candidates[index]
            before = history[index]
            tolerance = 1e-9 * max(1.0, abs(value))
            if abs(float(before[row, layers]) - value) <= tolerance:
                value = float(before[row, layers])
            else:
                target = table.target_of[row]
                if target < 0:
                    raise AssertionError("placement programme could not be traced back")
                extras, windows = terms[index]
                adds = node_adds[candidate.node_index] + extras[table.combo_role]
                found = False
                for combo in range(table.combo_role.shape[1]):
                    add = float(adds[target, combo])
                    if not math.isfinite(add):
                        continue
                    role = int(table.combo_role[target, combo])
                    source = int(table.combo_source[target, combo])
                    for count in range(1, min(windows[role], layers) + 1):
                        previous = float(before[source, layers - count])
                        if not math.isfinite(previous):
                            continue
                        if abs(previous + count * candidate.layer_ms + add - value) <= tolerance:
                            chosen.append((index, role, count))
                            row = source
                            layers -= count
                            value = previous
                            found = True
                            break
                    if found:
                        break
                if not found:
                    raise AssertionError("placement programme could not be traced back")
            if index in merged_from:
                if table.current(row) == 1:
                    raise AssertionError(
                        "placement programme state is inconsistent at a node boundary"
                    )
                unmerged = merged_from[index]
                tolerance = 1e-9 * max(1.0, abs(value))
                if abs(float(unmerged[row, layers]) - value) > tolerance:
                    row = table.with_current(row)
        if layers != 0 or row != table.row(0, 0, 0):
            raise AssertionError("placement programme did not place every layer")
        chosen.reverse()
        return chosen

    def _arrange(
        self,
        assignment: Sequence[tuple[int, int, int]],
        candidates: Sequence[_Candidate],
        node_ids: Sequence[NodeId],
        uniform: bool,
    ) -> list[StagePlan]:
        """Ranks: the first-role device, the rest of its node, the other nodes (in the
        cheapest ring order), then the last node's devices with the last-role device last."""
        by_node: dict[int, list[tuple[_Candidate, int, int]]] = {}
        first: tuple[_Candidate, int] | None = None
        last: tuple[_Candidate, int] | None = None
        for index, role, count in assignment:
            candidate = candidates[index]
            by_node.setdefault(candidate.node_index, []).append((candidate, role, count))
            if role == _ROLE_FIRST:
                first = (candidate, count)
            elif role == _ROLE_LAST:
                last = (candidate, count)
        if first is None or last is None:
            raise AssertionError("placement programme lost the first or last stage")
        first_node = first[0].node_index
        last_node = last[0].node_index
        middle_nodes = [node for node in sorted(by_node) if node not in (first_node, last_node)]
        if not uniform and middle_nodes:
            middle_nodes = self._ring_order(first_node, last_node, middle_nodes, node_ids)

        def middles(node: int) -> list[StagePlan]:
            return [
                StagePlan(device=candidate.device, n_layers=count)
                for candidate, role, count in by_node[node]
                if role == _ROLE_MIDDLE
            ]

        stages = [StagePlan(device=first[0].device, n_layers=first[1]), *middles(first_node)]
        for node in middle_nodes:
            stages.extend(middles(node))
        if last_node != first_node:
            stages.extend(middles(last_node))
        stages.append(StagePlan(device=last[0].device, n_layers=last[1]))
        return stages

    def _ring_order(
        self,
        first_node: int,
        last_node: int,
        middle: Sequence[int],
        node_ids: Sequence[NodeId],
        exact_up_to: int = 8,
    ) -> list[int]:
        """Order of the intermediate nodes minimising first → … → last link costs (the
        closing link last → first is fixed). Exact (Held–Karp) up to ``exact_up_to`` nodes,
        else nearest neighbour."""
        cost_model = self.cost_model
        known: dict[tuple[int, int], float] = {}

        def cost(source: int, destination: int) -> float:
            pair = (source, destination)
            if pair not in known:
                known[pair] = cost_model.node_link_ms(node_ids[source], node_ids[destination])
            return known[pair]

        if len(middle) > exact_up_to:
            order: list[int] = []
            remaining = list(middle)
            position = first_node
            while remaining:
                position = min(remaining, key=lambda node: (cost(position, node), node))
                remaining.remove(position)
                order.append(position)
            return order
        count = len(middle)
        full = (1 << count) - 1
        table: dict[tuple[int, int], tuple[float, int]] = {}
        for index, node in enumerate(middle):
            table[(1 << index, index)] = (cost(first_node, node), -1)
        for mask in range(1, full + 1):
            for end in range(count):
                if not mask & (1 << end) or (mask, end) not in table:
                    continue
                base = table[(mask, end)][0]
                for following in range(count):
                    if mask & (1 << following):
                        continue
                    key = (mask | (1 << following), following)
                    value = base + cost(middle[end], middle[following])
                    if key not in table or value < table[key][0] - 1e-15:
                        table[key] = (value, end)
        best_end = min(
            range(count),
            key=lambda end: (table[(full, end)][0] + cost(middle[end], last_node), end),
        )
        order_indices: list[int] = []
        mask, end = full, best_end
        while end != -1:
            order_indices.append(end)
            previous = table[(mask, end)][1]
            mask ^= 1 << end
            end = previous
        order_indices.reverse()
        return [middle[index] for index in order_indices]

    # --- throughput --------------------------------------------------------------------
    def _solve_throughput(self, context: _Context) -> _Found | None:
        """Bisection over the candidate bottlenecks: the smallest ``T`` the threshold check
        accepts, then the placement the check built for it. With uneven links the check
        charges every node its cheapest exit, so ``T`` is a lower bound."""
        self._total = len(context.candidates)
        upper = math.inf
        fallback_value = self._fallback_value()
        if fallback_value is not None:
            upper = fallback_value
        found = self._bottleneck_search(context, context.cheapest_exit, upper)
        if found is None:
            return None
        lower_bound = found.lower_bound if self._complete else -math.inf
        return _Found(found.stages, found.cost, min(lower_bound, found.cost))

    def _bottleneck_search(
        self, context: _Context, exit_ms: Sequence[float], upper: float
    ) -> _Found | None:
        """One bisection with each node's exit hop charged ``exit_ms``; its ``lower_bound``
        is the smallest feasible threshold (a bound on the optimum when the search was
        complete)."""
        cost_model = self.cost_model
        candidates = context.candidates
        search = _BottleneckSearch(
            candidates,
            len(context.node_ids),
            context.local_ms,
            exit_ms,
            cost_model.model_card.n_layers,
            self.min_nodes,
        )
        thresholds = search.thresholds(upper)
        if not self._spend(int(thresholds.size) + search.cells):
            return None
        self._processed = len(candidates)
        feasible: float | None = None
        while thresholds.size:
            if not self._spend(search.cells):
                break
            middle = thresholds.size // 2
            threshold = float(np.partition(thresholds, middle)[middle])
            if search.evaluate(threshold, first_only=True).options:
                feasible = threshold
                thresholds = thresholds[thresholds < threshold]
            else:
                thresholds = thresholds[thresholds > threshold]
        if feasible is None:
            return None
        evaluation = search.evaluate(feasible)
        built: list[tuple[float, list[StagePlan]]] = []
        for option in evaluation.options:
            plan = search.build(evaluation, option)
            stages = [StagePlan(device=candidates[index].device, n_layers=n) for index, n in plan]
            if not context.uniform:
                stages = self._reorder_nodes(stages, context)
            bottleneck = (
                cost_model.predict_bottleneck_ms(stages) if len(evaluation.options) > 1 else 0.0
            )
            built.append((bottleneck, stages))
        if not built:
            return None
        # Every kind meets the threshold; the least realised bottleneck, then latency.
        least = min(bottleneck for bottleneck, _stages in built)
        tied = [stages for bottleneck, stages in built if bottleneck <= least * (1 + _TOLERANCE)]
        chosen = (
            tied[0]
            if len(tied) == 1
            else min(tied, key=lambda stages: cost_model.predict_ms_per_token(stages))
        )
        return _Found(chosen, cost_model.predict_bottleneck_ms(chosen), feasible)

    def _reorder_nodes(self, stages: Sequence[StagePlan], context: _Context) -> list[StagePlan]:
        """With uneven links: the node blocks between the first and the last block in the
        cheapest ring order (exact up to 4 blocks, else nearest neighbour; the blocks
        themselves are kept)."""
        blocks: list[list[StagePlan]] = []
        for stage in stages:
            if blocks and blocks[-1][-1].device.node_id == stage.device.node_id:
                blocks[-1].append(stage)
            else:
                blocks.append([stage])
        if len(blocks) <= 3:
            return list(stages)
        index = {node: position for position, node in enumerate(context.node_ids)}
        middle = [index[block[0].device.node_id] for block in blocks[1:-1]]
        if len(set(middle)) != len(middle):
            return list(stages)
        first = index[blocks[0][0].device.node_id]
        last = index[blocks[-1][0].device.node_id]
        order = self._ring_order(first, last, middle, context.node_ids, exact_up_to=4)
        by_node = {index[block[0].device.node_id]: block for block in blocks[1:-1]}
        reordered = list(blocks[0])
        for node in order:
            reordered.extend(by_node[node])
        reordered.extend(blocks[-1])
        return reordered


@functools.lru_cache(maxsize=32)
def _table(max_nodes: int) -> "_Table":
    return _Table(max_nodes)


class _Table:
    """Row layout of the latency programme and its transitions as gathers. A row is
    ``(roles taken, nodes used, current node used)``; a candidate's transitions reach the
    rows with the current node used from at most three roles × three source rows."""

    def __init__(self, max_nodes: int) -> None:
        self.max_nodes = max_nodes
        self.rows = 4 * (max_nodes + 1) * 2
        targets: list[int] = []
        combos: list[list[tuple[int, int, int]]] = []  # (role, source row, entry index or -1)
        for roles_taken in range(4):
            for nodes_used in range(1, max_nodes + 1):
                targets.append(self.row(roles_taken, nodes_used, 1))
                options: list[tuple[int, int, int]] = []
                for role, bit in ((_ROLE_MIDDLE, 0), (_ROLE_FIRST, 1), (_ROLE_LAST, 2)):
                    if bit and not roles_taken & bit:
                        continue
                    source_roles = roles_taken & ~bit
                    options.append((role, self.row(source_roles, nodes_used, 1), -1))
                    for source_nodes in range(max_nodes + 1):
                        if min(max_nodes, source_nodes + 1) == nodes_used:
                            options.append(
                                (role, self.row(source_roles, source_nodes, 0), source_nodes)
                            )
                combos.append(options)
        width = max(len(options) for options in combos)
        self.target_rows = np.array(targets, dtype=np.intp)
        self.target_of = np.full(self.rows, -1, dtype=np.intp)
        self.target_of[self.target_rows] = np.arange(len(targets))
        self.combo_role = np.zeros((len(targets), width), dtype=np.intp)
        self.combo_source = np.zeros((len(targets), width), dtype=np.intp)
        self.combo_entry = np.full((len(targets), width), -2, dtype=np.intp)
        for target, options in enumerate(combos):
            for combo, (role, source, entry) in enumerate(options):
                self.combo_role[target, combo] = role
                self.combo_source[target, combo] = source
                self.combo_entry[target, combo] = entry
        self.combo_flat = self.combo_role * self.rows + self.combo_source

    def row(self, roles_taken: int, nodes_used: int, current: int) -> int:
        return (roles_taken * (self.max_nodes + 1) + nodes_used) * 2 + current

    @staticmethod
    def current(row: int) -> int:
        return row % 2

    @staticmethod
    def with_current(row: int) -> int:
        return row | 1

    def merge(self, values: FloatArray) -> FloatArray:
        """A new node starts: whether the previous node was used no longer matters."""
        merged = values.copy()
        by_state = merged.reshape(4, self.max_nodes + 1, 2, -1)
        np.minimum(by_state[:, :, 0], by_state[:, :, 1], out=by_state[:, :, 0])
        by_state[:, :, 1] = np.inf
        return merged

    def update(self, values: FloatArray, reached: FloatArray) -> FloatArray:
        """``values`` with each target row lowered to ``reached`` (targets in row order)."""
        updated = values.copy()
        targets = updated.reshape(4, self.max_nodes + 1, 2, -1)[:, 1:, 1]
        np.minimum(targets, reached.reshape(targets.shape), out=targets)
        return updated

    def node_adds(self, entry_add: FloatArray, local_ms: float) -> FloatArray:
        """Per (target, combo): the hop terms of the transition (inf for padding)."""
        adds = np.full(self.combo_entry.shape, np.inf)
        same_node = self.combo_entry == -1
        adds[same_node] = local_ms
        new_node = self.combo_entry >= 0
        adds[new_node] = local_ms + entry_add[self.combo_entry[new_node]]
        return adds


# --- throughput threshold check ----------------------------------------------------------
_MID_LOCAL, _MID_EXIT, _FIRST_LOCAL, _FIRST_EXIT, _LAST_LOCAL, _LAST_EXIT = range(6)


@dataclass(frozen=True, slots=True)
class _Option:
    kind: str
    """``solo``, ``single`` (one node), ``together_exit`` / ``together_other`` (first and
    last on one node, the first stage / another device exits it), ``apart_with`` /
    ``apart_alone`` (first and last on different nodes, the first stage with / without
    other devices on its node)."""
    first_node: int
    last_node: int
    core: int
    """Devices a placement of this kind needs at least."""


def _nothing() -> FloatArray:
    return np.empty(0)


@dataclass(slots=True)
class _Evaluation:
    """The threshold check's result: the feasible kinds and the arrays ``build`` reads."""

    threshold: float
    caps: FloatArray
    options: list[_Option]
    exit_order: IntArray = field(default_factory=lambda: np.empty(0, dtype=np.intp))
    in_plain: NDArray[np.bool_] = field(default_factory=lambda: np.empty(0, dtype=np.bool_))
    first_alone: FloatArray = field(default_factory=_nothing)
    first_with: FloatArray = field(default_factory=_nothing)
    last_exit: FloatArray = field(default_factory=_nothing)
    single: FloatArray = field(default_factory=_nothing)
    together_exit: FloatArray = field(default_factory=_nothing)
    together_other: FloatArray = field(default_factory=_nothing)


class _BottleneckSearch:
    """The threshold check of the throughput objective over a padded ``(node, slot)`` grid
    of the candidates. For a threshold ``T`` every device gets six capacities (layers whose
    stage time plus hop stays ≤ ``T``, within memory): middle / first / last role, each
    paying the hop within the node or the exit hop out of it. A node used in a placement of
    ≥ 2 nodes has one exit; the first stage's node is entered from the last stage; the last
    stage exits its node unless the first stage is there too."""

    def __init__(
        self,
        candidates: Sequence[_Candidate],
        n_nodes: int,
        local_ms: float,
        exit_ms: Sequence[float],
        n_layers: int,
        min_nodes: int,
    ) -> None:
        self.n_layers = n_layers
        self.min_nodes = min_nodes
        self.needed_nodes = max(2, min_nodes)
        groups: list[list[int]] = [[] for _ in range(n_nodes)]
        for index, candidate in enumerate(candidates):
            groups[candidate.node_index].append(index)
        self.n_nodes = n_nodes
        width = max(3, max(len(group) for group in groups))
        self.width = width
        self.index = np.full((n_nodes, width), -1, dtype=np.intp)
        layer_ms = np.ones((n_nodes, width))
        fixed = np.zeros((n_nodes, width))
        first = np.zeros((n_nodes, width))
        last = np.zeros((n_nodes, width))
        memory = np.zeros((3, n_nodes, width))
        alone = np.full((n_nodes, width), np.inf)
        real = np.zeros((n_nodes, width), dtype=np.bool_)
        for node, group in enumerate(groups):
            for slot, index in enumerate(group):
                candidate = candidates[index]
                self.index[node, slot] = index
                real[node, slot] = True
                layer_ms[node, slot] = candidate.layer_ms
                fixed[node, slot] = candidate.stage_fixed_ms
                first[node, slot] = candidate.first_extra_ms
                last[node, slot] = candidate.last_extra_ms
                memory[:, node, slot] = (
                    candidate.cap_middle,
                    candidate.cap_first,
                    candidate.cap_last,
                )
                if candidate.fits_alone:
                    alone[node, slot] = (
                        candidate.stage_fixed_ms
                        + candidate.first_extra_ms
                        + candidate.last_extra_ms
                        + n_layers * candidate.layer_ms
                    )
        exits = np.array(exit_ms, dtype=np.float64)[:, None]
        local = min(local_ms, float(exits.min())) if n_nodes >= 2 else local_ms
        self.local_ms = local
        self.layer_ms = layer_ms
        self.base = np.full((6, n_nodes, width), np.inf)
        for variant, extra, hop in (
            (_MID_LOCAL, 0.0, local),
            (_MID_EXIT, 0.0, exits),
            (_FIRST_LOCAL, first, local),
            (_FIRST_EXIT, first, exits),
            (_LAST_LOCAL, last, local),
            (_LAST_EXIT, last, exits),
        ):
            self.base[variant] = np.where(real, fixed + extra + hop, np.inf)
        self.memory = np.minimum(memory[[0, 0, 1, 1, 2, 2]], n_layers)
        self.alone = alone
        self.cells = 6 * n_nodes * width + 4 * n_nodes * width * width

    def thresholds(self, upper: float) -> FloatArray:
        """Every stage time plus hop a device can have (and every single-device time), up to
        ``upper`` (a bottleneck in hand); unsorted, repeats kept (the bisection drops
        them)."""
        counts = np.arange(1, self.n_layers + 1, dtype=np.float64)
        values = self.base[..., None] + counts * self.layer_ms[None, :, :, None]
        within = counts <= self.memory[..., None]
        found = np.concatenate([values[within], self.alone[np.isfinite(self.alone)]])
        if math.isfinite(upper):
            found = found[found <= upper * (1 + 1e-12)]
        return found

    def evaluate(self, threshold: float, first_only: bool = False) -> _Evaluation:
        """The placements kinds feasible at ``threshold`` (the best per kind). With
        ``first_only`` it stops at the first feasible kind (the bisection needs no more)
        and leaves the arrays it did not need empty."""
        n_layers = self.n_layers
        caps = np.clip(np.floor((threshold - self.base) / self.layer_ms + 1e-9), 0.0, self.memory)
        mid, mid_exit, first, first_exit, last, last_exit = caps
        options: list[_Option] = []
        evaluation = _Evaluation(threshold=threshold, caps=caps, options=options)
        if self.min_nodes <= 1 and bool((self.alone <= threshold).any()):
            flat = int(np.argmin(self.alone))
            node = flat // self.width
            options.append(_Option("solo", node, node, 1))
            if first_only:
                return evaluation
        if n_layers < 2:
            return evaluation
        width = self.width
        needed = self.needed_nodes
        slots = np.arange(width)
        total = mid.sum(axis=1)
        loss = np.where(mid_exit >= 1, mid - mid_exit, np.inf)
        exit_order = np.argsort(loss, axis=1, kind="stable")
        sorted_loss = np.take_along_axis(loss, exit_order, axis=1)
        loss0, loss1, loss2 = sorted_loss[:, 0], sorted_loss[:, 1], sorted_loss[:, 2]
        exit0, exit1 = exit_order[:, 0], exit_order[:, 1]
        in_plain = np.isfinite(loss0)
        plain = np.where(in_plain, total - np.where(in_plain, loss0, 0.0), 0.0)
        plain_sum = float(plain.sum())
        plain_nodes = int(in_plain.sum())
        rest = total[:, None] - mid
        evaluation.exit_order = exit_order
        evaluation.in_plain = in_plain
        # First and last stage on different nodes.
        evaluation.first_alone = np.where(first_exit >= 1, first_exit, -np.inf)
        other_exit = np.where(slots[None, :] == exit0[:, None], loss1[:, None], loss0[:, None])
        evaluation.first_with = np.where(
            (first >= 1) & np.isfinite(other_exit), rest + first - other_exit, -np.inf
        )
        evaluation.last_exit = np.where(last_exit >= 1, rest + last_exit, -np.inf)
        last_gain = evaluation.last_exit.max(axis=1) - plain
        for kind, grid, core in (
            ("apart_with", evaluation.first_with, 3 + needed - 2),
            ("apart_alone", evaluation.first_alone, 2 + needed - 2),
        ):
            if core > n_layers:
                continue
            value, first_node, last_node = _best_pair(
                grid.max(axis=1) - plain, last_gain, in_plain, needed - plain_nodes
            )
            if plain_sum + value >= n_layers - 1e-9:
                options.append(_Option(kind, first_node, last_node, core))
                if first_only:
                    return evaluation
        # First and last stage on one node: every (first, last) pair of its devices.
        pair_rest = total[:, None, None] - mid[:, :, None] - mid[:, None, :]
        distinct = (slots[:, None] != slots[None, :])[None, :, :]
        first_ok = (first >= 1)[:, :, None]
        last_ok = (last >= 1)[:, None, :] & distinct
        evaluation.single = np.where(
            first_ok & last_ok, pair_rest + first[:, :, None] + last[:, None, :], -np.inf
        )
        if self.min_nodes <= 1:
            best = evaluation.single.reshape(self.n_nodes, -1).max(axis=1)
            node = int(np.argmax(best))
            if best[node] >= n_layers - 1e-9:
                options.append(_Option("single", node, node, 2))
                if first_only:
                    return evaluation
        evaluation.together_exit = np.where(
            (first_exit >= 1)[:, :, None] & last_ok,
            pair_rest + first_exit[:, :, None] + last[:, None, :],
            -np.inf,
        )
        f_slot = slots[None, :, None]
        l_slot = slots[None, None, :]
        e0 = exit0[:, None, None]
        e1 = exit1[:, None, None]
        third = np.where(
            (e0 != f_slot) & (e0 != l_slot),
            loss0[:, None, None],
            np.where((e1 != f_slot) & (e1 != l_slot), loss1[:, None, None], loss2[:, None, None]),
        )
        evaluation.together_other = np.where(
            first_ok & last_ok & np.isfinite(third), evaluation.single - third, -np.inf
        )
        others = np.where(in_plain, plain_nodes - 1, plain_nodes)
        for kind, grid, core in (
            ("together_exit", evaluation.together_exit, 2 + needed - 1),
            ("together_other", evaluation.together_other, 3 + needed - 1),
        ):
            if core > n_layers:
                continue
            best = grid.reshape(self.n_nodes, -1).max(axis=1)
            totals = np.where(others + 1 >= needed, plain_sum - plain + best, -np.inf)
            node = int(np.argmax(totals))
            if totals[node] >= n_layers - 1e-9:
                options.append(_Option(kind, node, node, core))
                if first_only:
                    return evaluation
        return evaluation

    def build(self, evaluation: _Evaluation, option: _Option) -> list[tuple[int, int]]:
        """(candidate index, layers) in ring order for ``option`` at the evaluation's
        threshold: every device the option counts, then the slowest left out while the rest
        still hold every layer, then layers to the fastest first."""
        n_layers = self.n_layers
        index = self.index
        if option.kind == "solo":
            flat = int(np.argmin(self.alone))
            return [(int(index.flat[flat]), n_layers)]
        mid, mid_exit, first, first_exit, last, last_exit = evaluation.caps
        exit_order = evaluation.exit_order
        width = self.width

        # Members per node: (slot, role, exit, capacity).
        members: dict[int, list[tuple[int, int, bool, int]]] = {}

        def fill_node(node: int, fixed: Mapping[int, tuple[int, bool, int]]) -> None:
            entries: list[tuple[int, int, bool, int]] = []
            for slot in range(width):
                if slot in fixed:
                    role, is_exit, capacity = fixed[slot]
                    entries.append((slot, role, is_exit, capacity))
                elif mid[node, slot] >= 1:
                    entries.append((slot, _ROLE_MIDDLE, False, int(mid[node, slot])))
            members[node] = entries

        def pair(grid: FloatArray, node: int) -> tuple[int, int]:
            flat = int(np.argmax(grid[node]))
            return flat // width, flat % width

        x, y = option.first_node, option.last_node
        kind = option.kind
        if kind == "single":
            first_slot, last_slot = pair(evaluation.single, x)
            fill_node(
                x,
                {
                    first_slot: (_ROLE_FIRST, False, int(first[x, first_slot])),
                    last_slot: (_ROLE_LAST, False, int(last[x, last_slot])),
                },
            )
        elif kind == "together_exit":
            first_slot, last_slot = pair(evaluation.together_exit, x)
            fill_node(
                x,
                {
                    first_slot: (_ROLE_FIRST, True, int(first_exit[x, first_slot])),
                    last_slot: (_ROLE_LAST, False, int(last[x, last_slot])),
                },
            )
        elif kind == "together_other":
            first_slot, last_slot = pair(evaluation.together_other, x)
            exit_slot = next(int(s) for s in exit_order[x, :3] if s not in (first_slot, last_slot))
            fill_node(
                x,
                {
                    first_slot: (_ROLE_FIRST, False, int(first[x, first_slot])),
                    last_slot: (_ROLE_LAST, False, int(last[x, last_slot])),
                    exit_slot: (_ROLE_MIDDLE, True, int(mid_exit[x, exit_slot])),
                },
            )
        else:
            last_slot = int(np.argmax(evaluation.last_exit[y]))
            if kind == "apart_with":
                first_slot = int(np.argmax(evaluation.first_with[x]))
                exit_slot = (
                    int(exit_order[x, 0])
                    if int(exit_order[x, 0]) != first_slot
                    else int(exit_order[x, 1])
                )
                fill_node(
                    x,
                    {
                        first_slot: (_ROLE_FIRST, False, int(first[x, first_slot])),
                        exit_slot: (_ROLE_MIDDLE, True, int(mid_exit[x, exit_slot])),
                    },
                )
            else:
                first_slot = int(np.argmax(evaluation.first_alone[x]))
                members[x] = [(first_slot, _ROLE_FIRST, True, int(first_exit[x, first_slot]))]
            fill_node(y, {last_slot: (_ROLE_LAST, True, int(last_exit[y, last_slot]))})
        if kind != "single":
            for node in range(self.n_nodes):
                if node in (x, y) or not evaluation.in_plain[node]:
                    continue
                e = int(exit_order[node, 0])
                fill_node(node, {e: (_ROLE_MIDDLE, True, int(mid_exit[node, e]))})
        self._shrink(members, x, y, kind != "single")
        counts = self._distribute(members)
        return self._ring(members, counts, x, y, kind)

    def _shrink(
        self, members: dict[int, list[tuple[int, int, bool, int]]], x: int, y: int, multi: bool
    ) -> None:
        """Leave out the slowest devices while the others still hold every layer (and at
        most one stage per layer remains): a node's exit only with its last device, and
        nodes only while ``min_nodes`` (and two) remain."""
        layer_ms = self.layer_ms
        capacity = sum(entry[3] for entries in members.values() for entry in entries)
        changed = True
        while changed:
            changed = False
            removable = [
                (node, entry)
                for node, entries in members.items()
                for entry in entries
                if entry[1] == _ROLE_MIDDLE
                and (not entry[2] or (node not in (x, y) and len(entries) == 1))
            ]
            removable.sort(
                key=lambda item: (
                    -layer_ms[item[0], item[1][0]],
                    -self.base[_MID_LOCAL, item[0], item[1][0]],
                    -int(self.index[item[0], item[1][0]]),
                )
            )
            for node, entry in removable:
                entries = members[node]
                if entry not in entries or capacity - entry[3] < self.n_layers:
                    continue
                if entry[2]:
                    if len(entries) != 1 or not multi or len(members) <= self.needed_nodes:
                        continue
                    del members[node]
                else:
                    entries.remove(entry)
                capacity -= entry[3]
                changed = True

    def _distribute(
        self, members: Mapping[int, list[tuple[int, int, bool, int]]]
    ) -> dict[tuple[int, int], int]:
        """One layer each, the rest to the fastest devices up to their capacity (the least
        latency for these devices); among devices equally fast, each next layer to the one
        whose stage plus hop stays the shortest (the latency does not change, the stages
        even out)."""
        counts = {(node, entry[0]): 1 for node, entries in members.items() for entry in entries}
        remaining = self.n_layers - len(counts)
        if remaining < 0:
            raise AssertionError("throughput search kept more stages than layers")
        by_speed: dict[float, list[tuple[int, int, int, float]]] = {}
        for node, entries in members.items():
            for slot, role, is_exit, capacity in entries:
                variant = 2 * role + int(is_exit)
                by_speed.setdefault(float(self.layer_ms[node, slot]), []).append(
                    (node, slot, capacity, float(self.base[variant, node, slot]))
                )
        for speed in sorted(by_speed):
            group = by_speed[speed]
            while remaining:
                open_slots = [item for item in group if counts[(item[0], item[1])] < item[2]]
                if not open_slots:
                    break
                node, slot, _capacity, _base = min(
                    open_slots,
                    key=lambda item: (
                        item[3] + (counts[(item[0], item[1])] + 1) * speed,
                        int(self.index[item[0], item[1]]),
                    ),
                )
                counts[(node, slot)] += 1
                remaining -= 1
        if remaining:
            raise AssertionError("throughput search lost capacity")
        return counts

    def _ring(
        self,
        members: Mapping[int, list[tuple[int, int, bool, int]]],
        counts: Mapping[tuple[int, int], int],
        x: int,
        y: int,
        kind: str,
    ) -> list[tuple[int, int]]:
        """Ring order: every node's devices in one block that ends with its exit; the first
        stage first and the last stage last."""

        def of(node: int, role: int | None = None, is_exit: bool | None = None) -> list[int]:
            return [
                entry[0]
                for entry in members.get(node, [])
                if (role is None or entry[1] == role) and (is_exit is None or entry[2] == is_exit)
            ]

        def plain_middles(node: int) -> list[int]:
            return [
                entry[0]
                for entry in members.get(node, [])
                if entry[1] == _ROLE_MIDDLE and not entry[2]
            ]

        first = of(x, _ROLE_FIRST)
        last = of(y, _ROLE_LAST)
        exits_x = of(x, _ROLE_MIDDLE, True)
        plain_nodes = [node for node in sorted(members) if node not in (x, y)]
        plain_block = [
            (node, slot)
            for node in plain_nodes
            for slot in [*plain_middles(node), *of(node, _ROLE_MIDDLE, True)]
        ]
        order: list[tuple[int, int]] = [(x, first[0])]
        if kind == "single":
            order += [(x, slot) for slot in plain_middles(x)]
        elif kind == "together_exit":
            order += plain_block + [(x, slot) for slot in plain_middles(x)]
        elif kind == "together_other":
            order += [(x, slot) for slot in plain_middles(x)] + [(x, exits_x[0])] + plain_block
        else:
            order += [(x, slot) for slot in plain_middles(x)] + [(x, slot) for slot in exits_x]
            order += plain_block + [(y, slot) for slot in plain_middles(y)]
        order.append((y, last[0]))
        return [(int(self.index[node, slot]), counts[(node, slot)]) for node, slot in order]


def _best_pair(
    first_gain: FloatArray, last_gain: FloatArray, in_plain: NDArray[np.bool_], need: int
) -> tuple[float, int, int]:
    """The largest ``first_gain[x] + last_gain[y]`` over nodes ``x ≠ y`` where at least
    ``need`` of the two are outside ``in_plain`` (they add a node to the placement)."""
    if need <= 0:
        classes = [(None, None)]
    else:
        classes = [
            (first_inside, last_inside)
            for first_inside in (True, False)
            for last_inside in (True, False)
            if (not first_inside) + (not last_inside) >= need
        ]
    best = (-math.inf, -1, -1)
    for first_inside, last_inside in classes:
        a = (
            first_gain
            if first_inside is None
            else np.where(in_plain == first_inside, first_gain, -np.inf)
        )
        b = (
            last_gain
            if last_inside is None
            else np.where(in_plain == last_inside, last_gain, -np.inf)
        )
        top_a = int(np.argmax(a))
        top_b = int(np.argmax(b))
        if top_a != top_b:
            value, pair = float(a[top_a] + b[top_b]), (top_a, top_b)
        else:
            second_a = a.copy()
            second_a[top_a] = -np.inf
            second_b = b.copy()
            second_b[top_b] = -np.inf
            next_a = int(np.argmax(second_a))
            next_b = int(np.argmax(second_b))
            with_b = float(a[top_a] + second_b[next_b])
            with_a = float(second_a[next_a] + b[top_b])
            value, pair = (
                (with_b, (top_a, next_b)) if with_b >= with_a else (with_a, (next_a, top_b))
            )
        if value > best[0]:
            best = (value, pair[0], pair[1])
    return best


def balance_equal_stages(
    stages: Sequence[StagePlan], cost_model: CostModel, margin: float = EVEN_SPLIT_MARGIN
) -> list[StagePlan]:
    """Among stages on equal devices (same model, memory, bandwidth and calibration, whatever
    their live condition), spread their layers as evenly as memory allows, unless the
    uneven split is predicted more than ``margin`` faster. Between
    devices whose condition is the same the prediction does not change at all; between
    devices a momentary reading sets apart (a utilisation blip), this keeps noise from
    deciding a 15 / 1 / 14 split, and no stage is left holding one layer while an equal
    device holds the rest."""
    counts = [stage.n_layers for stage in stages]
    groups: dict[tuple[str, str, int, float, float], list[int]] = {}
    for position, stage in enumerate(stages):
        groups.setdefault(stage.device.static_identity, []).append(position)
    last = len(stages) - 1
    for positions in groups.values():
        if len(positions) < 2:
            continue
        total = sum(counts[position] for position in positions)
        caps = {
            position: cost_model.max_layers(
                stages[position].device, position == 0, position == last
            )
            for position in positions
        }
        share = dict.fromkeys(positions, 1)
        remaining = total - len(positions)
        while remaining > 0:
            open_positions = [p for p in positions if share[p] < caps[p]]
            if not open_positions:
                return list(stages)
            target = min(open_positions, key=lambda p: (share[p], p))
            share[target] += 1
            remaining -= 1
        for position in positions:
            counts[position] = share[position]
    balanced = [
        StagePlan(device=stage.device, n_layers=count)
        for stage, count in zip(stages, counts, strict=True)
    ]
    if balanced == list(stages) or cost_model.violations(balanced):
        return list(stages)
    before = cost_model.predict_ms_per_token(stages)
    if cost_model.predict_ms_per_token(balanced) > before * (1 + margin) + 1e-12:
        return list(stages)
    return balanced
