"""The OpenAI-compatible endpoints: ``GET /v1/models`` and ``POST /v1/chat/completions``.

A chat request becomes a ``CreateChatTask`` command; the master assigns the task to an
instance; its rank-0 runner streams ``ChunkGenerated`` events, which this node reads from
its own copy of the log and passes on (SSE when ``stream`` is true). Errors use OpenAI's
shape: ``{"error": {"message", "type", "param", "code"}}``.
"""

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ConfigDict, Field, field_validator

from exo.api.context import ApiContext
from exo.api.validation import MAX_ID_LENGTH, ApiRequest
from exo.master.commands import instances_for_model
from exo.models.cards import known_model_cards
from exo.shared.runner_sets import instance_health
from exo.shared.types.commands import CancelTask, CommandResult, CreateChatTask
from exo.shared.types.events import ChunkGenerated, Event, IndexedEvent
from exo.shared.types.ids import TaskId
from exo.shared.types.tasks import ChatCompletionParams, ChatMessage

CLIENT_CHECK_INTERVAL_S = 0.5
INSTANCE_WAIT_S = 30.0
"""A request for a model whose instance is loading or healing waits this long for it to be
ready; then it gets 503 with the instance's status."""
READY_POLL_S = 0.1
WAITING_STATUSES = ("loading", "healing")
NO_PROGRESS_TIMEOUT_S = 120.0
"""A request whose instance produces nothing for this long fails instead of hanging."""


class ChatCompletionRequest(ApiRequest):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields exo does not use

    model: str = Field(min_length=1, max_length=MAX_ID_LENGTH)
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=32768)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=32768)
    temperature: float = Field(default=0.7, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    stream: bool = False

    @field_validator("stop")
    @classmethod
    def at_most_four_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        return value

    def params(self) -> ChatCompletionParams:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return ChatCompletionParams(
            model=self.model,
            message_count=len(self.messages),
            prompt_chars=sum(len(message.content) for message in self.messages),
            max_tokens=self.max_completion_tokens or self.max_tokens or 256,
            temperature=self.temperature,
            top_p=self.top_p,
            stop=stops,
        )


def openai_error(
    status: int, message: str, error_type: str, code: str | None = None
) -> JSONResponse:
    return JSONResponse(
        status_code=status,
        content={"error": {"message": message, "type": error_type, "param": None, "code": code}},
    )


def error_from_result(result: CommandResult) -> JSONResponse:
    kinds = {404: "not_found_error", 422: "invalid_request_error", 503: "service_unavailable"}
    return openai_error(
        result.status_code,
        result.error or "request failed",
        kinds.get(result.status_code, "server_error"),
        code="model_not_found" if result.status_code == 404 else None,
    )


class TaskFailedError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def chat_routes(context: ApiContext) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        cards = [card for card in known_model_cards().values() if card.source != "planning_only"]
        return {
            "object": "list",
            "data": [
                {
                    "id": card.model_id,
                    "object": "model",
                    "created": 0,
                    "owned_by": "exo",
                    "family": card.family,
                    "n_layers": card.n_layers,
                }
                for card in sorted(cards, key=lambda card: card.model_id)
            ],
        }

    @router.post("/v1/chat/completions", response_model=None)
    async def chat_completions(
        request: ChatCompletionRequest, http_request: Request
    ) -> JSONResponse | StreamingResponse:
        # The master decides: no instance for the model (404), none ready (503), or a task.
        task_id = TaskId(str(uuid.uuid4()))
        events = context.store.subscribe()
        # The prompt stays here until the serving runner's worker fetches it.
        context.prompts.hold(task_id, request.messages)
        result = await _create_task(context, task_id, request)
        if not result.ok:
            context.prompts.release(task_id)
            events.close()
            return error_from_result(result)
        chunks = _task_chunks(context, task_id, events)
        completion_id = f"chatcmpl-{task_id}"
        created = int(time.time())
        if request.stream:
            return StreamingResponse(
                _sse(context, chunks, completion_id, created, request.model, task_id),
                media_type="text/event-stream",
            )
        text: list[str] = []
        finish: str | None = None
        usage = (0, 0)
        async with anyio.create_task_group() as group:
            group.start_soon(_cancel_when_client_leaves, context, http_request, task_id)
            try:
                async for chunk in chunks:
                    text.append(chunk.text)
                    usage = (chunk.prompt_tokens, chunk.completion_tokens)
                    finish = chunk.finish_reason
            except TaskFailedError as error:
                return openai_error(error.status, error.message, "service_unavailable")
            finally:
                group.cancel_scope.cancel()
        return JSONResponse(
            {
                "id": completion_id,
                "object": "chat.completion",
                "created": created,
                "model": request.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "".join(text)},
                        "finish_reason": finish,
                    }
                ],
                "usage": _usage(*usage),
            }
        )

    return router


async def _create_task(
    context: ApiContext, task_id: TaskId, request: ChatCompletionRequest
) -> CommandResult:
    """Ask the master for the task; while the model's instance loads or heals, wait for it
    (up to INSTANCE_WAIT_S) and ask again."""
    deadline = anyio.current_time() + INSTANCE_WAIT_S
    while True:
        command = CreateChatTask(
            task_id=task_id, requested_by=context.node_id, params=request.params()
        )
        result = await context.send_command(command)
        waiting = result.detail.get("instance_status") in WAITING_STATUSES
        if result.ok or not waiting or anyio.current_time() >= deadline:
            return result
        with anyio.move_on_after(deadline - anyio.current_time()):
            while _still_waiting(context, request.model):
                await anyio.sleep(READY_POLL_S)


def _still_waiting(context: ApiContext, model: str) -> bool:
    """No instance of the model is ready, and one is loading or healing."""
    state = context.store.state
    statuses = {
        instance_health(state, instance)[0] for instance in instances_for_model(state, model)
    }
    return "ready" not in statuses and bool(statuses & set(WAITING_STATUSES))


async def _cancel_when_client_leaves(
    context: ApiContext, http_request: Request, task_id: TaskId
) -> None:
    """A non-streaming client that hangs up cancels its task (streaming ones do so when
    their response generator is closed)."""
    while not await http_request.is_disconnected():
        await anyio.sleep(CLIENT_CHECK_INTERVAL_S)
    with anyio.CancelScope(shield=True):
        await context.send_command(CancelTask(task_id=task_id))


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


async def _task_chunks(
    context: ApiContext,
    task_id: TaskId,
    events: "anyio.abc.ObjectReceiveStream[IndexedEvent]",
) -> AsyncIterator[ChunkGenerated]:
    """The task's chunks in order, until the last; raises TaskFailedError when the task or
    its instance fails, or nothing happens for NO_PROGRESS_TIMEOUT_S. The held prompt is
    released when it ends, however it ends."""
    pending: dict[int, ChunkGenerated] = {}
    next_index = 0
    try:
        async with events:
            while True:
                event = await _next_event(events)
                if isinstance(event, ChunkGenerated):
                    if event.task_id != task_id or event.chunk_index < next_index:
                        continue
                    pending[event.chunk_index] = event
                    while (chunk := pending.pop(next_index, None)) is not None:
                        next_index += 1
                        yield chunk
                        if chunk.finish_reason is not None:
                            return
                    continue
                _raise_if_failed(context, task_id)
    finally:
        context.prompts.release(task_id)


async def _next_event(events: "anyio.abc.ObjectReceiveStream[IndexedEvent]") -> Event:
    with anyio.move_on_after(NO_PROGRESS_TIMEOUT_S):
        return (await events.receive()).event
    raise TaskFailedError(504, "the model produced nothing for too long")


def _raise_if_failed(context: ApiContext, task_id: TaskId) -> None:
    state = context.store.state
    task = state.tasks.get(task_id)
    if task is None:
        raise TaskFailedError(503, "the task's instance was deleted")
    if task.status == "failed":
        raise TaskFailedError(503, f"the request failed: {task.error}")
    instance = state.instances.get(task.instance_id)
    if instance is None:
        raise TaskFailedError(503, "the task's instance was deleted")
    status, why = instance_health(state, instance)
    if status == "failed":
        raise TaskFailedError(503, f"the instance failed: {why}")


async def _sse(
    context: ApiContext,
    chunks: AsyncIterator[ChunkGenerated],
    completion_id: str,
    created: int,
    model: str,
    task_id: TaskId,
) -> AsyncIterator[str]:
    def frame(
        delta: dict[str, str], finish: str | None, usage: dict[str, int] | None = None
    ) -> str:
        body: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    finished = False
    try:
        yield frame({"role": "assistant", "content": ""}, None)
        async for chunk in chunks:
            usage = (
                _usage(chunk.prompt_tokens, chunk.completion_tokens)
                if chunk.finish_reason
                else None
            )
            yield frame({"content": chunk.text}, chunk.finish_reason, usage)
        finished = True
        yield "data: [DONE]\n\n"
    except TaskFailedError as error:
        finished = True
        yield f"data: {json.dumps({'error': {'message': error.message, 'type': 'service_unavailable'}})}\n\n"
    finally:
        if not finished:
            with anyio.CancelScope(shield=True):
                await context.send_command(CancelTask(task_id=task_id))
