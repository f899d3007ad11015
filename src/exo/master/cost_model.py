"""The placement cost model: devices, links, memory fit and predicted time.

Pure values in, values out. ``placement.py`` builds :class:`PlacementDevice` values from the
cluster state and makes the decision; ``placement_csp.py`` searches for the placement this
model predicts fastest. Every rule about what a device can hold or how fast it is lives
here, once. docs/placement.md gives each term's basis and the measured numbers.

Time per generated token (decode), for a pipeline of stages::

    Σ_stages  calibration × (host_stage + n_layers × layer + row + head)
  + Σ_hops    latency + hidden_state_bytes / link_bandwidth           (ring closure included)

    layer = max(host_layer, layer_read)      GPU backends: launches run ahead of the device
          = host_layer / condition + layer_read     CPU backend: one thread does both
    layer_read = (layer_bytes + KV cache of one layer at the request's context) / bandwidth_eff
    row, head  = one embedding row (first stage), the whole LM head (last stage) / bandwidth_eff
    bandwidth_eff = peak bandwidth × condition factor (heat, battery, foreign load)

Time to first token adds the prompt's compute: 2 FLOPs per parameter per prompt token over
the device's fp16 TFLOPS, per stage, plus the same hops.

Memory a stage needs: its weights (the embedding on the first stage, the LM head — or the
tied embedding — on the last) plus the KV cache of its layers for the whole context. A
device offers its free memory, capped by Apple's wired-memory limit where reported, less a
fixed reserve for its backend.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from exo.shared.types.gpu import UNKNOWN_TEMPERATURE_C, PeerLinkKind
from exo.shared.types.ids import DeviceId, NodeId
from exo.shared.types.memory import GIB, MIB
from exo.shared.types.models import ModelCard

DeviceKey = tuple[NodeId, DeviceId]


class PlacementDevice(BaseModel):
    """One candidate device: static facts joined with its (smoothed) live reading."""

    model_config = ConfigDict(frozen=True)

    node_id: NodeId
    device_id: DeviceId
    name: str
    vendor: str
    backend: str
    memory_total_bytes: int = Field(ge=0)
    memory_free_bytes: int = Field(ge=0)
    memory_bandwidth_gbps: float = Field(gt=0)
    peak_tflops_fp16: float = Field(ge=0)
    utilization_percent: float = Field(default=0.0, ge=0, le=100)
    """Load from others' work (smoothed); our own runners' load is not counted."""
    temperature_c: float = UNKNOWN_TEMPERATURE_C
    throttle_threshold_c: float = 100.0
    is_thermal_throttling: bool = False
    battery_percent: float = Field(default=100.0, ge=0, le=100)
    is_plugged_in: bool = True
    is_cpu_fallback: bool = False
    """True for a node without GPU state that offers its CPU and RAM."""
    has_static_info: bool = True
    """False when the node has not reported the device's static facts (name, bandwidth…)."""
    max_working_set_bytes: int | None = Field(default=None, ge=0)
    """Apple's wired-memory limit (MLX's recommended working set); None when not reported."""
    peer_links: dict[DeviceId, PeerLinkKind] = Field(default_factory=dict)
    """How this device reaches the other GPUs of its node (NVML's topology)."""
    calibration_factor: float = Field(default=1.0, gt=0)
    """Measured stage time over predicted stage time on this device (1.0: not measured)."""
    cpu_cores: int = Field(default=0, ge=0)
    """Cores of a CPU device (0: unknown); MLX's CPU backend computes on one of them."""

    @property
    def key(self) -> DeviceKey:
        return (self.node_id, self.device_id)

    @property
    def label(self) -> str:
        return f"{self.node_id}/{self.device_id} ({self.name})"

    @property
    def temperature_known(self) -> bool:
        return self.temperature_c > UNKNOWN_TEMPERATURE_C

    @property
    def static_identity(self) -> tuple[str, str, int, float, float]:
        """What makes two devices alike regardless of their live condition."""
        return (
            self.backend,
            self.name,
            self.memory_total_bytes,
            self.memory_bandwidth_gbps,
            self.calibration_factor,
        )


class LinkCost(BaseModel):
    model_config = ConfigDict(frozen=True)

    latency_ms: float = Field(ge=0)
    bandwidth_mbps: float = Field(gt=0)


class BackendProfile(BaseModel):
    """What a backend costs beyond bytes and FLOPs: memory it keeps for itself and the host
    time it spends per layer and per pipeline stage for every token."""

    model_config = ConfigDict(frozen=True)

    memory_reserve_bytes: int = Field(ge=0)
    host_ms_per_layer: float = Field(ge=0)
    host_ms_per_stage: float = Field(ge=0)
    compute_efficiency: float = Field(default=0.5, gt=0, le=1)
    """Share of peak fp16 TFLOPS a prompt's matrix products reach."""
    overlaps_host: bool = True
    """Kernel launches run ahead of the device, so a layer costs max(host, reads); False
    where one thread does both (the CPU backend): host + reads."""


BACKEND_PROFILES: dict[str, BackendProfile] = {
    # MLX CUDA on an H100, bundled 135M model, one stage: 8.2 ms/token for 30 layers with
    # the GPU 1.6 % busy — the time is the host launching kernels (bench/inference.py).
    "cuda": BackendProfile(
        memory_reserve_bytes=1 * GIB, host_ms_per_layer=0.25, host_ms_per_stage=0.6
    ),
    # Not measured yet (no Apple machine here): CUDA's measured figures, so that neither
    # GPU backend wins on an assumption; calibration replaces them on the first request.
    "metal": BackendProfile(
        memory_reserve_bytes=1 * GIB, host_ms_per_layer=0.25, host_ms_per_stage=0.6
    ),
    # MLX's CPU backend on this project's 2-core CI machine: about 140 ms/token for the
    # bundled model's 30 layers on one stage (single-threaded; bench/calibration.py).
    "cpu": BackendProfile(
        memory_reserve_bytes=2 * GIB,
        host_ms_per_layer=4.5,
        host_ms_per_stage=2.0,
        compute_efficiency=0.2,
        overlaps_host=False,
    ),
    # Simulated GPUs model the GPU their file describes; calibration corrects them to the
    # CPU their runners really use.
    "simulated": BackendProfile(
        memory_reserve_bytes=256 * MIB, host_ms_per_layer=0.25, host_ms_per_stage=0.6
    ),
}
UNKNOWN_BACKEND = "cpu"


PEER_LINKS: dict[PeerLinkKind, LinkCost] = {
    "nvlink": LinkCost(latency_ms=0.01, bandwidth_mbps=2_400_000.0),
    "pcie_p2p": LinkCost(latency_ms=0.02, bandwidth_mbps=200_000.0),
    "pcie_host": LinkCost(latency_ms=0.05, bandwidth_mbps=100_000.0),
}
"""Hops between two GPUs of one node by NVML's topology (NVLink ~300 GB/s, PCIe 4 x16 peer
reads ~25 GB/s, through host memory with an extra copy). A pair without topology (CPU, Apple,
a node that did not report it) counts as ``pcie_host``."""


class CostModelConfig(BaseModel):
    """Every constant of the cost model, with its default. Documented in docs/placement.md."""

    model_config = ConfigDict(frozen=True)

    context_tokens: int = Field(default=2048, gt=0)
    """Tokens in the KV cache a generated token reads (a typical chat: a prompt of a few
    hundred tokens growing towards 2k); capped by the model's context length."""
    prompt_tokens: int = Field(default=512, gt=0)
    """Prompt length for the predicted time to first token."""
    throttling_factor: float = Field(default=0.5, gt=0, le=1)
    """Speed of a device that throttles or is past its throttle threshold (clocks halve)."""
    near_threshold_margin_c: float = Field(default=5.0, ge=0)
    near_threshold_factor: float = Field(default=0.8, gt=0, le=1)
    """Speed within ``near_threshold_margin_c`` of the threshold (it will throttle soon)."""
    on_battery_factor: float = Field(default=0.8, gt=0, le=1)
    """Speed charged to an unplugged device (laptops cap power on battery)."""
    low_battery_percent: float = Field(default=20.0, ge=0, le=100)
    low_battery_factor: float = Field(default=0.25, gt=0, le=1)
    """Speed charged to an unplugged device below ``low_battery_percent``: used only when
    it still wins by four times over the alternative."""
    min_share: float = Field(default=0.05, gt=0, le=1)
    """The least share of a device a placement counts on when others load it fully."""
    local_link: LinkCost = PEER_LINKS["pcie_host"]
    """Between two devices of one node without topology."""
    default_link: LinkCost = LinkCost(latency_ms=1.0, bandwidth_mbps=1_000.0)
    """Between two nodes when no measurement exists (a plain gigabit LAN)."""
    backends: dict[str, BackendProfile] = Field(default_factory=lambda: dict(BACKEND_PROFILES))

    def profile(self, backend: str) -> BackendProfile:
        return self.backends.get(backend, self.backends[UNKNOWN_BACKEND])


class StagePlan(BaseModel):
    """One pipeline stage before it becomes a Shard: a device and how many layers it runs."""

    model_config = ConfigDict(frozen=True)

    device: PlacementDevice
    n_layers: int = Field(ge=1)


# --- conditions ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class DeviceCondition:
    """A device's live condition as the cost model sees it, with the speed it leaves (a
    plain value: the solver asks for it thousands of times per decision)."""

    hot: bool
    """Thermally throttling, or at or past its throttle threshold."""
    near_threshold: bool
    on_battery: bool
    low_battery: bool
    busy: bool
    """Others leave us at most half of it."""
    speed_factor: float

    @property
    def notes(self) -> list[str]:
        notes: list[str] = []
        if self.hot:
            notes.append("throttling")
        elif self.near_threshold:
            notes.append("near its throttle threshold")
        if self.low_battery:
            notes.append("on low battery")
        elif self.on_battery:
            notes.append("on battery")
        if self.busy:
            notes.append("busy")
        return notes


BUSY_SHARE = 0.5
"""A device whose available share is at most this is *busy* (a GPU others use ≥ 50 %)."""


def device_condition(device: PlacementDevice, config: CostModelConfig) -> DeviceCondition:
    """The one place heat, battery and load are judged. Each is a cost, never an exclusion:
    heat and battery scale the device's speed by their factor, and others' load leaves us
    the :func:`available_share`."""
    temperature_known = device.temperature_known
    hot = device.is_thermal_throttling or (
        temperature_known and device.temperature_c >= device.throttle_threshold_c
    )
    near = (
        not hot
        and temperature_known
        and device.temperature_c >= device.throttle_threshold_c - config.near_threshold_margin_c
    )
    on_battery = not device.is_plugged_in
    low_battery = on_battery and device.battery_percent < config.low_battery_percent
    factor = 1.0
    if hot:
        factor *= config.throttling_factor
    elif near:
        factor *= config.near_threshold_factor
    if low_battery:
        factor *= config.low_battery_factor
    elif on_battery:
        factor *= config.on_battery_factor
    share = available_share(device, config)
    return DeviceCondition(
        hot=hot,
        near_threshold=near,
        on_battery=on_battery,
        low_battery=low_battery,
        busy=share <= BUSY_SHARE,
        speed_factor=factor * share,
    )


def available_share(device: PlacementDevice, config: CostModelConfig) -> float:
    """The share of the device our work gets beside others' load (utilisation u).

    A GPU is time-sliced between the processes using it: 1 − u. MLX's CPU backend runs one
    thread, and a CPU with c cores at utilisation u already runs about u × c busy threads,
    so the scheduler gives ours min(1, c / (u × c + 1)): a 16-core machine at 50 % still
    has a core free (1), a 2-core one at 100 % shares two cores among three threads (2/3).
    Never below ``min_share``."""
    utilisation = device.utilization_percent / 100.0
    if device.backend == "cpu":
        cores = max(1, device.cpu_cores)
        share = min(1.0, cores / (utilisation * cores + 1.0))
    else:
        share = 1.0 - utilisation
    return max(config.min_share, share)


def usable_bytes(device: PlacementDevice, config: CostModelConfig) -> int:
    """Free memory, capped by the wired-memory limit where reported, less the backend's
    fixed reserve."""
    free = device.memory_free_bytes
    if device.max_working_set_bytes is not None:
        free = min(free, device.max_working_set_bytes)
    return max(0, free - config.profile(device.backend).memory_reserve_bytes)


def effective_bandwidth_gbps(device: PlacementDevice, config: CostModelConfig) -> float:
    """Peak memory bandwidth × the condition's speed factor."""
    return device.memory_bandwidth_gbps * device_condition(device, config).speed_factor


def link_ms(link: LinkCost, n_bytes: float) -> float:
    """Time to send ``n_bytes`` over ``link``: its latency plus bits over bandwidth."""
    return link.latency_ms + n_bytes * 8 / (link.bandwidth_mbps * 1e3)


def node_link(
    links: Mapping[NodeId, Mapping[NodeId, LinkCost]],
    source: NodeId,
    destination: NodeId,
    config: CostModelConfig,
) -> LinkCost:
    """The link between two nodes: measured, else the default LAN; within a node, the local
    link without topology."""
    if source == destination:
        return config.local_link
    return links.get(source, {}).get(destination, config.default_link)


class StageTime(BaseModel):
    """A stage's predicted time per generated token, by term (ms)."""

    model_config = ConfigDict(frozen=True)

    weights_ms: float
    kv_cache_ms: float
    host_ms: float
    """Host time the device's reads do not hide."""
    calibration_factor: float

    @property
    def uncalibrated_ms(self) -> float:
        """Without calibration: what the model alone predicts."""
        return self.weights_ms + self.kv_cache_ms + self.host_ms

    @property
    def total_ms(self) -> float:
        return self.uncalibrated_ms * self.calibration_factor


class CostModel(BaseModel):
    """Predicted time and memory fit of a placement; the one model greedy, the solver, the
    scores and the decision all use."""

    model_config = ConfigDict(frozen=True)

    model_card: ModelCard
    config: CostModelConfig = CostModelConfig()
    links: dict[NodeId, dict[NodeId, LinkCost]] = Field(default_factory=dict)
    """Measured links, source node -> destination node."""

    # --- bytes held --------------------------------------------------------------------------
    @property
    def embedding_bytes(self) -> int:
        """The token embedding (half the non-layer bytes for a card that does not say)."""
        card = self.model_card
        return card.embedding_bytes or card.non_layer_bytes // 2

    @property
    def head_bytes(self) -> int:
        """The LM head the last stage reads for every token: its own matrix, or the
        embedding when tied; a card that does not say: the other half of the non-layer bytes."""
        card = self.model_card
        if card.embedding_bytes == 0:
            return card.non_layer_bytes - card.non_layer_bytes // 2
        if card.tied_embeddings:
            return card.embedding_bytes
        return card.lm_head_bytes

    @property
    def first_extra_bytes(self) -> int:
        """Held by the first stage: the embedding."""
        return self.embedding_bytes

    @property
    def last_extra_bytes(self) -> int:
        """Held by the last stage: every non-layer byte but the embedding (the final norm and
        the LM head), and with a tied head the embedding again (unless the last stage is
        also the first)."""
        card = self.model_card
        rest = max(0, card.non_layer_bytes - self.embedding_bytes)
        tied = card.tied_embeddings and card.embedding_bytes > 0
        return rest + (self.embedding_bytes if tied else 0)

    def stage_bytes(self, n_layers: int, is_first: bool, is_last: bool) -> int:
        """Weights a stage holds."""
        extras = (self.first_extra_bytes if is_first else 0) + (
            self.last_extra_bytes if is_last else 0
        )
        if (
            is_first
            and is_last
            and self.model_card.tied_embeddings
            and self.model_card.embedding_bytes
        ):
            extras -= self.embedding_bytes  # one copy serves both ends
        return n_layers * self.model_card.layer_bytes + extras

    def kv_cache_bytes(self, n_layers: int) -> int:
        """KV cache of ``n_layers`` layers for the model's whole context."""
        card = self.model_card
        total = card.context_length * card.kv_cache_bytes_per_token
        return -(-total * n_layers // card.n_layers)

    def memory_needed(self, n_layers: int, is_first: bool, is_last: bool) -> int:
        """Bytes a stage occupies: its weights plus the KV cache for the whole context."""
        return self.stage_bytes(n_layers, is_first, is_last) + self.kv_cache_bytes(n_layers)

    def usable_bytes(self, device: PlacementDevice) -> int:
        return usable_bytes(device, self.config)

    def fits(self, device: PlacementDevice, n_layers: int, is_first: bool, is_last: bool) -> bool:
        return self.memory_needed(n_layers, is_first, is_last) <= self.usable_bytes(device)

    def max_layers(self, device: PlacementDevice, is_first: bool, is_last: bool) -> int:
        """The most layers ``device`` can hold in this role (0 when not even one fits)."""
        card = self.model_card
        usable = self.usable_bytes(device)
        extras = self.stage_bytes(0, is_first, is_last)
        per_layer = card.layer_bytes + card.context_length * card.kv_cache_bytes_per_token / (
            card.n_layers
        )
        estimate = max(0, min(card.n_layers, int((usable - extras) // per_layer)))
        while estimate > 0 and not self.fits(device, estimate, is_first, is_last):
            estimate -= 1
        while estimate < card.n_layers and self.fits(device, estimate + 1, is_first, is_last):
            estimate += 1
        return estimate

    # --- bytes read per token ------------------------------------------------------------------
    @property
    def context_tokens(self) -> int:
        return min(self.config.context_tokens, self.model_card.context_length)

    @property
    def kv_read_bytes_per_layer(self) -> float:
        """KV cache one layer reads per generated token at the request's context."""
        card = self.model_card
        return card.kv_cache_bytes_per_token / card.n_layers * self.context_tokens

    @property
    def embedding_row_bytes(self) -> float:
        """A token reads one row of the embedding."""
        card = self.model_card
        if card.vocab_size > 0:
            return self.embedding_bytes / card.vocab_size
        return float(card.hop_bytes_per_token)

    # --- time ----------------------------------------------------------------------------------
    def condition(self, device: PlacementDevice) -> DeviceCondition:
        return device_condition(device, self.config)

    def effective_bandwidth_gbps(self, device: PlacementDevice) -> float:
        return effective_bandwidth_gbps(device, self.config)

    def ms_for_bytes(self, device: PlacementDevice, n_bytes: float) -> float:
        """Time to stream ``n_bytes`` from device memory: bytes / (GB/s) in ms."""
        return n_bytes / (self.effective_bandwidth_gbps(device) * 1e6)

    def _host_speed(self, device: PlacementDevice) -> float:
        """The host work of a backend that runs on the device itself (the CPU backend) is
        slowed by the device's condition; a GPU's host work runs on the CPU beside it."""
        profile = self.config.profile(device.backend)
        return 1.0 if profile.overlaps_host else self.condition(device).speed_factor

    def _layer_read_ms(self, device: PlacementDevice) -> float:
        return self.ms_for_bytes(device, self.model_card.layer_bytes + self.kv_read_bytes_per_layer)

    def visible_host_ms_per_layer(self, device: PlacementDevice) -> float:
        """Host time per layer that the device's reads do not hide: all of it on the CPU
        backend (one thread does both), the excess over the layer's reads on a GPU (kernel
        launches run ahead of the device while it reads)."""
        profile = self.config.profile(device.backend)
        host = profile.host_ms_per_layer / self._host_speed(device)
        if profile.overlaps_host:
            return max(0.0, host - self._layer_read_ms(device))
        return host

    def layer_ms(self, device: PlacementDevice) -> float:
        """One more layer on ``device``: its weights and KV cache, and the host time they do
        not hide (calibrated). On a GPU this is max(host, reads)."""
        visible = self.visible_host_ms_per_layer(device)
        return (self._layer_read_ms(device) + visible) * device.calibration_factor

    def first_extra_ms(self, device: PlacementDevice) -> float:
        return self.ms_for_bytes(device, self.embedding_row_bytes) * device.calibration_factor

    def last_extra_ms(self, device: PlacementDevice) -> float:
        return self.ms_for_bytes(device, self.head_bytes) * device.calibration_factor

    def _stage_host_ms(self, device: PlacementDevice) -> float:
        """A stage's own host time per token, whatever its layers (uncalibrated)."""
        profile = self.config.profile(device.backend)
        return profile.host_ms_per_stage / self._host_speed(device)

    def stage_fixed_ms(self, device: PlacementDevice) -> float:
        """A stage's own host time per token, whatever its layers (calibrated)."""
        return self._stage_host_ms(device) * device.calibration_factor

    def stage_time(
        self, device: PlacementDevice, n_layers: int, is_first: bool, is_last: bool
    ) -> StageTime:
        card = self.model_card
        weights = n_layers * card.layer_bytes
        weights += self.embedding_row_bytes if is_first else 0.0
        weights += self.head_bytes if is_last else 0.0
        return StageTime(
            weights_ms=self.ms_for_bytes(device, weights),
            kv_cache_ms=self.ms_for_bytes(device, n_layers * self.kv_read_bytes_per_layer),
            host_ms=self._stage_host_ms(device) + n_layers * self.visible_host_ms_per_layer(device),
            calibration_factor=device.calibration_factor,
        )

    def base_stage_ms(
        self, device: PlacementDevice, n_layers: int, is_first: bool, is_last: bool
    ) -> float:
        """The model alone: the stage on the device in ideal condition (cool, plugged in,
        unloaded) and uncalibrated. Calibration compares measurements with this, so what
        the device's condition and everything the model leaves out cost is learned."""
        ideal = device.model_copy(
            update={
                "utilization_percent": 0.0,
                "is_thermal_throttling": False,
                "temperature_c": UNKNOWN_TEMPERATURE_C,
                "is_plugged_in": True,
                "calibration_factor": 1.0,
            }
        )
        return self.stage_ms(ideal, n_layers, is_first, is_last)

    def stage_ms(
        self, device: PlacementDevice, n_layers: int, is_first: bool, is_last: bool
    ) -> float:
        return self.stage_time(device, n_layers, is_first, is_last).total_ms

    def link(self, source: PlacementDevice, destination: PlacementDevice) -> LinkCost:
        """Between two devices: by NVML's topology within a node where reported."""
        if source.node_id == destination.node_id:
            kind = source.peer_links.get(destination.device_id)
            if kind is not None:
                return PEER_LINKS[kind]
        return node_link(self.links, source.node_id, destination.node_id, self.config)

    def node_link_ms(self, source: NodeId, destination: NodeId) -> float:
        """A hidden state from one node to another (the local link without topology when
        they are the same node)."""
        link = node_link(self.links, source, destination, self.config)
        return link_ms(link, self.model_card.hop_bytes_per_token)

    def hop_ms(self, source: PlacementDevice, destination: PlacementDevice) -> float:
        return link_ms(self.link(source, destination), self.model_card.hop_bytes_per_token)

    def cheapest_local_hop_ms(self, devices: Sequence[PlacementDevice]) -> float:
        """The cheapest hop between two devices of one node among ``devices``."""
        kinds: set[PeerLinkKind] = {k for device in devices for k in device.peer_links.values()}
        links = [self.config.local_link, *(PEER_LINKS[kind] for kind in kinds)]
        return min(link_ms(link, self.model_card.hop_bytes_per_token) for link in links)

    def predict_ms_per_token(self, stages: Sequence[StagePlan]) -> float:
        """Latency: Σ stage times + Σ hops between consecutive stages, ring closure included."""
        total = sum(self.stage_times_ms(stages))
        return total + sum(self.hop_times_ms(stages))

    def stage_times_ms(self, stages: Sequence[StagePlan]) -> list[float]:
        last = len(stages) - 1
        return [
            self.stage_ms(stage.device, stage.n_layers, index == 0, index == last)
            for index, stage in enumerate(stages)
        ]

    def hop_times_ms(self, stages: Sequence[StagePlan]) -> list[float]:
        """The hop out of each stage (to the next, the last back to the first); none alone."""
        if len(stages) < 2:
            return [0.0] * len(stages)
        return [
            self.hop_ms(stage.device, stages[(index + 1) % len(stages)].device)
            for index, stage in enumerate(stages)
        ]

    def predict_bottleneck_ms(self, stages: Sequence[StagePlan]) -> float:
        """Throughput: with requests in flight on every stage, a token leaves the pipeline
        every slowest (stage + its outgoing hop) time."""
        times = zip(self.stage_times_ms(stages), self.hop_times_ms(stages), strict=True)
        return max((stage + hop for stage, hop in times), default=0.0)

    def predict_time_to_first_token_ms(self, stages: Sequence[StagePlan]) -> float:
        """The prompt's compute (2 FLOPs per parameter per prompt token at the backend's
        share of peak fp16), the first generated token's decode, and the hops."""
        card = self.model_card
        prompt = self.config.prompt_tokens
        parameters_per_layer = card.parameters_per_layer or card.layer_bytes // 2
        head_parameters = card.vocab_size * card.hidden_size
        total = self.predict_ms_per_token(stages)
        last = len(stages) - 1
        for index, stage in enumerate(stages):
            device = stage.device
            profile = self.config.profile(device.backend)
            flops = 2.0 * prompt * stage.n_layers * parameters_per_layer
            if index == last:
                flops += 2.0 * head_parameters  # logits for the last prompt token only
            tflops = max(device.peak_tflops_fp16, 1e-3) * profile.compute_efficiency
            speed = self.condition(device).speed_factor
            total += flops / (tflops * 1e9 * speed) * device.calibration_factor
        hop_bytes = card.hop_bytes_per_token * prompt
        for index, stage in enumerate(stages[:-1]):
            total += link_ms(self.link(stage.device, stages[index + 1].device), hop_bytes)
        return total

    def violations(self, stages: Sequence[StagePlan], min_nodes: int = 1) -> list[str]:
        """Every hard constraint ``stages`` breaks (empty when the placement is valid)."""
        problems: list[str] = []
        placed = sum(stage.n_layers for stage in stages)
        if placed != self.model_card.n_layers:
            problems.append(f"{placed} layers placed, the model has {self.model_card.n_layers}")
        keys = [stage.device.key for stage in stages]
        if len(set(keys)) != len(keys):
            problems.append("a device appears in more than one stage")
        last_index = len(stages) - 1
        for index, stage in enumerate(stages):
            if stage.n_layers < 1:
                problems.append(f"{stage.device.label} has no layers")
            if not self.fits(stage.device, stage.n_layers, index == 0, index == last_index):
                problems.append(f"{stage.device.label} cannot hold {stage.n_layers} layers")
        if len({stage.device.node_id for stage in stages}) < min_nodes:
            problems.append(f"fewer than {min_nodes} nodes used")
        return problems
