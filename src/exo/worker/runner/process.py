"""A runner process: one rank of a model instance.

Start one per device; its command line is :class:`~exo.worker.runner.arguments.RunnerArguments`
(``--rank R --world-size N --hostfile PATH --layer-start S --layer-end E [--model PATH]``).
With ``--world-size 1`` no hostfile is needed and the process holds the whole model. Rank 0
serves requests read as JSON lines from stdin (or the single ``--request``, then shuts the
pipeline down); every rank writes status lines to stdout (see
:mod:`exo.worker.runner.messages`), and after a request its measured time per token (see
:mod:`exo.worker.runner.timing`). Logs go to stderr.

The first thing a rank does is take its device (``--device``): it makes it MLX's default
device, or fails with the reason, before anything else touches MLX. The model code is
imported only then, so nothing (mlx-lm creates a stream on MLX's default device when it is
imported) lands on another device first.
"""

import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import psutil
from loguru import logger

from exo.models.weights_cache import default_weights_cache
from exo.shared.types.execution import ComputeDevice
from exo.shared.types.generation import GenerationRequest
from exo.shared.types.runners import RunnerStatus
from exo.worker.compute_device import use_compute_device
from exo.worker.runner.arguments import RunnerArguments, RunnerArgumentsError
from exo.worker.runner.messages import (
    CancelInput,
    ChunkOutput,
    GenerateInput,
    RequestFailedOutput,
    RunnerOutputMessage,
    ShutdownInput,
    StatusOutput,
    parse_input,
)
from exo.worker.runner.timing import StageClock, StageTimeReporter, TokenClock

if TYPE_CHECKING:
    from exo.models.stage import ModelStage
    from exo.worker.runner.engine import Engine, TokenStepper

Emit = Callable[[RunnerOutputMessage], None]


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


def print_output(message: RunnerOutputMessage) -> None:
    sys.stdout.write(message.model_dump_json() + "\n")
    sys.stdout.flush()


def _rss_bytes() -> int:
    return int(psutil.Process().memory_info().rss)


LOAD_PROGRESS_INTERVAL_S = 0.5
"""At most one load-progress status per this many seconds (the first and the last always)."""


class LoadProgressReporter:
    """Passes ``(loaded_bytes, total_bytes)`` on to ``send`` a few times while weights
    load: the first report, then at most one per ``interval_s``, and always the last (all
    loaded). Each report becomes a cluster event, so it must stay a handful per load."""

    def __init__(
        self,
        send: Callable[[int, int], None],
        interval_s: float = LOAD_PROGRESS_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._send = send
        self._interval_s = interval_s
        self._clock = clock
        self._last_at: float | None = None
        self._last: tuple[int, int] | None = None

    def __call__(self, loaded_bytes: int, total_bytes: int) -> None:
        now = self._clock()
        done = loaded_bytes >= total_bytes
        if (loaded_bytes, total_bytes) == self._last:
            return
        if not done and self._last_at is not None and now - self._last_at < self._interval_s:
            return
        self._last_at = now
        self._last = (loaded_bytes, total_bytes)
        self._send(loaded_bytes, total_bytes)


def run_rank(
    config: RunnerArguments, requests: RequestSource | None, emit: Emit = print_output
) -> None:
    """Run one rank to completion: load, join the group, serve (rank 0: ``requests``)."""

    device: ComputeDevice | None = None

    def status(
        value: RunnerStatus,
        stage: "ModelStage | None" = None,
        error: str | None = None,
        loaded: tuple[int, int] | None = None,
    ) -> None:
        emit(
            StatusOutput(
                rank=config.rank,
                status=value,
                error=error,
                layer_start=stage.layer_start if stage else None,
                layer_end=stage.layer_end if stage else None,
                weight_bytes=stage.nbytes if stage else None,
                rss_bytes=_rss_bytes(),
                compute_device=device,
                loaded_bytes=loaded[0] if loaded else None,
                total_bytes=loaded[1] if loaded else None,
            )
        )

    def load_progress(loaded_bytes: int, total_bytes: int) -> None:
        status("loading", loaded=(loaded_bytes, total_bytes))

    stage: ModelStage | None = None
    stage_clock = StageClock()
    reporter = StageTimeReporter(config.rank)

    def report_stage_time(decode_steps: list[float], tokens: TokenClock | None = None) -> None:
        message = reporter.report(decode_steps, tokens)
        if message is not None:
            emit(message)

    try:
        status("loading")
        device = use_compute_device(config.device)
        logger.info("rank {} computes on {} ({})", config.rank, device.device_id, device.name)
        # Only now: importing mlx-lm makes a stream on MLX's default device.
        from exo.models.locate import model_directory
        from exo.models.stage import load_stage
        from exo.models.tokenizer import load_model_tokenizer
        from exo.worker.runner.engine import Engine, LocalStepper
        from exo.worker.runner.pipeline import (
            PipelineStepper,
            init_ring_group,
            link_control_channel,
            serve_stage,
        )

        directory = model_directory(config.model, config.weights_cache or default_weights_cache())
        stage = load_stage(
            directory,
            config.layer_start,
            config.layer_end,
            progress=LoadProgressReporter(load_progress),
        )
        tokenizer = load_model_tokenizer(directory) if config.rank == 0 else None
        stepper: TokenStepper
        if config.world_size == 1:
            status("ready", stage)
            stepper = LocalStepper(stage, stage_clock=stage_clock)
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
            control = link_control_channel(group, config.hostfile)
            if config.rank != 0:
                status("ready", stage)
                serve_stage(stage, group, control, stage_clock, report_stage_time, directory)
                status("shut_down", stage)
                return
            stepper = PipelineStepper(stage, group, control, stage_clock)
            status("ready", stage)
        if tokenizer is None or requests is None:
            raise ValueError("rank 0 needs a tokenizer and a request source")
        engine = Engine(tokenizer, stepper)
        try:
            _serve_requests(
                engine,
                requests,
                emit,
                lambda value: status(value, stage),
                lambda tokens: report_stage_time(stage_clock.take(), tokens),
            )
        finally:
            if isinstance(stepper, PipelineStepper):
                stepper.shutdown()
        status("shut_down", stage)
    except Exception as error:
        logger.exception("rank {} failed", config.rank)
        status("failed", stage, f"{type(error).__name__}: {error}")
        raise


def _serve_requests(
    engine: "Engine",
    requests: RequestSource,
    emit: Emit,
    status: Callable[[RunnerStatus], None],
    report_stage_time: Callable[[TokenClock], None],
) -> None:
    """Run requests until there are no more; after each, ``report_stage_time`` gets its
    token clock (the stepper's stage clock holds its decode steps)."""
    while (request := requests.next_request()) is not None:
        status("running")
        request_id = request.request_id

        def should_cancel(request_id: str = request_id) -> bool:
            return requests.is_cancelled(request_id)

        tokens = TokenClock(time.perf_counter())  # time to first token counts from here
        try:
            for chunk in engine.generate(request, should_cancel, tokens):
                emit(ChunkOutput(chunk=chunk))
        except ValueError as error:
            emit(RequestFailedOutput(request_id=request_id, error=str(error)))
        report_stage_time(tokens)
        status("ready")


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
    arguments = sys.argv[1:] if argv is None else argv
    if arguments in (["-h"], ["--help"]):
        print(RunnerArguments.usage())
        return 0
    try:
        config = RunnerArguments.parse(arguments)
    except RunnerArgumentsError as error:
        print(f"exo runner: {error}", file=sys.stderr)
        return 2
    requests: RequestSource | None = None
    if config.rank == 0:
        requests = (
            FixedRequests([config.request]) if config.request is not None else StdinRequests()
        )
    try:
        run_rank(config, requests)
    except Exception:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
