"""No stranger can join, read or wreck the cluster: a zenoh peer without the cluster secret
(or with a wrong one) tries every attack a peer could, and nothing changes.

Each attack is made twice over the same kind of zenoh session: once by an *insider* that
holds the secret (the evidence that the attempt reaches the nodes: its reads get answers,
its subscription gets the cluster's events, its forged messages reach the nodes' checks),
and once by the stranger, who gets nothing and changes nothing.
"""

import json
import shutil
import subprocess
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
    free_port,
    running_cluster,
    wait_converged,
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
                    {
                        "kind": "PlaceInstance",
                        "model_id": "Llama-3.1-8B-Instruct-4bit",
                        "allow_planning_only": True,
                    }
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
        wait_converged(nodes, 3, "3 nodes to agree")
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
                lambda: len(list(insider.info.peers_zid())) >= 1, 60.0, "the insider to join"
            )
            insider_log, insider_tokens = read_everything(insider, master_id)
            assert insider_log and len(insider_tokens) == 3
            # ...the stranger's are refused at the transport: no session, no answers.
            assert list(stranger.info.peers_zid()) == []
            assert read_everything(stranger, master_id) == ([], [])

            # Writes: every attack, by the stranger.
            queryables = attack(stranger, master_id, len(before) - 1)
            # Seconds of attempts later (the insider joined in milliseconds), the stranger
            # still has no session with any node: the transport refused it every time.
            assert list(stranger.info.peers_zid()) == []

            # The cluster keeps working meanwhile, and the insider hears it; the stranger
            # subscribed to everything and hears nothing but itself.
            probe = httpx.post(nodes[1].url + "/probe", timeout=5.0).json()
            wait_until(
                lambda: (
                    probe["event_id"]
                    in {entry["event"]["event_id"] for entry in nodes[0].all_events()}
                ),
                60.0,
                "a probe after the attacks to be logged",
            )
            marker = probe["event_id"].encode()

            def heard_probe(name: str) -> bool:
                with lock:
                    return any(marker in payload for payload in heard[name])

            wait_until(lambda: heard_probe("insider"), 60.0, "the insider to hear the probe")
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
        wait_until(lambda: converged([a], 1) and converged([b], 1), 30.0, "each to elect itself")
        wait_until(
            lambda: "cluster secret" in a.log_text() and "no peer" in a.log_text(),
            60.0,
            "a to say it is alone",
        )
        assert set(a.state()["nodes"]) == {a.node_id()}
        assert set(b.state()["nodes"]) == {b.node_id()}
    finally:
        a.kill()
        b.kill()


@pytest.mark.parametrize(
    "stranger_secret", [None, "not-the-cluster-secret-42"], ids=["no secret", "wrong secret"]
)
def test_a_node_that_connects_to_a_stranger_gets_no_session(
    tmp_path: Path, stranger_secret: str | None
) -> None:
    """The other direction: the stranger listens and the node opens the link (as it does
    for --connect and for peers it discovers). The node's side refuses it too."""
    port = free_port()
    stranger = zenoh_peer(
        None, tmp_path / "stranger", stranger_secret, listen=f"tcp/127.0.0.1:{port}"
    )
    heard: list[str] = []
    subscription = stranger.declare_subscriber(
        "**", lambda sample: heard.append(str(sample.key_expr))
    )
    node = ExoNode(tmp_path / "node", [f"tcp/127.0.0.1:{port}"])
    node.start()
    try:
        node.wait_ready()
        # The node tried the stranger's address for 10 s and says nobody accepted it.
        wait_until(lambda: "no peer has accepted" in node.log_text(), 60.0, "the node to give up")
        assert list(stranger.info.peers_zid()) == []
        assert heard == []
        assert set(node.state()["nodes"]) == {node.node_id()}
    finally:
        node.kill()
        subscription.undeclare()
        stranger.close()


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


def make_certificates(directory: Path, name: str) -> tuple[Path, Path, Path]:
    """A test CA and a node certificate it signed for 127.0.0.1: (ca, cert, key), PEM."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = directory / f"{name}-ca.pem", directory / f"{name}-ca.key"
    cert, key = directory / f"{name}-node.pem", directory / f"{name}-node.key"
    request, extensions = directory / f"{name}-node.csr", directory / f"{name}-ext.cnf"
    extensions.write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "basicConstraints=CA:FALSE\n"
        "extendedKeyUsage=serverAuth,clientAuth\n"
    )
    elliptic = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    ca_subject = ["-subj", f"/CN={name} test CA"]
    ca_extensions = [
        *("-addext", "basicConstraints=critical,CA:TRUE"),
        *("-addext", "keyUsage=critical,keyCertSign,cRLSign"),
    ]
    commands = [
        [
            "req",
            "-x509",
            *elliptic,
            "-keyout",
            ca_key,
            "-out",
            ca,
            "-days",
            "2",
            *ca_subject,
            *ca_extensions,
        ],
        ["req", *elliptic, "-keyout", key, "-out", request, "-subj", "/CN=localhost"],
        [
            *("x509", "-req", "-in", request, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial"),
            *("-out", cert, "-days", "2", "-extfile", extensions),
        ],
    ]
    for command in commands:
        subprocess.run(["openssl", *map(str, command)], check=True, capture_output=True)
    return ca, cert, key


def tls_peer(endpoint: str, directory: Path, ca: Path, cert: Path, key: Path) -> zenoh.Session:
    """A zenoh peer with the cluster secret that opens a mutual-TLS link with its own
    certificate, checking the node's against ``ca``."""
    session_config = zenoh.Config()
    session_config.insert_json5("transport/link/tls/root_ca_certificate", json.dumps(str(ca)))
    session_config.insert_json5("transport/link/tls/enable_mtls", "true")
    session_config.insert_json5("transport/link/tls/connect_certificate", json.dumps(str(cert)))
    session_config.insert_json5("transport/link/tls/connect_private_key", json.dumps(str(key)))
    return zenoh_peer(endpoint, directory, config=session_config)


@pytest.mark.skipif(
    shutil.which("openssl") is None, reason="needs openssl to make test certificates"
)
def test_nodes_join_over_mutual_tls_and_refuse_a_foreign_certificate(tmp_path: Path) -> None:
    ca, cert, key = make_certificates(tmp_path / "pki", "cluster")
    tls_args = ["--tls-cert", str(cert), "--tls-key", str(key), "--tls-ca", str(ca)]
    nodes = [ExoNode(tmp_path / f"node{index}", [], tls_args, protocol="tls") for index in range(2)]
    nodes[1].peers = [nodes[0].endpoint]
    for node in nodes:
        node.start()
    try:
        for node in nodes:
            node.wait_ready()
        wait_converged(nodes, 2, "2 nodes to agree over TLS")

        # A peer with the secret and a certificate from the cluster's CA joins (the
        # evidence that a TLS peer reaches the node); one whose certificate another CA
        # signed is refused by the node even though it trusts the node's CA.
        _, foreign_cert, foreign_key = make_certificates(tmp_path / "pki", "foreign")
        member = tls_peer(nodes[0].endpoint, tmp_path / "member", ca, cert, key)
        foreign = tls_peer(nodes[0].endpoint, tmp_path / "foreign", ca, foreign_cert, foreign_key)
        try:
            wait_until(lambda: len(list(member.info.peers_zid())) >= 1, 60.0, "the member")
            assert read_everything(member, nodes[0].node_id())[0]
            assert list(foreign.info.peers_zid()) == []
            assert read_everything(foreign, nodes[0].node_id()) == ([], [])
        finally:
            member.close()
            foreign.close()
        assert set(nodes[0].state()["nodes"]) == {node.node_id() for node in nodes}
    finally:
        for node in nodes:
            node.kill()
