"""Pipeline-parallel generation across processes over MLX's ring backend.

Every rank is one process holding a contiguous layer range (:class:`ModelStage`: rank 0 the
first layers and the embedding, the last rank the last layers, the final norm and the head).
The ranks join one group with ``mx.distributed.init(backend="ring", strict=True)``, which
reads:

* ``MLX_RANK``: this process's rank;
* ``MLX_HOSTFILE``: the path of a JSON file listing, per rank, the ``"ip:port"`` addresses
  it listens on: ``[["10.0.0.1:5000"], ["10.0.0.2:5001"], ...]``. Ranks connect to their
  ring neighbours, so rank ``r`` talks to ``r - 1`` and ``r + 1`` (and the last to rank 0).

Only neighbour links are used. Rank 0 runs the :class:`~exo.worker.runner.engine.Engine`
(tokenizer, stop conditions, streaming) with a :class:`PipelineStepper`; every other rank
runs :func:`serve_stage`. A request goes as mlx-lm's ``generate_step`` does it in one
process, so a pipeline produces exactly the single process's tokens: BEGIN (every rank
empties its caches, the last rank makes the sampler), the prompt but its last token in
PREFILL chunks of :data:`PREFILL_STEP` tokens, then one FORWARD per generated token. Per
step a header travels 0 -> 1 -> ... -> last on the control channel
(:mod:`~exo.worker.runner.control_channel`) and the hidden state after it on the MLX ring;
after a FORWARD the last rank samples the next token (a
:class:`~exo.worker.runner.sampling.RequestSampler`: penalties, JSON mode, seed) and sends
it on the control channel to rank 0 (its ring neighbour), with its log-probabilities when
the request asked for them (:func:`encode_reply`), and rank 0 feeds it in as the next
step's input. The last rank loads the tokenizer the first time a JSON request needs it. When rank 0
is done with a request (a stop, ``max_tokens``, a cancellation), END goes round so that
every rank knows the request is over and can report its stage time. A rank waits
only on the control channel, never inside MLX's receive (which spins a core), so an idle
pipeline, and a rank waiting for its turn, costs no CPU.

Header (:data:`HEADER_BYTES`, seventeen little-endian uint32): command, length, activation
dtype, hidden size, seed (u64), temperature (f64), top_p (f64), presence penalty (f64),
frequency penalty (f64), flags (1: log-probabilities, 2: JSON object), top log-probabilities,
the request's max tokens (on BEGIN).

Every rank times its own compute per decode step (a FORWARD but the request's first, which
computes the first token from the prompt's last) on a
:class:`~exo.worker.runner.timing.StageClock`: from having its input (rank 0: the token;
the others: the received hidden state) to having its output evaluated (the hidden state it
sends on, or on the last rank the sampled token); sending, and waiting for other ranks,
are outside the timer.
"""

import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import cast

import mlx.core as mx
import numpy as np
from loguru import logger

from exo.models.stage import ModelStage
from exo.shared.types.generation import SamplingParams
from exo.worker.runner.control_channel import ControlChannel
from exo.worker.runner.hostfile import HOSTFILE_ENV, RANK_ENV, read_hostfile
from exo.worker.runner.sampling import (
    RequestSampler,
    SampledToken,
    TokenVocabulary,
    sampled_token,
    vocabulary_loader,
)
from exo.worker.runner.timing import StageClock

COMMAND_BEGIN = 1
COMMAND_PREFILL = 2
COMMAND_FORWARD = 3
COMMAND_SHUTDOWN = 4
COMMAND_END = 5
"""Rank 0 is done with the request (every rank reports its stage time on it)."""
HEADER_BYTES = 68
TOKEN_BYTES = 4
FLAG_LOGPROBS = 1
FLAG_JSON_OBJECT = 2
PREFILL_STEP = 2048
"""Prompt tokens per prefill chunk (mlx-lm's ``generate_step`` default)."""

_DTYPES: tuple[mx.Dtype, ...] = (mx.float32, mx.float16, mx.bfloat16)


class PipelineError(RuntimeError):
    """The ranks disagree (layer ranges, group size) or the group could not be formed."""


def init_ring_group(rank: int, hostfile: Path | str) -> mx.distributed.Group:
    """Join the ring group as ``rank`` (sets ``MLX_RANK``/``MLX_HOSTFILE`` for MLX)."""
    hosts = read_hostfile(hostfile)
    if not 0 <= rank < len(hosts):
        raise PipelineError(f"rank {rank} is not in the hostfile's {len(hosts)} ranks")
    os.environ[RANK_ENV] = str(rank)
    os.environ[HOSTFILE_ENV] = str(hostfile)
    if len(hosts) == 1:
        return mx.distributed.init(strict=False)
    group = mx.distributed.init(backend="ring", strict=True)
    if group.rank() != rank or group.size() != len(hosts):
        raise PipelineError(
            f"joined as rank {group.rank()} of {group.size()}, expected {rank} of {len(hosts)}"
        )
    return group


# --- wire helpers -------------------------------------------------------------------------


def _send(array: mx.array, destination: int, group: mx.distributed.Group) -> None:
    mx.eval(mx.distributed.send(array, destination, group=group))


def _receive(
    shape: Sequence[int], dtype: mx.Dtype, source: int, group: mx.distributed.Group
) -> mx.array:
    received = mx.distributed.recv(shape, dtype, source, group=group)
    mx.eval(received)
    return received


def _scalar(array: mx.array) -> int:
    return int(cast(int, array.item()))


class Header:
    """One step's control words."""

    def __init__(
        self,
        command: int,
        length: int = 0,
        dtype: mx.Dtype = mx.float32,
        hidden_size: int = 0,
        sampling: SamplingParams | None = None,
        max_tokens: int = 0,
    ) -> None:
        self.command = command
        self.length = length
        self.dtype = dtype
        self.hidden_size = hidden_size
        self.sampling = sampling or SamplingParams()
        self.max_tokens = max_tokens

    def encode(self) -> bytes:
        sampling = self.sampling
        flags = (FLAG_LOGPROBS if sampling.logprobs else 0) | (
            FLAG_JSON_OBJECT if sampling.json_object else 0
        )
        words = np.concatenate(
            [
                np.array(
                    [self.command, self.length, _DTYPES.index(self.dtype), self.hidden_size],
                    dtype=np.uint32,
                ),
                np.array([(sampling.seed or 0) % 2**64], dtype=np.uint64).view(np.uint32),
                np.array(
                    [
                        sampling.temperature,
                        sampling.top_p,
                        sampling.presence_penalty,
                        sampling.frequency_penalty,
                    ],
                    dtype=np.float64,
                ).view(np.uint32),
                np.array([flags, sampling.top_logprobs, self.max_tokens], dtype=np.uint32),
            ]
        )
        return words.astype("<u4").tobytes()

    @classmethod
    def decode(cls, data: bytes) -> "Header":
        words = np.frombuffer(data, dtype="<u4").astype(np.uint32)
        seed = int(words[4:6].view(np.uint64)[0])
        temperature, top_p, presence, frequency = (
            float(value) for value in words[6:14].view(np.float64)
        )
        flags, top_logprobs, max_tokens = (int(value) for value in words[14:17])
        return cls(
            command=int(words[0]),
            length=int(words[1]),
            dtype=_DTYPES[int(words[2])],
            hidden_size=int(words[3]),
            sampling=SamplingParams(
                temperature=temperature,
                top_p=top_p,
                seed=seed,
                presence_penalty=presence,
                frequency_penalty=frequency,
                logprobs=bool(flags & FLAG_LOGPROBS),
                top_logprobs=top_logprobs,
                json_object=bool(flags & FLAG_JSON_OBJECT),
            ),
            max_tokens=max_tokens,
        )


def reply_bytes(sampling: SamplingParams) -> int:
    """Size of the last rank's answer to a FORWARD: the token (int32), and with
    log-probabilities its own (float32) and ``top_logprobs`` pairs (int32, float32)."""
    return TOKEN_BYTES + (4 + 8 * sampling.top_logprobs if sampling.logprobs else 0)


def encode_reply(sampled: SampledToken, sampling: SamplingParams) -> bytes:
    data = np.array([sampled.token], dtype="<i4").tobytes()
    if not sampling.logprobs:
        return data
    top = list(sampled.top[: sampling.top_logprobs])
    top += [(0, -np.inf)] * (sampling.top_logprobs - len(top))  # a vocabulary smaller than asked
    data += np.array([sampled.logprob], dtype="<f4").tobytes()
    for token, logprob in top:
        data += np.array([token], dtype="<i4").tobytes() + np.array([logprob], "<f4").tobytes()
    return data


def decode_reply(data: bytes, sampling: SamplingParams) -> SampledToken:
    token = int(np.frombuffer(data[:TOKEN_BYTES], dtype="<i4")[0])
    if not sampling.logprobs:
        return SampledToken(token)
    logprob = float(np.frombuffer(data[4:8], dtype="<f4")[0])
    top: list[tuple[int, float]] = []
    for offset in range(8, len(data), 8):
        top_token = int(np.frombuffer(data[offset : offset + 4], dtype="<i4")[0])
        top_logprob = float(np.frombuffer(data[offset + 4 : offset + 8], dtype="<f4")[0])
        top.append((top_token, top_logprob))
    return SampledToken(token, logprob, tuple(top))


def _check_layer_chain(stage: ModelStage, group: mx.distributed.Group) -> None:
    """Each rank checks that its range starts where the previous rank's ended; the last rank
    checks that it ends at the last layer and tells rank 0 the chain is whole."""
    rank, size = group.rank(), group.size()
    if rank > 0:
        previous_end = _scalar(_receive((1,), mx.int32, rank - 1, group))
        if previous_end != stage.layer_start:
            message = (
                f"rank {rank} starts at layer {stage.layer_start} but rank {rank - 1} "
                f"ends at {previous_end}"
            )
            _send(mx.array([-1], dtype=mx.int32), (rank + 1) % size, group)
            raise PipelineError(message)
    if rank < size - 1:
        _send(mx.array([stage.layer_end], dtype=mx.int32), rank + 1, group)
    elif not stage.is_last:
        _send(mx.array([-1], dtype=mx.int32), 0, group)
        raise PipelineError(f"the last rank ends at layer {stage.layer_end}, not the last layer")
    else:
        _send(mx.array([stage.layer_end], dtype=mx.int32), 0, group)
    if rank == 0:
        answer = _scalar(_receive((1,), mx.int32, size - 1, group))
        if answer != stage.n_layers_total:
            raise PipelineError("the pipeline's layer ranges do not chain (see the other ranks)")


def link_control_channel(group: mx.distributed.Group, hostfile: Path | str) -> ControlChannel:
    """Set up this rank's control channel (see :mod:`~exo.worker.runner.control_channel`):
    listen on its ring address, tell the right neighbour the port and the ticket it must
    present, link both neighbours."""
    hosts = read_hostfile(hostfile)
    rank, size = group.rank(), group.size()
    left = (rank - 1) % size

    def host_of(index: int) -> str:
        return hosts[index][0].rsplit(":", 1)[0]

    channel = ControlChannel(host_of(rank))
    try:
        ticket = np.frombuffer(channel.ticket, dtype="<i4")
        _send(mx.array([channel.port, *ticket.tolist()], dtype=mx.int32), (rank + 1) % size, group)
        received = np.array(_receive((1 + ticket.size,), mx.int32, left, group), dtype="<i4")
        channel.join(host_of(left), int(received[0]), received[1:].tobytes())
    except Exception:
        channel.close()
        raise
    return channel


class PipelineStepper:
    """Rank 0's side of the pipeline: a :class:`~exo.worker.runner.engine.TokenStepper`."""

    def __init__(
        self,
        stage: ModelStage,
        group: mx.distributed.Group,
        control: ControlChannel,
        stage_clock: StageClock | None = None,
    ) -> None:
        if group.rank() != 0 or not stage.is_first:
            raise PipelineError("the pipeline stepper runs on rank 0 with the first layers")
        if group.size() < 2:
            raise PipelineError("a pipeline needs at least two ranks")
        self.stage = stage
        self.group = group
        self.control = control
        self.stage_clock = stage_clock if stage_clock is not None else StageClock()
        self._interrupted = False
        """A step did not finish (an error, often a lost neighbour): the other ranks are
        mid-step, and the ring may be broken."""
        _check_layer_chain(stage, group)

    @property
    def context_length(self) -> int:
        return self.stage.context_length

    def _forward(self, command: int, token_ids: Sequence[int], cache: list[object]) -> float:
        """Run this stage on ``token_ids`` and send the hidden state on; returns the seconds
        the stage took (input in hand to output evaluated)."""
        started = time.perf_counter()
        hidden = self.stage(mx.array([list(token_ids)]), cache)
        mx.eval(hidden)
        computed = time.perf_counter() - started
        self.control.send(Header(command, len(token_ids), hidden.dtype, hidden.shape[-1]).encode())
        _send(hidden, 1, self.group)
        return computed

    def generate(
        self, prompt: Sequence[int], sampling: SamplingParams, max_tokens: int
    ) -> Iterator[int | SampledToken]:
        self._interrupted = True
        self.stage_clock.begin_request()
        self.control.send(Header(COMMAND_BEGIN, sampling=sampling, max_tokens=max_tokens).encode())
        reply_size = reply_bytes(sampling)
        try:
            cache: list[object] = self.stage.make_cache()
            remaining = list(prompt)
            while len(remaining) > 1:
                chunk = remaining[: min(PREFILL_STEP, len(remaining) - 1)]
                self._forward(COMMAND_PREFILL, chunk, cache)
                remaining = remaining[len(chunk) :]
            self._interrupted = False
            for step in range(max_tokens):
                self._interrupted = True
                computed = self._forward(COMMAND_FORWARD, remaining, cache)
                if step > 0:  # the first forward computes the first token: not decode
                    self.stage_clock.record_decode_step(computed)
                reply = decode_reply(self.control.receive(reply_size), sampling)
                self._interrupted = False
                yield reply if sampling.logprobs else reply.token
                remaining = [reply.token]
        finally:
            # Also when the engine closes the stream early (between steps, so the other
            # ranks wait for a header); never after an interrupted step.
            if not self._interrupted:
                self.control.send(Header(COMMAND_END).encode())

    def shutdown(self) -> None:
        """Tell the other ranks to stop. Skipped after an interrupted step: they are not
        waiting for a header then; they fail on their own once this process exits and its
        connections close."""
        if self._interrupted:
            logger.warning("pipeline interrupted mid-step; not sending shutdown")
            return
        self.control.send(Header(COMMAND_SHUTDOWN).encode())


def serve_stage(
    stage: ModelStage,
    group: mx.distributed.Group,
    control: ControlChannel,
    stage_clock: StageClock | None = None,
    on_request_end: Callable[[list[float]], None] | None = None,
    model_directory: Path | None = None,
) -> None:
    """Ranks 1..n-1: follow rank 0's headers until SHUTDOWN. At each END,
    ``on_request_end`` gets the request's decode step times (seconds, as timed on
    ``stage_clock``). The last rank loads the tokenizer from ``model_directory`` the first
    time a request asks for JSON."""
    rank, size = group.rank(), group.size()
    if rank == 0:
        raise PipelineError("rank 0 drives the pipeline; it does not serve a stage")
    _check_layer_chain(stage, group)
    is_last = rank == size - 1
    clock = stage_clock if stage_clock is not None else StageClock()
    cache: list[object] = stage.make_cache()
    sampling = SamplingParams()
    chooser = RequestSampler(sampling, 0)
    generated: list[int] = []
    """Tokens this (last) rank sampled for the request under way."""
    vocabulary: Callable[[], TokenVocabulary] | None = (
        vocabulary_loader(model_directory) if model_directory is not None and is_last else None
    )
    forwards = 0
    """FORWARD steps of the request under way (the first is not a decode step)."""
    while True:
        encoded = control.receive(HEADER_BYTES)  # sleeps until rank 0 has work
        header = Header.decode(encoded)
        if header.command in (COMMAND_SHUTDOWN, COMMAND_BEGIN, COMMAND_END) and not is_last:
            control.send(encoded)
        if header.command == COMMAND_SHUTDOWN:
            logger.debug("rank {} shutting down", rank)
            return
        if header.command == COMMAND_BEGIN:
            cache = stage.make_cache()
            clock.begin_request()
            forwards = 0
            if is_last:
                sampling = header.sampling
                if sampling.json_object and vocabulary is None:
                    raise PipelineError("JSON mode needs the model directory on the last rank")
                chooser = RequestSampler(
                    sampling,
                    header.max_tokens,
                    vocabulary() if sampling.json_object and vocabulary is not None else None,
                )
                generated = []
            continue
        if header.command == COMMAND_END:
            if on_request_end is not None:
                on_request_end(clock.take())
            continue
        if header.command not in (COMMAND_PREFILL, COMMAND_FORWARD):
            raise PipelineError(f"rank {rank} got an unknown command {header.command}")
        hidden = _receive((1, header.length, header.hidden_size), header.dtype, rank - 1, group)
        started = time.perf_counter()  # timer: the input hidden state is here (evaluated)
        output = stage(hidden, cache)
        if not is_last:
            mx.eval(output)
            computed = time.perf_counter() - started
            control.send(
                Header(
                    header.command, header.length, output.dtype, output.shape[-1], header.sampling
                ).encode()
            )
            _send(output, rank + 1, group)
        elif header.command == COMMAND_FORWARD:
            token, logprobs = chooser.choose(mx.array(generated, dtype=mx.int32), output[:, -1, :])
            mx.eval(token)
            token_id = _scalar(token)
            computed = time.perf_counter() - started
            sampled = (
                sampled_token(logprobs, token_id, sampling.top_logprobs)
                if sampling.logprobs
                else SampledToken(token_id)
            )
            generated.append(token_id)
            control.send(encode_reply(sampled, sampling))
        else:
            mx.eval([layer_cache.state for layer_cache in cache])  # pyright: ignore[reportAttributeAccessIssue]
            computed = 0.0
        if header.command == COMMAND_FORWARD:
            if forwards > 0:
                clock.record_decode_step(computed)
            forwards += 1
