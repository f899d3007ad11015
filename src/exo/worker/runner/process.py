"""A runner process: one rank of a model instance.

Start one per device with ``python -m exo.worker.runner.process --rank R --world-size N
--hostfile PATH --layer-start S --layer-end E [--model PATH]``. With ``--world-size 1`` no
hostfile is needed and the process holds the whole model. Rank 0 serves requests read as JSON
lines from stdin (or the single ``--request-json``, then shuts the pipeline down); every rank
writes status lines to stdout (see :mod:`exo.worker.runner.messages`). Logs go to stderr.
"""

import argparse
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import mlx.core as mx
import psutil
from loguru import logger
from pydantic import BaseModel, ConfigDict

from exo.models.llama import LlamaStage
from exo.models.loader import load_stage_for, load_tokenizer_for
from exo.shared.types.runners import RunnerStatus
from exo.worker.runner.engine import Engine, GenerationRequest, LocalStepper, TokenStepper
from exo.worker.runner.messages import (
    CancelInput,
    ChunkOutput,
    GenerateInput,
    RequestFailedOutput,
    ShutdownInput,
    StatusOutput,
    parse_input,
)
from exo.worker.runner.pipeline import PipelineStepper, init_ring_group, serve_stage

Emit = Callable[[StatusOutput | ChunkOutput | RequestFailedOutput], None]


class RankConfig(BaseModel):
    """Where one rank sits in its instance and what it loads."""

    model_config = ConfigDict(frozen=True)

    rank: int = 0
    world_size: int = 1
    hostfile: str | None = None
    layer_start: int = 0
    layer_end: int | None = None
    """None: to the last layer."""
    model_path: str | None = None
    """A GGUF file or an MLX model directory; None: the bundled SmolLM2 GGUF."""
    weights_cache: str | None = None
    """A directory for the per-machine safetensors cache (only the stage's tensors are read)."""


class RequestSource(Protocol):
    def next_request(self) -> GenerationRequest | None:
        """The next request to run, or None to shut down."""
        ...

    def is_cancelled(self, request_id: str) -> bool: ...


class FixedRequests:
    """A fixed list of requests, then shutdown."""

    def __init__(self, requests: list[GenerationRequest]) -> None:
        self._requests = list(requests)

    def next_request(self) -> GenerationRequest | None:
        return self._requests.pop(0) if self._requests else None

    def is_cancelled(self, request_id: str) -> bool:
        return False


class StdinRequests:
    """Requests and cancellations as JSON lines on stdin, read by a thread so a cancel line
    takes effect between two tokens of the running request."""

    def __init__(self) -> None:
        self._queue: queue.Queue[GenerationRequest | None] = queue.Queue()
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._read, name="runner-stdin", daemon=True).start()

    def _read(self) -> None:
        for line in sys.stdin:
            if not line.strip():
                continue
            try:
                message = parse_input(line)
            except ValueError as error:
                logger.warning("ignoring a malformed input line: {}", error)
                continue
            match message:
                case GenerateInput(request=request):
                    with self._lock:  # a reused id is not cancelled by an earlier cancel
                        self._cancelled.discard(request.request_id)
                    self._queue.put(request)
                case CancelInput(request_id=request_id):
                    with self._lock:
                        self._cancelled.add(request_id)
                case ShutdownInput():
                    break
        self._queue.put(None)

    def next_request(self) -> GenerationRequest | None:
        return self._queue.get()

    def is_cancelled(self, request_id: str) -> bool:
        with self._lock:
            return request_id in self._cancelled


def print_output(message: StatusOutput | ChunkOutput | RequestFailedOutput) -> None:
    sys.stdout.write(message.model_dump_json() + "\n")
    sys.stdout.flush()


def _rss_bytes() -> int:
    return int(psutil.Process().memory_info().rss)


def run_rank(config: RankConfig, requests: RequestSource | None, emit: Emit = print_output) -> None:
    """Run one rank to completion: load, join the group, serve (rank 0: ``requests``)."""

    def status(
        value: RunnerStatus, stage: LlamaStage | None = None, error: str | None = None
    ) -> None:
        emit(
            StatusOutput(
                rank=config.rank,
                status=value,
                error=error,
                layer_start=stage.layer_start if stage else None,
                layer_end=stage.layer_end if stage else None,
                weight_bytes=stage.weights.nbytes if stage else None,
                rss_bytes=_rss_bytes(),
            )
        )

    stage: LlamaStage | None = None
    try:
        status("loading")
        model_path = Path(config.model_path) if config.model_path else None
        cache_dir = Path(config.weights_cache) if config.weights_cache else None
        weights = load_stage_for(model_path, config.layer_start, config.layer_end, cache_dir)
        tokenizer = load_tokenizer_for(model_path, weights) if config.rank == 0 else None
        weights.metadata = {}
        stage = LlamaStage(weights)
        stepper: TokenStepper
        if config.world_size == 1:
            status("ready", stage)
            stepper = LocalStepper(stage)
        else:
            if config.hostfile is None:
                raise ValueError("a pipeline with more than one rank needs a hostfile")
            status("connecting", stage)
            group = init_ring_group(config.rank, config.hostfile)
            if group.size() != config.world_size:
                raise ValueError(
                    f"the hostfile has {group.size()} ranks but the world size is "
                    f"{config.world_size}"
                )
            if config.rank != 0:
                status("ready", stage)
                serve_stage(stage, group)
                status("shut_down", stage)
                return
            stepper = PipelineStepper(stage, group)
            status("ready", stage)
        if tokenizer is None or requests is None:
            raise ValueError("rank 0 needs a tokenizer and a request source")
        engine = Engine(tokenizer, stepper)
        try:
            _serve_requests(engine, requests, emit, lambda value: status(value, stage))
        finally:
            if isinstance(stepper, PipelineStepper):
                stepper.shutdown()
        status("shut_down", stage)
    except Exception as error:
        logger.exception("rank {} failed", config.rank)
        status("failed", stage, f"{type(error).__name__}: {error}")
        raise


def _serve_requests(
    engine: Engine,
    requests: RequestSource,
    emit: Emit,
    status: Callable[[RunnerStatus], None],
) -> None:
    while (request := requests.next_request()) is not None:
        status("running")
        request_id = request.request_id

        def should_cancel(request_id: str = request_id) -> bool:
            return requests.is_cancelled(request_id)

        try:
            for chunk in engine.generate(request, should_cancel):
                emit(ChunkOutput(chunk=chunk))
        except ValueError as error:
            emit(RequestFailedOutput(request_id=request_id, error=str(error)))
        status("ready")


def parse_args(argv: list[str] | None = None) -> tuple[RankConfig, GenerationRequest | None]:
    parser = argparse.ArgumentParser(description="Run one rank of a model instance.")
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--world-size", type=int, default=1)
    parser.add_argument("--hostfile", help="JSON ring hostfile (MLX_HOSTFILE format)")
    parser.add_argument("--layer-start", type=int, default=0)
    parser.add_argument("--layer-end", type=int, default=None)
    parser.add_argument(
        "--model", help="GGUF file or MLX model directory (default: the bundled SmolLM2)"
    )
    parser.add_argument(
        "--weights-cache", help="directory of the per-machine weights cache (lazy stage loading)"
    )
    parser.add_argument(
        "--request-json", help="rank 0: run this one GenerationRequest (JSON), then stop"
    )
    arguments = parser.parse_args(argv)
    config = RankConfig(
        rank=arguments.rank,
        world_size=arguments.world_size,
        hostfile=arguments.hostfile,
        layer_start=arguments.layer_start,
        layer_end=arguments.layer_end,
        model_path=arguments.model,
        weights_cache=arguments.weights_cache,
    )
    request = (
        GenerationRequest.model_validate_json(arguments.request_json)
        if arguments.request_json
        else None
    )
    return config, request


PARENT_PID_ENV = "EXO_RUNNER_PARENT_PID"


def _exit_with_parent() -> None:
    """A supervised runner exits when its node process is gone (even after kill -9), so a
    dead node never leaves ranks blocked on the ring."""
    expected = os.environ.get(PARENT_PID_ENV)
    if not expected:
        return

    def watch() -> None:
        while os.getppid() == int(expected):
            time.sleep(0.5)
        os._exit(3)

    threading.Thread(target=watch, name="runner-parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    logger.remove()
    logger.add(sys.stderr, level="INFO")
    _exit_with_parent()
    config, request = parse_args(argv)
    requests: RequestSource | None = None
    if config.rank == 0:
        requests = FixedRequests([request]) if request is not None else StdinRequests()
    try:
        run_rank(config, requests)
    except Exception:
        return 1
    finally:
        mx.clear_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
