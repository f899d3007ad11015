"""``GET /metrics``: the node's view of the cluster in Prometheus' text format.

Two kinds of metric, in one registry per app (never prometheus-client's global one):

* **Gauges read from the state at scrape time** (:class:`StateCollector`): every device's
  live reading, the cluster (nodes, members, master, event indices), instances and runners.
  The values are exactly the state's, as ``GET /gpus`` and ``GET /state`` show it; a device
  reading without a value (no temperature, no power reading) has no sample.
* **Request counters and histograms** (:class:`RequestMetrics`) for the chat requests this
  node's API took (``requested_by`` this node), derived from the events this node applies:
  a request starts when its ``TaskCreated`` is applied here, its first token arrives with its
  first ``ChunkGenerated`` and it ends with its final chunk or the task's end
  (``TaskStatusUpdated``, or the task failing or leaving the state with its instance). The
  times are the apply times on this node, so they include the trip of the events through the
  master, not the HTTP request's own parsing. Each node counts only its own requests, so
  summing over nodes counts each request once.

Event apply lag (``exo_event_apply_lag_events``) is how many events the master had indexed,
as of its last announcement, that this node has not applied yet (0 on the master itself; no
sample while no master is known). ``exo_event_last_applied_timestamp_seconds`` is when this
node applied its last event (Unix time): ``time() - exo_event_last_applied_timestamp_seconds``
is how long the log has been quiet here.
"""

import asyncio
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from anyio.streams.memory import MemoryObjectReceiveStream
from fastapi import APIRouter, FastAPI, Request, Response
from loguru import logger
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Receive, Scope, Send

from exo.api.context import ApiContext
from exo.api.node_view import node_view
from exo.shared.apply import FINISHED_TASK_STATUSES
from exo.shared.types.events import (
    ChunkGenerated,
    IndexedEvent,
    InstanceDeleted,
    InstanceFailed,
    InstanceReplaced,
    NodeTimedOut,
    TaskCreated,
    TaskStatusUpdated,
)
from exo.shared.types.gpu import UNKNOWN_TEMPERATURE_C
from exo.shared.types.ids import TaskId
from exo.shared.types.state import State

TIME_TO_FIRST_TOKEN_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
REQUEST_DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
DEVICE_LABELS = ("node", "device", "name")
REQUEST_LABELS = ("instance", "model")


class StateCollector(Collector):
    """Gauges of the node's current state, computed on each scrape."""

    def __init__(self, context: ApiContext) -> None:
        self._context = context

    def collect(self) -> Iterable[Metric]:
        state = self._context.store.state
        yield from device_metrics(state)
        yield from self._cluster_metrics(state)
        yield from instance_metrics(state)
        yield from runner_metrics(state)

    def _cluster_metrics(self, state: State) -> Iterator[Metric]:
        context = self._context
        yield _gauge("exo_cluster_nodes", "Live nodes in the state.", len(state.nodes))
        yield _gauge(
            "exo_cluster_members", "Members a majority is counted over.", len(state.members)
        )
        master = GaugeMetricFamily(
            "exo_cluster_master_info",
            "The master, from the state (1 for its node).",
            labels=["node"],
        )
        if state.master_node_id is not None:
            master.add_metric([state.master_node_id], 1)
        yield master
        is_master = GaugeMetricFamily(
            "exo_node_is_master", "1 when this node is the state's master.", labels=["node"]
        )
        is_master.add_metric([context.node_id], float(state.master_node_id == context.node_id))
        yield is_master
        yield _gauge(
            "exo_event_last_applied_index",
            "Index of the last event applied here (-1: none).",
            state.last_event_applied_idx,
        )
        election = context.election
        yield _gauge(
            "exo_event_commit_index",
            "Index up to which this node knows the log is stored by a majority.",
            election.commit_idx,
        )
        view = node_view(context)
        lag = GaugeMetricFamily(
            "exo_event_apply_lag_events",
            "Events the master had indexed (as of its last announcement) not yet applied here.",
        )
        if view.behind_master_events is not None:
            lag.add_metric([], view.behind_master_events)
        yield lag
        yield _gauge(
            "exo_node_serving_writes",
            "1 when this node is the master and a majority answered it within the lease.",
            float(view.serving_writes),
        )
        yield _gauge(
            "exo_event_loop_longest_stall_seconds",
            "The longest this node's event loop went without running since it started.",
            view.longest_loop_stall_s,
        )
        yield _gauge(
            "exo_event_loop_stalls_total",
            "Stalls of the event loop of a second or more since the node started.",
            context.cluster.loop_watch.stall_count,
        )
        refused = CounterMetricFamily(
            "exo_transport_refused_messages",
            "Messages a full transport queue refused (each topic gets them back its own way).",
            labels=["queue"],
        )
        waiting = GaugeMetricFamily(
            "exo_transport_waiting_messages",
            "Messages waiting in a transport queue (zenoh thread to loop, loop to sender).",
            labels=["queue"],
        )
        for queue, (queued, dropped) in context.cluster.router.queue_counts().items():
            refused.add_metric([queue], dropped)
            waiting.add_metric([queue], queued)
        yield refused
        yield waiting
        applied = GaugeMetricFamily(
            "exo_event_last_applied_timestamp_seconds",
            "When this node applied its last event (Unix time; no sample before the first "
            "event since the node started or took a snapshot).",
        )
        store = context.store
        if store.last_idx >= store.base:
            applied.add_metric([], store.applied_at(store.last_idx))
        yield applied


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def device_metrics(state: State) -> Iterator[Metric]:
    """Per device (labels node, device, name): its live reading, as ``GET /gpus`` has it."""
    families = {
        name: GaugeMetricFamily(name, documentation, labels=DEVICE_LABELS)
        for name, documentation in (
            ("exo_gpu_memory_used_bytes", "Device memory in use."),
            ("exo_gpu_memory_total_bytes", "Device memory in all."),
            ("exo_gpu_utilization_ratio", "Compute utilisation, 0 to 1."),
            ("exo_gpu_temperature_celsius", "Temperature (no sample when unknown)."),
            ("exo_gpu_throttle_threshold_celsius", "Temperature at which it throttles."),
            ("exo_gpu_shutdown_threshold_celsius", "Temperature at which it shuts down."),
            ("exo_gpu_thermal_throttling", "1 while it is thermally throttling."),
            ("exo_gpu_power_draw_watts", "Power draw (no sample when unknown)."),
            ("exo_gpu_power_limit_watts", "Power limit (no sample when unknown)."),
            ("exo_gpu_sm_clock_hertz", "Current SM clock (no sample when unknown)."),
            ("exo_gpu_battery_ratio", "Battery charge, 0 to 1 (1 without a battery)."),
            ("exo_gpu_plugged_in", "1 when on mains power."),
            ("exo_gpu_last_update_timestamp_seconds", "When the reading was taken (Unix time)."),
        )
    }
    reasons = GaugeMetricFamily(
        "exo_gpu_throttle_reason",
        "1 for each reason the device reports for throttling now.",
        labels=[*DEVICE_LABELS, "reason"],
    )
    info = GaugeMetricFamily(
        "exo_gpu_info",
        "Static facts of a device (always 1).",
        labels=[*DEVICE_LABELS, "vendor", "backend", "simulated"],
    )
    for node_id, device_id, device_info, reading in state.devices():
        labels = [node_id, device_id, device_info.name if device_info is not None else ""]
        if device_info is not None:
            info.add_metric(
                [
                    *labels,
                    device_info.vendor,
                    device_info.backend,
                    str(device_info.is_simulated).lower(),
                ],
                1,
            )
        if reading is None:
            continue
        values: dict[str, float | None] = {
            "exo_gpu_memory_used_bytes": reading.memory_used_bytes,
            "exo_gpu_memory_total_bytes": reading.memory_total_bytes,
            "exo_gpu_utilization_ratio": reading.compute_utilization_percent / 100,
            "exo_gpu_temperature_celsius": reading.thermal_temperature_c
            if reading.thermal_temperature_c != UNKNOWN_TEMPERATURE_C
            else None,
            "exo_gpu_throttle_threshold_celsius": reading.thermal_throttle_threshold_c,
            "exo_gpu_shutdown_threshold_celsius": reading.thermal_shutdown_threshold_c,
            "exo_gpu_thermal_throttling": float(reading.is_thermal_throttling),
            "exo_gpu_power_draw_watts": reading.power_draw_watts,
            "exo_gpu_power_limit_watts": reading.power_limit_watts,
            "exo_gpu_sm_clock_hertz": reading.sm_clock_mhz * 1e6
            if reading.sm_clock_mhz is not None
            else None,
            "exo_gpu_battery_ratio": reading.battery_percent / 100,
            "exo_gpu_plugged_in": float(reading.is_plugged_in),
            "exo_gpu_last_update_timestamp_seconds": reading.last_update.timestamp(),
        }
        for name, value in values.items():
            if value is not None:
                families[name].add_metric(labels, value)
        for reason in reading.throttle_reasons:
            reasons.add_metric([*labels, reason], 1)
    yield from families.values()
    yield reasons
    yield info


def instance_metrics(state: State) -> Iterator[Metric]:
    """Per instance (labels instance, model): measured and predicted speed."""
    yield _gauge("exo_instances", "Instances in the state.", len(state.instances))
    measured = GaugeMetricFamily(
        "exo_instance_tokens_per_second",
        "Generated tokens per second rank 0 measured on the last measured request.",
        labels=REQUEST_LABELS,
    )
    predicted = GaugeMetricFamily(
        "exo_instance_predicted_tokens_per_second",
        "Tokens per second placement predicted for the instance's layout.",
        labels=REQUEST_LABELS,
    )
    first_token = GaugeMetricFamily(
        "exo_instance_time_to_first_token_seconds",
        "Time to first token rank 0 measured on the last measured request.",
        labels=REQUEST_LABELS,
    )
    for instance_id, instance in sorted(state.instances.items()):
        labels = [instance_id, instance.model_id]
        if instance.measured_ms_per_token:
            measured.add_metric(labels, 1000 / instance.measured_ms_per_token)
        if instance.placement.predicted_ms_per_token > 0:
            predicted.add_metric(labels, 1000 / instance.placement.predicted_ms_per_token)
        if instance.measured_time_to_first_token_ms is not None:
            first_token.add_metric(labels, instance.measured_time_to_first_token_ms / 1000)
    yield measured
    yield predicted
    yield first_token


def runner_metrics(state: State) -> Iterator[Metric]:
    """Runners by node and status, and each runner's load progress."""
    counts: dict[tuple[str, str], int] = {}
    for runner in state.runners.values():
        key = (runner.node_id, runner.status)
        counts[key] = counts.get(key, 0) + 1
    runners = GaugeMetricFamily(
        "exo_runners", "Runners by node and status.", labels=["node", "status"]
    )
    for (node_id, status), count in sorted(counts.items()):
        runners.add_metric([node_id, status], count)
    yield runners
    labels = ["runner", "instance", "node"]
    loaded = GaugeMetricFamily(
        "exo_runner_weights_loaded_bytes", "Weights the runner has loaded.", labels=labels
    )
    total = GaugeMetricFamily(
        "exo_runner_weights_bytes", "Weights the runner loads in all.", labels=labels
    )
    for runner_id, runner in sorted(state.runners.items()):
        values = [runner_id, runner.instance_id, runner.node_id]
        if runner.loaded_bytes is not None:
            loaded.add_metric(values, runner.loaded_bytes)
        if runner.total_bytes is not None:
            total.add_metric(values, runner.total_bytes)
    yield loaded
    yield total


@dataclass
class _OpenRequest:
    instance: str
    model: str
    started_at: float
    first_token_at: float | None = None
    ended_at: float | None = None
    """When its final chunk came (the task's status follows)."""
    prompt_tokens: int = 0
    completion_tokens: int = 0


class RequestMetrics:
    """Counters and histograms of the requests one node's API took, fed one applied event
    at a time (:meth:`observe`)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._open: dict[TaskId, _OpenRequest] = {}
        self.requests = Counter(
            "exo_requests",
            "Chat requests this node took, by how they ended.",
            [*REQUEST_LABELS, "status"],
            registry=registry,
        )
        self.time_to_first_token = Histogram(
            "exo_request_time_to_first_token_seconds",
            "From the request's task being applied here to its first token's chunk.",
            REQUEST_LABELS,
            registry=registry,
            buckets=TIME_TO_FIRST_TOKEN_BUCKETS,
        )
        self.duration = Histogram(
            "exo_request_duration_seconds",
            "From the request's task being applied here to its end.",
            REQUEST_LABELS,
            registry=registry,
            buckets=REQUEST_DURATION_BUCKETS,
        )
        self.prompt_tokens = Counter(
            "exo_request_prompt_tokens",
            "Prompt tokens of the requests this node took.",
            REQUEST_LABELS,
            registry=registry,
        )
        self.completion_tokens = Counter(
            "exo_request_completion_tokens",
            "Generated tokens of the requests this node took.",
            REQUEST_LABELS,
            registry=registry,
        )

    @property
    def open_requests(self) -> int:
        return len(self._open)

    def observe(self, indexed: IndexedEvent, state: State, applied_at: float, node_id: str) -> None:
        """Take in one event as applied on node ``node_id`` at ``applied_at`` (Unix time);
        ``state`` is the state after it (or later)."""
        match indexed.event:
            case TaskCreated(task=task) if task.requested_by == node_id:
                instance = state.instances.get(task.instance_id)
                self._open[task.task_id] = _OpenRequest(
                    instance=task.instance_id,
                    model=instance.model_id if instance is not None else task.params.model,
                    started_at=applied_at,
                )
            case ChunkGenerated(task_id=task_id) as chunk if task_id in self._open:
                request = self._open[task_id]
                if request.first_token_at is None:
                    request.first_token_at = applied_at
                    self.time_to_first_token.labels(request.instance, request.model).observe(
                        applied_at - request.started_at
                    )
                request.prompt_tokens = max(request.prompt_tokens, chunk.prompt_tokens)
                request.completion_tokens = max(request.completion_tokens, chunk.completion_tokens)
                if chunk.finish_reason is not None:
                    request.ended_at = applied_at
            case TaskStatusUpdated(task_id=task_id, status=status) if (
                task_id in self._open and status in FINISHED_TASK_STATUSES
            ):
                self._finish(task_id, status, applied_at)
            case InstanceDeleted() | InstanceFailed() | InstanceReplaced() | NodeTimedOut():
                # These end tasks inside apply, without a TaskStatusUpdated of their own.
                for task_id in list(self._open):
                    task = state.tasks.get(task_id)
                    if task is None:
                        self._finish(task_id, "failed", applied_at)
                    elif task.status in FINISHED_TASK_STATUSES:
                        self._finish(task_id, task.status, applied_at)
            case _:
                pass

    def _finish(self, task_id: TaskId, status: str, at: float) -> None:
        request = self._open.pop(task_id)
        labels = (request.instance, request.model)
        self.requests.labels(*labels, status).inc()
        end = request.ended_at if request.ended_at is not None else at
        self.duration.labels(*labels).observe(max(0.0, end - request.started_at))
        self.prompt_tokens.labels(*labels).inc(request.prompt_tokens)
        self.completion_tokens.labels(*labels).inc(request.completion_tokens)


class RequestRecorder:
    """Feeds :class:`RequestMetrics` from the store's stream of applied events.

    The app has no lifespan (the node serves it with ``lifespan="off"``), so the recorder
    starts with the first HTTP request the app sees, before that request is handled: a chat
    request's own task is always among the events it takes in. It runs on the event loop
    that serves the app until the loop ends."""

    def __init__(self, context: ApiContext, metrics: RequestMetrics) -> None:
        self._context = context
        self._metrics = metrics
        self._task: asyncio.Task[None] | None = None
        self._broken = False

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def ensure_started(self) -> None:
        """Start recording unless it runs; metrics never fail the request that starts them."""
        if self.running or self._broken:
            return
        try:
            events = self._context.store.subscribe()
        except Exception:
            self._broken = True
            logger.opt(exception=True).warning("request metrics cannot start; none are recorded")
            return
        self._task = asyncio.get_running_loop().create_task(self._pump(events))

    async def _pump(self, events: MemoryObjectReceiveStream[IndexedEvent]) -> None:
        store = self._context.store
        async with events:
            async for indexed in events:
                held = store.base <= indexed.idx <= store.last_idx
                # An event compacted away since it was applied: it was applied about now.
                applied_at = store.applied_at(indexed.idx) if held else time.time()
                try:
                    self._metrics.observe(indexed, store.state, applied_at, self._context.node_id)
                except Exception:
                    logger.opt(exception=True).warning("request metrics: cannot take in an event")
        logger.debug("the request metrics' event stream ended; it restarts with a request")


class _StartRecorder:
    """ASGI middleware: start the recorder with the first HTTP request."""

    def __init__(self, app: ASGIApp, recorder: RequestRecorder) -> None:
        self._app = app
        self._recorder = recorder

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self._recorder.ensure_started()
        await self._app(scope, receive, send)


def install_metrics(app: FastAPI, context: ApiContext) -> None:
    """Serve ``GET /metrics`` on ``app``, with its own registry."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StateCollector(context))
    recorder = RequestRecorder(context, RequestMetrics(registry))
    router = APIRouter()

    @router.get("/metrics", include_in_schema=False)
    async def get_metrics(request: Request) -> Response:
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(content=encoder(registry), media_type=content_type)

    app.include_router(router)
    app.add_middleware(_StartRecorder, recorder=recorder)
