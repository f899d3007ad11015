"""Text generation: stop conditions, streaming text and cancellation around a token stream.

The engine drives a :class:`TokenStepper`, which turns a prompt into a stream of sampled
tokens: :class:`LocalStepper` runs mlx-lm's own ``generate_step`` over a stage holding every
layer (prefill in chunks, then one token per step with the next step already scheduled
while the current token is handed out), and the pipeline's rank 0 runs
:class:`~exo.worker.runner.pipeline.PipelineStepper`. The engine itself only handles text:
it turns tokens into whole-character text with the tokenizer's streaming detokenizer, holds
back text that could still become a stop string, and stops on a stop token,
``max_tokens``, a stop string (which is not emitted), or a cancellation checked between
tokens. It notes when each token arrives on a :class:`~exo.worker.runner.timing.TokenClock`
(time to first token, end-to-end time per token); the steppers time their own compute per
decode step on a :class:`~exo.worker.runner.timing.StageClock`.

Sampling (penalties, JSON mode, seeds, log-probabilities) is
:class:`~exo.worker.runner.sampling.RequestSampler`'s, where the logits are; a stepper
yields each token as an ``int``, or as a
:class:`~exo.worker.runner.sampling.SampledToken` with its log-probabilities when the
request asked for them, which the engine turns into OpenAI's ``logprobs`` entries.
"""

import math
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import mlx.core as mx
from loguru import logger
from mlx_lm.generate import generate_step

from exo.models.stage import ModelStage
from exo.models.tokenizer import ModelTokenizer
from exo.shared.types.generation import (
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    SamplingParams,
    TokenLogprob,
    TopLogprob,
)
from exo.worker.runner.sampling import (
    RequestSampler,
    SampledToken,
    TokenVocabulary,
    finite_logprob,
    sampled_token,
    token_sampler,
)
from exo.worker.runner.timing import StageClock, TokenClock


class TokenStepper(Protocol):
    """Turns a prompt into sampled tokens (sampled where the logits are)."""

    @property
    def context_length(self) -> int: ...

    def generate(
        self, prompt: Sequence[int], sampling: SamplingParams, max_tokens: int
    ) -> Iterator[int | SampledToken]:
        """Tokens following ``prompt``, at most ``max_tokens``; closing the iterator early
        (a stop, a cancellation) leaves the stepper ready for the next prompt. With
        ``sampling.logprobs`` each is a :class:`SampledToken`."""
        ...


class LocalStepper:
    """Every layer in this process, driven by mlx-lm's ``generate_step``.

    Its decode step time (on ``stage_clock``) is the interval between two tokens coming out
    of ``generate_step``: each token is evaluated (``.item()``) before it comes out, and the
    next step is already computing while it is handed out, so with the whole model in one
    process the interval is the compute time per token (unless the consumer of the tokens
    is the slower one).

    A plain request (temperature, ``top_p``, seed, log-probabilities) runs ``generate_step``
    with mlx-lm's sampler; penalties and JSON mode go in as its logits processor, so the next step is
    still scheduled while the current token is handed out (JSON mode waits for each token:
    it needs its bytes). ``vocabulary`` (set by the :class:`Engine`) serves JSON mode.
    """

    def __init__(
        self,
        stage: ModelStage,
        stream: mx.Stream | None = None,
        stage_clock: StageClock | None = None,
        vocabulary: TokenVocabulary | None = None,
    ) -> None:
        if not (stage.is_first and stage.is_last):
            raise ValueError("a local stepper needs the whole model (first and last stage)")
        self.stage = stage
        self.stream = stream if stream is not None else mx.new_stream(mx.default_device())
        self.stage_clock = stage_clock if stage_clock is not None else StageClock()
        self.vocabulary = vocabulary

    @property
    def context_length(self) -> int:
        return self.stage.context_length

    def generate(
        self, prompt: Sequence[int], sampling: SamplingParams, max_tokens: int
    ) -> Iterator[int | SampledToken]:
        if sampling.plain:
            sampler = token_sampler(sampling)
            processors = None
        else:
            chooser = RequestSampler(sampling, max_tokens, self.vocabulary)
            sampler = chooser.sample
            prompt_length = len(prompt)

            def process(tokens: mx.array, logits: mx.array) -> mx.array:
                # generate_step passes the prompt and the tokens generated so far.
                return chooser.process(tokens[prompt_length:], logits)

            processors = [process]
        steps = generate_step(
            mx.array(list(prompt)),
            self.stage,  # pyright: ignore[reportArgumentType]  (called like an mlx-lm model)
            self.stream,
            max_tokens=max_tokens,
            sampler=sampler,
            logits_processors=processors,
            prompt_cache=self.stage.make_cache(),
        )
        self.stage_clock.begin_request()
        previous: float | None = None
        for token, logprobs in steps:
            # Timer: from one evaluated token to the next (the first is the prompt's).
            arrived = time.perf_counter()
            if previous is not None:
                self.stage_clock.record_decode_step(arrived - previous)
            previous = arrived
            if sampling.logprobs:
                yield sampled_token(logprobs, int(token), sampling.top_logprobs)
            else:
                yield int(token)


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

    def __init__(self, tokenizer: ModelTokenizer, stepper: TokenStepper) -> None:
        self.tokenizer = tokenizer
        self.stepper = stepper
        self.vocabulary = TokenVocabulary(tokenizer)
        if isinstance(stepper, LocalStepper) and stepper.vocabulary is None:
            stepper.vocabulary = self.vocabulary

    def token_logprob(self, sampled: SampledToken) -> TokenLogprob:
        """OpenAI's entry for a sampled token."""

        def entry(token: int, logprob: float) -> TopLogprob:
            return TopLogprob(
                token=self.vocabulary.text(token),
                bytes=list(self.vocabulary.token_bytes(token)),
                logprob=finite_logprob(logprob),
            )

        chosen = entry(sampled.token, sampled.logprob)
        return TokenLogprob(
            token=chosen.token,
            bytes=chosen.bytes,
            logprob=chosen.logprob,
            top_logprobs=[entry(token, value) for token, value in sampled.top if value > -math.inf],
        )

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
        token_clock: TokenClock | None = None,
    ) -> Iterator[GenerationChunk]:
        """Stream chunks for ``request``; the last one carries the finish reason and counts.

        ``should_cancel`` is called between tokens; when it returns True, generation ends
        with finish reason ``"cancelled"``. Bad requests (an empty or too long prompt, a
        chat template that refuses the messages) raise ``ValueError`` before any token.
        ``token_clock`` (started by the caller) notes when each token arrives from the
        stepper.
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

        detokenizer = self.tokenizer.detokenizer()
        pending = ""
        pending_ids: list[int] = []
        pending_logprobs: list[TokenLogprob] = []
        completion_tokens = 0

        def chunk(text: str, finish_reason: FinishReason | None = None) -> GenerationChunk:
            result = GenerationChunk(
                request_id=request.request_id,
                text=text,
                token_ids=list(pending_ids),
                finish_reason=finish_reason,
                prompt_tokens=len(prompt),
                completion_tokens=completion_tokens,
                logprobs=list(pending_logprobs) if sampling.logprobs else None,
            )
            pending_ids.clear()
            pending_logprobs.clear()
            return result

        def rest() -> str:
            detokenizer.finalize()
            return detokenizer.last_segment

        if should_cancel is not None and should_cancel():
            yield chunk("", "cancelled")
            return
        logger.debug("prefill {} tokens for {}", len(prompt), request.request_id)
        tokens = self.stepper.generate(prompt, sampling, max_tokens)
        try:
            for item in tokens:
                if token_clock is not None:
                    token_clock.token(time.perf_counter())
                token = item.token if isinstance(item, SampledToken) else item
                completion_tokens += 1
                pending_ids.append(token)
                if token in self.tokenizer.stop_token_ids:
                    yield chunk(pending + rest(), "stop")
                    return
                if sampling.logprobs and isinstance(item, SampledToken):
                    pending_logprobs.append(self.token_logprob(item))
                detokenizer.add_token(token)
                pending += detokenizer.last_segment
                if stops:
                    found = [i for i in (pending.find(stop) for stop in stops) if i >= 0]
                    if found:
                        yield chunk(pending[: min(found)], "stop")
                        return
                if completion_tokens >= max_tokens:
                    yield chunk(pending + rest(), "length")
                    return
                if should_cancel is not None and should_cancel():
                    yield chunk(pending, "cancelled")
                    return
                held = _held_back_length(pending, stops) if stops else 0
                ready, pending = pending[: len(pending) - held], pending[len(pending) - held :]
                if ready:
                    yield chunk(ready)
            yield chunk(pending + rest(), "length")
        finally:
            close = getattr(tokens, "close", None)
            if close is not None:
                close()

    def complete(
        self, request: GenerationRequest, should_cancel: Callable[[], bool] | None = None
    ) -> GenerationChunk:
        """The whole completion as one chunk (text and token ids joined)."""
        texts: list[str] = []
        token_ids: list[int] = []
        last: GenerationChunk | None = None
        pieces = list(self.generate(request, should_cancel))
        for piece in pieces:
            texts.append(piece.text)
            token_ids.extend(piece.token_ids)
            last = piece
        if last is None:  # generate always ends with a finishing chunk
            raise RuntimeError("generation produced no output")
        logprobs = (
            [entry for piece in pieces for entry in piece.logprobs or []]
            if request.logprobs
            else None
        )
        return last.model_copy(
            update={"text": "".join(texts), "token_ids": token_ids, "logprobs": logprobs}
        )
