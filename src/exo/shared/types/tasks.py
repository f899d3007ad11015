"""Tasks: a request (e.g. a chat completion) assigned to an instance."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from exo.shared.types.generation import MAX_TOP_LOGPROBS, Penalty, ResponseFormat
from exo.shared.types.ids import CommandId, InstanceId, NodeId, RunnerId, TaskId

TaskStatus = Literal["pending", "running", "complete", "failed", "cancelled"]


class ChatMessage(BaseModel):
    """One message of a chat. A key other than these is refused (a 400 naming it on
    ``/v1``), never dropped without a word."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionParams(BaseModel):
    """How a chat task is generated: everything but the prompt, which travels from the
    node that took the request to the runner (:mod:`exo.routing.prompts`) and is never in
    the replicated log. Its size is, for accounting."""

    model_config = ConfigDict(frozen=True)

    model: str
    max_tokens: int = Field(default=256, ge=1, le=32768)
    temperature: float = Field(default=0.7, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    stop: list[str] = Field(default_factory=list)
    message_count: int = Field(default=1, ge=1)
    prompt_chars: int = Field(default=0, ge=0)
    seed: int | None = None
    """This task's seed (a request for ``n`` choices makes one task per choice, choice
    ``i`` seeded ``seed + i``)."""
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    logprobs: bool = False
    top_logprobs: int = Field(default=0, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat = "text"
    choice_index: int = Field(default=0, ge=0)
    """Which of the request's choices this task generates."""


class Task(BaseModel):
    model_config = ConfigDict(frozen=True)

    task_id: TaskId
    command_id: CommandId
    instance_id: InstanceId
    requested_by: NodeId
    params: ChatCompletionParams
    runner_id: RunnerId | None = None
    """The rank-0 runner that serves it, chosen with the instance (its serving set) when the
    task is created; a heal rebinds a task that had not started. None in logs written
    before runner sets existed: the serving set's rank 0 then serves it."""
    status: TaskStatus = "pending"
    error: str | None = None
