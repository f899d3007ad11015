"""No stranger can join, read or wreck the cluster: a zenoh peer without the cluster secret
(or with a wrong one) tries every attack a peer could, and nothing changes.

Each attack is made twice over the same kind of zenoh session: once by an *insider* that
holds the secret (the evidence that the attempt reaches the nodes: its reads get answers,
its subscription gets the cluster's events, its forged messages reach the nodes' checks),
and once by the stranger, who gets nothing and changes nothing.
"""

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import zenoh

from tests.cluster import (
    ExoNode,
    converged,
    running_cluster,
    wait_until,
    zenoh_peer,
)

pytestmark = pytest.mark.cluster

FAKE_NODE = "fake-master-0000"


def attack(session: zenoh.Session, master_id: str, last_idx: int) -> list[zenoh.Queryable[None]]:
    """Every write a peer could make: the fake-master takeover (an older liveliness token,
    a log to catch up from, election announcements), forged events, commands."""
    fake_event = {"kind": "NodeTimedOut", "event_id": "forged-0001", "node_id": master_id}
    one_event_log = json.dumps(
        {"node_id": FAKE_NODE, "events": [{"idx": 0, "event": fake_event}], "last_event_idx": 0}
    ).encode()

    def serve_log(query: zenoh.Query) -> None:
        query.reply(query.key_expr, one_event_log)

    session.liveliness().declare_token(f"exo/alive/{FAKE_NODE}/1")
    queryables = [session.declare_queryable(f"exo/log/{FAKE_NODE}", serve_log)]
    for _ in range(5):
        session.put(
            "exo/election",
            json.dumps(
                {
                    "node_id": FAKE_NODE,
                    "started_at_us": 1,
                    "last_event_idx": 10**9,
                    "master_node_id": FAKE_NODE,
                }
            ).encode(),
        )
        session.put(
            "exo/global_events",
            json.dumps(
                {
                    "master_node_id": master_id,
                    "indexed_event": {"idx": last_idx + 1, "event": fake_event},
                }
            ).encode(),
        )
        session.put(
            "exo/local_events",
            json.dumps({"origin_node_id": master_id, "event": fake_event}).encode(),
        )
        list(
            session.get(
                "exo/commands",
                payload=json.dumps(
                    {"kind": "PlaceInstance", "model_id": "Llama-3.1-8B-Instruct-4bit"}
                ).encode(),
                timeout=1.0,
            )
        )
        time.sleep(0.2)
    return queryables


def read_everything(session: zenoh.Session, node_id: str) -> tuple[list[bytes], list[str]]:
    """A node's log (its queryable) and every live token."""
    log = [
        reply.ok.payload.to_bytes()
        for reply in session.get(f"exo/log/{node_id}?from=0;to=100", timeout=2.0)
        if reply.ok is not None
    ]
    tokens = [
        str(reply.ok.key_expr)
        for reply in session.liveliness().get("exo/alive/**", timeout=2.0)
        if reply.ok is not None
    ]
    return log, tokens


@pytest.mark.parametrize(
    "stranger_secret", [None, "not-the-cluster-secret-42"], ids=["no secret", "wrong secret"]
)
def test_a_stranger_can_neither_read_nor_change_anything(
    tmp_path: Path, stranger_secret: str | None
) -> None:
    with running_cluster(tmp_path / "cluster", 3) as nodes:
        wait_until(lambda: converged(nodes, 3), 10.0, "3 nodes to agree")
        state = nodes[0].state()
        master_id = state["master_node_id"]
        node_ids = set(state["nodes"])
        before = [entry["event"]["event_id"] for entry in nodes[0].all_events()]

        insider = zenoh_peer(nodes[0].endpoint, tmp_path / "insider")
        stranger = zenoh_peer(nodes[0].endpoint, tmp_path / "stranger", stranger_secret)
        heard: dict[str, list[bytes]] = {"insider": [], "stranger": []}
        lock = threading.Lock()

        def listener(name: str) -> Callable[[zenoh.Sample], None]:
            def on_sample(sample: zenoh.Sample) -> None:
                with lock:
                    heard[name].append(sample.payload.to_bytes())

            return on_sample

        subscriptions = [
            insider.declare_subscriber("**", listener("insider")),
            stranger.declare_subscriber("**", listener("stranger")),
        ]
        try:
            # Reads: the insider's reach the nodes and are answered...
            wait_until(
                lambda: len(list(insider.info.peers_zid())) >= 1, 10.0, "the insider to join"
            )
            insider_log, insider_tokens = read_everything(insider, master_id)
            assert insider_log and len(insider_tokens) == 3
            # ...the stranger's are refused at the transport: no session, no answers.
            assert list(stranger.info.peers_zid()) == []
            assert read_everything(stranger, master_id) == ([], [])

            # Writes: every attack, by the stranger.
            queryables = attack(stranger, master_id, len(before) - 1)

            # The cluster keeps working meanwhile, and the insider hears it; the stranger
            # subscribed to everything and hears nothing but itself.
            probe = httpx.post(nodes[1].url + "/probe", timeout=5.0).json()
            wait_until(
                lambda: (
                    probe["event_id"]
                    in {entry["event"]["event_id"] for entry in nodes[0].all_events()}
                ),
                10.0,
                "a probe after the attacks to be logged",
            )
            marker = probe["event_id"].encode()

            def heard_probe(name: str) -> bool:
                with lock:
                    return any(marker in payload for payload in heard[name])

            wait_until(lambda: heard_probe("insider"), 5.0, "the insider to hear the probe")
            assert not heard_probe("stranger")  # it hears nothing but its own puts
            for queryable in queryables:
                queryable.undeclare()
        finally:
            for subscription in subscriptions:
                subscription.undeclare()
            stranger.close()
            insider.close()

        for node in nodes:
            state = node.state()
            assert state["master_node_id"] == master_id
            assert set(state["nodes"]) == node_ids
            assert "Llama-3.1-8B-Instruct-4bit" not in {
                instance["model_id"] for instance in state["instances"].values()
            }
            logged = [entry["event"]["event_id"] for entry in node.all_events()]
            assert logged[: len(before)] == before  # nothing cut
            assert "forged-0001" not in logged
        assert FAKE_NODE not in "".join(node.log_text() for node in nodes)


def test_nodes_with_different_secrets_never_meet(tmp_path: Path) -> None:
    a = ExoNode(tmp_path / "a", [], cluster_secret="the-first-cluster-secret-1")
    b = ExoNode(tmp_path / "b", [], cluster_secret="the-other-cluster-secret-2")
    a.peers = b.peers = [a.endpoint, b.endpoint]
    for node in (a, b):
        node.start()
    try:
        for node in (a, b):
            node.wait_ready()
        wait_until(lambda: converged([a], 1) and converged([b], 1), 10.0, "each to elect itself")
        wait_until(
            lambda: "cluster secret" in a.log_text() and "no peer" in a.log_text(),
            20.0,
            "a to say it is alone",
        )
        assert set(a.state()["nodes"]) == {a.node_id()}
        assert set(b.state()["nodes"]) == {b.node_id()}
    finally:
        a.kill()
        b.kill()


def test_a_first_node_makes_and_keeps_its_secret(tmp_path: Path) -> None:
    node = ExoNode(tmp_path / "first", [], cluster_secret=None)
    node.start()
    try:
        node.wait_ready()
        secret = (node.home / "cluster_secret").read_text().strip()
        assert len(secret) >= 16
        assert oct((node.home / "cluster_secret").stat().st_mode & 0o777) == "0o600"
        assert f"--cluster-secret {secret}" in node.log_text()
        assert node.terminate() == 0
        node.start()  # the same home: the same secret, not printed again
        node.wait_ready()
        assert (node.home / "cluster_secret").read_text().strip() == secret
        assert node.log_text().count("made a new cluster secret") == 1
        assert "cluster secret from" in node.log_text()
    finally:
        node.kill()
