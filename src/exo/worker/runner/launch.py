"""Start a pipeline as N local runner processes on 127.0.0.1 (tests, the CLI, benchmarks).

Each rank is ``sys.executable -m exo.worker.runner.process`` with its own ``MLX_RANK`` and a
shared ring hostfile on free loopback ports; rank 0 runs one request and its stdout is read
as it streams.
"""

import os
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from exo.models.config import ModelConfig
from exo.models.locate import model_directory
from exo.models.weights_cache import default_weights_cache
from exo.shared.types.generation import GenerationChunk, GenerationRequest
from exo.worker.runner.arguments import RunnerArguments
from exo.worker.runner.messages import (
    ChunkOutput,
    RequestFailedOutput,
    StatusOutput,
    parse_output,
)
from exo.worker.runner.pipeline import HOSTFILE_ENV, RANK_ENV, split_layers, write_hostfile


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
) -> list[str]:
    return RunnerArguments(
        rank=rank,
        world_size=world_size,
        hostfile=hostfile,
        layer_start=layer_range[0],
        layer_end=layer_range[1],
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


@dataclass
class LocalPipelineRun:
    """What came back from a local pipeline run."""

    chunks: list[GenerationChunk] = field(default_factory=lambda: list[GenerationChunk]())
    statuses: list[StatusOutput] = field(default_factory=lambda: list[StatusOutput]())
    failures: list[RequestFailedOutput] = field(default_factory=lambda: list[RequestFailedOutput]())
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
    block_count: int | None = None,
    timeout_s: float = 120.0,
    run: LocalPipelineRun | None = None,
) -> Iterator[GenerationChunk]:
    """Start ``world_size`` ranks, yield rank 0's chunks as they stream, then clean up.

    Status lines of every rank, failures, return codes and stderr go into ``run``.
    """
    record = run if run is not None else LocalPipelineRun()
    if layer_ranges is None:
        if block_count is None:
            block_count = block_count_for(model_path)
        layer_ranges = split_layers(block_count, world_size)
    ranges = layer_ranges
    if len(ranges) != world_size:
        raise ValueError(f"{len(ranges)} layer ranges for {world_size} ranks")
    with tempfile.TemporaryDirectory(prefix="exo-ring-") as directory:
        hostfile = write_hostfile(
            Path(directory) / "hostfile.json",
            [f"127.0.0.1:{port}" for port in free_loopback_ports(world_size)],
        )
        processes = [
            subprocess.Popen(
                rank_command(
                    rank,
                    world_size,
                    hostfile,
                    ranges[rank],
                    model_path,
                    request if rank == 0 else None,
                ),
                env=rank_environment(rank, hostfile),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for rank in range(world_size)
        ]
        stderr_text = [""] * world_size
        lock = threading.Lock()
        outputs: list[StatusOutput | ChunkOutput | RequestFailedOutput] = []

        def drain_stderr(rank: int) -> None:
            stream = processes[rank].stderr
            if stream is not None:
                stderr_text[rank] = stream.read()

        def drain_stdout(rank: int) -> None:
            stream = processes[rank].stdout
            if stream is None:
                return
            for line in stream:
                if line.strip():
                    with lock:
                        outputs.append(parse_output(line))

        readers = [
            threading.Thread(target=drain_stderr, args=(rank,), daemon=True)
            for rank in range(world_size)
        ] + [
            threading.Thread(target=drain_stdout, args=(rank,), daemon=True)
            for rank in range(1, world_size)
        ]
        for reader in readers:
            reader.start()
        killer = threading.Timer(timeout_s, lambda: [p.kill() for p in processes])
        killer.start()
        try:
            rank_zero_out = processes[0].stdout
            if rank_zero_out is not None:
                for line in rank_zero_out:
                    if not line.strip():
                        continue
                    message = parse_output(line)
                    match message:
                        case ChunkOutput(chunk=chunk):
                            record.chunks.append(chunk)
                            yield chunk
                        case RequestFailedOutput():
                            record.failures.append(message)
                        case StatusOutput():
                            record.statuses.append(message)
            for process in processes:
                process.wait(timeout=timeout_s)
        finally:
            killer.cancel()
            for process in processes:
                if process.poll() is None:
                    process.kill()
                    process.wait()
            for reader in readers:
                reader.join(timeout=5)
            with lock:
                for message in outputs:
                    if isinstance(message, StatusOutput):
                        record.statuses.append(message)
            record.return_codes = [process.returncode for process in processes]
            record.stderr = stderr_text


def run_local_pipeline(
    world_size: int,
    request: GenerationRequest,
    layer_ranges: list[tuple[int, int]] | None = None,
    model_path: Path | None = None,
    timeout_s: float = 120.0,
) -> LocalPipelineRun:
    """Run ``request`` on a local ``world_size``-rank pipeline and collect everything."""
    run = LocalPipelineRun()
    for _ in stream_local_pipeline(
        world_size, request, layer_ranges, model_path, timeout_s=timeout_s, run=run
    ):
        pass
    return run
