"""No acknowledged write is ever lost: a master that is paused (SIGSTOP) while writes go on
through another node comes back in an older term and steps down instead of erasing the
newer history; writes it cannot get a majority for are refused with 503, never 201.

Writes are ``POST /instance`` of a planning-only model card on nodes with large simulated
GPUs: each is a real command through the master and the log, and no runner process starts
(the worker reports the runner failed at once: the card has no weights).
"""

import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.cluster import ExoNode, converged, running_cluster, wait_until
from tests.simulated import device, write_devices

pytestmark = pytest.mark.cluster

MODEL = "Llama-3.1-8B-Instruct-4bit"
PAUSE_S = 20.0


class Writer:
    """Creates instances through one node's API, one after another, and keeps every answer."""

    def __init__(self, node: ExoNode) -> None:
        self._node = node
        self.acknowledged: list[tuple[float, str]] = []
        self.refused: list[tuple[float, int, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

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
                    response = client.post(self._node.url + "/instance", json={"model_id": MODEL})
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
    return [
        write_devices(tmp_path / f"gpus{index}.json", [device("cuda:0", "Sim", 4000, 2000)])
        for index in range(count)
    ]


def test_a_paused_master_steps_down_and_no_acknowledged_write_is_lost(tmp_path: Path) -> None:
    files = big_gpus(tmp_path, 3)
    with running_cluster(
        tmp_path / "cluster", 3, lambda index: ["--simulate-gpus", str(files[index])]
    ) as nodes:
        wait_until(lambda: converged(nodes, 3), 15.0, "3 nodes to agree")
        old_master_id = nodes[0].state()["master_node_id"]
        old_master = next(node for node in nodes if node.node_id() == old_master_id)
        writer_node = next(node for node in nodes if node is not old_master)
        assert old_master.process is not None

        writer = Writer(writer_node)
        writer.start()
        wait_until(lambda: len(writer.acknowledged) >= 3, 15.0, "writes before the pause")
        paused_at = time.monotonic()
        os.kill(old_master.process.pid, signal.SIGSTOP)
        try:
            time.sleep(PAUSE_S)  # the pause itself is what is under test
        finally:
            os.kill(old_master.process.pid, signal.SIGCONT)
        resumed_at = time.monotonic()
        # Writes go on after the old master is back, until it has rejoined as a follower.
        wait_until(
            lambda: sum(sent > resumed_at for sent, _ in writer.acknowledged) >= 3,
            30.0,
            "writes after the old master resumed",
        )
        writer.stop()

        during_pause = [iid for sent, iid in writer.acknowledged if paused_at < sent < resumed_at]
        assert during_pause, f"no write succeeded while the master was paused: {writer.refused}"
        for _, status, text in writer.refused:
            assert status in (0, 503, 504), text  # refused openly, never half-done

        def everyone_agrees() -> bool:
            if not converged(nodes, 3):
                return False
            instances = [set(node.state()["instances"]) for node in nodes]
            return all(instances[0] == other for other in instances[1:])

        wait_until(everyone_agrees, 20.0, "all 3 nodes to hold the same log again")
        acknowledged = {iid for _, iid in writer.acknowledged}
        for node in nodes:
            missing = acknowledged - set(node.state()["instances"])
            assert not missing, f"{node.node_id()} lost {len(missing)} acknowledged writes"
        new_master_id = nodes[0].state()["master_node_id"]
        assert new_master_id != old_master_id, "the old master took over again"
        assert "stepping down as master" in old_master.log_text()
