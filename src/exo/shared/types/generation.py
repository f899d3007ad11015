"""One text generation: the request a runner's engine takes and the chunks it streams.

Pure pydantic (no MLX), so the node process can build requests and read chunks without
loading the runtime that computes them."""

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

FinishReason = Literal["stop", "length", "cancelled"]
ResponseFormat = Literal["text", "json_object"]
"""``json_object``: the output is constrained to one JSON object (see
:mod:`exo.worker.runner.sampling`)."""
MAX_TOP_LOGPROBS = 20
"""Most alternatives per token a request may ask for (OpenAI's limit)."""
Penalty = Annotated[float, Field(ge=-2, le=2)]
"""A presence or frequency penalty, in OpenAI's range."""


class SamplingParams(BaseModel):
    """How the next token is chosen. ``temperature == 0`` is greedy (argmax).

    Penalties follow OpenAI's definition: before sampling, every token already generated in
    this completion has ``presence_penalty`` subtracted from its logit once and
    ``frequency_penalty`` once per time it was generated (the prompt does not count)."""

    model_config = ConfigDict(frozen=True)

    temperature: float = Field(default=0.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    logprobs: bool = False
    """Report each generated token's log-probability."""
    top_logprobs: int = Field(default=0, ge=0, le=MAX_TOP_LOGPROBS)
    """With ``logprobs``: also this many of the most likely tokens at each position."""
    json_object: bool = False
    """Constrain the output to one JSON object."""

    @property
    def plain(self) -> bool:
        """Nothing that needs the tokens generated so far (penalties, JSON mode): mlx-lm's
        sampler alone, which also gives the log-probabilities."""
        return not (self.presence_penalty or self.frequency_penalty or self.json_object)


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
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    logprobs: bool = False
    top_logprobs: int = Field(default=0, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat = "text"

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logprobs=self.logprobs,
            top_logprobs=self.top_logprobs if self.logprobs else 0,
            json_object=self.response_format == "json_object",
        )


class TopLogprob(BaseModel):
    """One token and its log-probability, in OpenAI's shape (``bytes``: its UTF-8 bytes,
    which may be part of a character)."""

    model_config = ConfigDict(frozen=True)

    token: str
    bytes: list[int]
    logprob: float


class TokenLogprob(TopLogprob):
    """A generated token's log-probability and the most likely tokens at its position."""

    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class GenerationChunk(BaseModel):
    """A piece of streamed output. The last chunk of a request has ``finish_reason`` set."""

    model_config = ConfigDict(frozen=True)

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None = None
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob] | None = None
    """With ``logprobs`` requested: one entry per token in ``token_ids`` that is text (a
    stop token is not)."""
