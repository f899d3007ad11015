"""The worker: reports this node (and its devices) to the cluster and runs what the
cluster assigns to it."""

from dataclasses import dataclass

import anyio
from loguru import logger

from exo.routing.local_events import LocalEventSender
from exo.shared.event_store import EventStore
from exo.shared.types.events import NodeInfoReported, NodeMemoryUpdated
from exo.shared.types.ids import NodeId
from exo.worker.node_info import (
    available_ram_bytes,
    gather_static_info,
    memory_changed_meaningfully,
)

MEMORY_CHECK_INTERVAL_S = 2.0


@dataclass(frozen=True)
class WorkerConfig:
    friendly_name: str | None = None
    api_port: int | None = None


class Worker:
    def __init__(
        self,
        node_id: NodeId,
        store: EventStore,
        sender: LocalEventSender,
        config: WorkerConfig,
    ) -> None:
        self.node_id = node_id
        self._store = store
        self._sender = sender
        self._config = config

    async def run(self) -> None:
        async with anyio.create_task_group() as group:
            group.start_soon(self._report_node)

    async def _report_node(self) -> None:
        info = await anyio.to_thread.run_sync(
            gather_static_info, self._config.friendly_name, self._config.api_port
        )
        reported_ram = available_ram_bytes()
        await self._sender.emit(
            NodeInfoReported(node_id=self.node_id, info=info, ram_available_bytes=reported_ram)
        )
        logger.info(f"reported node info: {info.friendly_name}, {info.cpu_count} CPUs")
        while True:
            await anyio.sleep(MEMORY_CHECK_INTERVAL_S)
            state = self._store.state
            if state.master_node_id is not None and self.node_id not in state.nodes:
                if self._sender.pending_count == 0:
                    logger.info("this node is missing from the cluster state; reporting again")
                    reported_ram = available_ram_bytes()
                    await self._sender.emit(
                        NodeInfoReported(
                            node_id=self.node_id, info=info, ram_available_bytes=reported_ram
                        )
                    )
                continue
            current = available_ram_bytes()
            if memory_changed_meaningfully(reported_ram, current, info.ram_total_bytes):
                reported_ram = current
                await self._sender.emit(
                    NodeMemoryUpdated(node_id=self.node_id, ram_available_bytes=current)
                )
