"""Link probing: bounded per node whatever the cluster's size, and jitter is no news."""

from typing import cast

import anyio

from exo.routing.context import ClusterContext
from exo.routing.local_events import LocalEventSender
from exo.routing.topics import Topics
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
    assert not link_changed_meaningfully(before, jitter, 1.5, latency_floor_ms=1.0)
    assert link_changed_meaningfully(before, jitter, 1.5)  # without the floor it was news
    assert link_changed_meaningfully(before, slower, 1.5, latency_floor_ms=1.0)
    assert link_changed_meaningfully(before, narrower, 1.5, latency_floor_ms=1.0)
    assert link_changed_meaningfully(None, before, 1.5, latency_floor_ms=1.0)


def test_a_link_is_news_when_it_moved_by_the_factor_either_way() -> None:
    """Growing by 1.5 and shrinking to two thirds are the same step; a 40 % change either
    way, the noise of a busy machine, is not."""
    before = LinkReading(latency_ms=10.0, bandwidth_mbps=1000)

    def news(latency_ms: float, bandwidth_mbps: float) -> bool:
        current = LinkReading(latency_ms=latency_ms, bandwidth_mbps=bandwidth_mbps)
        return link_changed_meaningfully(before, current, 1.5, latency_floor_ms=1.0)

    assert not news(10.0, 1400) and not news(10.0, 700) and not news(14.0, 1000)
    assert not news(10.0, 1500) and not news(10.0, 1000 / 1.5 + 0.01) and not news(15.0, 1000)
    assert news(10.0, 1501) and news(10.0, 666) and news(15.1, 1000) and news(6.6, 1000)


class TimedRouter:
    """Answers a ping like a peer would, after a delay that depends on the payload's size."""

    def __init__(self, small_s: float, large_s: float) -> None:
        self.small_s = small_s
        self.large_s = large_s

    async def query(self, selector: str, payload: bytes, timeout_s: float) -> list[bytes]:
        await anyio.sleep(self.large_s if len(payload) > 1 else self.small_s)
        return [str(len(payload)).encode()]


def timed_prober(router: TimedRouter) -> LinkProber:
    context = Context({NodeId("me"), NodeId("peer")})
    context.router = router  # pyright: ignore[reportAttributeAccessIssue]
    context.topics = Topics("exo")  # pyright: ignore[reportAttributeAccessIssue]
    return LinkProber(cast(ClusterContext, context), cast(LocalEventSender, None))


def test_a_transfer_faster_than_a_round_trip_is_no_measurement() -> None:
    async def measure(router: TimedRouter) -> LinkReading | None:
        return await timed_prober(router).measure(NodeId("peer"))

    honest = anyio.run(measure, TimedRouter(small_s=0.001, large_s=0.2))
    assert honest is not None
    assert 0 < honest.bandwidth_mbps < 45  # 1 MiB in at least 0.2 s less a round trip
    assert anyio.run(measure, TimedRouter(small_s=0.02, large_s=0.0)) is None


def test_one_outlying_measurement_is_no_news_and_a_lasting_change_is() -> None:
    probe = prober(peers=1, per_round=1)
    peer = NodeId("peer00")
    config = LinkProbeConfig()

    def news(previous: LinkReading | None, bandwidth_mbps: float) -> LinkReading | None:
        value = probe.smoothed(peer, LinkReading(latency_ms=0.3, bandwidth_mbps=bandwidth_mbps))
        changed = link_changed_meaningfully(
            previous, value, config.change_factor, config.latency_change_floor_ms
        )
        return value if changed else None

    reported = news(None, 1000)
    assert reported is not None and reported.bandwidth_mbps == 1000
    assert news(reported, 1000) is None
    assert news(reported, 150) is None  # one busy moment: the median of 1000, 1000, 150
    assert news(reported, 1000) is None
    assert news(reported, 1000) is None
    assert news(reported, 100) is None
    moved = news(reported, 100)  # the link really is slower now: 1000, 100, 100
    assert moved is not None and moved.bandwidth_mbps == 100
