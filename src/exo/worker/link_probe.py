"""Measuring the links between this node and its peers over the transport.

Every ``interval_s`` (default 60 s), and never while a runner of this node is loading or
running a model, the worker sends up to ``peers_per_round`` live peers (those not measured
yet first, then the longest ago) a few small queries (round-trip latency, median) and one
large one (throughput), and emits ``GPUBandwidthMeasured`` when the link's value (the
median of its last 3 measurements) moved meaningfully since the last report (or none was
made): by a factor of 1.5 either way (and, for latency, by 1 ms too). Finer changes are
noise on a busy machine: with a 20 % threshold, 34 of the 64 measurements a minute at 16
nodes x 16 devices on one machine were reported, each an event every node stores and
acknowledges, and none of them moved a placement. So a node's probing costs the same at 16 nodes as at 4 (a link is measured every
``interval_s x ceil(peers / peers_per_round)``), rather than growing with the cluster: at
16 nodes, every node measuring all 15 peers every minute was 240 MB of probe payload a
minute.
"""

import statistics
import time
from collections import deque
from dataclasses import dataclass

import anyio
from loguru import logger

from exo.routing.context import ClusterContext
from exo.routing.local_events import LocalEventSender
from exo.shared.types.events import GPUBandwidthMeasured
from exo.shared.types.ids import NodeId

NODE_ENDPOINT_DEVICE_ID = "net"
"""The seed's event names endpoints by device id; a node's network endpoint is ``net``."""
BUSY_RUNNER_STATUSES = {"loading", "running"}


@dataclass(frozen=True)
class LinkProbeConfig:
    interval_s: float = 60.0
    first_delay_s: float = 3.0
    latency_samples: int = 5
    throughput_payload_bytes: int = 1 << 20
    peers_per_round: int = 4
    change_factor: float = 1.5
    """A value is news when it grew or shrank by more than this factor since the report."""
    latency_change_floor_ms: float = 1.0
    """Latency must also move by this much to count: sub-millisecond loopback or LAN round
    trips jitter by more than ``change_factor`` on a busy machine."""
    timeout_s: float = 2.0
    history: int = 3
    """A link's value is the median of its last this-many measurements: one probe on a busy
    machine can be off by several times, and each such outlier was an event in the log."""


@dataclass(frozen=True)
class LinkReading:
    latency_ms: float
    bandwidth_mbps: float


def link_changed_meaningfully(
    previous: LinkReading | None,
    current: LinkReading,
    change_factor: float,
    latency_floor_ms: float = 0.0,
) -> bool:
    if previous is None:
        return True

    def moved(old: float, new: float, floor: float = 0.0) -> bool:
        low, high = sorted((old, new))
        return high > change_factor * max(low, 1e-9) and high - low > floor

    return moved(previous.latency_ms, current.latency_ms, latency_floor_ms) or moved(
        previous.bandwidth_mbps, current.bandwidth_mbps
    )


class LinkProber:
    def __init__(
        self,
        context: ClusterContext,
        sender: LocalEventSender,
        config: LinkProbeConfig | None = None,
    ) -> None:
        self._router = context.router
        self._topics = context.topics
        self._election = context.election
        self._store = context.store
        self._sender = sender
        self._node_id = context.node_id
        self._config = config or LinkProbeConfig()
        self._reported: dict[NodeId, LinkReading] = {}
        self._recent: dict[NodeId, deque[LinkReading]] = {}
        self._measured_at: dict[NodeId, float] = {}

    def start(self) -> None:
        """Answer other nodes' probes (every node does, worker or not)."""
        self._router.declare_queryable(self._topics.ping(self._node_id), self._answer)

    @staticmethod
    def _answer(parameters: str, payload: bytes | None) -> bytes:
        return str(len(payload or b"")).encode()

    def _busy(self) -> bool:
        return any(
            runner.node_id == self._node_id and runner.status in BUSY_RUNNER_STATUSES
            for runner in self._store.state.runners.values()
        )

    async def run(self) -> None:
        await anyio.sleep(self._config.first_delay_s)
        while True:
            if not self._busy():
                await self.measure_all()
            await anyio.sleep(self._config.interval_s)

    def next_peers(self) -> list[NodeId]:
        """The peers of this round: never measured first, then the longest ago."""
        peers = sorted(self._election.live_node_ids - {self._node_id})
        peers.sort(key=lambda peer: self._measured_at.get(peer, float("-inf")))
        return peers[: self._config.peers_per_round]

    async def measure_all(self) -> None:
        for peer in self.next_peers():
            self._measured_at[peer] = time.monotonic()
            measured = await self.measure(peer)
            if measured is None:
                continue
            reading = self.smoothed(peer, measured)
            if link_changed_meaningfully(
                self._reported.get(peer),
                reading,
                self._config.change_factor,
                self._config.latency_change_floor_ms,
            ):
                self._reported[peer] = reading
                await self._sender.emit(
                    GPUBandwidthMeasured(
                        source_node_id=self._node_id,
                        dest_node_id=peer,
                        source_device_id=NODE_ENDPOINT_DEVICE_ID,
                        dest_device_id=NODE_ENDPOINT_DEVICE_ID,
                        bandwidth_mbps=reading.bandwidth_mbps,
                        latency_ms=reading.latency_ms,
                        measurement_count=self._config.latency_samples + 1,
                    )
                )

    def smoothed(self, peer: NodeId, measured: LinkReading) -> LinkReading:
        """The link's value after this measurement: the median of its recent ones."""
        recent = self._recent.setdefault(peer, deque(maxlen=self._config.history))
        recent.append(measured)
        return LinkReading(
            latency_ms=statistics.median(reading.latency_ms for reading in recent),
            bandwidth_mbps=statistics.median(reading.bandwidth_mbps for reading in recent),
        )

    async def measure(self, peer: NodeId) -> LinkReading | None:
        selector = self._topics.ping(peer)
        round_trips: list[float] = []
        for _ in range(self._config.latency_samples):
            started = time.perf_counter()
            replies = await self._router.query(selector, b"x", self._config.timeout_s)
            if not replies:
                logger.debug(f"link probe to {peer}: no answer")
                return None
            round_trips.append(time.perf_counter() - started)
        latency_s = statistics.median(round_trips)
        payload = bytes(self._config.throughput_payload_bytes)
        started = time.perf_counter()
        replies = await self._router.query(selector, payload, self._config.timeout_s * 5)
        elapsed = time.perf_counter() - started
        if not replies or replies[0] != str(len(payload)).encode():
            return None
        transfer_s = elapsed - latency_s
        if transfer_s <= 0:
            # The large query came back faster than the median small one: scheduling noise
            # swamped the transfer, and any bandwidth from it would be made up.
            logger.debug(f"link probe to {peer}: transfer time lost in noise")
            return None
        return LinkReading(
            latency_ms=latency_s * 1000 / 2,
            bandwidth_mbps=len(payload) * 8 / transfer_s / 1e6,
        )
