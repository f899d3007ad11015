"""What the API needs from the running node."""

from dataclasses import dataclass

import anyio
from pydantic import ValidationError

from exo.routing.context import ClusterContext
from exo.routing.election import Election
from exo.routing.local_events import LocalEventSender
from exo.routing.prompts import PromptExchange
from exo.shared.event_store import EventStore
from exo.shared.types.commands import Command, CommandAdapter, CommandResult
from exo.shared.types.ids import NodeId

COMMAND_TIMEOUT_S = 5.0
COMMIT_TIMEOUT_S = 5.0
"""How long a write waits for a majority to store its events before the API answers 503."""
MASTER_WAIT_S = 3.0
"""A node that has just started waits this long for an election before answering 503."""


@dataclass(frozen=True)
class ApiContext:
    """The node's shared context, its worker's outbox (for events the API emits) and the
    prompts of the requests it took."""

    cluster: ClusterContext
    sender: LocalEventSender
    prompts: PromptExchange

    @property
    def node_id(self) -> NodeId:
        return self.cluster.node_id

    @property
    def store(self) -> EventStore:
        return self.cluster.store

    @property
    def election(self) -> Election:
        return self.cluster.election

    async def send_command(self, command: Command) -> CommandResult:
        """Send a command to the master and wait until this node has applied its events."""
        with anyio.move_on_after(MASTER_WAIT_S):
            while self.election.master_node_id is None:
                await anyio.sleep(0.05)
        if self.election.master_node_id is None:
            return CommandResult(ok=False, status_code=503, error="no master elected yet")
        payload = CommandAdapter.dump_json(command)
        # Only the active master answers; the first answer is the one (a frozen node's
        # queryable would otherwise hold the query until its timeout).
        result: CommandResult | None = None
        async for reply in self.cluster.router.query_replies(
            self.cluster.topics.commands, payload, COMMAND_TIMEOUT_S
        ):
            try:
                result = CommandResult.model_validate_json(reply)
            except ValidationError:
                continue
            break
        if result is None:
            return CommandResult(ok=False, status_code=503, error="the master did not answer")
        if result.ok and result.event_indices:
            return await self._committed(result)
        return result

    async def _committed(self, result: CommandResult) -> CommandResult:
        """The result once its last event is committed (stored by a majority) in the term
        the master indexed it and applied here; else a 503 that says the write may or may
        not take effect."""
        last = max(result.event_indices)
        with anyio.move_on_after(COMMIT_TIMEOUT_S):
            await self.election.wait_for_commit(last, COMMIT_TIMEOUT_S)
            await self.store.wait_for_index(last, COMMIT_TIMEOUT_S)
        held = self.store.event_at(last)
        if self.election.commit_idx >= last and held is not None and held.term == result.term:
            return result
        if held is not None and held.term != result.term:
            reason = "a new master replaced it before a majority stored it; it did not happen"
        else:
            reason = (
                "a majority of the cluster did not confirm it in time; it may still take effect"
            )
        return CommandResult(ok=False, status_code=503, error=f"no quorum: {reason}")
