"""Prompts travel from the node that took the request to the runner that serves it, point
to point, never through the replicated log.

The log records that a chat task exists, where it runs, its parameters, its size and its
outcome (:class:`~exo.shared.types.tasks.ChatCompletionParams`), so every node can show and
account for it. The prompt itself stays on the requesting node: it holds the messages
under the task id and serves them on ``prompt/<node>``; the worker whose runner takes the
task fetches them once. A 10 MB prompt thus costs one transfer to one node instead of 10 MB
in every node's log.

Held prompts go when the request ends, and at the latest after :data:`PROMPT_TTL_S`.
"""

import time
from urllib.parse import parse_qsl

from loguru import logger
from pydantic import BaseModel, ConfigDict, ValidationError

from exo.routing.router import Router
from exo.routing.topics import Topics
from exo.shared.types.ids import NodeId, TaskId
from exo.shared.types.tasks import ChatMessage

PROMPT_TTL_S = 600.0
FETCH_TIMEOUT_S = 5.0


class PromptReply(BaseModel):
    model_config = ConfigDict(frozen=True)

    task_id: TaskId
    messages: list[ChatMessage]


class PromptExchange:
    def __init__(self, router: Router, topics: Topics, node_id: NodeId) -> None:
        self._router = router
        self._topics = topics
        self._node_id = node_id
        self._held: dict[TaskId, tuple[list[ChatMessage], float]] = {}

    def start(self) -> None:
        self._router.declare_queryable(self._topics.prompt(self._node_id), self._answer)

    def hold(self, task_id: TaskId, messages: list[ChatMessage]) -> None:
        """Keep a request's messages until the runner fetches them (or the request ends)."""
        self._expire()
        self._held[task_id] = (messages, time.monotonic() + PROMPT_TTL_S)

    def release(self, task_id: TaskId) -> None:
        self._held.pop(task_id, None)

    @property
    def held_count(self) -> int:
        return len(self._held)

    def _expire(self) -> None:
        now = time.monotonic()
        for task_id in [task for task, (_, until) in self._held.items() if until < now]:
            del self._held[task_id]

    def _answer(self, parameters: str, payload: bytes | None) -> bytes | None:
        task_id = dict(parse_qsl(parameters.replace(";", "&"))).get("task")
        held = self._held.get(TaskId(task_id)) if task_id else None
        if task_id is None or held is None:
            return None
        return PromptReply(task_id=TaskId(task_id), messages=held[0]).model_dump_json().encode()

    async def fetch(self, requested_by: NodeId, task_id: TaskId) -> list[ChatMessage] | None:
        """The task's messages from the node that holds them; None if it does not answer
        (it left, or the request ended)."""
        selector = f"{self._topics.prompt(requested_by)}?task={task_id}"
        for payload in await self._router.query(selector, timeout_s=FETCH_TIMEOUT_S):
            try:
                reply = PromptReply.model_validate_json(payload)
            except ValidationError:
                logger.warning(f"dropped an invalid prompt reply for task {task_id}")
                continue
            if reply.task_id == task_id:
                return reply.messages
        return None
