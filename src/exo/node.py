"""One exo node: router, election, log sync, master, worker and API in one task group."""

import contextlib
import fcntl
import os
import signal
import socket
import uuid
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import anyio
import uvicorn
from loguru import logger

from exo.api.app import create_app
from exo.api.context import ApiContext
from exo.api.guard import guarded
from exo.loop_watch import LoopWatch
from exo.master.commands import handle_command
from exo.master.main import Master
from exo.master.planning import RING_BASE_PORT
from exo.master.replacement import ReplacementConfig
from exo.models.cards import known_model_cards, register_model_card, use_weights_cache
from exo.models.directory import scan_models_dir
from exo.models.weights_cache import weights_cache_in
from exo.routing.cluster_secret import (
    SECRET_ENV,
    SECRET_FILE,
    ClusterSecretError,
    resolve_cluster_secret,
)
from exo.routing.context import ClusterContext
from exo.routing.election import Election, now_us
from exo.routing.event_sync import EventSync
from exo.routing.local_events import LocalEventSender
from exo.routing.prompts import PromptExchange
from exo.routing.router import Router, RouterConfig, TlsFiles
from exo.routing.term_store import TermStore, TermStoreError
from exo.routing.topics import Topics
from exo.shared.event_log import LogDamagedError
from exo.shared.event_store import EventStore
from exo.shared.snapshot import SnapshotDamagedError
from exo.shared.types.ids import NodeId
from exo.shared.types.models import ModelCard
from exo.worker.link_probe import LinkProbeConfig, LinkProber
from exo.worker.main import Worker, WorkerConfig

NODE_ID_FILE = "node_id"
LOCK_FILE = "lock"
_home_locks: list[IO[bytes]] = []
"""Open lock files of the homes this process holds (kept open until it exits)."""
FSYNC_INTERVAL_S = 1.0


class StartupError(Exception):
    """The node cannot start; the message is one sentence for the user (exit code 2)."""


@dataclass(frozen=True)
class NodeConfig:
    home: Path
    namespace: str = "exo"
    listen: list[str] = field(default_factory=lambda: ["tcp/0.0.0.0:52414"])
    connect: list[str] = field(default_factory=list[str])
    discovery: bool = True
    api_host: str = "127.0.0.1"
    api_port: int = 52415
    ring_port: int = RING_BASE_PORT
    """The first port this node's runner ranks listen on for the MLX ring."""
    api_key: str | None = None
    """Every API request must carry ``Authorization: Bearer <api_key>`` when set."""
    cluster_secret: str | None = None
    """Given with --cluster-secret; else $EXO_CLUSTER_SECRET, the home's, or a new one."""
    tls: TlsFiles = field(default_factory=TlsFiles)
    run_worker: bool = True
    friendly_name: str | None = None
    election_settle_s: float = 1.5
    link_probe_interval_s: float = 60.0
    gpu_backend: str = "auto"
    simulate_gpus_file: Path | None = None
    telemetry_interval_s: float = 2.0
    models_dir: Path | None = None
    """MLX model directories to offer (one model per subdirectory, id = its name)."""
    replacement: ReplacementConfig = field(default_factory=ReplacementConfig)
    """When this node, as master, heals and moves instances."""


def lock_home(home: Path) -> IO[bytes]:
    """Hold an exclusive lock on the home for the life of the process: two nodes writing one
    event log would corrupt it. The lock goes with the process, even after kill -9."""
    handle = (home / LOCK_FILE).open("ab")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as error:
        handle.close()
        raise StartupError(
            f"home directory {home} is in use by another exo node; give this one its own --home"
        ) from error
    return handle


def prepare_home(home: Path) -> NodeId:
    """Create the home directory if needed, lock it, and load (or create) this node's id."""
    try:
        home.mkdir(parents=True, exist_ok=True)
        _home_locks.append(lock_home(home))
        (home / "events").mkdir(exist_ok=True)
        id_file = home / NODE_ID_FILE
        if id_file.exists():
            node_id = id_file.read_text().strip()
            if not node_id:
                raise StartupError(f"{id_file} is empty; delete it to get a new node id")
            return NodeId(node_id)
        node_id = NodeId(str(uuid.uuid4()))
        temporary = id_file.with_suffix(".tmp")
        temporary.write_text(node_id + "\n")
        os.replace(temporary, id_file)
        return node_id
    except OSError as error:
        raise StartupError(
            f"cannot use home directory {home}: {error.strerror or error}"
        ) from error


def bind_api_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise StartupError(
            f"cannot serve the API on {host}:{port}: {error.strerror or error}"
        ) from error
    sock.listen(128)
    sock.setblocking(False)
    return sock


class _ApiServer(uvicorn.Server):
    """uvicorn without its own signal handling (the node owns SIGINT/SIGTERM), and with
    one housekeeping tick a second instead of ten: all uvicorn does on a tick that matters
    here is refresh its Date header once a second, and the node stops it by cancelling."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None]:
        yield

    async def main_loop(self) -> None:
        # uvicorn refreshes the header on ticks whose counter is a multiple of ten: each one.
        while not await self.on_tick(0):
            await anyio.sleep(1.0)


def register_models_dir(models_dir: Path) -> list[ModelCard]:
    """Make every model directory under ``models_dir`` placeable and servable here."""
    try:
        cards = scan_models_dir(models_dir)
    except OSError as error:
        raise StartupError(
            f"cannot read --models-dir {models_dir}: {error.strerror or error}"
        ) from error
    for card in cards:
        register_model_card(card)
        logger.info(
            f"model {card.model_id}: {card.n_layers} layers, "
            f"{card.total_bytes / 1e6:.1f} MB, from {card.weights_path}"
        )
    return cards


async def run_node(config: NodeConfig) -> None:
    node_id = prepare_home(config.home)
    try:
        secret = resolve_cluster_secret(config.cluster_secret, config.home)
    except ClusterSecretError as error:
        raise StartupError(str(error)) from error
    except OSError as error:
        raise StartupError(f"cannot store the cluster secret in {config.home}: {error}") from error
    if secret.created:
        logger.info(
            f"this node made a new cluster secret, stored in {config.home / SECRET_FILE}: "
            f"{secret.value} — start the other nodes with --cluster-secret {secret.value} "
            f"(or {SECRET_ENV}) so they can join"
        )
    elif secret.replaced:
        logger.warning(
            f"the cluster secret from {secret.source} replaces the one stored in "
            f"{config.home / SECRET_FILE}"
        )
    else:
        logger.info(f"cluster secret from {secret.source}")
    use_weights_cache(weights_cache_in(config.home))
    if config.models_dir is not None:
        register_models_dir(config.models_dir)
    api_socket = bind_api_socket(config.api_host, config.api_port)
    store = EventStore(config.home / "events")
    terms = TermStore(config.home)
    damage: LogDamagedError | None = None
    try:
        terms.load()
        try:
            store.load()
        except LogDamagedError as error:
            damage = error
            if not (config.connect or config.discovery):
                raise StartupError(
                    f"{error}; this node has no peer to get the rest from (give --connect "
                    "to a cluster member, or move the file aside to start from scratch)"
                ) from error
            store.load(salvage=True)
    except (OSError, TermStoreError) as error:
        api_socket.close()
        store.close()
        raise StartupError(f"cannot read the event log in {config.home}: {error}") from error
    except SnapshotDamagedError as error:
        api_socket.close()
        store.close()
        raise StartupError(
            f"{error}, and the log after it cannot be replayed without it; restore the file "
            f"from a backup, or move {config.home / 'events'} aside to start with an empty log "
            "that the node refills from a cluster member (give --connect; alone it starts empty)"
        ) from error
    except StartupError:
        api_socket.close()
        raise
    router = Router(
        RouterConfig(
            config.listen,
            config.connect,
            config.discovery,
            secret=secret.value,
            dictionary_file=secret.dictionary_file,
            tls=config.tls,
        )
    )
    try:
        await router.open()
    except Exception:
        api_socket.close()
        store.close()
        raise
    logger.info(f"node {node_id} starting (home {config.home}, namespace {config.namespace})")
    topics = Topics(config.namespace)
    loop_watch = LoopWatch()
    election = Election(
        router, topics, node_id, now_us(), config.election_settle_s, store, terms, loop_watch
    )
    if damage is not None:
        election.stand_from_idx = damage.record_idx
    cluster = ClusterContext(node_id, router, topics, election, store, loop_watch)
    sync = EventSync(cluster)
    sender = LocalEventSender(cluster)
    master = Master(cluster, handle_command, config.replacement)
    link_prober = LinkProber(cluster, sender, LinkProbeConfig(config.link_probe_interval_s))
    sync.start()
    master.start()
    link_prober.start()
    election.start()
    prompts = PromptExchange(router, topics, node_id)
    prompts.start()
    context = ApiContext(cluster, sender, prompts)
    server = _ApiServer(
        uvicorn.Config(
            guarded(create_app(context), config.api_key),
            log_level="warning",
            log_config=None,  # its records go through loguru (exo.main.configure_logging)
            lifespan="off",
            access_log=False,
        )
    )
    try:
        async with anyio.create_task_group() as group:
            group.start_soon(_stop_on_signal, group.cancel_scope)
            group.start_soon(loop_watch.run)
            group.start_soon(election.run)
            group.start_soon(sync.run)
            group.start_soon(sender.run)
            group.start_soon(master.run)
            group.start_soon(_sync_disk_periodically, store)
            if damage is not None:
                group.start_soon(_require_repair, store, damage)
            if config.connect:
                group.start_soon(_warn_when_alone, router, config.connect)
            # The bundled model's card needs its import (once per machine, a child process):
            # do it now, off the event loop, rather than in the first request that asks.
            group.start_soon(anyio.to_thread.run_sync, known_model_cards)
            if config.run_worker:
                worker_config = WorkerConfig(
                    home=config.home,
                    friendly_name=config.friendly_name,
                    api_port=config.api_port,
                    ring_port=config.ring_port,
                    gpu_backend=config.gpu_backend,
                    simulate_gpus_file=config.simulate_gpus_file,
                    telemetry_interval_s=config.telemetry_interval_s,
                )
                worker = Worker(node_id, store, sender, prompts, worker_config)
                group.start_soon(worker.run)
                group.start_soon(link_prober.run)
            group.start_soon(_serve_api, server, api_socket)
            logger.info(f"API listening on http://{config.api_host}:{config.api_port}")
    finally:
        with anyio.CancelScope(shield=True):
            await router.close()
            store.close()
            api_socket.close()
            logger.info("node stopped")


async def _serve_api(server: uvicorn.Server, sock: socket.socket) -> None:
    try:
        await server.serve(sockets=[sock])
    finally:
        server.should_exit = True


async def _stop_on_signal(scope: anyio.CancelScope) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for received in signals:
            logger.info(f"received {signal.Signals(received).name}; shutting down")
            scope.cancel()
            return


JOIN_CHECK_S = 10.0
REPAIR_WAIT_S = 30.0


async def _warn_when_alone(router: Router, connect: list[str]) -> None:
    """A node told where its peers are but with none after a while says why that may be."""
    await anyio.sleep(JOIN_CHECK_S)
    if router.peer_count() == 0:
        logger.warning(
            f"no peer has accepted this node after {JOIN_CHECK_S:.0f} s (--connect "
            f"{' '.join(connect)}): are they up, and do all nodes hold the same cluster secret?"
        )


async def _require_repair(store: EventStore, damage: LogDamagedError) -> None:
    """A node whose log was cut at a damaged record must get the rest from a peer soon;
    it never goes on (or becomes master) with the shortened log."""
    if not await store.wait_for_index(damage.record_idx, REPAIR_WAIT_S):
        raise StartupError(
            f"{damage}; no peer supplied the records from {damage.record_idx} on within "
            f"{REPAIR_WAIT_S:.0f} s, so this node does not start from a shortened log"
        )
    logger.info(f"event log repaired from the cluster: records {damage.record_idx} on refetched")


async def _sync_disk_periodically(store: EventStore) -> None:
    while True:
        await anyio.sleep(FSYNC_INTERVAL_S)
        await store.make_durable_in_thread()
