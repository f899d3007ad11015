"""Cheap real writes for durability tests: ``POST /instance`` of a planning-only model card
on nodes with large simulated GPUs. Each is a real command through the master and the log,
and no runner process starts (the worker reports the runner failed at once: the card has no
weights)."""

import contextlib
import threading
import time
from collections.abc import Generator
from pathlib import Path

import httpx

from tests.cluster import ExoNode, running_cluster, wait_converged
from tests.simulated import device, write_devices

MODEL = "Llama-3.1-8B-Instruct-4bit"


class Writer:
    """Creates instances through one node's API, one after another, and keeps every answer."""

    def __init__(self, node: ExoNode) -> None:
        self._node = node
        self.acknowledged: list[tuple[float, str]] = []
        self.refused: list[tuple[float, int, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def acknowledged_between(self, start: float, end: float = float("inf")) -> list[str]:
        """Instances of the writes sent after ``start`` (and before ``end``) that got 201."""
        return [iid for sent, iid in self.acknowledged if start < sent < end]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30.0)

    def _run(self) -> None:
        with httpx.Client(timeout=20.0) as client:
            while not self._stop.is_set():
                sent = time.monotonic()
                try:
                    response = client.post(
                        self._node.url + "/instance",
                        json={"model_id": MODEL, "allow_planning_only": True},
                    )
                except httpx.HTTPError as error:
                    self.refused.append((sent, 0, repr(error)))
                    continue
                if response.status_code == 201:
                    self.acknowledged.append((sent, response.json()["instance_id"]))
                else:
                    self.refused.append((sent, response.status_code, response.text[:200]))
                    time.sleep(0.2)
                self._stop.wait(0.25)


def big_gpus(tmp_path: Path, count: int) -> list[Path]:
    """One simulated-GPU file per node, each GPU large enough for hundreds of instances."""
    return [
        write_devices(tmp_path / f"gpus{index}.json", [device("cuda:0", "Sim", 4000, 2000)])
        for index in range(count)
    ]


@contextlib.contextmanager
def writable_cluster(base: Path, count: int) -> Generator[list[ExoNode]]:
    """count nodes with big simulated GPUs (see big_gpus), agreed on one master."""
    files = big_gpus(base, count)
    with running_cluster(
        base / "cluster", count, lambda index: ["--simulate-gpus", str(files[index])]
    ) as nodes:
        wait_converged(nodes, count, f"{count} nodes to agree")
        yield nodes
