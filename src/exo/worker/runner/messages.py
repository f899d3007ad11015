"""What a runner process reads on stdin and writes on stdout: one JSON object per line.

Input (rank 0 only; other ranks take their orders from rank 0 over the ring):
``{"type": "generate", "request": {...}}``, ``{"type": "cancel", "request_id": "..."}``,
``{"type": "shutdown"}``. End of input means shutdown.

Output (every rank): ``{"type": "status", ...}`` as the rank moves through
loading → connecting → ready → running → ready ... → shut_down (or failed, with the error;
while loading, a few more ``loading`` lines carry ``loaded_bytes`` of ``total_bytes``);
rank 0 also writes ``{"type": "chunk", "chunk": {...}}`` for streamed text (the last chunk of a
request has ``finish_reason``) and ``{"type": "request_failed", ...}`` for a request it
rejected (e.g. a prompt longer than the context) while staying ready for the next.
After a request with enough decode tokens, every rank may write
``{"type": "stage_time", ...}``: its measured time per token (see
:mod:`exo.worker.runner.timing`).
"""

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from exo.shared.types.execution import ComputeDevice
from exo.shared.types.generation import GenerationChunk, GenerationRequest
from exo.shared.types.runners import RunnerStatus


class GenerateInput(BaseModel):
    model_config = ConfigDict(frozen=True)
    type: Literal["generate"] = "generate"
    request: GenerationRequest


class CancelInput(BaseModel):
    model_config = ConfigDict(frozen=True)
    type: Literal["cancel"] = "cancel"
    request_id: str


class ShutdownInput(BaseModel):
    model_config = ConfigDict(frozen=True)
    type: Literal["shutdown"] = "shutdown"


RunnerInput = Annotated[GenerateInput | CancelInput | ShutdownInput, Field(discriminator="type")]


class StatusOutput(BaseModel):
    model_config = ConfigDict(frozen=True)
    type: Literal["status"] = "status"
    rank: int
    status: RunnerStatus
    error: str | None = None
    layer_start: int | None = None
    layer_end: int | None = None
    weight_bytes: int | None = None
    rss_bytes: int | None = None
    compute_device: ComputeDevice | None = None
    """Where this rank computes, once it has its device."""
    loaded_bytes: int | None = Field(default=None, ge=0)
    """While loading: bytes of this rank's weights read so far (a few reports per load)."""
    total_bytes: int | None = Field(default=None, ge=0)
    """While loading: bytes of weights this rank loads in all."""


class ChunkOutput(BaseModel):
    model_config = ConfigDict(frozen=True)
    type: Literal["chunk"] = "chunk"
    chunk: GenerationChunk


class RequestFailedOutput(BaseModel):
    model_config = ConfigDict(frozen=True)
    type: Literal["request_failed"] = "request_failed"
    request_id: str
    error: str


class StageTimeOutput(BaseModel):
    """One request's measured times per generated token on this rank."""

    model_config = ConfigDict(frozen=True)
    type: Literal["stage_time"] = "stage_time"
    rank: int
    stage_ms_per_token: float = Field(ge=0)
    """Median over the request's decode tokens of this rank's own compute for its layers."""
    ms_per_token: float | None = Field(default=None, ge=0)
    """Rank 0 only: end-to-end wall time per decode token."""
    time_to_first_token_ms: float | None = Field(default=None, ge=0)
    """Rank 0 only."""
    tokens: int = Field(ge=1)
    """Decode tokens measured."""
    measured_at: datetime


RunnerOutputMessage = StatusOutput | ChunkOutput | RequestFailedOutput | StageTimeOutput
RunnerOutput = Annotated[RunnerOutputMessage, Field(discriminator="type")]

runner_input_adapter: TypeAdapter[GenerateInput | CancelInput | ShutdownInput] = TypeAdapter(
    RunnerInput
)
runner_output_adapter: TypeAdapter[RunnerOutputMessage] = TypeAdapter(RunnerOutput)


def parse_input(line: str) -> GenerateInput | CancelInput | ShutdownInput:
    return runner_input_adapter.validate_json(line)


def parse_output(line: str) -> RunnerOutputMessage:
    return runner_output_adapter.validate_json(line)
