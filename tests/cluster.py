"""Start real ``exo`` node processes on 127.0.0.1 for cluster tests and benchmarks."""

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import httpx
import zenoh

JsonDict = dict[str, Any]


TEST_CLUSTER_SECRET = "exo-test-cluster-secret-0123456789"
"""What every test node holds unless a test gives it another (nodes with different secrets
never see each other)."""

SHARED_WEIGHTS_CACHE = Path(tempfile.gettempdir()) / f"exo-test-weights-{os.getuid()}"
"""The weights cache every test node shares (imports are atomic: a directory renamed into
place), so the bundled model is imported once per machine, as in production."""

PORT_RANGE = (20000, 32000)
"""Below Linux's ephemeral range (32768+), so outgoing connections never take our ports."""


def ring_port() -> int:
    """Where this test process's nodes put their ranks' ring ports (``--ring-port``): one
    range per xdist worker, each below PORT_RANGE, so that two clusters running at once on
    two workers never join each other's rings (each worker runs one cluster at a time)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker.removeprefix("gw")) if worker.removeprefix("gw").isdigit() else 0
    return 10000 + 1000 * (index % 10)


def free_port() -> int:
    """A port in PORT_RANGE that is free right now."""
    while True:
        port = random.randrange(*PORT_RANGE)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


class ExoNode:
    def __init__(
        self,
        home: Path,
        peers: list[str],
        extra_args: list[str] | None = None,
        discovery: bool = False,
        api_key: str | None = None,
        cluster_secret: str | None = TEST_CLUSTER_SECRET,
        protocol: str = "tcp",
        host: str = "127.0.0.1",
        extra_listen: list[str] | None = None,
        prefix: list[str] | None = None,
    ) -> None:
        """``host``: the address its zenoh endpoint and API use (an address other than
        loopback gets --insecure-api); ``extra_listen``: more zenoh endpoints; ``prefix``:
        what the command runs under (``ip netns exec NAME``, say)."""
        self.home = home
        self.host = host
        self.extra_listen = extra_listen or []
        self.prefix = prefix or []
        self.protocol = protocol
        self.api_key = api_key
        self.cluster_secret = cluster_secret
        self.discovery = discovery
        self.api_port = free_port()
        self.zenoh_port = free_port()
        self.peers = peers
        self.extra_args = extra_args or []
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = home.parent / f"{home.name}.log"

    @property
    def endpoint(self) -> str:
        return f"{self.protocol}/{self.host}:{self.zenoh_port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.api_port}"

    def start(self) -> None:
        args = [
            *self.prefix,
            sys.executable,
            "-m",
            "exo.main",
            *([] if self.discovery else ["--no-discovery"]),
            "--api-host",
            self.host,
            *(["--insecure-api"] if self.host != "127.0.0.1" else []),
            "--api-port",
            str(self.api_port),
            "--listen",
            self.endpoint,
            *[arg for endpoint in self.extra_listen for arg in ("--listen", endpoint)],
            "--home",
            str(self.home),
            "--election-settle",
            "1.0",
            "--ring-port",
            str(ring_port()),
            *[arg for peer in self.peers if peer != self.endpoint for arg in ("--connect", peer)],
            *(["--api-key", self.api_key] if self.api_key else []),
            *(["--cluster-secret", self.cluster_secret] if self.cluster_secret else []),
            *self.extra_args,
        ]
        log = self.log_path.open("ab")
        env = {
            **os.environ,
            "EXO_GPU_BACKEND": os.environ.get("EXO_GPU_BACKEND", "cpu"),
            # One import of the bundled model for the whole test run, not one per node.
            "EXO_WEIGHTS_CACHE": os.environ.get("EXO_WEIGHTS_CACHE", str(SHARED_WEIGHTS_CACHE)),
        }
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()

    def wait_ready(self, timeout_s: float = 20.0) -> None:
        """Wait for the API. A node that exited because a port was taken meanwhile is
        started again on new ports; any other early exit fails with the node's log."""
        for _ in range(3):
            assert self.process is not None
            try:
                wait_until(
                    lambda: self.try_get("/node_id") is not None or self.process_exited(),
                    timeout_s,
                    f"{self.url} to answer",
                )
            except AssertionError as error:
                raise AssertionError(
                    f"{error}\n--- node log ---\n{self.log_text()[-3000:]}"
                ) from error
            if not self.process_exited():
                return
            log = self.log_text()
            if self.process.returncode != 2 or "in use" not in log.splitlines()[-1]:
                raise AssertionError(f"node exited with {self.process.returncode}:\n{log[-3000:]}")
            self.api_port, self.zenoh_port = free_port(), free_port()
            self.start()
        raise AssertionError(f"node could not find free ports:\n{self.log_text()[-3000:]}")

    def process_exited(self) -> bool:
        return self.process is not None and self.process.poll() is not None

    @property
    def headers(self) -> dict[str, str]:
        """What every request to this node carries (its API key, when it has one)."""
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def try_get(self, path: str) -> JsonDict | None:
        try:
            response = httpx.get(self.url + path, timeout=2.0, headers=self.headers)
        except httpx.HTTPError:
            return None
        return response.json() if response.status_code == 200 else None

    def get(self, path: str) -> JsonDict:
        response = httpx.get(self.url + path, timeout=5.0, headers=self.headers)
        response.raise_for_status()
        return response.json()

    def get_list(self, path: str) -> list[JsonDict]:
        response = httpx.get(self.url + path, timeout=5.0, headers=self.headers)
        response.raise_for_status()
        return response.json()

    def state(self) -> JsonDict:
        return self.get("/state")

    def node_id(self) -> str:
        return str(self.get("/node_id")["node_id"])

    def all_events(self) -> list[JsonDict]:
        events: list[JsonDict] = []
        since = -1
        while True:
            page = self.get(f"/events?since={since}&limit=10000")["events"]
            if not page:
                return events
            events.extend(page)
            since = page[-1]["idx"]

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def terminate(self, timeout_s: float = 15.0) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout_s)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Poll until predicate holds; returns the seconds it took. Fails the test on timeout."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        with contextlib.suppress(httpx.HTTPError):
            if predicate():
                return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def stays_true(predicate: Callable[[], bool], window_s: float, what: str) -> None:
    """Watch that predicate holds for the whole window (what must not happen has had the
    time to happen); fails as soon as one look finds it broken, so a passing change that
    undoes itself fails too, where a sleep and one assert would miss it."""
    start = time.monotonic()
    while True:
        if not predicate():
            broken_at = time.monotonic() - start
            raise AssertionError(f"{what} was broken {broken_at:.1f}s into the {window_s}s window")
        if time.monotonic() - start >= window_s:
            return
        time.sleep(0.1)


@contextlib.contextmanager
def running_cluster(
    base: Path, count: int, extra_args: Callable[[int], list[str]] | None = None
) -> Generator[list[ExoNode]]:
    """Start count nodes that all know each other's endpoints; always stop them."""
    base.mkdir(parents=True, exist_ok=True)
    nodes: list[ExoNode] = []
    for index in range(count):
        nodes.append(ExoNode(base / f"node{index}", [], extra_args(index) if extra_args else None))
    endpoints = [node.endpoint for node in nodes]
    for node in nodes:
        node.peers = endpoints
    try:
        for node in nodes:
            node.start()
        for node in nodes:
            node.wait_ready()
        yield nodes
    except BaseException:
        # Shown with the failure (pytest prints a failed test's output): what each node
        # warned about and how its elections went.
        for node in nodes:
            print(
                f"--- {node.url} ({node.log_path}) ---", *_notable(node.log_text())[-25:], sep="\n"
            )
        raise
    finally:
        for node in nodes:
            node.kill()


def disagreement(nodes: list[ExoNode], expected_nodes: int) -> str | None:
    """What keeps these nodes from agreeing (each must know expected_nodes nodes, follow
    one master and have applied the same last event), or None when they agree."""
    states = [node.state() for node in nodes]
    masters = {state["master_node_id"] for state in states}
    indices = {state["last_event_applied_idx"] for state in states}
    if (
        all(len(state["nodes"]) == expected_nodes for state in states)
        and len(masters) == 1
        and None not in masters
        and len(indices) == 1
    ):
        return None
    return "; ".join(
        f"{node.url}: {len(state['nodes'])} nodes, master {state['master_node_id']}, "
        f"last event {state['last_event_applied_idx']}"
        for node, state in zip(nodes, states, strict=True)
    )


def converged(nodes: list[ExoNode], expected_nodes: int) -> bool:
    return disagreement(nodes, expected_nodes) is None


CONVERGE_WITHIN_S = 30.0
"""A generous deadline for nodes to agree: on a loaded 2-core machine an election and a
catch-up can take several seconds, a broken one never ends."""


def wait_converged(
    nodes: list[ExoNode], expected_nodes: int, what: str, timeout_s: float = CONVERGE_WITHIN_S
) -> float:
    """Wait until the nodes agree (:func:`disagreement`); on timeout the failure says what
    differed last and quotes each node's warnings and elections."""
    last: list[str] = ["no node answered"]

    def agreed() -> bool:
        try:
            reason = disagreement(nodes, expected_nodes)
        except httpx.HTTPError as error:
            last[0] = f"a read failed: {error!r}"
            raise
        if reason is not None:
            last[0] = reason
        return reason is None

    try:
        return wait_until(agreed, timeout_s, what)
    except AssertionError as error:
        notes = "\n".join(
            f"--- {node.url} ---\n" + "\n".join(_notable(node.log_text())[-15:]) for node in nodes
        )
        raise AssertionError(f"{error}; last seen: {last[0]}\n{notes}") from None


def _notable(log: str) -> list[str]:
    return [
        line[:300]
        for line in log.splitlines()
        if "WARNING" in line or "ERROR" in line or "elected" in line or "master" in line
    ]


def zenoh_peer(
    endpoint: str | None,
    directory: Path,
    secret: str | None = TEST_CLUSTER_SECRET,
    config: zenoh.Config | None = None,
    listen: str | None = None,
) -> zenoh.Session:
    """A bare zenoh session connected to a node's endpoint (or to none), as another program
    would open one: with the cluster's credentials by default, without any when ``secret``
    is None; listening on ``listen`` if given; ``config`` may carry more settings (TLS
    files, say)."""
    config = config if config is not None else zenoh.Config()
    config.insert_json5("mode", '"peer"')
    config.insert_json5("connect/endpoints", json.dumps([endpoint] if endpoint else []))
    config.insert_json5("connect/timeout_ms", "2000")
    config.insert_json5("connect/exit_on_failure", "false")
    config.insert_json5("listen/endpoints", json.dumps([listen] if listen else []))
    config.insert_json5("scouting/multicast/enabled", "false")
    if secret is not None:
        directory.mkdir(parents=True, exist_ok=True)
        dictionary = directory / "users"
        dictionary.write_text(f"exo:{secret}\n")
        config.insert_json5("transport/auth/usrpwd/user", '"exo"')
        config.insert_json5("transport/auth/usrpwd/password", json.dumps(secret))
        config.insert_json5("transport/auth/usrpwd/dictionary_file", json.dumps(str(dictionary)))
    return zenoh.open(config)
