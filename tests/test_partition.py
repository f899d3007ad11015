"""A real network partition: the master runs in its own network namespace, linked to the
other two nodes by a veth pair, and the link goes down for a while.

The cut-off master must refuse writes (503 "no quorum") instead of acknowledging them; the
majority side elects a master of a newer term and goes on; when the link comes back the old
master steps down, and every write acknowledged on either side is on every node.

Needs root (network namespaces); skipped with the reason where the kernel refuses.
"""

import json
import os
import subprocess
import time
from collections.abc import Generator
from pathlib import Path

import pytest

from tests.cluster import ExoNode, free_port, wait_until
from tests.writes import MODEL, Writer, big_gpus

pytestmark = pytest.mark.cluster

PARTITION_S = 25.0
ROOT_IP, NS_IP = "10.213.0.1", "10.213.0.2"


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def namespace() -> Generator[tuple[str, str]]:
    """A network namespace and the root side of its veth link: (name, root interface)."""
    name, root_side, ns_side = f"exo{os.getpid()}", f"vexo{os.getpid()}a", f"vexo{os.getpid()}b"
    try:
        ip("netns", "add", name)
    except (subprocess.CalledProcessError, FileNotFoundError) as error:
        pytest.skip(f"network namespaces are not available here: {error}")
    try:
        ip("link", "add", root_side, "type", "veth", "peer", "name", ns_side)
        ip("link", "set", ns_side, "netns", name)
        ip("addr", "add", f"{ROOT_IP}/24", "dev", root_side)
        ip("link", "set", root_side, "up")
        ip("-n", name, "addr", "add", f"{NS_IP}/24", "dev", ns_side)
        ip("-n", name, "link", "set", ns_side, "up")
        ip("-n", name, "link", "set", "lo", "up")
        yield name, root_side
    finally:
        subprocess.run(["ip", "link", "del", root_side], capture_output=True)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def write_inside(namespace: str, node: ExoNode) -> tuple[int, str]:
    """POST /instance to a node in the namespace, from inside it (the test's own namespace
    cannot reach it while the link is down)."""
    result = subprocess.run(
        [
            *("ip", "netns", "exec", namespace, "curl", "-s", "-m", "15"),
            *("-o", "-", "-w", "\n%{http_code}", "-X", "POST"),
            *("-H", "content-type: application/json"),
            *(
                "-d",
                json.dumps({"model_id": MODEL, "allow_planning_only": True}),
                f"{node.url}/instance",
            ),
        ],
        capture_output=True,
        text=True,
    )
    body, _, code = result.stdout.rpartition("\n")
    return int(code or 0), body


def test_a_cut_off_master_refuses_writes_and_steps_down_when_the_partition_heals(
    tmp_path: Path, namespace: tuple[str, str]
) -> None:
    name, root_side = namespace
    files = big_gpus(tmp_path, 3)
    isolated = ExoNode(
        tmp_path / "a",
        [],
        ["--simulate-gpus", str(files[0])],
        host=NS_IP,
        prefix=["ip", "netns", "exec", name],
    )
    b = ExoNode(tmp_path / "b", [], ["--simulate-gpus", str(files[1])])
    c = ExoNode(tmp_path / "c", [], ["--simulate-gpus", str(files[2])])
    for node in (b, c):  # loopback between b and c, the veth address towards a
        node.extra_listen = [f"tcp/{ROOT_IP}:{free_port()}"]
    isolated.peers = [b.extra_listen[0], c.extra_listen[0]]
    b.peers = [c.endpoint, isolated.endpoint]
    c.peers = [b.endpoint, isolated.endpoint]
    nodes = [isolated, b, c]
    try:
        isolated.start()  # first, so that it is the master
        isolated.wait_ready()
        wait_until(lambda: isolated.state()["master_node_id"] is not None, 60.0, "a to lead")
        for node in (b, c):
            node.start()
        for node in (b, c):
            node.wait_ready()
        master_id = isolated.node_id()

        def agreed() -> bool:
            states = [node.state() for node in nodes]
            return (
                {s["master_node_id"] for s in states} == {master_id}
                and len({s["last_event_applied_idx"] for s in states}) == 1
                and all(len(s["members"]) == 3 for s in states)
            )

        wait_until(agreed, 30.0, "3 members following a")
        writer = Writer(b)
        writer.start()
        wait_until(lambda: len(writer.acknowledged) >= 3, 60.0, "writes before the partition")

        ip("link", "set", root_side, "down")
        cut_at = time.monotonic()
        answers_inside: list[tuple[int, str]] = []
        try:
            time.sleep(4.0)  # past the 2.5 s quorum lease: the cut-off master knows
            while time.monotonic() - cut_at < PARTITION_S:
                answers_inside.append(write_inside(name, isolated))
                time.sleep(1.0)
            wait_until(
                lambda: bool(writer.acknowledged_between(cut_at)),
                30.0,
                "the majority side to accept writes",
            )
        finally:
            ip("link", "set", root_side, "up")
        healed_at = time.monotonic()
        wait_until(
            lambda: len(writer.acknowledged_between(healed_at)) >= 3,
            30.0,
            "writes after the partition healed",
        )
        writer.stop()

        assert answers_inside, "no write was tried on the cut-off master"
        for code, body in answers_inside:
            assert code == 503 and "no quorum" in body, (code, body)

        def everyone_agrees() -> bool:
            states = [node.state() for node in nodes]
            instances = [set(s["instances"]) for s in states]
            return (
                len({s["master_node_id"] for s in states}) == 1
                and len({s["last_event_applied_idx"] for s in states}) == 1
                and all(instances[0] == other for other in instances[1:])
            )

        wait_until(everyone_agrees, 30.0, "all 3 nodes to hold the same log again")
        acknowledged = {iid for _, iid in writer.acknowledged}
        for node in nodes:
            missing = acknowledged - set(node.state()["instances"])
            assert not missing, f"{node.node_id()} lost {len(missing)} acknowledged writes"
        assert isolated.state()["master_node_id"] != master_id
        assert "stepping down as master" in isolated.log_text()
    finally:
        for node in nodes:
            node.kill()
