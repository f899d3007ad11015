"""Real exo processes on 127.0.0.1, observed over HTTP only."""

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.cluster import (
    ExoNode,
    free_port,
    running_cluster,
    stays_true,
    wait_converged,
    wait_until,
    zenoh_peer,
)

pytestmark = pytest.mark.cluster


def test_three_nodes_converge(tmp_path: Path) -> None:
    with running_cluster(tmp_path, 3) as nodes:
        wait_converged(nodes, 3, "3 nodes to agree")
        states = [node.state() for node in nodes]
        node_ids = {node.node_id() for node in nodes}
        assert set(states[0]["nodes"]) == node_ids
        assert states[0]["master_node_id"] in node_ids
        for node_info in states[0]["nodes"].values():
            assert node_info["ram_total_bytes"] > 0
            assert node_info["friendly_name"]
            assert "last_seen" in node_info


def _identical_prefixes(logs: list[list[dict[str, object]]]) -> None:
    """No two nodes hold different events at the same index."""
    by_index: dict[int, str] = {}
    for log in logs:
        for position, entry in enumerate(log):
            assert entry["idx"] == position
            event = entry["event"]
            assert isinstance(event, dict)
            event_id = str(event["event_id"])
            assert by_index.setdefault(position, event_id) == event_id, f"index {position} differs"


def test_nodes_find_each_other_without_flags(tmp_path: Path) -> None:
    """Multicast scouting: no --connect, only a namespace of the test's own."""
    namespace = f"discovery-{tmp_path.name}"[:40]
    nodes = [
        ExoNode(tmp_path / f"node{index}", [], ["--namespace", namespace], discovery=True)
        for index in range(2)
    ]
    try:
        for node in nodes:
            node.start()
        for node in nodes:
            node.wait_ready()
        wait_converged(nodes, 2, "2 nodes to find each other")
    finally:
        for node in nodes:
            node.kill()


def test_master_killed_with_events_in_flight(tmp_path: Path) -> None:
    with running_cluster(tmp_path, 3) as nodes:
        wait_converged(nodes, 3, "3 nodes to agree")
        master_id = nodes[0].state()["master_node_id"]
        master = next(node for node in nodes if node.node_id() == master_id)
        survivors = [node for node in nodes if node is not master]
        survivor_ids = {node.node_id() for node in survivors}

        accepted: list[str] = []
        stop = threading.Event()

        def emit_probes() -> None:
            with httpx.Client(timeout=2.0) as client:
                while not stop.is_set():
                    for node in survivors:
                        try:
                            response = client.post(node.url + "/probe")
                        except httpx.HTTPError:
                            continue
                        if response.status_code == 202:
                            accepted.append(response.json()["event_id"])
                    time.sleep(0.005)

        emitter = threading.Thread(target=emit_probes)
        emitter.start()
        try:
            time.sleep(1.0)
            before = survivors[0].all_events()
            killed_at = time.monotonic()
            master.kill()
            time.sleep(1.0)
        finally:
            stop.set()
            emitter.join()

        def new_master_agreed() -> bool:
            states = [node.state() for node in survivors]
            masters = {state["master_node_id"] for state in states}
            return (
                len(masters) == 1
                and masters <= survivor_ids
                and all(set(state["nodes"]) == survivor_ids for state in states)
            )

        # The failover target (5 s of the kill) is bench/failover.py's to measure; here, that
        # the survivors agree at all (this time includes the second of probing above).
        wait_until(new_master_agreed, 30.0, "survivors to agree on a new master")
        print(
            f"the survivors agreed on a new master {time.monotonic() - killed_at:.2f} s after the kill"
        )
        states = [node.state() for node in survivors]
        new_master_id = states[0]["master_node_id"]
        assert new_master_id != master_id and new_master_id in survivor_ids
        for state in states:
            assert state["master_node_id"] == new_master_id
            assert master_id not in state["nodes"]

        # Every probe a survivor accepted reaches the global log, with nothing lost.
        def all_probes_logged() -> bool:
            logged = {entry["event"]["event_id"] for entry in survivors[0].all_events()}
            return set(accepted) <= logged

        wait_until(all_probes_logged, 60.0, "every accepted probe to be in the log")
        wait_converged(survivors, 2, "survivors to converge")
        logs = [node.all_events() for node in survivors]
        _identical_prefixes(logs)
        # Nothing reset: what the survivor had before the kill is still there.
        after_ids = [entry["event"]["event_id"] for entry in logs[0]]
        before_ids = [entry["event"]["event_id"] for entry in before]
        assert after_ids[: len(before_ids)] == before_ids
        since_kill = [entry["event"] for entry in logs[0][len(before_ids) :]]
        elected = [
            event["master_node_id"] for event in since_kill if event["kind"] == "MasterElected"
        ]
        timed_out = [event["node_id"] for event in since_kill if event["kind"] == "NodeTimedOut"]
        # The log says what the state shows: the new master elected, the dead one timed out.
        assert elected and elected[-1] == new_master_id
        assert master_id in timed_out and not set(timed_out) & survivor_ids
        # The dead master's own log (on disk) agrees with the survivors where it overlaps.
        disk = (master.home / "events" / "global_events.jsonl").read_text().splitlines()
        # Each record is "<crc32> <JSON>" (src/exo/shared/event_log.py).
        disk_ids = [json.loads(line.split(" ", 1)[1])["event"]["event_id"] for line in disk]
        overlap = min(len(disk_ids), len(after_ids))
        assert overlap > 0
        mismatches = [i for i in range(overlap) if disk_ids[i] != after_ids[i]]
        # Only a tail the dead master wrote but never sent may differ; it is repaired on
        # restart (see test_restart_keeps_id_and_catches_up).
        assert not mismatches or min(mismatches) >= len(before_ids)


def test_restart_keeps_id_and_catches_up(tmp_path: Path) -> None:
    with running_cluster(tmp_path, 3) as nodes:
        wait_converged(nodes, 3, "3 nodes to agree")
        master_id = nodes[0].state()["master_node_id"]
        follower = next(node for node in nodes if node.node_id() != master_id)
        others = [node for node in nodes if node is not follower]
        old_id = follower.node_id()
        assert follower.terminate() == 0
        # The cluster moves on while the node is down.
        for _ in range(20):
            httpx.post(others[0].url + "/probe", timeout=2.0)
        wait_converged(others, 2, "the rest to drop the stopped node")
        follower.start()
        follower.wait_ready()
        assert follower.node_id() == old_id
        wait_converged(nodes, 3, "the restarted node to catch up")
        _identical_prefixes([node.all_events() for node in nodes])
        assert "reloaded" in follower.log_text()


def test_garbage_and_forged_messages_change_nothing(tmp_path: Path) -> None:
    with running_cluster(tmp_path, 3) as nodes:
        wait_converged(nodes, 3, "3 nodes to agree")
        master_id = nodes[0].state()["master_node_id"]
        before_nodes = set(nodes[0].state()["nodes"])
        # A peer holding the cluster secret (strangers are kept out at the transport, see
        # tests/test_cluster_security.py): what it sends is still checked.
        session = zenoh_peer(nodes[0].endpoint, tmp_path / "peer")
        forged_event_id = "forged-event-0001"
        forged_event = {
            "kind": "NodeTimedOut",
            "event_id": forged_event_id,
            "node_id": master_id,
        }
        try:
            time.sleep(0.5)
            last = nodes[0].state()["last_event_applied_idx"]
            for topic in ("local_events", "global_events", "election", "commands"):
                session.put(f"exo/{topic}", b"\x00\xffnot json at all")
                session.put(f"exo/{topic}", b'{"kind": "Nonsense"}')
            # A well-formed global event from a node that is not the master.
            forged_global = {
                "master_node_id": "impostor",
                "indexed_event": {"idx": last + 1, "event": forged_event},
            }
            session.put("exo/global_events", json.dumps(forged_global).encode())
            # The same, claiming to be the master, at an index already taken.
            forged_taken = {
                "master_node_id": master_id,
                "indexed_event": {"idx": 0, "event": forged_event},
            }
            session.put("exo/global_events", json.dumps(forged_taken).encode())
            # A local event with a wrong schema, and an invalid command.
            session.put(
                "exo/local_events",
                json.dumps({"origin_node_id": "x", "event": {"kind": "NodeTimedOut"}}).encode(),
            )
            list(session.get("exo/commands", payload=b"{}", timeout=2.0))
            # An election announcement from a node that does not exist.
            session.put(
                "exo/election",
                json.dumps(
                    {
                        "node_id": "ghost",
                        "started_at_us": 0,
                        "last_event_idx": 10**9,
                        "master_node_id": "ghost",
                    }
                ).encode(),
            )

            def nothing_taken() -> bool:
                for node in nodes:
                    state = node.state()
                    logged = {entry["event"]["event_id"] for entry in node.all_events()}
                    if (
                        state["master_node_id"] != master_id
                        or set(state["nodes"]) != before_nodes
                        or forged_event_id in logged
                    ):
                        return False
                return True

            stays_true(nothing_taken, 1.5, "the master, the members and the log unchanged")
        finally:
            session.close()
        wait_converged(nodes, 3, "nodes still agree")
        assert "dropped" in "".join(node.log_text() for node in nodes)


def test_bad_startup_arguments_exit_with_a_sentence(tmp_path: Path) -> None:
    import subprocess
    import sys

    bad_devices = tmp_path / "bad.json"
    bad_devices.write_text('{"devices": [{"device_id": "cuda:0"}]}')
    busy = ExoNode(tmp_path / "busy", [])
    busy.start()
    try:
        busy.wait_ready()
        # Each case with the words its one sentence must hold: a case that failed for
        # another reason (say, a default flag refused) would not show its own check works.
        expected = [
            (["--listen", "garbage"], "is not a zenoh endpoint"),
            (["--connect", "tcp/127.0.0.1:99999"], "a port between 1 and 65535"),
            (["--api-port", str(busy.api_port)], "cannot serve the API"),
            (["--listen", busy.endpoint], "already in use"),
            (["--home", "/proc/no-such-dir/exo"], "cannot use home directory"),
            (["--simulate-gpus", str(tmp_path / "missing.json")], "cannot read simulated GPU"),
            (["--simulate-gpus", str(bad_devices)], "memory_total_bytes: Field required"),
            (["--telemetry-interval", "0"], "--telemetry-interval must be positive"),
            (["--ring-port", "80"], "--ring-port 80 is not a port from 1024"),
            (["--home", str(busy.home)], "is in use by another exo node"),
            (["--api-host", "0.0.0.0"], "without a key"),
            (["--listen", f"tls/127.0.0.1:{free_port()}"], "needs --tls-cert and --tls-key"),
            (["--connect", "tls/127.0.0.1:52414"], "needs --tls-ca"),
            (["--tls-cert", str(bad_devices)], "--tls-cert and --tls-key go together"),
            (["--tls-ca", str(tmp_path / "missing.pem")], "does not exist"),
            (["--cluster-secret", "short"], "at least 16 characters"),
        ]
        cases = [extra for extra, _ in expected]

        def start_with(case: tuple[int, list[str]]) -> subprocess.CompletedProcess[str]:
            index, extra = case
            args = [
                sys.executable,
                "-m",
                "exo.main",
                "--no-discovery",
                "--home",
                str(tmp_path / f"home{index}"),  # its own: a shared home would be busy
            ]
            if "--api-port" not in extra:
                args += ["--api-port", str(free_port())]
            if "--listen" not in extra:
                args += ["--listen", f"tcp/127.0.0.1:{free_port()}"]
            return subprocess.run([*args, *extra], capture_output=True, timeout=60, text=True)

        # A few at a time: each is a fresh interpreter that imports the node and stops.
        with ThreadPoolExecutor(max_workers=3) as pool:
            results = list(pool.map(start_with, enumerate(cases)))
        for (extra, words), result in zip(expected, results, strict=True):
            assert result.returncode == 2, (extra, result.stderr)
            assert "Traceback" not in result.stderr
            sentence = result.stderr.strip().splitlines()[-1]
            assert sentence.startswith("exo: ") and words in sentence, (extra, sentence)
    finally:
        busy.kill()


def test_links_between_nodes_are_measured(tmp_path: Path) -> None:
    with running_cluster(tmp_path, 2, lambda index: ["--link-probe-interval", "1"]) as nodes:
        ids = [node.node_id() for node in nodes]

        def links_measured() -> bool:
            links = nodes[0].state()["gpu_links"]
            return ids[1] in links.get(ids[0], {}) and ids[0] in links.get(ids[1], {})

        wait_until(links_measured, 60.0, "both directions of the link to be measured")
        link = nodes[1].state()["gpu_links"][ids[0]][ids[1]]
        assert link["latency_ms"] > 0
        assert link["bandwidth_mbps"] > 10
