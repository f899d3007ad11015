"""Start a pipeline as N local runner processes on 127.0.0.1 (tests, the CLI, benchmarks).

Each rank is ``sys.executable -m exo.worker.runner.process`` with its own ``MLX_RANK`` and a
shared ring hostfile on free loopback ports; rank 0 takes requests on stdin and its stdout
is read as it streams.
"""

import contextlib
import os
import queue
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from exo.models.config import ModelConfig
from exo.models.locate import model_directory
from exo.models.weights_cache import default_weights_cache
from exo.shared.types.generation import GenerationChunk, GenerationRequest
from exo.worker.runner.arguments import RunnerArguments
from exo.worker.runner.hostfile import HOSTFILE_ENV, RANK_ENV, write_hostfile
from exo.worker.runner.messages import (
    ChunkOutput,
    GenerateInput,
    RequestFailedOutput,
    StageTimeOutput,
    StatusOutput,
    parse_output,
)


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


def free_loopback_ports(count: int) -> list[int]:
    """Ports the OS reports free right now (held open together so they are distinct)."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            handle = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            handle.bind(("127.0.0.1", 0))
            sockets.append(handle)
        return [int(handle.getsockname()[1]) for handle in sockets]
    finally:
        for handle in sockets:
            handle.close()


def rank_command(
    rank: int,
    world_size: int,
    hostfile: Path,
    layer_range: tuple[int, int],
    model_path: Path | None = None,
    request: GenerationRequest | None = None,
    device: str | None = None,
) -> list[str]:
    return RunnerArguments(
        rank=rank,
        world_size=world_size,
        hostfile=hostfile,
        layer_start=layer_range[0],
        layer_end=layer_range[1],
        device=device,
        model=model_path,
        request=request,
    ).command()


def block_count_for(model_path: Path | None) -> int:
    """How many layers the model has (imports a GGUF into the weights cache first)."""
    config, _ = ModelConfig.read(model_directory(model_path, default_weights_cache()))
    return config.num_hidden_layers


def rank_environment(rank: int, hostfile: Path) -> dict[str, str]:
    environment = dict(os.environ)
    environment[RANK_ENV] = str(rank)
    environment[HOSTFILE_ENV] = str(hostfile)
    environment.setdefault("PYTHONUNBUFFERED", "1")
    return environment


CLOSE_TIMEOUT_S = 60.0


class LocalPipeline:
    """``world_size`` runner processes on this machine forming one pipeline over loopback;
    rank 0 takes requests on stdin, as under a node's supervisor.

    ``devices`` names each rank's device (None: the runner's default, the first GPU its MLX
    reaches, else the CPU). Every rank's status lines are kept in ``statuses`` and its
    stderr in ``stderr``. With ``timeout_s`` a watchdog kills every rank that long after
    the start (a guard for one-shot runs); ``close`` waits that long (or 60 s) for the
    ranks to exit before killing them. The ranks' measured stage times are kept in
    ``stage_times``.
    """

    def __init__(
        self,
        world_size: int,
        *,
        layer_ranges: list[tuple[int, int]] | None = None,
        model_path: Path | None = None,
        devices: list[str | None] | None = None,
        timeout_s: float | None = None,
    ) -> None:
        if layer_ranges is None:
            layer_ranges = split_layers(block_count_for(model_path), world_size)
        if len(layer_ranges) != world_size:
            raise ValueError(f"{len(layer_ranges)} layer ranges for {world_size} ranks")
        self.devices = devices if devices is not None else [None] * world_size
        if len(self.devices) != world_size:
            raise ValueError(f"{len(self.devices)} devices for {world_size} ranks")
        self.world_size = world_size
        self.layer_ranges = layer_ranges
        self.model_path = model_path
        self.timeout_s = timeout_s
        self.statuses: list[StatusOutput] = []
        self.stage_times: list[StageTimeOutput] = []
        self.stderr = [""] * world_size
        self.return_codes: list[int | None] = []
        self.processes: list[subprocess.Popen[str]] = []
        self._rank_zero: queue.Queue[ChunkOutput | RequestFailedOutput | None] = queue.Queue()
        self._lock = threading.Lock()
        self._readers: list[threading.Thread] = []
        self._directory = tempfile.TemporaryDirectory(prefix="exo-ring-")
        self._killer = threading.Timer(timeout_s, self.kill) if timeout_s is not None else None

    def __enter__(self) -> "LocalPipeline":
        hostfile = write_hostfile(
            Path(self._directory.name) / "hostfile.json",
            [f"127.0.0.1:{port}" for port in free_loopback_ports(self.world_size)],
        )
        for rank in range(self.world_size):
            self.processes.append(
                subprocess.Popen(
                    rank_command(
                        rank,
                        self.world_size,
                        hostfile,
                        self.layer_ranges[rank],
                        self.model_path,
                        device=self.devices[rank],
                    ),
                    env=rank_environment(rank, hostfile),
                    stdin=subprocess.PIPE if rank == 0 else subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        for rank in range(self.world_size):
            for target in (self._read_stdout, self._read_stderr):
                reader = threading.Thread(target=target, args=(rank,), daemon=True)
                reader.start()
                self._readers.append(reader)
        if self._killer is not None:
            self._killer.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _read_stdout(self, rank: int) -> None:
        stream = self.processes[rank].stdout
        if stream is not None:
            for line in stream:
                if not line.strip():
                    continue
                message = parse_output(line)
                if isinstance(message, StatusOutput):
                    with self._lock:
                        self.statuses.append(message)
                elif isinstance(message, StageTimeOutput):
                    with self._lock:
                        self.stage_times.append(message)
                elif rank == 0:
                    self._rank_zero.put(message)
        if rank == 0:
            self._rank_zero.put(None)

    def _read_stderr(self, rank: int) -> None:
        stream = self.processes[rank].stderr
        if stream is not None:
            self.stderr[rank] = stream.read()

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        """Until every rank reports ``ready``; raises RuntimeError when one fails first."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                failed = [s for s in self.statuses if s.status == "failed"]
                ready = {s.rank for s in self.statuses if s.status == "ready"}
            if failed:
                raise RuntimeError(f"rank {failed[0].rank} failed: {failed[0].error}")
            if len(ready) == self.world_size:
                return
            time.sleep(0.05)
        raise TimeoutError(f"the pipeline was not ready within {timeout_s} s")

    def generate(self, request: GenerationRequest) -> Iterator[GenerationChunk]:
        """Rank 0's chunks for ``request`` as they stream (none if a rank is gone); a
        request rank 0 rejects raises ValueError with its reason."""
        stdin = self.processes[0].stdin
        if stdin is None:
            return
        try:
            stdin.write(GenerateInput(request=request).model_dump_json() + "\n")
            stdin.flush()
        except OSError:  # rank 0 has already exited; its statuses say why
            return
        while (message := self._rank_zero.get()) is not None:
            if isinstance(message, RequestFailedOutput):
                raise ValueError(message.error)
            yield message.chunk
            if message.chunk.finish_reason is not None:
                return

    def kill(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()

    def close(self) -> None:
        """Shut the ranks down (end of rank 0's input), killing what is left after the
        timeout; collects return codes and stderr."""
        stdin = self.processes[0].stdin if self.processes else None
        if stdin is not None:
            with contextlib.suppress(OSError):
                stdin.close()
        for process in self.processes:
            try:
                process.wait(timeout=self.timeout_s or CLOSE_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._killer is not None:
            self._killer.cancel()
        for reader in self._readers:
            reader.join(timeout=5)
        self.return_codes = [process.returncode for process in self.processes]
        self._directory.cleanup()


@dataclass
class LocalPipelineRun:
    """What came back from a local pipeline run."""

    chunks: list[GenerationChunk] = field(default_factory=lambda: list[GenerationChunk]())
    statuses: list[StatusOutput] = field(default_factory=lambda: list[StatusOutput]())
    stage_times: list[StageTimeOutput] = field(default_factory=lambda: list[StageTimeOutput]())
    failures: list[str] = field(default_factory=lambda: list[str]())
    return_codes: list[int | None] = field(default_factory=lambda: list[int | None]())
    stderr: list[str] = field(default_factory=lambda: list[str]())

    @property
    def text(self) -> str:
        return "".join(chunk.text for chunk in self.chunks)

    @property
    def token_ids(self) -> list[int]:
        return [token for chunk in self.chunks for token in chunk.token_ids]

    @property
    def final(self) -> GenerationChunk | None:
        return self.chunks[-1] if self.chunks and self.chunks[-1].finish_reason else None


def stream_local_pipeline(
    world_size: int,
    request: GenerationRequest,
    layer_ranges: list[tuple[int, int]] | None = None,
    model_path: Path | None = None,
    devices: list[str | None] | None = None,
    timeout_s: float = 120.0,
    run: LocalPipelineRun | None = None,
    warm_up: bool = False,
) -> Iterator[GenerationChunk]:
    """Start ``world_size`` ranks, yield rank 0's chunks for ``request`` as they stream,
    then shut the ranks down. Statuses, failures, return codes and stderr go into ``run``.
    ``warm_up``: serve the request once first, unrecorded (the runners report timings only
    from their second request on)."""
    record = run if run is not None else LocalPipelineRun()
    pipeline = LocalPipeline(
        world_size,
        layer_ranges=layer_ranges,
        model_path=model_path,
        devices=devices,
        timeout_s=timeout_s,
    )
    try:
        with pipeline:
            try:
                if warm_up:
                    warm = request.model_copy(
                        update={"request_id": f"{request.request_id}-warm-up"}
                    )
                    for _ in pipeline.generate(warm):
                        pass
                for chunk in pipeline.generate(request):
                    record.chunks.append(chunk)
                    yield chunk
            except ValueError as error:
                record.failures.append(str(error))
    finally:
        record.statuses = list(pipeline.statuses)
        record.stage_times = list(pipeline.stage_times)
        record.return_codes = pipeline.return_codes
        record.stderr = pipeline.stderr


def run_local_pipeline(
    world_size: int,
    request: GenerationRequest,
    layer_ranges: list[tuple[int, int]] | None = None,
    model_path: Path | None = None,
    devices: list[str | None] | None = None,
    timeout_s: float = 120.0,
    warm_up: bool = False,
) -> LocalPipelineRun:
    """Run ``request`` on a local ``world_size``-rank pipeline and collect everything."""
    run = LocalPipelineRun()
    for _ in stream_local_pipeline(
        world_size,
        request,
        layer_ranges,
        model_path,
        devices,
        timeout_s=timeout_s,
        run=run,
        warm_up=warm_up,
    ):
        pass
    return run
