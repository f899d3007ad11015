"""``GET /metrics``: parsed with prometheus-client's own parser, its device values are the
ones ``GET /gpus`` returns for the same state, and its request metrics follow the events
the node applies."""

import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

import anyio
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from exo.api.app import create_app
from exo.api.context import ApiContext
from exo.api.metrics import RequestMetrics
from exo.loop_watch import LoopWatch
from exo.master.tests.placement_helpers import gpu_info, gpu_state, node_info
from exo.shared.event_store import EventStore
from exo.shared.snapshot import Snapshot
from exo.shared.tests.instances import single_shard_instance
from exo.shared.types.events import (
    ChunkGenerated,
    Event,
    IndexedEvent,
    InstanceDeleted,
    TaskCreated,
    TaskStatusUpdated,
)
from exo.shared.types.gpu import UNKNOWN_TEMPERATURE_C
from exo.shared.types.ids import CommandId, DeviceId, InstanceId, NodeId, TaskId
from exo.shared.types.runners import RunnerState
from exo.shared.types.state import State
from exo.shared.types.tasks import ChatCompletionParams, Task

HERE = NodeId("n0")
OTHER = NodeId("n1")
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@dataclass
class FakeElection:
    master_node_id: NodeId | None = OTHER
    commit_idx: int = 7
    heads: dict[NodeId, int] = field(default_factory=dict[NodeId, int])

    term: int = 1
    serving_writes: bool = False

    @property
    def is_master(self) -> bool:
        return self.master_node_id == HERE

    def announced_head(self, node: NodeId) -> int:
        return self.heads.get(node, -1)

    def master_heard_s_ago(self) -> float | None:
        return None if self.master_node_id is None else 0.2


class FakeRouter:
    def queue_counts(self) -> dict[str, tuple[int, int]]:
        return {"test/global_events": (3, 2)}


@dataclass
class FakeCluster:
    loop_watch: LoopWatch = field(default_factory=LoopWatch)
    router: FakeRouter = field(default_factory=FakeRouter)


@dataclass
class FakeContext:
    """What the metrics read of the node: its id, its store, its election, its loop watch
    and its transport queues."""

    store: EventStore
    election: FakeElection
    node_id: NodeId = HERE
    cluster: FakeCluster = field(default_factory=FakeCluster)


def cluster_state() -> State:
    """Two nodes, three devices with different readings: power, throttling, no temperature."""
    hot = gpu_state(
        "n0",
        "cuda:0",
        memory_gb=24,
        used_gb=7.5,
        utilization=63.0,
        temperature_c=88.0,
        throttle_threshold_c=87.0,
        throttling=True,
    ).model_copy(
        update={
            "power_draw_watts": 301.5,
            "power_limit_watts": 450.0,
            "sm_clock_mhz": 1710.0,
            "thermal_shutdown_threshold_c": 95.0,
            "throttle_reasons": ["hw_thermal", "sw_power_cap"],
        }
    )
    cool = gpu_state("n0", "cuda:1", memory_gb=12, used_gb=1.25, utilization=5.5)
    cpu = gpu_state("n1", "cpu:0", memory_gb=16, used_gb=3, temperature_c=UNKNOWN_TEMPERATURE_C)
    instance = single_shard_instance("tiny", node_id="n0", device_id="cuda:0")
    instance = instance.model_copy(update={"measured_ms_per_token": 25.0})
    runner = RunnerState(
        runner_id=instance.shards[0].runner_id,
        instance_id=instance.instance_id,
        node_id=HERE,
        status="loading",
        loaded_bytes=300,
        total_bytes=1200,
    )
    return State(
        master_node_id=OTHER,
        members=frozenset({HERE, OTHER}),
        nodes={HERE: node_info("n0"), OTHER: node_info("n1")},
        gpu_device_info={
            HERE: {
                DeviceId("cuda:0"): gpu_info("n0", "cuda:0", name="NVIDIA RTX 4090"),
                DeviceId("cuda:1"): gpu_info("n0", "cuda:1", name="NVIDIA RTX 3060"),
            },
            OTHER: {DeviceId("cpu:0"): gpu_info("n1", "cpu:0", name="CPU", backend="cpu")},
        },
        gpu_device_state={
            HERE: {DeviceId("cuda:0"): hot, DeviceId("cuda:1"): cool},
            OTHER: {DeviceId("cpu:0"): cpu},
        },
        instances={instance.instance_id: instance},
        runners={runner.runner_id: runner},
    )


def store_with(state: State, last_idx: int = 9) -> EventStore:
    store = EventStore(None)
    store.install_snapshot(
        Snapshot(
            idx=last_idx,
            term=1,
            state=state.model_copy(update={"last_event_applied_idx": last_idx}),
        )
    )
    return store


def samples(text: str) -> Samples:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(found: Samples, metric: str, /, **labels: str) -> float | None:
    return found.get((metric, tuple(sorted(labels.items()))))


def test_device_metrics_are_what_gpus_returns() -> None:
    store = store_with(cluster_state())
    context = FakeContext(store, FakeElection(heads={OTHER: 12}))
    with TestClient(create_app(cast(ApiContext, context))) as client:
        gpus: list[dict[str, Any]] = client.get("/gpus").json()
        response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    found = samples(response.text)
    assert len(gpus) == 3
    for gpu in gpus:
        labels = {"node": gpu["node_id"], "device": gpu["device_id"], "name": gpu["info"]["name"]}
        reading = gpu["state"]

        def at(metric: str, labels: dict[str, str] = labels) -> float | None:
            return value(found, metric, **labels)

        assert at("exo_gpu_memory_used_bytes") == reading["memory_used_bytes"]
        assert at("exo_gpu_memory_total_bytes") == reading["memory_total_bytes"]
        assert at("exo_gpu_utilization_ratio") == reading["compute_utilization_percent"] / 100
        assert at("exo_gpu_throttle_threshold_celsius") == reading["thermal_throttle_threshold_c"]
        assert at("exo_gpu_thermal_throttling") == float(reading["is_thermal_throttling"])
        assert at("exo_gpu_power_draw_watts") == reading["power_draw_watts"]
        assert at("exo_gpu_power_limit_watts") == reading["power_limit_watts"]
        assert at("exo_gpu_shutdown_threshold_celsius") == reading["thermal_shutdown_threshold_c"]
        temperature = reading["thermal_temperature_c"]
        expected = None if temperature == UNKNOWN_TEMPERATURE_C else temperature
        assert at("exo_gpu_temperature_celsius") == expected
        updated = datetime.fromisoformat(reading["last_update"]).timestamp()
        assert at("exo_gpu_last_update_timestamp_seconds") == updated
        for reason in reading["throttle_reasons"]:
            assert value(found, "exo_gpu_throttle_reason", **labels, reason=reason) == 1
    hot = {"node": "n0", "device": "cuda:0", "name": "NVIDIA RTX 4090"}
    assert value(found, "exo_gpu_sm_clock_hertz", **hot) == 1710e6
    assert value(found, "exo_gpu_thermal_throttling", **hot) == 1
    assert value(found, "exo_gpu_power_draw_watts", node="n1", device="cpu:0", name="CPU") is None
    # The cluster, as the state has it.
    assert value(found, "exo_cluster_nodes") == 2
    assert value(found, "exo_cluster_members") == 2
    assert value(found, "exo_cluster_master_info", node="n1") == 1
    assert value(found, "exo_node_is_master", node="n0") == 0
    assert value(found, "exo_event_last_applied_index") == 9
    assert value(found, "exo_event_commit_index") == 7
    assert value(found, "exo_event_apply_lag_events") == 12 - 9
    # Instances and runners.
    assert value(found, "exo_instances") == 1
    assert value(found, "exo_instance_tokens_per_second", instance="i0", model="tiny") == 40.0
    runner = {"runner": "r0", "instance": "i0", "node": "n0"}
    assert value(found, "exo_runner_weights_loaded_bytes", **runner) == 300
    assert value(found, "exo_runner_weights_bytes", **runner) == 1200
    assert value(found, "exo_runners", node="n0", status="loading") == 1


def test_metrics_follow_a_changed_state_and_the_master_has_no_lag() -> None:
    state = cluster_state()
    context = FakeContext(store_with(state), FakeElection(master_node_id=HERE))
    app = create_app(cast(ApiContext, context))
    with TestClient(app) as client:
        first = samples(client.get("/metrics").text)
        cooled = state.gpu_device_state[HERE][DeviceId("cuda:0")].model_copy(
            update={"is_thermal_throttling": False, "memory_used_bytes": 123}
        )
        changed = state.model_copy(
            update={
                "master_node_id": HERE,
                "gpu_device_state": {**state.gpu_device_state, HERE: {DeviceId("cuda:0"): cooled}},
            }
        )
        context.store = store_with(changed, last_idx=20)
        second = samples(client.get("/metrics").text)
    hot = {"node": "n0", "device": "cuda:0", "name": "NVIDIA RTX 4090"}
    assert value(first, "exo_gpu_thermal_throttling", **hot) == 1
    assert value(second, "exo_gpu_thermal_throttling", **hot) == 0
    assert value(second, "exo_gpu_memory_used_bytes", **hot) == 123
    gone = {"node": "n0", "device": "cuda:1", "name": "NVIDIA RTX 3060"}
    assert value(first, "exo_gpu_memory_used_bytes", **gone) == int(1.25 * 2**30)
    assert value(second, "exo_gpu_memory_used_bytes", **gone) is None
    assert value(second, "exo_node_is_master", node="n0") == 1
    assert value(second, "exo_event_last_applied_index") == 20
    assert value(second, "exo_event_apply_lag_events") == 0


def task(task_id: str, requested_by: NodeId) -> Task:
    return Task(
        task_id=TaskId(task_id),
        command_id=CommandId(f"c-{task_id}"),
        instance_id=InstanceId("i0"),
        requested_by=requested_by,
        params=ChatCompletionParams(model="tiny"),
    )


def chunk(task_id: str, index: int, finish: bool = False) -> ChunkGenerated:
    return ChunkGenerated(
        task_id=TaskId(task_id),
        chunk_index=index,
        text="x",
        finish_reason="stop" if finish else None,
        prompt_tokens=11,
        completion_tokens=index + 1,
    )


def test_request_metrics_time_the_requests_this_node_took() -> None:
    registry = CollectorRegistry()
    metrics = RequestMetrics(registry)
    state = cluster_state()
    timeline: list[tuple[float, Event]] = [
        (100.0, TaskCreated(task=task("a", HERE))),
        (100.0, TaskCreated(task=task("elsewhere", OTHER))),
        (100.5, chunk("a", 0)),
        (100.5, chunk("elsewhere", 0)),
        (101.0, chunk("a", 1)),
        (102.0, chunk("a", 2, finish=True)),
        (102.1, TaskStatusUpdated(task_id=TaskId("a"), status="complete")),
        (103.0, TaskCreated(task=task("b", HERE))),
        (104.0, TaskStatusUpdated(task_id=TaskId("b"), status="failed", error="boom")),
        (105.0, TaskCreated(task=task("c", HERE))),
        (105.0, TaskStatusUpdated(task_id=TaskId("elsewhere"), status="complete")),
    ]
    for idx, (at, event) in enumerate(timeline):
        metrics.observe(IndexedEvent(idx=idx, event=event), state, at, HERE)
    assert metrics.open_requests == 1  # c
    # The instance is deleted: c leaves the state with it, and ends as failed.
    metrics.observe(
        IndexedEvent(idx=99, event=InstanceDeleted(instance_id=InstanceId("i0"))),
        state.model_copy(update={"tasks": {}}),
        107.0,
        HERE,
    )
    assert metrics.open_requests == 0

    def get(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, {"instance": "i0", "model": "tiny", **labels})

    assert get("exo_requests_total", status="complete") == 1
    assert get("exo_requests_total", status="failed") == 2
    assert get("exo_request_time_to_first_token_seconds_count") == 1
    assert get("exo_request_time_to_first_token_seconds_sum") == 0.5
    assert get("exo_request_duration_seconds_count") == 3
    # a ended with its last chunk (2.0 s), b with its status (1.0 s), c with the deletion.
    assert get("exo_request_duration_seconds_sum") == 2.0 + 1.0 + 2.0
    assert get("exo_request_duration_seconds_bucket", le="1.0") == 1
    assert get("exo_request_completion_tokens_total") == 3
    assert get("exo_request_prompt_tokens_total") == 11


def test_the_app_counts_requests_from_the_events_it_applies() -> None:
    store = store_with(cluster_state())
    context = FakeContext(store, FakeElection())
    with TestClient(create_app(cast(ApiContext, context))) as client:
        before = samples(client.get("/metrics").text)  # the first request starts recording
        portal = client.portal  # the app's event loop, where the store is touched
        assert portal is not None
        events: list[Event] = [
            TaskCreated(task=task("a", HERE)),
            chunk("a", 0),
            chunk("a", 1, finish=True),
            TaskStatusUpdated(task_id=TaskId("a"), status="complete"),
        ]
        for offset, event in enumerate(events):
            indexed = IndexedEvent(idx=store.last_idx + 1, event=event)
            portal.call(store.append, indexed)
            time.sleep(0.05 if offset == 0 else 0.0)
        labels = {"instance": "i0", "model": "tiny"}
        deadline = time.monotonic() + 5
        after: Samples = {}
        while time.monotonic() < deadline:
            after = samples(client.get("/metrics").text)
            if value(after, "exo_requests_total", **labels, status="complete") == 1:
                break
            portal.call(anyio.sleep, 0.02)
    assert value(before, "exo_requests_total", **labels, status="complete") is None
    assert value(after, "exo_requests_total", **labels, status="complete") == 1
    assert value(after, "exo_request_completion_tokens_total", **labels) == 2
    first_token = value(after, "exo_request_time_to_first_token_seconds_sum", **labels)
    assert first_token is not None and first_token >= 0.05
    duration = value(after, "exo_request_duration_seconds_sum", **labels)
    assert duration is not None and duration >= first_token
    assert value(after, "exo_event_last_applied_index") == store.last_idx
    applied = value(after, "exo_event_last_applied_timestamp_seconds")
    assert applied is not None and abs(applied - time.time()) < 60
