"""One text generation: the request a runner's engine takes and the chunks it streams.

Pure pydantic (no MLX), so the node process can build requests and read chunks without
loading the runtime that computes them."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

FinishReason = Literal["stop", "length", "cancelled"]


class SamplingParams(BaseModel):
    """How the next token is chosen. ``temperature == 0`` is greedy (argmax)."""

    model_config = ConfigDict(frozen=True)

    temperature: float = Field(default=0.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int | None = None


class GenerationRequest(BaseModel):
    """One completion: a chat (rendered with the model's template) or a raw prompt."""

    model_config = ConfigDict(frozen=True)

    request_id: str = "request"
    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    max_tokens: int = Field(default=256, ge=1)
    temperature: float = Field(default=0.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, seed=self.seed)


class GenerationChunk(BaseModel):
    """A piece of streamed output. The last chunk of a request has ``finish_reason`` set."""

    model_config = ConfigDict(frozen=True)

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None = None
    prompt_tokens: int
    completion_tokens: int
