"""Pipeline-parallel generation across processes over MLX's ring backend.

Every rank is one process holding a contiguous layer range (rank 0 the first layers and the
embedding, the last rank the last layers, the final norm and the head). The ranks join one
group with ``mx.distributed.init(backend="ring", strict=True)``, which reads:

* ``MLX_RANK``: this process's rank;
* ``MLX_HOSTFILE``: the path of a JSON file listing, per rank, the ``"ip:port"`` addresses
  it listens on: ``[["10.0.0.1:5000"], ["10.0.0.2:5001"], ...]``. Ranks connect to their
  ring neighbours, so rank ``r`` talks to ``r - 1`` and ``r + 1`` (and the last to rank 0).

Only neighbour links are used. Rank 0 runs the :class:`~exo.worker.runner.engine.Engine`
(tokenizer, stop conditions, streaming) with a :class:`PipelineStepper`; every other rank
runs :func:`serve_stage`. Per step, a control header then the activations travel
0 -> 1 -> ... -> last; the last rank samples the next token and sends it to rank 0, which
feeds it back in as the next step's input. Each rank's KV cache therefore advances by the
same positions on every step; a BEGIN header empties every cache and reseeds the sampler.

Header (8 x uint32): command, length, seed (u64), temperature (f64), top_p (f64).
"""

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import mlx.core as mx
import numpy as np
from loguru import logger

from exo.models.gguf import scalar_int
from exo.models.llama import ACTIVATION_DTYPE, KVCache, LlamaStage
from exo.worker.runner.engine import Sampler, SamplingParams

HOSTFILE_ENV = "MLX_HOSTFILE"
RANK_ENV = "MLX_RANK"

COMMAND_BEGIN = 1
COMMAND_FORWARD = 2
COMMAND_SHUTDOWN = 3
HEADER_WORDS = 8


class PipelineError(RuntimeError):
    """The ranks disagree (layer ranges, group size) or the group could not be formed."""


def split_layers(block_count: int, world_size: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, end)`` ranges, as even as possible, earlier ranks taking extras."""
    if not 1 <= world_size <= block_count:
        raise ValueError(f"cannot split {block_count} layers over {world_size} ranks")
    base, extra = divmod(block_count, world_size)
    ranges: list[tuple[int, int]] = []
    start = 0
    for rank in range(world_size):
        end = start + base + (1 if rank < extra else 0)
        ranges.append((start, end))
        start = end
    return ranges


def write_hostfile(path: Path | str, addresses: Sequence[str]) -> Path:
    """Write the ring hostfile: one ``"ip:port"`` per rank, in rank order."""
    path = Path(path)
    path.write_text(json.dumps([[address] for address in addresses]))
    return path


def read_hostfile(path: Path | str) -> list[list[str]]:
    data: object = json.loads(Path(path).read_text())
    if not isinstance(data, list):
        raise PipelineError(f"hostfile {path} is not a JSON list")
    hosts: list[list[str]] = []
    for entry in cast(list[object], data):
        addresses = [entry] if isinstance(entry, str) else entry
        if not isinstance(addresses, list) or not all(
            isinstance(address, str) for address in cast(list[object], addresses)
        ):
            raise PipelineError(f"hostfile {path}: entry {entry!r} is not a list of 'ip:port'")
        hosts.append(cast(list[str], addresses))
    return hosts


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


def encode_header(
    command: int, length: int = 0, sampling: SamplingParams | None = None
) -> mx.array:
    seed = (sampling.seed or 0) % 2**64 if sampling else 0
    temperature = sampling.temperature if sampling else 0.0
    top_p = sampling.top_p if sampling else 1.0
    words = np.concatenate(
        [
            np.array([command, length], dtype=np.uint32),
            np.array([seed], dtype=np.uint64).view(np.uint32),
            np.array([temperature, top_p], dtype=np.float64).view(np.uint32),
        ]
    )
    return mx.array(words)


def decode_header(header: mx.array) -> tuple[int, int, SamplingParams]:
    words = np.array(header, dtype=np.uint32)
    seed = int(words[2:4].view(np.uint64)[0])
    temperature, top_p = (float(v) for v in words[4:8].view(np.float64))
    return (
        int(words[0]),
        int(words[1]),
        SamplingParams(temperature=temperature, top_p=top_p, seed=seed),
    )


def _check_layer_chain(stage: LlamaStage, group: mx.distributed.Group) -> None:
    """Each rank checks that its range starts where the previous rank's ended; the last rank
    checks that it ends at the last layer and tells rank 0 the chain is whole."""
    rank, size = group.rank(), group.size()
    if rank > 0:
        previous_end = scalar_int(_receive((1,), mx.int32, rank - 1, group))
        if previous_end != stage.layer_start:
            message = (
                f"rank {rank} starts at layer {stage.layer_start} but rank {rank - 1} "
                f"ends at {previous_end}"
            )
            if rank < size - 1:
                _send(mx.array([-1], dtype=mx.int32), rank + 1, group)
            else:
                _send(mx.array([-1], dtype=mx.int32), 0, group)
            raise PipelineError(message)
    if rank < size - 1:
        _send(mx.array([stage.layer_end], dtype=mx.int32), rank + 1, group)
    elif not stage.is_last:
        _send(mx.array([-1], dtype=mx.int32), 0, group)
        raise PipelineError(f"the last rank ends at layer {stage.layer_end}, not the last layer")
    else:
        _send(mx.array([stage.layer_end], dtype=mx.int32), 0, group)
    if rank == 0:
        answer = scalar_int(_receive((1,), mx.int32, size - 1, group))
        if answer != stage.hyperparameters.block_count:
            raise PipelineError("the pipeline's layer ranges do not chain (see the other ranks)")


class PipelineStepper:
    """Rank 0's side of the pipeline: a :class:`~exo.worker.runner.engine.TokenStepper`."""

    def __init__(self, stage: LlamaStage, group: mx.distributed.Group) -> None:
        if group.rank() != 0 or not stage.is_first:
            raise PipelineError("the pipeline stepper runs on rank 0 with the first layers")
        if group.size() < 2:
            raise PipelineError("a pipeline needs at least two ranks")
        self.stage = stage
        self.group = group
        self._cache: KVCache = stage.new_cache()
        self._interrupted = False
        """A begin or step did not finish (an error, often a lost neighbour): the other
        ranks are mid-step, and the ring may be broken."""
        _check_layer_chain(stage, group)

    @property
    def context_length(self) -> int:
        return self.stage.hyperparameters.context_length

    def begin(self, sampling: SamplingParams) -> None:
        self._interrupted = True
        self._cache = self.stage.new_cache()
        _send(encode_header(COMMAND_BEGIN, 0, sampling), 1, self.group)
        self._interrupted = False

    def step(self, token_ids: Sequence[int]) -> int:
        self._interrupted = True
        _send(encode_header(COMMAND_FORWARD, len(token_ids)), 1, self.group)
        hidden = self.stage.forward(mx.array([list(token_ids)], dtype=mx.int32), self._cache)
        mx.eval(hidden, self._cache.arrays())
        _send(hidden, 1, self.group)
        token = scalar_int(_receive((1,), mx.int32, self.group.size() - 1, self.group))
        self._interrupted = False
        return token

    def shutdown(self) -> None:
        """Tell the other ranks to stop. Skipped after an interrupted step: they are not
        waiting for a header then, and a send on a broken ring can block for good (MLX 0.32);
        they fail on their own once this process exits and its sockets close."""
        if self._interrupted:
            logger.warning("pipeline interrupted mid-step; not sending shutdown")
            return
        _send(encode_header(COMMAND_SHUTDOWN), 1, self.group)


def serve_stage(stage: LlamaStage, group: mx.distributed.Group) -> None:
    """Ranks 1..n-1: follow rank 0's headers until SHUTDOWN."""
    rank, size = group.rank(), group.size()
    if rank == 0:
        raise PipelineError("rank 0 drives the pipeline; it does not serve a stage")
    _check_layer_chain(stage, group)
    is_last = rank == size - 1
    cache = stage.new_cache()
    sampler = Sampler(SamplingParams())
    hidden_size = stage.hidden_size
    while True:
        header = _receive((HEADER_WORDS,), mx.uint32, rank - 1, group)
        command, length, sampling = decode_header(header)
        if not is_last:
            _send(header, rank + 1, group)
        if command == COMMAND_SHUTDOWN:
            logger.debug("rank {} shutting down", rank)
            return
        if command == COMMAND_BEGIN:
            cache = stage.new_cache()
            sampler = Sampler(sampling)
            continue
        if command != COMMAND_FORWARD:
            raise PipelineError(f"rank {rank} got an unknown command {command}")
        hidden = _receive((1, length, hidden_size), ACTIVATION_DTYPE, rank - 1, group)
        output = stage.forward(hidden, cache)
        mx.eval(output, cache.arrays())
        if is_last:
            _send(mx.array([sampler(output)], dtype=mx.int32), 0, group)
        else:
            _send(output, rank + 1, group)
