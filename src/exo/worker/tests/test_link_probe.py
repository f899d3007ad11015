"""Link probing: bounded per node whatever the cluster's size, and jitter is no news."""

from typing import cast

from exo.routing.context import ClusterContext
from exo.routing.local_events import LocalEventSender
from exo.shared.types.ids import NodeId
from exo.worker.link_probe import (
    LinkProbeConfig,
    LinkProber,
    LinkReading,
    link_changed_meaningfully,
)


class Election:
    def __init__(self, live: set[NodeId]) -> None:
        self.live_node_ids = live


class Context:
    def __init__(self, live: set[NodeId]) -> None:
        self.router = None
        self.topics = None
        self.store = None
        self.node_id = NodeId("me")
        self.election = Election(live)


def prober(peers: int, per_round: int) -> LinkProber:
    live = {NodeId("me"), *(NodeId(f"peer{index:02}") for index in range(peers))}
    context = cast(ClusterContext, Context(live))
    return LinkProber(
        context, cast(LocalEventSender, None), LinkProbeConfig(peers_per_round=per_round)
    )


def test_a_round_measures_a_bounded_number_of_peers_and_every_peer_in_turn() -> None:
    probe = prober(peers=15, per_round=4)
    seen: list[NodeId] = []
    for round_number in range(4):
        chosen = probe.next_peers()
        assert len(chosen) == 4
        for offset, peer in enumerate(chosen):
            probe._measured_at[peer] = round_number * 10 + offset  # pyright: ignore[reportPrivateUsage]
        seen.extend(chosen)
    assert len(set(seen[:15])) == 15, "some peer was measured twice before another once"
    assert NodeId("me") not in seen


def test_latency_jitter_below_the_floor_is_not_news() -> None:
    before = LinkReading(latency_ms=0.3, bandwidth_mbps=1000)
    jitter = LinkReading(latency_ms=0.6, bandwidth_mbps=1050)
    slower = LinkReading(latency_ms=5.0, bandwidth_mbps=1000)
    narrower = LinkReading(latency_ms=0.3, bandwidth_mbps=500)
    assert not link_changed_meaningfully(before, jitter, 0.2, latency_floor_ms=1.0)
    assert link_changed_meaningfully(before, jitter, 0.2)  # without the floor it was news
    assert link_changed_meaningfully(before, slower, 0.2, latency_floor_ms=1.0)
    assert link_changed_meaningfully(before, narrower, 0.2, latency_floor_ms=1.0)
    assert link_changed_meaningfully(None, before, 0.2, latency_floor_ms=1.0)
