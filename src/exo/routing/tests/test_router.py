"""The router's threading: zenoh's threads and the event loop never wait on each other.

Two real zenoh sessions on loopback in one event loop. The flood test is the deadlock the
cluster hit at 8 nodes x 16 devices: the loop publishes a burst while the receiving
session's callbacks need that same loop; a subscriber callback that waits for the loop,
or a publish that waits for zenoh on the loop, never finishes. It runs in a thread of its
own so that a deadlock fails the test instead of hanging the suite.
"""

import asyncio
import socket
import threading
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

import anyio
import pytest

from exo.routing.handoff import Inbox, Outbox
from exo.routing.router import Router, RouterConfig

FLOOD_MESSAGES = 6000
"""With 8 KB each (48 MB), more than loopback TCP and zenoh buffer: the old router deadlocked."""
FLOOD_BYTES = 8192
DEADLOCK_TIMEOUT_S = 60.0

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@asynccontextmanager
async def two_routers() -> AsyncGenerator[tuple[Router, Router]]:
    port = free_port()
    first = Router(RouterConfig([f"tcp/127.0.0.1:{port}"], [], discovery=False))
    second = Router(
        RouterConfig([f"tcp/127.0.0.1:{free_port()}"], [f"tcp/127.0.0.1:{port}"], discovery=False)
    )
    await first.open()
    await second.open()
    try:
        with anyio.fail_after(10):
            while first.peer_count() == 0 or second.peer_count() == 0:
                await anyio.sleep(0.05)
        yield first, second
    finally:
        await second.close()
        await first.close()


def run_in_thread(main: Callable[[], Awaitable[T]], timeout_s: float) -> T:
    """Run an async main in an event loop on a thread; fail if it does not end in time."""
    results: list[T] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            results.append(anyio.run(main))
        except BaseException as error:  # reported by the test
            errors.append(error)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        pytest.fail(f"the event loop and zenoh deadlocked (no end after {timeout_s:.0f} s)")
    if errors:
        raise errors[0]
    return results[0]


def test_a_burst_published_from_the_loop_to_a_subscriber_on_the_same_loop_arrives() -> None:
    async def main() -> int:
        received: list[bytes] = []
        async with two_routers() as (publisher, subscriber):
            subscriber.subscribe("test/flood", lambda key, payload: received.append(payload))
            await anyio.sleep(0.5)  # the subscription reaches the publisher
            payload = b"x" * FLOOD_BYTES
            for index in range(FLOOD_MESSAGES):  # no await: the loop is busy throughout
                publisher.publish("test/flood", index.to_bytes(4, "big") + payload)
            with anyio.fail_after(30):
                while len(received) < FLOOD_MESSAGES:
                    await anyio.sleep(0.05)
            order = [int.from_bytes(message[:4], "big") for message in received]
            assert order == list(range(FLOOD_MESSAGES)), "the burst arrived out of order"
        return len(received)

    assert run_in_thread(main, DEADLOCK_TIMEOUT_S) == FLOOD_MESSAGES


def test_a_query_is_answered_while_the_loop_floods_the_asker() -> None:
    async def main() -> list[bytes]:
        async with two_routers() as (answering, asking):
            asking.subscribe("test/flood", lambda key, payload: None)
            answering.declare_queryable("test/ask", lambda parameters, payload: b"answer")
            await anyio.sleep(0.5)
            for _ in range(FLOOD_MESSAGES):
                answering.publish("test/flood", b"y" * FLOOD_BYTES)
            return await asking.query("test/ask", timeout_s=10.0)

    assert run_in_thread(main, DEADLOCK_TIMEOUT_S) == [b"answer"]


def test_replies_are_handed_over_as_they_come_not_when_every_queryable_finished() -> None:
    """A queryable that never answers (a frozen node) does not hold back the others'."""

    async def main() -> float:
        async with two_routers() as (answering, asking):
            answering.declare_queryable("test/vote/a", lambda parameters, payload: b"granted")
            silent = threading.Event()

            def never(parameters: str, payload: bytes | None) -> bytes | None:
                silent.set()
                return None  # answered on the loop with no reply: the query is finished

            asking.declare_queryable("test/vote/b", never)
            await anyio.sleep(0.5)
            started = time.monotonic()
            async for reply in asking.query_replies("test/vote/*", timeout_s=5.0):
                assert reply == b"granted"
                return time.monotonic() - started
            raise AssertionError("no reply")

    assert run_in_thread(main, DEADLOCK_TIMEOUT_S) < 5.0


def test_heartbeats_keep_only_the_newest_per_key() -> None:
    """A burst of heartbeats on four keys: each key's values arrive newest-last, never an
    older one after a newer. zenoh may drop any heartbeat under congestion (DROP), the last
    of a burst included, because the sender repeats its newest value; so does this test,
    every 0.2 s after the burst, as an announcement would."""

    async def main() -> dict[str, list[int]]:
        seen: dict[str, list[int]] = {}
        async with two_routers() as (publisher, subscriber):
            subscriber.subscribe(
                "test/beat/*",
                lambda key, payload: seen.setdefault(key, []).append(int(payload)),
            )
            with anyio.fail_after(10):  # the subscription has reached the publisher
                while "test/beat/probe" not in seen:
                    publisher.publish_newest("test/beat/probe", b"-1")
                    await anyio.sleep(0.05)
            for index in range(2000):  # no await: the loop is busy throughout
                publisher.publish_newest(f"test/beat/{index % 4}", str(index).encode())
            newest = {f"test/beat/{key}": 1996 + key for key in range(4)}
            with anyio.fail_after(30):
                while any(seen.get(key, [None])[-1] != value for key, value in newest.items()):
                    await anyio.sleep(0.2)
                    for key, value in newest.items():
                        publisher.publish_newest(key, str(value).encode())
        return seen

    seen = run_in_thread(main, DEADLOCK_TIMEOUT_S)
    for key in range(4):
        values = seen[f"test/beat/{key}"]
        assert values == sorted(values), f"key {key}: an older heartbeat came after a newer one"
        assert all(value % 4 == key for value in values), f"key {key} got another key's value"
        assert values[-1] == 1996 + key


# ---- the hand-offs alone ----------------------------------------------------------------


def test_a_full_inbox_refuses_without_waiting_and_a_coalescing_one_keeps_the_newest() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        delivered: list[int] = []
        refused: list[int] = []
        inbox = Inbox("test", loop, delivered.append, capacity=3, refused=refused.append)
        newest: list[int] = []
        coalescing = Inbox("newest", loop, newest.append, capacity=2, coalesce=True)

        def zenoh_thread() -> None:  # the loop is not running meanwhile (joined below)
            for value in range(5):
                inbox.put("k", value)
                coalescing.put(f"key{value % 2}", value)

        thread = threading.Thread(target=zenoh_thread)
        thread.start()
        thread.join(5)  # blocks the loop: a waiting put would never return
        assert not thread.is_alive(), "a put waited for the loop"
        await anyio.sleep(0.05)
        assert delivered == [0, 1, 2]
        assert refused == [3, 4] and inbox.dropped == 2
        assert sorted(newest) == [3, 4]

    anyio.run(main)


def test_an_outbox_sends_in_order_on_its_own_thread_and_refuses_when_full() -> None:
    sent: list[int] = []
    threads: set[str] = set()
    gate = threading.Event()

    def sender(value: int) -> None:
        gate.wait(5)
        threads.add(threading.current_thread().name)
        sent.append(value)

    outbox = Outbox("test-outbox", capacity=3)
    accepted = [outbox.put("k", lambda value=value: sender(value)) for value in range(5)]
    # The first send is being performed (waiting on the gate), three wait: one is refused.
    assert accepted.count(False) >= 1
    gate.set()
    outbox.close()
    assert sent == sorted(sent) and sent[0] == 0
    assert threads == {"test-outbox"}
