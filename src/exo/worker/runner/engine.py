"""Text generation: prefill, decode, sampling and stop conditions.

The engine drives a :class:`TokenStepper`, which feeds tokens through the model (one process
holding every layer, or rank 0 of a pipeline) and returns the next sampled token. The engine
itself only handles text: it prefills the whole prompt in one step, then decodes one token at
a time, turns tokens into whole-character text, holds back text that could still become a
stop string, and stops on a stop token, ``max_tokens``, a stop string (which is not emitted),
or a cancellation checked between tokens.
"""

import secrets
from collections.abc import Callable, Iterator, Sequence
from typing import Literal, Protocol

import mlx.core as mx
import numpy as np
from loguru import logger
from pydantic import BaseModel, ConfigDict, Field

from exo.models.gguf import scalar_int
from exo.models.llama import KVCache, LlamaStage
from exo.models.tokenizer import GGUFTokenizer

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


class Sampler:
    """Greedy at temperature 0; otherwise softmax(logits / T), nucleus-truncated to the
    smallest set of tokens whose probability reaches ``top_p``, drawn with a seeded RNG."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self._rng = np.random.default_rng(None if params.seed is None else params.seed % 2**64)

    def __call__(self, logits: mx.array) -> int:
        """``logits``: the last position's scores, any shape ending in ``vocab``."""
        last = logits.reshape(-1, logits.shape[-1])[-1]
        if self.params.temperature == 0:
            return scalar_int(mx.argmax(last))
        scores = np.asarray(last.astype(mx.float32), dtype=np.float64) / self.params.temperature
        scores -= scores.max()
        probabilities = np.exp(scores)
        probabilities /= probabilities.sum()
        if self.params.top_p < 1.0:
            order = np.argsort(-probabilities, kind="stable")
            sorted_probabilities = probabilities[order]
            mass_before = np.cumsum(sorted_probabilities) - sorted_probabilities
            keep = order[mass_before < self.params.top_p]
            kept = probabilities[keep]
            return int(keep[self._rng.choice(len(keep), p=kept / kept.sum())])
        return int(self._rng.choice(len(probabilities), p=probabilities))


class TokenStepper(Protocol):
    """Feeds tokens through the model and returns the next token (sampled where the logits
    are: in this process, or on the pipeline's last rank)."""

    @property
    def context_length(self) -> int: ...

    def begin(self, sampling: SamplingParams) -> None:
        """Start a sequence: empty KV caches, a fresh sampler."""
        ...

    def step(self, token_ids: Sequence[int]) -> int:
        """Append ``token_ids`` to the sequence; return the sampled next token."""
        ...


class LocalStepper:
    """Every layer in this process."""

    def __init__(self, model: LlamaStage) -> None:
        if not (model.is_first and model.is_last):
            raise ValueError("a local stepper needs the whole model (first and last stage)")
        self.model = model
        self._cache: KVCache = model.new_cache()
        self._sampler = Sampler(SamplingParams())

    @property
    def context_length(self) -> int:
        return self.model.hyperparameters.context_length

    def begin(self, sampling: SamplingParams) -> None:
        self._cache = self.model.new_cache()
        self._sampler = Sampler(sampling)

    def step(self, token_ids: Sequence[int]) -> int:
        logits = self.model.forward(mx.array([list(token_ids)], dtype=mx.int32), self._cache)
        mx.eval(logits, self._cache.arrays())
        return self._sampler(logits)


def _held_back_length(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    longest = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:length]):
                longest = length
                break
    return longest


class Engine:
    """Generates text for requests with a tokenizer and a :class:`TokenStepper`."""

    def __init__(self, tokenizer: GGUFTokenizer, stepper: TokenStepper) -> None:
        self.tokenizer = tokenizer
        self.stepper = stepper

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        if request.messages is not None:
            return self.tokenizer.encode_chat(request.messages, add_generation_prompt=True)
        if request.prompt is not None:
            return self.tokenizer.encode(request.prompt)
        raise ValueError("a request needs either messages or a prompt")

    def generate(
        self,
        request: GenerationRequest,
        should_cancel: Callable[[], bool] | None = None,
    ) -> Iterator[GenerationChunk]:
        """Stream chunks for ``request``; the last one carries the finish reason and counts.

        ``should_cancel`` is called between tokens; when it returns True, generation ends
        with finish reason ``"cancelled"``.
        """
        prompt = self.prompt_ids(request)
        if not prompt:
            raise ValueError("the prompt is empty")
        context_length = self.stepper.context_length
        if len(prompt) >= context_length:
            raise ValueError(
                f"the prompt has {len(prompt)} tokens; the model's context is {context_length}"
            )
        max_tokens = min(request.max_tokens, context_length - len(prompt))
        stops = [stop for stop in request.stop if stop]
        sampling = request.sampling
        if sampling.temperature > 0 and sampling.seed is None:
            sampling = sampling.model_copy(update={"seed": secrets.randbits(31)})

        decoder = self.tokenizer.streaming_decoder(skip_special_tokens=True)
        pending = ""
        pending_ids: list[int] = []
        completion_tokens = 0

        def chunk(text: str, finish_reason: FinishReason | None = None) -> GenerationChunk:
            result = GenerationChunk(
                request_id=request.request_id,
                text=text,
                token_ids=list(pending_ids),
                finish_reason=finish_reason,
                prompt_tokens=len(prompt),
                completion_tokens=completion_tokens,
            )
            pending_ids.clear()
            return result

        if should_cancel is not None and should_cancel():
            yield chunk("", "cancelled")
            return
        self.stepper.begin(sampling)
        logger.debug("prefill {} tokens for {}", len(prompt), request.request_id)
        token = self.stepper.step(prompt)
        while True:
            completion_tokens += 1
            pending_ids.append(token)
            if token in self.tokenizer.stop_token_ids:
                yield chunk(pending + decoder.flush(), "stop")
                return
            pending += decoder.add(token)
            if stops:
                found = [index for index in (pending.find(stop) for stop in stops) if index >= 0]
                if found:
                    yield chunk(pending[: min(found)], "stop")
                    return
            if completion_tokens >= max_tokens:
                yield chunk(pending + decoder.flush(), "length")
                return
            if should_cancel is not None and should_cancel():
                yield chunk(pending, "cancelled")
                return
            held = _held_back_length(pending, stops) if stops else 0
            ready, pending = pending[: len(pending) - held], pending[len(pending) - held :]
            if ready:
                yield chunk(ready)
            token = self.stepper.step([token])

    def complete(
        self, request: GenerationRequest, should_cancel: Callable[[], bool] | None = None
    ) -> GenerationChunk:
        """The whole completion as one chunk (text and token ids joined)."""
        texts: list[str] = []
        token_ids: list[int] = []
        last: GenerationChunk | None = None
        for piece in self.generate(request, should_cancel):
            texts.append(piece.text)
            token_ids.extend(piece.token_ids)
            last = piece
        if last is None:  # generate always ends with a finishing chunk
            raise RuntimeError("generation produced no output")
        return last.model_copy(update={"text": "".join(texts), "token_ids": token_ids})
