"""The worker: reports this node and its devices to the cluster and runs what the cluster
assigns to it (runner processes, tasks)."""

from dataclasses import dataclass
from pathlib import Path

import anyio
from anyio.abc import TaskGroup
from loguru import logger

from exo.gpu.backend import GPUBackendError, GPUBackendFactory
from exo.routing.local_events import LocalEventSender
from exo.routing.prompts import PromptExchange
from exo.shared.event_store import EventStore
from exo.shared.types.events import NodeInfoReported, NodeMemoryUpdated
from exo.shared.types.ids import NodeId
from exo.shared.types.node import NodeStaticInfo
from exo.worker.execution_probe import log_execution, probe_execution, unusable_gpu_warning
from exo.worker.gpu_telemetry import GPUTelemetryCollector, TelemetryConfig
from exo.worker.node_info import (
    available_ram_bytes,
    gather_static_info,
    memory_changed_meaningfully,
)
from exo.worker.plan import (
    CancelRunnerTask,
    ForwardTask,
    StartRunner,
    StopRunner,
    plan,
    runners_in_use,
)
from exo.worker.supervisor import RunnerSupervisor

MEMORY_CHECK_INTERVAL_S = 2.0
PLAN_RECHECK_S = 1.0
"""The plan runs on every change of the state or of a local runner, and at least this often."""


@dataclass(frozen=True)
class WorkerConfig:
    home: Path
    friendly_name: str | None = None
    api_port: int | None = None
    ring_port: int | None = None
    gpu_backend: str = "auto"
    simulate_gpus_file: Path | None = None
    telemetry_interval_s: float = 2.0


class Worker:
    def __init__(
        self,
        node_id: NodeId,
        store: EventStore,
        sender: LocalEventSender,
        prompts: PromptExchange,
        config: WorkerConfig,
    ) -> None:
        self.node_id = node_id
        self._store = store
        self._sender = sender
        self._config = config
        self.supervisor = RunnerSupervisor(
            node_id,
            config.home,
            sender.emit,
            lambda task: prompts.fetch(task.requested_by, task.task_id),
        )
        self.gpu_telemetry: GPUTelemetryCollector | None = None

    async def run(self) -> None:
        self.gpu_telemetry = GPUTelemetryCollector(
            node_id=self.node_id,
            gpu_backend=await GPUBackendFactory.create_backend(
                self._config.gpu_backend, self._config.simulate_gpus_file
            ),
            event_emitter=self._sender.emit,
            config=TelemetryConfig(interval_s=self._config.telemetry_interval_s),
        )
        self.supervisor.simulated_devices = self.gpu_telemetry.gpu_backend.name == "simulated"
        execution = await anyio.to_thread.run_sync(probe_execution)
        log_execution(execution)
        try:
            telemetry_devices = await self.gpu_telemetry.gpu_backend.list_devices(self.node_id)
        except GPUBackendError:  # the collector reports a backend that fails
            telemetry_devices = []
        warning = unusable_gpu_warning(telemetry_devices, execution)
        if warning is not None:
            logger.warning(warning)
        info = await anyio.to_thread.run_sync(
            gather_static_info,
            self._config.friendly_name,
            self._config.api_port,
            self._config.ring_port,
        )
        info = info.model_copy(update={"execution": execution})
        try:
            async with anyio.create_task_group() as group:
                # The node first: the cluster ignores device reports of nodes it doesn't know.
                reported_ram = await self._emit_node_info(info)
                logger.info(f"reported node info: {info.friendly_name}, {info.cpu_count} CPUs")
                await self.gpu_telemetry.start_monitoring(group)
                group.start_soon(self._watch_node, info, reported_ram)
                group.start_soon(self._plan_loop, group)
        finally:
            with anyio.CancelScope(shield=True):
                await self.supervisor.stop_all()
                await self.gpu_telemetry.stop_monitoring()

    async def _watch_node(self, info: NodeStaticInfo, reported_ram: int) -> None:
        """Report memory when it moved meaningfully; report everything again if the cluster
        dropped this node (it timed out while still alive), and the devices again if the
        cluster lacks them."""
        while True:
            await anyio.sleep(MEMORY_CHECK_INTERVAL_S)
            state = self._store.state
            if state.master_node_id is not None and self.node_id not in state.nodes:
                if self._sender.pending_count == 0:
                    logger.info("this node is missing from the cluster state; reporting again")
                    reported_ram = await self._emit_node_info(info)
                continue
            telemetry = self.gpu_telemetry
            if telemetry is not None and self._sender.pending_count == 0:
                known = set(state.gpu_device_info.get(self.node_id, {}))
                if set(telemetry.last_readings) - known:
                    # A device report indexed before this node's own report was ignored.
                    logger.info("the cluster state lacks this node's devices; reporting again")
                    telemetry.forget_reported()
            current = available_ram_bytes()
            if memory_changed_meaningfully(reported_ram, current, info.ram_total_bytes):
                reported_ram = current
                await self._sender.emit(
                    NodeMemoryUpdated(node_id=self.node_id, ram_available_bytes=current)
                )

    async def _emit_node_info(self, info: NodeStaticInfo) -> int:
        ram = available_ram_bytes()
        await self._sender.emit(
            NodeInfoReported(node_id=self.node_id, info=info, ram_available_bytes=ram)
        )
        if self.gpu_telemetry is not None:
            self.gpu_telemetry.forget_reported()
        return ram

    async def _plan_loop(self, group: TaskGroup) -> None:
        while True:
            # Taken before acting, so a change that lands while we act is not missed.
            store_changed, runners_changed = self._store.changed, self.supervisor.changed
            state = self._store.state
            for action in plan(state, self.node_id, self.supervisor.local_runners()):
                match action:
                    case StartRunner():
                        await self.supervisor.start_runner(group, action.instance, action.shard)
                    case StopRunner():
                        group.start_soon(
                            self.supervisor.stop_runner, action.runner_id, action.reason
                        )
                    case ForwardTask():
                        await self.supervisor.forward_task(action.runner_id, action.task)
                    case CancelRunnerTask():
                        await self.supervisor.cancel_task(action.runner_id, action.task_id)
            self.supervisor.forget_stopped_runners(runners_in_use(state))
            await wait_for_any(store_changed, runners_changed, timeout_s=PLAN_RECHECK_S)


async def wait_for_any(*events: anyio.Event, timeout_s: float) -> None:
    """Return when any of the events is set, or after timeout_s."""
    with anyio.move_on_after(timeout_s):
        async with anyio.create_task_group() as race:

            async def wait(event: anyio.Event) -> None:
                await event.wait()
                race.cancel_scope.cancel()

            for event in events:
                race.start_soon(wait, event)
