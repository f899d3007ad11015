"""No acknowledged write is ever lost: a master that is paused (SIGSTOP) while writes go on
through another node comes back in an older term and steps down instead of erasing the
newer history; writes it cannot get a majority for are refused with 503, never 201.

Writes: see :mod:`tests.writes`.
"""

import os
import signal
import time
from pathlib import Path

import pytest

from tests.cluster import converged, wait_converged, wait_until
from tests.writes import Writer, writable_cluster

pytestmark = pytest.mark.cluster

PAUSE_S = 20.0


def test_a_paused_master_steps_down_and_no_acknowledged_write_is_lost(tmp_path: Path) -> None:
    with writable_cluster(tmp_path, 3) as nodes:
        old_master_id = nodes[0].state()["master_node_id"]
        old_master = next(node for node in nodes if node.node_id() == old_master_id)
        writer_node = next(node for node in nodes if node is not old_master)
        assert old_master.process is not None

        writer = Writer(writer_node)
        writer.start()
        wait_until(lambda: len(writer.acknowledged) >= 3, 60.0, "writes before the pause")
        paused_at = time.monotonic()
        os.kill(old_master.process.pid, signal.SIGSTOP)
        try:
            time.sleep(PAUSE_S)  # the pause itself is what is under test
        finally:
            os.kill(old_master.process.pid, signal.SIGCONT)
        resumed_at = time.monotonic()
        # Writes go on after the old master is back, until it has rejoined as a follower.
        wait_until(
            lambda: len(writer.acknowledged_between(resumed_at)) >= 3,
            30.0,
            "writes after the old master resumed",
        )
        writer.stop()

        during_pause = writer.acknowledged_between(paused_at, resumed_at)
        assert during_pause, f"no write succeeded while the master was paused: {writer.refused}"
        for _, status, text in writer.refused:
            assert status in (0, 503, 504), text  # refused openly, never half-done

        def everyone_agrees() -> bool:
            if not converged(nodes, 3):
                return False
            instances = [set(node.state()["instances"]) for node in nodes]
            return all(instances[0] == other for other in instances[1:])

        wait_until(everyone_agrees, 60.0, "all 3 nodes to hold the same log again")
        acknowledged = {iid for _, iid in writer.acknowledged}
        for node in nodes:
            missing = acknowledged - set(node.state()["instances"])
            assert not missing, f"{node.node_id()} lost {len(missing)} acknowledged writes"
        new_master_id = nodes[0].state()["master_node_id"]
        assert new_master_id != old_master_id, "the old master took over again"
        assert "stepping down as master" in old_master.log_text()


def test_two_nodes_go_on_when_either_is_switched_off(tmp_path: Path) -> None:
    """A strict majority of two is both, yet a 2-node cluster keeps working when the other
    machine is switched off (docs/architecture.md, "A two-node cluster"): the node left
    alone is master by itself and takes writes; the other, switched on again, catches up."""
    with writable_cluster(tmp_path, 2) as nodes:
        ids = [node.node_id() for node in nodes]
        master = next(
            node for node in nodes if node.node_id() == nodes[0].state()["master_node_id"]
        )
        follower = next(node for node in nodes if node is not master)
        writer = Writer(follower)
        writer.start()
        try:
            # Writes while both are up are stored by both before they are acknowledged.
            wait_until(lambda: len(writer.acknowledged) >= 3, 60.0, "writes with both nodes up")
            before = {iid for _, iid in writer.acknowledged}
            assert before <= set(master.state()["instances"])

            # The master's machine goes off: the follower goes on alone, as master.
            master.kill()
            off_at = time.monotonic()
            wait_until(
                lambda: follower.state()["master_node_id"] == follower.node_id(),
                60.0,
                "the node left alone to become master",
            )
            wait_until(
                lambda: len(writer.acknowledged_between(off_at)) >= 3,
                60.0,
                "writes acknowledged by the node left alone",
            )
            alone = {iid for _, iid in writer.acknowledged}
            assert alone <= set(follower.state()["instances"])
            assert before <= set(follower.state()["instances"])

            # Switched on again, the old master is a follower in an older term: it takes
            # the newer history instead of erasing it.
            master.start()
            master.wait_ready()
            wait_converged(nodes, 2, "the returning node to catch up")

            # Now the follower's machine goes off: the master goes on alone.
            master.kill()
            follower_off_at = time.monotonic()
            wait_until(
                lambda: len(writer.acknowledged_between(follower_off_at + 3.0)) >= 3,
                60.0,
                "writes acknowledged after the follower went off",
            )
            assert follower.state()["master_node_id"] == follower.node_id()
            master.start()
            master.wait_ready()
            wait_converged(nodes, 2, "the follower to catch up again")
        finally:
            writer.stop()
        for _, status, text in writer.refused:
            assert status in (0, 503, 504), text  # refused openly, never half-done
        acknowledged = {iid for _, iid in writer.acknowledged}

        def both_hold_everything() -> bool:
            return all(acknowledged <= set(node.state()["instances"]) for node in nodes)

        wait_until(both_hold_everything, 60.0, "both nodes to hold every acknowledged write")
        assert nodes[0].state()["master_node_id"] == follower.node_id()
        assert {node.node_id() for node in nodes} == set(ids)


def test_a_frozen_master_is_replaced_at_once_and_resumed_says_it_is_not_serving(
    tmp_path: Path,
) -> None:
    """SIGSTOP keeps the master's liveliness token alive (~10 s lease): the others must
    judge it by its silent heartbeats. Another master serves writes within a few seconds;
    the frozen node, resumed, says it is not serving writes in its very first answer."""
    with writable_cluster(tmp_path, 3) as nodes:
        old_master_id = nodes[0].state()["master_node_id"]
        old_master = next(node for node in nodes if node.node_id() == old_master_id)
        writer_node = next(node for node in nodes if node is not old_master)
        assert old_master.process is not None
        assert old_master.state()["this_node"]["role"] == "master"

        writer = Writer(writer_node)
        writer.start()
        wait_until(lambda: len(writer.acknowledged) >= 3, 60.0, "writes before the freeze")
        frozen_at = time.monotonic()
        os.kill(old_master.process.pid, signal.SIGSTOP)
        try:
            # 6 s: the liveliness lease alone took 9.4-10.1 s; heartbeats take about 2.
            wait_until(
                lambda: len(writer.acknowledged_between(frozen_at + 0.5)) >= 1,
                6.0,
                "a write acknowledged by a new master while the old one is frozen",
            )
            new_state = writer_node.state()["this_node"]
            assert new_state["master_node_id"] != old_master_id
        finally:
            os.kill(old_master.process.pid, signal.SIGCONT)
        first = None
        while first is None:
            first = old_master.try_get("/state")
        view = first["this_node"]
        assert not view["serving_writes"], view
        assert view["role"] != "master", view
        wait_until(
            lambda: old_master.state()["this_node"]["role"] == "follower",
            60.0,
            "the resumed node to follow the new master",
        )
        writer.stop()
        for _, status, text in writer.refused:
            assert status in (0, 503, 504), text
        wait_converged(nodes, 3, "all 3 nodes to hold the same log again")
        acknowledged = {iid for _, iid in writer.acknowledged}
        for node in nodes:
            missing = acknowledged - set(node.state()["instances"])
            assert not missing, f"{node.node_id()} lost {len(missing)} acknowledged writes"
