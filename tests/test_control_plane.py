"""The control plane under a burst: 4 nodes x 16 simulated devices, a 2-node instance
streaming chats for a minute, and every node's API answering throughout.

Before the router's hand-offs (:mod:`exo.routing.handoff`) this wedged within seconds: the
event loop blocked in a zenoh put while zenoh's threads waited for the loop.
"""

import itertools
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from exo.models.locate import model_directory
from exo.shared.types.generation import GenerationRequest
from exo.worker.runner.generate import load_local_engine
from tests.cluster import SHARED_WEIGHTS_CACHE, ExoNode, running_cluster, wait_until
from tests.simulated import device, write_devices
from tests.test_inference_cluster import QUESTION, ask_streaming, place, runners_ready

pytestmark = pytest.mark.cluster

NODES = 4
DEVICES = 16
STREAM_FOR_S = 60.0
ANSWER_WITHIN_S = 5.0
"""A generous deadline: a wedged node never answers, and a busy 2-core machine can delay a
healthy one past a second (the latencies themselves are measured by bench/scale.py)."""
DEVICES_WITHIN_S = 60.0
MAX_TOKENS = 24
READ_PATHS = ("/state", "/gpus", "/metrics", "/")


@dataclass
class Poller:
    """Reads one node's ``GET /state``, ``/gpus``, ``/metrics`` and dashboard in turn, five
    reads a second; every read must answer 200 within ANSWER_WITHIN_S."""

    node: ExoNode
    reads: int = 0
    failures: list[str] = field(default_factory=list[str])
    slowest_s: dict[str, float] = field(default_factory=dict[str, float])
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        with httpx.Client(timeout=ANSWER_WITHIN_S) as client:
            while not self._stop.is_set():
                path = READ_PATHS[self.reads % len(READ_PATHS)]
                started = time.monotonic()
                try:
                    status = client.get(self.node.url + path).status_code
                    if status != 200:
                        self.failures.append(f"{path}: {status} at {started:.1f}")
                except httpx.HTTPError as error:
                    self.failures.append(f"{path}: {type(error).__name__} at {started:.1f}")
                took = time.monotonic() - started
                self.slowest_s[path] = max(took, self.slowest_s.get(path, 0.0))
                self.reads += 1
                self._stop.wait(max(0.0, 0.2 - (time.monotonic() - started)))


def test_sixteen_devices_per_node_and_a_streaming_chat_keep_every_api_answering(
    tmp_path: Path,
) -> None:
    reference = (
        load_local_engine(model_directory(None, SHARED_WEIGHTS_CACHE))
        .complete(
            GenerationRequest(
                messages=[{"role": "user", "content": QUESTION}],
                max_tokens=MAX_TOKENS,
                temperature=0,
            )
        )
        .text
    )
    files = [
        write_devices(
            tmp_path / f"gpus{index}.json",
            [device(f"cuda:{number}", "Sim GPU", 24, 1000) for number in range(DEVICES)],
        )
        for index in range(NODES)
    ]

    def node_args(index: int) -> list[str]:
        return ["--gpu-backend", "simulated", "--simulate-gpus", str(files[index])]

    started = time.monotonic()
    with running_cluster(tmp_path / "cluster", NODES, node_args) as nodes:
        pollers = [Poller(node) for node in nodes]
        for poller in pollers:
            poller.start()
        try:
            remaining = DEVICES_WITHIN_S - (time.monotonic() - started)
            wait_until(
                lambda: all(len(node.get_list("/gpus")) == NODES * DEVICES for node in nodes),
                remaining,
                f"all {NODES * DEVICES} devices in every node's state within "
                f"{DEVICES_WITHIN_S:.0f} s of start",
            )
            instance = place(nodes[0], 2, rebalance="off")
            assert len({shard["node_id"] for shard in instance["shards"]}) >= 2
            wait_until(
                lambda: all(runners_ready(node, instance) for node in nodes),
                120.0,
                "every runner ready",
            )
            answers: list[str] = []
            index_samples: list[list[int]] = []
            streaming_since = time.monotonic()
            while time.monotonic() - streaming_since < STREAM_FOR_S:
                index_samples.append([node.state()["last_event_applied_idx"] for node in nodes])
                asked = nodes[len(answers) % NODES]
                text, finish = ask_streaming(asked, QUESTION, MAX_TOKENS)
                assert finish in ("stop", "length"), finish
                assert text == reference, f"request {len(answers)} on {asked.url}: {text!r}"
                answers.append(text)
            index_samples.append([node.state()["last_event_applied_idx"] for node in nodes])
        finally:
            for poller in pollers:
                poller.stop()
    assert len(answers) >= 3, f"only {len(answers)} chats in {STREAM_FOR_S:.0f} s"
    for before, after in itertools.pairwise(index_samples):
        assert all(b < a for b, a in zip(before, after, strict=True)), (
            f"an event index stood still across a chat: {before} -> {after}"
        )
    for poller in pollers:
        slowest = ", ".join(f"{path} {took:.2f} s" for path, took in poller.slowest_s.items())
        print(f"{poller.node.url}: {poller.reads} reads, slowest {slowest}")
    for poller in pollers:
        assert poller.reads >= STREAM_FOR_S * 2, f"{poller.node.url}: {poller.reads} reads"
        assert not poller.failures, (
            f"{poller.node.url} did not answer within {ANSWER_WITHIN_S} s: {poller.failures[:5]}"
        )
