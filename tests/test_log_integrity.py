"""The event log on disk survives damage and a full disk without losing or inventing events.

- A record damaged in the middle of a follower's log (one hex digit of an event id changed:
  still valid JSON, only its checksum tells) is set aside on restart and refetched from the
  cluster: the node's log is again the master's, event by event, term by term.
- A node with no peer to refetch from refuses to start (exit 2, one sentence naming the
  file and the record) and leaves the damaged file exactly as it was.
- A full disk makes a write answer 503 and changes nothing, reads go on, the node stays up;
  once there is room again writes succeed, and the log reloads after a restart.

Writes are ``POST /instance`` of a planning-only model card on a big simulated GPU: a real
command through the master and the log that loads no model (the card has no weights).
"""

import contextlib
import errno
import json
import re
import subprocess
import zlib
from collections.abc import Generator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.cluster import ExoNode, running_cluster, wait_converged, wait_until
from tests.simulated import device, write_devices

pytestmark = pytest.mark.cluster

MODEL = "Llama-3.1-8B-Instruct-4bit"
LOG_FILE = "global_events.jsonl"
EVENT_ID_KEY = b'"event_id":"'
DISK_FULL_MARKERS = ("No space left on device", "cannot write the event log")


def big_gpu(path: Path) -> Path:
    return write_devices(path, [device("cuda:0", "Sim", 4000, 2000)])


def log_file(node: ExoNode) -> Path:
    return node.home / "events" / LOG_FILE


def log_records(node: ExoNode) -> list[dict[str, Any]]:
    """The records of node's log file, each checked against its checksum; a last line that
    is still being written (no line end yet) is left out."""
    records: list[dict[str, Any]] = []
    for number, line in enumerate(log_file(node).read_bytes().split(b"\n")[:-1]):
        checksum, body = line.split(b" ", 1)
        assert int(checksum, 16) == zlib.crc32(body), f"record {number} of {node.home} is bad"
        records.append(json.loads(body))
    return records


def placeable(node: ExoNode) -> bool:
    """The node's GPU is in the state, so a write of MODEL can be placed."""
    response = httpx.get(node.url + "/instance/placement", params={"model_id": MODEL}, timeout=5.0)
    return response.status_code == 200


def post_instance(node: ExoNode) -> httpx.Response:
    return httpx.post(
        node.url + "/instance", json={"model_id": MODEL, "allow_planning_only": True}, timeout=20.0
    )


def create_instance(node: ExoNode) -> str:
    response = post_instance(node)
    assert response.status_code == 201, response.text
    return str(response.json()["instance_id"])


def damage_event_id(path: Path, line_number: int) -> tuple[int, bytes]:
    """Change one hex digit of the event id in the record on line line_number (from 1) of
    the log at path: the line stays valid JSON holding a valid event; only its checksum no
    longer matches. Returns the record's index and the file's new bytes."""
    data = bytearray(path.read_bytes())
    start = sum(len(line) + 1 for line in bytes(data).split(b"\n")[: line_number - 1])
    end = data.index(b"\n", start)
    digit = data.index(EVENT_ID_KEY, start) + len(EVENT_ID_KEY)
    assert digit < end, "the record has no event id"
    data[digit] = ord("1") if data[digit] == ord("0") else ord("0")
    checksum, body = bytes(data[start:end]).split(b" ", 1)
    record_idx = int(json.loads(body)["idx"])  # still a well-formed record...
    assert int(checksum, 16) != zlib.crc32(body)  # ...that only its checksum gives away
    path.write_bytes(bytes(data))
    return record_idx, bytes(data)


def event_places(node: ExoNode) -> list[tuple[int, str]]:
    """(index, event id) of every event the node serves."""
    return [(int(event["idx"]), str(event["event"]["event_id"])) for event in node.all_events()]


def stop_cleanly(node: ExoNode) -> None:
    """SIGTERM, and check the node closed (and fsynced) its log before it exited."""
    before = len(node.log_text())
    node.terminate()
    assert "node stopped" in node.log_text()[before:], node.log_text()[-3000:]


def comparable(state: dict[str, Any]) -> dict[str, Any]:
    """The cluster state of a ``GET /state``, without the answering node's own view."""
    return {key: value for key, value in state.items() if key != "this_node"}


def node_with_id(nodes: list[ExoNode], node_id: str) -> ExoNode:
    return next(node for node in nodes if node.node_id() == node_id)


def refusal(node: ExoNode) -> str:
    """Start ``node``, which must refuse: exit 2 with one sentence as its last line, no
    traceback. Returns that line."""
    started_at = len(node.log_text())
    try:
        node.start()
        wait_until(node.process_exited, 60.0, "the node to refuse to start")
    finally:
        node.kill()
    assert node.process is not None
    output = node.log_text()[started_at:]
    assert node.process.returncode == 2, output
    assert "Traceback" not in output, output
    last_line = output.rstrip("\n").splitlines()[-1]
    assert not re.search(r"[.!?]\s+[A-Z]", last_line), f"more than one sentence: {last_line}"
    return last_line


def test_a_damaged_record_is_refetched_from_the_cluster(tmp_path: Path) -> None:
    files = [big_gpu(tmp_path / f"gpus{index}.json") for index in range(3)]
    with running_cluster(
        tmp_path / "cluster", 3, lambda index: ["--simulate-gpus", str(files[index])]
    ) as nodes:
        wait_converged(nodes, 3, "3 nodes to agree")
        master_id = str(nodes[0].state()["master_node_id"])
        master = node_with_id(nodes, master_id)
        follower = next(node for node in nodes if node is not master)
        wait_until(lambda: placeable(master), 60.0, "the GPUs to be in the state")
        instances = {create_instance(master) for _ in range(3)}
        wait_converged(nodes, 3, "the writes to reach every node")

        stop_cleanly(follower)
        records = log_records(follower)
        assert len(records) >= 8, f"too short a log to damage its middle: {len(records)}"
        damaged_line = len(records) // 2 + 1
        damaged_idx, damaged_bytes = damage_event_id(log_file(follower), damaged_line)
        # The cluster writes on while it is down: the node must fetch these too.
        instances.add(create_instance(master))

        restart_at = len(follower.log_text())
        follower.start()
        follower.wait_ready()

        def restart_log() -> str:
            return follower.log_text()[restart_at:]

        wait_until(
            lambda: "event log repaired from the cluster" in restart_log(),
            30.0,
            "the node to refetch the damaged part of its log",
        )
        warning = next(line for line in restart_log().splitlines() if "is damaged" in line)
        assert "WARNING" in warning, warning
        assert f"{log_file(follower)}: record {damaged_idx} (line {damaged_line})" in warning
        assert "checksum mismatch" in warning, warning
        aside = list(log_file(follower).parent.glob(f"{LOG_FILE}.damaged-*"))
        assert len(aside) == 1, aside
        assert f"moved the damaged file to {aside[0]}" in warning, warning
        assert aside[0].read_bytes() == damaged_bytes, "the damaged file was not kept as it was"

        wait_converged(nodes, 3, "the repaired node to rejoin")

        def same_log_as_master() -> bool:
            # On disk: every record, term included; through the API: every event's place.
            if log_records(follower) != log_records(master):
                return False
            return event_places(follower) == event_places(master)

        wait_until(same_log_as_master, 60.0, "the repaired log to equal the master's")
        repaired = log_records(follower)
        assert repaired[: len(records)] == records  # the damaged record's original is back

        wait_until(
            lambda: comparable(follower.state()) == comparable(master.state()),
            60.0,
            "the repaired node's state to equal the master's",
        )
        state = follower.state()
        assert instances <= set(state["instances"]), "a write was lost in the repair"
        assert state["master_node_id"] == master_id, "the repaired node took over as master"


def test_a_lone_node_with_a_damaged_log_refuses_to_start(tmp_path: Path) -> None:
    node = ExoNode(tmp_path / "home", [], ["--simulate-gpus", str(big_gpu(tmp_path / "gpus.json"))])
    assert not node.discovery and not node.peers  # --no-discovery, no --connect
    try:
        node.start()
        node.wait_ready()
        wait_until(lambda: placeable(node), 60.0, "the GPU to be in the state")
        for _ in range(3):
            create_instance(node)
        stop_cleanly(node)
    finally:
        node.kill()
    records = log_records(node)
    assert len(records) >= 8, f"too short a log to damage its middle: {len(records)}"
    damaged_line = len(records) // 2 + 1
    damaged_idx, damaged_bytes = damage_event_id(log_file(node), damaged_line)
    files_before = sorted(log_file(node).parent.iterdir())

    last_line = refusal(node)
    assert str(log_file(node)) in last_line, last_line
    assert f"record {damaged_idx} (line {damaged_line}) is damaged" in last_line, last_line
    assert "no peer" in last_line, last_line
    assert log_file(node).read_bytes() == damaged_bytes, "the damaged log was changed"
    assert sorted(log_file(node).parent.iterdir()) == files_before, "a file was set aside"


@pytest.mark.parametrize(
    "content",
    [b"garbage, not a snapshot\n", b'0badc0de {"idx": 3, "term": 1, "state": {}}\n'],
    ids=["garbage", "bad-checksum"],
)
def test_a_lone_node_with_a_damaged_snapshot_refuses_to_start(
    tmp_path: Path, content: bytes
) -> None:
    node = ExoNode(tmp_path / "home", [])
    snapshot = node.home / "events" / "snapshot.json"
    snapshot.parent.mkdir(parents=True)
    snapshot.write_bytes(content)
    last_line = refusal(node)
    assert str(snapshot) in last_line and "damaged" in last_line, last_line
    assert "move" in last_line and str(snapshot.parent) in last_line, last_line
    assert snapshot.read_bytes() == content, "the damaged snapshot was changed"


@contextlib.contextmanager
def small_tmpfs(directory: Path, size: str) -> Generator[Path]:
    """Mount a tmpfs of the given size on directory (skips the test where that is not
    allowed); always unmounted again, lazily if something still holds it."""
    directory.mkdir(parents=True, exist_ok=True)
    try:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError as error:  # no mount command here
        pytest.skip(f"cannot mount a tmpfs to fill: {error}")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill: {mounted.stderr.strip() or 'mount failed'}")
    try:
        yield directory
    finally:
        if subprocess.run(["umount", str(directory)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(directory)], check=False)


def fill_up(path: Path) -> int:
    """Write zeros to path until the file system has no room left; returns the bytes."""
    written = 0
    with path.open("wb", buffering=0) as handle:
        for chunk in (1 << 20, 1 << 12, 1):
            block = bytes(chunk)
            while True:
                try:
                    count = handle.write(block)
                except OSError as error:
                    if error.errno != errno.ENOSPC:
                        raise
                    break
                written += count or 0
    return written


def test_a_full_disk_gives_503_keeps_reads_and_recovers(tmp_path: Path) -> None:
    home = tmp_path / "home"  # the node's own log (home.log) stays off the small disk
    with small_tmpfs(home, "2m"):
        # The bundled model's import (about 100 MB) goes to a cache beside the small disk.
        weights = tmp_path / "weights"
        weights.mkdir()
        (home / "weights").symlink_to(weights, target_is_directory=True)
        node = ExoNode(home, [], ["--simulate-gpus", str(big_gpu(tmp_path / "gpus.json"))])
        try:
            node.start()
            node.wait_ready()
            wait_until(lambda: placeable(node), 60.0, "the GPU to be in the state")
            acknowledged = {create_instance(node)}

            filler = home / "filler"
            assert fill_up(filler) > 0
            # The log file's last page may still hold a record or two: writes that fit are
            # stored (and acknowledged), the first that does not is refused.
            refusal: list[httpx.Response] = []

            def refused() -> bool:
                response = post_instance(node)
                if response.status_code == 201:
                    acknowledged.add(str(response.json()["instance_id"]))
                    return False
                refusal.append(response)
                return True

            wait_until(refused, 60.0, "a write to be refused on the full disk")
            assert len(acknowledged) <= 4, f"{len(acknowledged)} writes fit on a full disk"
            response = refusal[0]
            assert response.status_code == 503, response.text
            detail = str(response.json()["detail"])
            for marker in (*DISK_FULL_MARKERS, "reads still work"):
                assert marker in detail, detail

            state_response = httpx.get(node.url + "/state", timeout=5.0)
            assert state_response.status_code == 200
            assert set(state_response.json()["instances"]) == acknowledged  # nothing half-done
            assert node.all_events(), "the log cannot be read any more"
            # The node logs the failure and goes on serving.
            wait_until(
                lambda: all(marker in node.log_text() for marker in DISK_FULL_MARKERS),
                60.0,
                "the node to log that it cannot write its log",
            )
            assert not node.process_exited(), node.log_text()[-3000:]
            assert "Traceback" not in node.log_text(), node.log_text()[-3000:]

            filler.unlink()

            def accepted() -> bool:
                response = post_instance(node)
                if response.status_code != 201:
                    return False
                acknowledged.add(str(response.json()["instance_id"]))
                return True

            wait_until(accepted, 60.0, "a write to be accepted once there is room again")
            assert set(node.state()["instances"]) == acknowledged

            stop_cleanly(node)
            restart_at = len(node.log_text())
            node.start()
            node.wait_ready()
            wait_until(
                lambda: set(node.state()["instances"]) == acknowledged,
                60.0,
                "the restarted node to hold every acknowledged write",
            )
            assert "reloaded" in node.log_text()[restart_at:]
            assert "Traceback" not in node.log_text(), node.log_text()[-3000:]
        finally:
            node.kill()
