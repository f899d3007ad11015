"""The OpenAI-compatible endpoints: ``GET /v1/models``, ``GET /v1/models/{id}`` and
``POST /v1/chat/completions``.

A chat request becomes one ``CreateChatTask`` command per choice (``n``); the master
assigns each task to an instance; its rank-0 runner streams ``ChunkGenerated`` events,
which this node reads from its own copy of the log and passes on (SSE when ``stream`` is
true, each frame naming its choice). Errors use OpenAI's shape:
``{"error": {"message", "type", "param", "code"}}``.

Every parameter of OpenAI's chat completions is either honoured, accepted because it
changes nothing here (:data:`ACCEPTED_WITHOUT_EFFECT`), or refused with a 400 that names it
(:data:`REFUSED`, and any field OpenAI does not define): a client never gets something other
than what it asked for without a word. docs/inference.md ("The OpenAI surface") lists them.
"""

import json
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ConfigDict, Field, JsonValue, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from exo.api.context import ApiContext
from exo.api.errors import error_type_for, openai_error
from exo.api.validation import MAX_ID_LENGTH, ApiRequest, PathId
from exo.master.commands import instances_for_model
from exo.models.cards import get_model_card, known_model_cards
from exo.shared.apply import FINISHED_TASK_STATUSES
from exo.shared.echo import echoed
from exo.shared.runner_sets import instance_health
from exo.shared.types.commands import CancelTask, CommandResult, CreateChatTask
from exo.shared.types.events import ChunkGenerated, Event, IndexedEvent
from exo.shared.types.generation import MAX_TOP_LOGPROBS, Penalty, TokenLogprob
from exo.shared.types.ids import TaskId
from exo.shared.types.models import ModelCard
from exo.shared.types.tasks import ChatCompletionParams, ChatMessage

CLIENT_CHECK_INTERVAL_S = 0.5
INSTANCE_WAIT_S = 30.0
"""A request for a model whose instance is loading or healing waits this long for it to be
ready; then it gets 503 with the instance's status."""
WAITING_STATUSES = ("loading", "healing")
NO_PROGRESS_TIMEOUT_S = 120.0
"""A request whose instance produces nothing for this long fails instead of hanging."""

DEFAULT_TEMPERATURE = 0.7
DEFAULT_MAX_TOKENS = 256
MAX_CHOICES = 16
"""Most choices (``n``) one request may ask for: each is a task of its own."""
MAX_SEED = 2**63 - 1

REFUSED: tuple[str, ...] = (
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "logit_bias",
    "audio",
    "modalities",
    "prediction",
    "reasoning_effort",
    "web_search_options",
    "verbosity",
)
"""OpenAI parameters exo does not implement: 400 naming the parameter when given, unless
null or a value that asks for nothing (:data:`HARMLESS_VALUES`)."""
HARMLESS_VALUES: dict[str, list[JsonValue]] = {
    "tools": [[]],
    "functions": [[]],
    "tool_choice": ["none"],
    "function_call": ["none"],
    "logit_bias": [{}],
    "modalities": [["text"]],
}
ACCEPTED_WITHOUT_EFFECT: tuple[str, ...] = (
    "user",
    "safety_identifier",
    "prompt_cache_key",
    "metadata",
    "parallel_tool_calls",
    "store",
    "service_tier",
)
"""Accepted and ignored because they change nothing here: identifiers for the caller's own
bookkeeping, ``parallel_tool_calls`` (there are no tools), ``store`` false (a true
``store`` is refused: exo stores no completions) and ``service_tier`` auto/default."""


def _unsupported(name: str, hint: str = "") -> PydanticCustomError:
    return PydanticCustomError(
        "unsupported_parameter",
        "'{name}' is not supported by exo{hint}",
        {"name": name, "hint": hint},
    )


class ResponseFormatRequest(ApiRequest):
    type: str = Field(max_length=64)
    json_schema: JsonValue = None

    @field_validator("type")
    @classmethod
    def text_or_json_object(cls, value: str) -> str:
        if value == "json_schema":
            raise _unsupported("json_schema", ' (use {"type": "json_object"})')
        if value not in ("text", "json_object"):
            raise PydanticCustomError(
                "invalid_value", "must be 'text' or 'json_object' ('json_schema' is not supported)"
            )
        return value


class StreamOptions(ApiRequest):
    include_usage: bool | None = None
    """A last frame with no choices and the whole request's usage."""
    include_obfuscation: bool | None = None
    """Accepted; exo adds no obfuscation padding to frames either way."""


class ChatCompletionRequest(ApiRequest):
    model_config = ConfigDict(extra="forbid")  # an unknown parameter is a 400 naming it

    model: str = Field(min_length=1, max_length=MAX_ID_LENGTH)
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=32768)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=32768)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=None, ge=1, le=MAX_CHOICES)
    seed: int | None = Field(default=None, ge=-MAX_SEED - 1, le=MAX_SEED)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    response_format: ResponseFormatRequest | None = None

    # Accepted without effect (ACCEPTED_WITHOUT_EFFECT).
    user: str | None = Field(default=None, max_length=MAX_ID_LENGTH)
    safety_identifier: str | None = Field(default=None, max_length=MAX_ID_LENGTH)
    prompt_cache_key: str | None = Field(default=None, max_length=MAX_ID_LENGTH)
    metadata: dict[str, str] | None = None
    parallel_tool_calls: bool | None = None
    store: bool | None = None
    service_tier: str | None = Field(default=None, max_length=64)

    # Refused unless null or harmless (REFUSED).
    tools: JsonValue = None
    tool_choice: JsonValue = None
    functions: JsonValue = None
    function_call: JsonValue = None
    logit_bias: JsonValue = None
    audio: JsonValue = None
    modalities: JsonValue = None
    prediction: JsonValue = None
    reasoning_effort: JsonValue = None
    web_search_options: JsonValue = None
    verbosity: JsonValue = None

    @field_validator(*REFUSED)
    @classmethod
    def refused(cls, value: JsonValue, info: ValidationInfo) -> JsonValue:
        name = info.field_name or "parameter"
        if value is None or value in HARMLESS_VALUES.get(name, []):
            return value
        raise _unsupported(name)

    @field_validator("store")
    @classmethod
    def nothing_stored(cls, value: bool | None) -> bool | None:
        if value:
            raise _unsupported("store", ": exo keeps no completions")
        return value

    @field_validator("service_tier")
    @classmethod
    def default_tier(cls, value: str | None) -> str | None:
        if value not in (None, "auto", "default"):
            raise _unsupported("service_tier", " other than 'auto' and 'default'")
        return value

    @field_validator("stop")
    @classmethod
    def at_most_four_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        return value

    @field_validator("stream_options")
    @classmethod
    def only_when_streaming(
        cls, value: StreamOptions | None, info: ValidationInfo
    ) -> StreamOptions | None:
        if value is not None and not info.data.get("stream"):
            raise PydanticCustomError("invalid_value", "only allowed when stream is true")
        return value

    @field_validator("top_logprobs")
    @classmethod
    def needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs"):
            raise PydanticCustomError("invalid_value", "needs logprobs set to true")
        return value

    @property
    def choices(self) -> int:
        return self.n or 1

    @property
    def streaming(self) -> bool:
        return bool(self.stream)

    def params(self, choice: int = 0) -> ChatCompletionParams:
        """Choice ``choice``'s task: as asked, and seeded ``seed + choice`` when seeded (so
        the choices differ and a seeded request is repeatable)."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        response_format = self.response_format.type if self.response_format else "text"
        return ChatCompletionParams(
            model=self.model,
            message_count=len(self.messages),
            prompt_chars=sum(len(message.content) for message in self.messages),
            max_tokens=self.max_completion_tokens or self.max_tokens or DEFAULT_MAX_TOKENS,
            temperature=DEFAULT_TEMPERATURE if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            stop=stops,
            seed=None if self.seed is None else self.seed + choice,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            logprobs=bool(self.logprobs),
            top_logprobs=(self.top_logprobs or 0) if self.logprobs else 0,
            response_format="json_object" if response_format == "json_object" else "text",
            choice_index=choice,
        )


def error_from_result(result: CommandResult) -> JSONResponse:
    not_found = result.status_code == 404
    return openai_error(
        result.status_code,
        result.error or "request failed",
        error_type_for(result.status_code),
        code="model_not_found" if not_found else None,
        param="model" if not_found else None,
    )


def model_not_found(model_id: str) -> JSONResponse:
    return openai_error(
        404,
        f"The model '{echoed(model_id)}' does not exist here (GET /v1/models lists "
        "the models this cluster can run)",
        "invalid_request_error",
        code="model_not_found",
        param="model",
    )


def _model_object(card: ModelCard) -> dict[str, Any]:
    return {
        "id": card.model_id,
        "object": "model",
        "created": 0,
        "owned_by": "exo",
        "family": card.family,
        "n_layers": card.n_layers,
    }


class TaskFailedError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Choice:
    """What one choice has produced so far."""

    text: list[str] = field(default_factory=list[str])
    logprobs: list[TokenLogprob] = field(default_factory=list[TokenLogprob])
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def take(self, chunk: ChunkGenerated) -> None:
        self.text.append(chunk.text)
        self.logprobs.extend(chunk.logprobs or [])
        self.prompt_tokens = chunk.prompt_tokens
        self.completion_tokens = chunk.completion_tokens
        self.finish_reason = chunk.finish_reason


def _usage(choices: list[Choice]) -> dict[str, int]:
    prompt_tokens = max((choice.prompt_tokens for choice in choices), default=0)
    completion_tokens = sum(choice.completion_tokens for choice in choices)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _logprobs_body(entries: list[TokenLogprob]) -> dict[str, Any]:
    return {"content": [entry.model_dump(mode="json") for entry in entries], "refusal": None}


def chat_routes(context: ApiContext) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        cards = [card for card in known_model_cards().values() if card.source != "planning_only"]
        return {
            "object": "list",
            "data": [_model_object(card) for card in sorted(cards, key=lambda c: c.model_id)],
        }

    @router.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: PathId) -> JSONResponse:
        if not model_id:
            return openai_error(
                404,
                "no model id given: the path is /v1/models/{model_id} (GET /v1/models lists "
                "the models)",
                "invalid_request_error",
                code="model_not_found",
                param="model",
            )
        card = get_model_card(model_id)
        if card is None or card.source == "planning_only":
            return model_not_found(model_id)
        return JSONResponse(_model_object(card))

    @router.post("/v1/chat/completions", response_model=None)
    async def chat_completions(
        request: ChatCompletionRequest, http_request: Request
    ) -> JSONResponse | StreamingResponse:
        # One subscription, taken before any task exists, sees every choice's chunks.
        events = context.store.subscribe()
        task_ids: list[TaskId] = []
        for choice in range(request.choices):
            task_id = TaskId(str(uuid.uuid4()))
            # The prompt stays here until the serving runner's worker fetches it.
            context.prompts.hold(task_id, request.messages)
            # The master decides: no instance for the model (404), none ready (503), or a task.
            result = await _create_task(context, task_id, request, choice)
            if not result.ok:
                events.close()
                await _cancel_tasks(context, task_ids)
                for created in [*task_ids, task_id]:
                    context.prompts.release(created)
                return error_from_result(result)
            task_ids.append(task_id)
        chunks = _choice_chunks(context, task_ids, events)
        completion_id = f"chatcmpl-{task_ids[0]}"
        created = int(time.time())
        if request.streaming:
            return StreamingResponse(
                _sse(context, chunks, completion_id, created, request, task_ids),
                media_type="text/event-stream",
            )
        choices = [Choice() for _ in task_ids]
        async with anyio.create_task_group() as group:
            group.start_soon(_cancel_when_client_leaves, context, http_request, task_ids)
            try:
                async for index, chunk in chunks:
                    choices[index].take(chunk)
            except TaskFailedError as error:
                await _cancel_tasks(context, task_ids)
                return openai_error(error.status, error.message, error_type_for(error.status))
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
                        "index": index,
                        "message": {
                            "role": "assistant",
                            "content": "".join(choice.text),
                            "refusal": None,
                        },
                        "logprobs": _logprobs_body(choice.logprobs) if request.logprobs else None,
                        "finish_reason": choice.finish_reason,
                    }
                    for index, choice in enumerate(choices)
                ],
                "usage": _usage(choices),
            }
        )

    return router


async def _create_task(
    context: ApiContext, task_id: TaskId, request: ChatCompletionRequest, choice: int
) -> CommandResult:
    """Ask the master for the task; while the model's instance loads or heals, wait for it
    (up to INSTANCE_WAIT_S) and ask again."""
    deadline = anyio.current_time() + INSTANCE_WAIT_S
    while True:
        command = CreateChatTask(
            task_id=task_id, requested_by=context.node_id, params=request.params(choice)
        )
        result = await context.send_command(command)
        waiting = result.detail.get("instance_status") in WAITING_STATUSES
        if result.ok or not waiting or anyio.current_time() >= deadline:
            return result
        with anyio.move_on_after(deadline - anyio.current_time()):
            while _still_waiting(context, request.model):
                await context.store.changed.wait()


def _still_waiting(context: ApiContext, model: str) -> bool:
    """No instance of the model is ready, and one is loading or healing."""
    state = context.store.state
    statuses = {
        instance_health(state, instance)[0] for instance in instances_for_model(state, model)
    }
    return "ready" not in statuses and bool(statuses & set(WAITING_STATUSES))


async def _cancel_tasks(context: ApiContext, task_ids: list[TaskId]) -> None:
    """Cancel the tasks that have not ended (cancelling an ended one changes nothing)."""
    with anyio.CancelScope(shield=True):
        state = context.store.state
        for task_id in task_ids:
            task = state.tasks.get(task_id)
            if task is None or task.status not in FINISHED_TASK_STATUSES:
                await context.send_command(CancelTask(task_id=task_id))


async def _cancel_when_client_leaves(
    context: ApiContext, http_request: Request, task_ids: list[TaskId]
) -> None:
    """A non-streaming client that hangs up cancels its tasks (streaming ones do so when
    their response generator is closed)."""
    while not await http_request.is_disconnected():
        await anyio.sleep(CLIENT_CHECK_INTERVAL_S)
    await _cancel_tasks(context, task_ids)


async def _choice_chunks(
    context: ApiContext,
    task_ids: list[TaskId],
    events: "anyio.abc.ObjectReceiveStream[IndexedEvent]",
) -> AsyncIterator[tuple[int, ChunkGenerated]]:
    """Each task's chunks in order, with the task's choice index, until every task has had
    its last; raises TaskFailedError when a task or its instance fails, or nothing happens
    for NO_PROGRESS_TIMEOUT_S. The held prompts are released when it ends, however it ends."""
    index_of = {task_id: index for index, task_id in enumerate(task_ids)}
    pending: list[dict[int, ChunkGenerated]] = [{} for _ in task_ids]
    next_index = [0 for _ in task_ids]
    finished = [False for _ in task_ids]
    try:
        async with events:
            while not all(finished):
                event = await _next_event(events)
                if isinstance(event, ChunkGenerated):
                    index = index_of.get(event.task_id)
                    if index is None or finished[index] or event.chunk_index < next_index[index]:
                        continue
                    pending[index][event.chunk_index] = event
                    while (chunk := pending[index].pop(next_index[index], None)) is not None:
                        next_index[index] += 1
                        yield index, chunk
                        if chunk.finish_reason is not None:
                            finished[index] = True
                            break
                    continue
                for index, task_id in enumerate(task_ids):
                    if not finished[index]:
                        _raise_if_failed(context, task_id)
    finally:
        for task_id in task_ids:
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
    chunks: AsyncIterator[tuple[int, ChunkGenerated]],
    completion_id: str,
    created: int,
    request: ChatCompletionRequest,
    task_ids: list[TaskId],
) -> AsyncIterator[str]:
    """OpenAI's stream: per choice a first frame with the role, then one frame per chunk
    (its choice's ``index``, the text, ``logprobs`` when asked, ``finish_reason`` on the
    last); with ``stream_options.include_usage`` a last frame with no choices and the usage;
    then ``[DONE]``. With one choice the finishing frame also carries ``usage``."""

    def envelope(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        body: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": request.model,
            "choices": choices,
        }
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    def frame(
        index: int,
        delta: Mapping[str, str],
        finish: str | None,
        logprobs: list[TokenLogprob] | None = None,
        usage: dict[str, int] | None = None,
    ) -> str:
        choice: dict[str, Any] = {
            "index": index,
            "delta": delta,
            "logprobs": _logprobs_body(logprobs) if logprobs is not None else None,
            "finish_reason": finish,
        }
        return envelope([choice], usage)

    choices = [Choice() for _ in task_ids]
    finished = False
    try:
        for index in range(len(task_ids)):
            yield frame(index, {"role": "assistant", "content": ""}, None)
        async for index, chunk in chunks:
            choices[index].take(chunk)
            usage = (
                _usage([choices[index]])
                if chunk.finish_reason is not None and len(choices) == 1
                else None
            )
            logprobs = (chunk.logprobs or []) if request.logprobs else None
            yield frame(index, {"content": chunk.text}, chunk.finish_reason, logprobs, usage)
        finished = True
        if request.stream_options is not None and request.stream_options.include_usage:
            yield envelope([], _usage(choices))
        yield "data: [DONE]\n\n"
    except TaskFailedError as error:
        finished = True
        await _cancel_tasks(context, task_ids)
        failure = {"message": error.message, "type": error_type_for(error.status)}
        yield f"data: {json.dumps({'error': failure})}\n\n"
    finally:
        if not finished:
            await _cancel_tasks(context, task_ids)
