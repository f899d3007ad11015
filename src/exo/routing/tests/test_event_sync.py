"""Gap filling and divergence repair between two real zenoh sessions on loopback."""

import errno
import os
import socket
from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest

from exo.master.commands import handle_command
from exo.master.main import Master
from exo.routing.context import ClusterContext
from exo.routing.election import Election
from exo.routing.event_sync import EventSync
from exo.routing.messages import GlobalEventMessage
from exo.routing.router import Router, RouterConfig
from exo.routing.term_store import TermStore
from exo.routing.topics import Topics
from exo.shared.event_log import LOG_FILE_NAME
from exo.shared.event_store import EventStore
from exo.shared.types.events import IndexedEvent, ProbeEmitted
from exo.shared.types.ids import NodeId

pytestmark = pytest.mark.anyio


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Stack:
    node_id: NodeId
    router: Router
    election: Election
    store: EventStore
    sync: EventSync
    master: Master


@asynccontextmanager
async def stack(
    home: Path, node_id: str, started_at_us: int, listen_port: int, connect_port: int | None
) -> AsyncGenerator[Stack]:
    connect = [f"tcp/127.0.0.1:{connect_port}"] if connect_port else []
    router = Router(RouterConfig([f"tcp/127.0.0.1:{listen_port}"], connect, discovery=False))
    await router.open()
    topics = Topics("test")
    store = EventStore(home)
    store.load()
    terms = TermStore(home)
    terms.load()
    election = Election(
        router, topics, NodeId(node_id), started_at_us, settle_s=0.2, store=store, terms=terms
    )
    cluster = ClusterContext(NodeId(node_id), router, topics, election, store)
    sync = EventSync(cluster)
    master = Master(cluster, handle_command)
    sync.start()
    master.start()
    election.start()
    try:
        async with anyio.create_task_group() as group:
            group.start_soon(election.run)
            group.start_soon(sync.run)
            group.start_soon(master.run)
            yield Stack(NodeId(node_id), router, election, store, sync, master)
            group.cancel_scope.cancel()
    finally:
        await router.close()
        store.close()


@asynccontextmanager
async def leader_and_follower(tmp_path: Path) -> AsyncGenerator[tuple[Stack, Stack]]:
    """A master-elect and a follower connected to it, once the master is active, both are
    members and the follower holds the master's whole log: the master appends nothing of its
    own from then on (a test that reads the master's end before the follower's membership
    change would race with it)."""
    port = free_port()
    async with (
        stack(tmp_path / "m", "master", 1, port, None) as leader,
        stack(tmp_path / "f", "follower", 2, free_port(), port) as follower,
    ):
        await wait_for(lambda: leader.master.is_active)
        await wait_for(
            lambda: leader.store.state.members == frozenset({leader.node_id, follower.node_id})
        )
        await wait_for(lambda: follower.store.last_idx == leader.store.last_idx)
        yield leader, follower


def assert_same_events(follower: Stack, leader: Stack, count: int) -> None:
    """Both logs hold the same event at each of the first count indices."""
    for idx in range(count):
        ours, theirs = follower.store.event_at(idx), leader.store.event_at(idx)
        assert ours is not None and theirs is not None
        assert ours.event.event_id == theirs.event.event_id


async def wait_for(predicate: "object", timeout_s: float = 5.0) -> None:
    assert callable(predicate)
    with anyio.fail_after(timeout_s):
        while not predicate():
            await anyio.sleep(0.02)


def probe() -> ProbeEmitted:
    return ProbeEmitted(probe_id="p", sent_at=0.0)


async def test_follower_fills_a_gap_from_the_master(tmp_path: Path) -> None:
    async with leader_and_follower(tmp_path) as (leader, follower):
        await wait_for(lambda: follower.store.last_idx == leader.store.last_idx)
        # Index three events on the master without broadcasting them: the follower misses them.
        for _ in range(3):
            leader.store.append(IndexedEvent(idx=leader.store.last_idx + 1, event=probe()))
        missed_up_to = leader.store.last_idx
        # The next one is broadcast; the follower sees the gap and fetches the range.
        leader.master.index(probe())
        await wait_for(lambda: follower.store.last_idx == leader.store.last_idx)
        assert_same_events(follower, leader, missed_up_to + 2)


async def test_duplicates_are_ignored_and_divergent_tail_is_repaired(tmp_path: Path) -> None:
    async with leader_and_follower(tmp_path) as (leader, follower):
        for _ in range(3):
            leader.master.index(probe())
        await wait_for(lambda: follower.store.last_idx == leader.store.last_idx)
        # A duplicate of an already-applied event changes nothing.
        duplicate = leader.store.event_at(1)
        assert duplicate is not None
        message = GlobalEventMessage(master_node_id=leader.node_id, indexed_event=duplicate)
        leader.router.publish("test/global_events", message.model_dump_json().encode())
        await anyio.sleep(0.3)
        assert follower.store.last_idx == leader.store.last_idx
        # The follower's log diverges at its tail (an event nobody else has) ...
        follower.store.append(IndexedEvent(idx=follower.store.last_idx + 1, event=probe()))
        foreign = follower.store.event_at(follower.store.last_idx)
        # ... and the master indexes a different event at that index.
        leader.master.index(probe())
        leader.master.index(probe())
        await wait_for(lambda: follower.store.last_idx == leader.store.last_idx)
        assert foreign is not None
        held = follower.store.event_at(foreign.idx)
        assert held is not None and held.event.event_id != foreign.event.event_id
        assert_same_events(follower, leader, leader.store.last_idx + 1)


async def test_a_follower_ahead_of_its_master_cuts_the_uncommitted_tail(tmp_path: Path) -> None:
    """Events past the master's end were never committed (the master holds every committed
    event): following the master cuts them."""
    async with leader_and_follower(tmp_path) as (leader, follower):
        await wait_for(lambda: follower.store.last_idx == leader.store.last_idx)
        head = leader.store.last_idx
        for _ in range(3):
            follower.store.append(IndexedEvent(idx=follower.store.last_idx + 1, event=probe()))
        await follower.sync.align_with(leader.node_id)
        assert follower.store.last_idx == head
        assert_same_events(follower, leader, head + 1)


async def test_a_follower_behind_a_compacted_log_installs_the_snapshot(tmp_path: Path) -> None:
    async with leader_and_follower(tmp_path) as (leader, follower):
        await wait_for(lambda: follower.store.last_idx == leader.store.last_idx)
        leader.store.compact_after = 50
        follower.store.compact_after = 10**9
        # Events the follower misses (not broadcast), then the leader compacts them away.
        for _ in range(120):
            leader.store.append(
                IndexedEvent(
                    idx=leader.store.last_idx + 1, term=leader.election.term, event=probe()
                )
            )
        leader.store.compact_if_due(leader.store.last_idx)
        assert leader.store.base > follower.store.last_idx + 1
        leader.master.index(probe())  # broadcast: the follower sees the gap
        await wait_for(lambda: follower.store.last_idx == leader.store.last_idx)
        assert follower.store.base == leader.store.base
        assert follower.store.state.members == leader.store.state.members
        for idx in range(leader.store.base, leader.store.last_idx + 1):
            ours, theirs = follower.store.event_at(idx), leader.store.event_at(idx)
            assert ours is not None and theirs is not None
            assert ours.event.event_id == theirs.event.event_id


class LogFsyncs:
    """os.fsync, watched for one node's event log file: counts the calls, and fails them
    with EIO while ``failing`` (the disk boundary; nothing of the sync logic is replaced)."""

    def __init__(self, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.log_path = str(home / LOG_FILE_NAME)
        self.calls = 0
        self.failing = False
        real_fsync = os.fsync

        def fsync(descriptor: int) -> None:
            if os.readlink(f"/proc/self/fd/{descriptor}") == self.log_path:
                self.calls += 1
                if self.failing:
                    raise OSError(errno.EIO, os.strerror(errno.EIO))
            real_fsync(descriptor)

        monkeypatch.setattr(os, "fsync", fsync)


def acknowledged_by(leader: Stack, follower: Stack) -> int:
    return leader.election.acknowledged().get(follower.node_id, -1)


async def test_a_follower_fsyncs_a_batch_once_before_it_acknowledges_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with leader_and_follower(tmp_path) as (leader, follower):
        await wait_for(lambda: acknowledged_by(leader, follower) == leader.store.last_idx)
        fsyncs = LogFsyncs(tmp_path / "f", monkeypatch)
        # 50 events the follower misses, then one broadcast: it fetches them as one batch.
        for _ in range(50):
            leader.store.append(
                IndexedEvent(
                    idx=leader.store.last_idx + 1, term=leader.election.term, event=probe()
                )
            )
        leader.master.index(probe())
        await wait_for(lambda: acknowledged_by(leader, follower) == leader.store.last_idx)
        assert follower.store.durable_idx == leader.store.last_idx
        assert 1 <= fsyncs.calls <= 3, fsyncs.calls  # per batch, not per event (51)


async def test_a_follower_does_not_acknowledge_what_it_could_not_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with leader_and_follower(tmp_path) as (leader, follower):
        await wait_for(lambda: acknowledged_by(leader, follower) == leader.store.last_idx)
        acknowledged = acknowledged_by(leader, follower)
        fsyncs = LogFsyncs(tmp_path / "f", monkeypatch)
        fsyncs.failing = True
        for _ in range(3):
            leader.master.index(probe())
        await wait_for(lambda: follower.store.last_idx == leader.store.last_idx)
        assert follower.election.match_idx == acknowledged  # stored, but not fsynced
        await wait_for(lambda: fsyncs.calls >= 2)  # it tried, and tried again
        assert follower.store.write_error is not None
        assert follower.election.match_idx == acknowledged
        assert acknowledged_by(leader, follower) == acknowledged
        # The disk works again: the retried fsync acknowledges the rest.
        fsyncs.failing = False
        await wait_for(lambda: acknowledged_by(leader, follower) == leader.store.last_idx)
        assert follower.store.write_error is None
