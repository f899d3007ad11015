"""Runner processes of this node: start, feed, watch and stop them.

One process per shard (``python -m exo.worker.runner.process``). Its stdout carries JSON
lines (status, chunks, failed requests, see ``exo.worker.runner.messages``) which become
cluster events; its stderr goes to ``EXO_HOME/runners/<runner_id>.log``. A process that
exits unexpectedly is reported ``failed`` with its exit code and the end of its log, the
other local ranks of that instance are stopped (they would block on the ring forever), and
its unfinished tasks fail. Every start first writes a header line (time, device, command
line) to that log, so a runner that dies before writing anything still leaves a log, and
its error says so.

One INFO line per request it served (when it ends) and per runner that becomes ready
(with its load time) or fails (with the reason).
"""

import contextlib
import os
import shlex
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import anyio
from anyio.abc import Process, TaskGroup
from anyio.streams.buffered import BufferedByteReceiveStream
from loguru import logger
from pydantic import ValidationError

from exo.models.cards import get_model_card
from exo.models.weights_cache import weights_cache_in
from exo.shared.types.events import (
    ChunkGenerated,
    Event,
    RunnerStatusUpdated,
    StageTimeMeasured,
    TaskStatusUpdated,
)
from exo.shared.types.execution import CPU_COMPUTE_DEVICE_ID, ComputeDevice, backend_of_device
from exo.shared.types.generation import GenerationRequest
from exo.shared.types.ids import NodeId, RunnerId, TaskId
from exo.shared.types.instances import Instance, Shard
from exo.shared.types.runners import RunnerStatus
from exo.shared.types.tasks import ChatMessage, Task
from exo.worker.plan import LocalRunner
from exo.worker.runner.arguments import RunnerArguments
from exo.worker.runner.hostfile import write_hostfile
from exo.worker.runner.messages import (
    CancelInput,
    ChunkOutput,
    GenerateInput,
    RequestFailedOutput,
    StageTimeOutput,
    StatusOutput,
    parse_output,
)
from exo.worker.runner.process import PARENT_PID_ENV

Emit = Callable[[Event], Awaitable[None]]
FetchPrompt = Callable[[Task], Awaitable[list[ChatMessage] | None]]
"""The task's messages, from the node that took the request (None: no longer there)."""
MAX_LINE_BYTES = 1 << 24
STOP_GRACE_S = 5.0
LOG_TAIL_CHARS = 600


@dataclass
class RunnerHandle:
    instance: Instance
    shard: Shard
    process: Process | None = None
    status: RunnerStatus = "starting"
    forwarded: set[TaskId] = field(default_factory=set[TaskId])
    cancelled: set[TaskId] = field(default_factory=set[TaskId])
    open_tasks: set[TaskId] = field(default_factory=set[TaskId])
    chunk_counts: dict[TaskId, int] = field(default_factory=dict[TaskId, int])
    stopping: bool = False
    stop_reason: str = ""
    force_killed: bool = False
    log_path: Path | None = None
    log_offset: int = 0
    """Where this start's output begins in the log (after its header line)."""
    started_at: float = field(default_factory=time.monotonic)
    task_started: dict[TaskId, float] = field(default_factory=dict[TaskId, float])
    """When each task went to the runner (monotonic), for its log line."""
    compute_device: ComputeDevice | None = None

    def view(self) -> LocalRunner:
        return LocalRunner(
            runner_id=self.shard.runner_id,
            instance_id=self.instance.instance_id,
            rank=self.shard.rank,
            status=self.status,
            forwarded_task_ids=frozenset(self.forwarded),
            cancelled_task_ids=frozenset(self.cancelled),
        )


def compute_device_for(shard: Shard, simulated_devices: bool) -> str:
    """The device the shard's runner computes on: the placed device itself, or, for a
    device a simulation file describes, this node's CPU (a simulated GPU is a placement
    target for tests and demos, not hardware)."""
    return str(CPU_COMPUTE_DEVICE_ID) if simulated_devices else shard.device_id


def runner_environment(compute_device: str) -> dict[str, str]:
    """The runner's environment: it exits with this node, and a CUDA runner sees only its
    GPU, numbered as NVML numbers it."""
    env = {**os.environ, PARENT_PID_ENV: str(os.getpid())}
    if backend_of_device(compute_device) == "cuda":
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        env["CUDA_VISIBLE_DEVICES"] = compute_device.split(":", 1)[1]
    return env


def runner_arguments(
    instance: Instance,
    shard: Shard,
    hostfile: Path | None,
    weights_cache: Path,
    compute_device: str | None = None,
) -> RunnerArguments:
    """The runner command line for ``shard``; raises ``FileNotFoundError`` when this node
    has no weights for the instance's model."""
    card = get_model_card(instance.model_id)
    if card is None:
        # Without its card this node cannot know the weights (the model directory must be
        # under this node's --models-dir too); starting the bundled model would be wrong.
        raise FileNotFoundError(
            f"model '{instance.model_id}' is not known on this node (is it in --models-dir?)"
        )
    if card.source == "planning_only":
        raise FileNotFoundError(
            f"no weights for '{instance.model_id}' on this node: its card is for planning only"
        )
    return RunnerArguments(
        rank=shard.rank,
        world_size=shard.world_size,
        hostfile=hostfile,
        layer_start=shard.start_layer,
        layer_end=shard.end_layer,
        device=compute_device or shard.device_id,
        model=Path(card.weights_path) if card.weights_path else None,
        weights_cache=weights_cache,
    )


def stage_time_measured(
    node_id: NodeId, instance: Instance, shard: Shard, output: StageTimeOutput
) -> StageTimeMeasured:
    """The cluster event for a runner's measurement (named by the shard's placed device,
    which is what placement predicts for, even where a simulated device computes on the
    CPU)."""
    return StageTimeMeasured(
        instance_id=instance.instance_id,
        runner_id=shard.runner_id,
        node_id=node_id,
        device_id=shard.device_id,
        stage_ms_per_token=output.stage_ms_per_token,
        ms_per_token=output.ms_per_token,
        time_to_first_token_ms=output.time_to_first_token_ms,
        tokens=output.tokens,
        measured_at=output.measured_at,
    )


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def log_header(instance: Instance, shard: Shard, compute_device: str, command: list[str]) -> str:
    """The line a runner's log starts with, each start: when, what and how it was started."""
    computed = f" computed on {compute_device}" if compute_device != shard.device_id else ""
    return (
        f"--- {_now()} exo starts runner "
        f"{shard.runner_id} of {instance.model_id} (rank {shard.rank}/{shard.world_size}, "
        f"layers {shard.start_layer}-{shard.end_layer}, {shard.device_id}{computed}): "
        f"{shlex.join(command)}\n"
    )


def log_tail(log_path: Path | None, offset: int) -> str:
    """The end of what the runner wrote to its log after ``offset`` (its header), stripped."""
    if log_path is None or not log_path.exists():
        return ""
    with log_path.open("rb") as log:
        size = log.seek(0, os.SEEK_END)
        log.seek(max(offset, size - LOG_TAIL_CHARS * 4))
        text = log.read().decode(errors="replace")
    return text[-LOG_TAIL_CHARS:].strip()


def exit_error(code: int, tail: str) -> str:
    """The error of a runner that exited on its own with ``code``."""
    if not tail:
        return f"runner process exited with code {code} before writing anything"
    return f"runner process exited with code {code}: ...{tail}"


def request_line(
    task_id: TaskId,
    model_id: str,
    prompt_tokens: int,
    completion_tokens: int,
    seconds: float | None,
    finish_reason: str,
) -> str:
    """The INFO line of a request that ended on this node's runner."""
    timing = (
        f"{seconds:.2f} s, {completion_tokens / seconds:.1f} tokens/s"
        if seconds is not None and seconds > 0
        else "time unknown"
    )
    return (
        f"request {task_id} ({model_id}): {prompt_tokens} prompt + {completion_tokens} "
        f"completion tokens in {timing}, finish {finish_reason}"
    )


def _log_transition(
    handle: RunnerHandle, previous: RunnerStatus, status: RunnerStatus, error: str | None
) -> None:
    """One INFO line when a runner becomes ready after loading, one when it fails."""
    runner = (
        f"runner {handle.shard.runner_id} ({handle.instance.model_id}, rank {handle.shard.rank})"
    )
    if status == "ready" and previous in ("starting", "loading", "connecting"):
        seconds = time.monotonic() - handle.started_at
        logger.info(f"{runner} ready {seconds:.1f} s after its start (weights loaded)")
    elif status == "failed":
        logger.error(f"{runner} failed: {error or 'no reason given'}")


class RunnerSupervisor:
    def __init__(self, node_id: NodeId, home: Path, emit: Emit, fetch_prompt: FetchPrompt) -> None:
        self._node_id = node_id
        self._fetch_prompt = fetch_prompt
        self.simulated_devices = False
        """This node's GPUs come from a simulation file: runners compute on its CPU."""
        self._directory = home / "runners"
        self._weights_cache = weights_cache_in(home)
        self._emit = emit
        self._runners: dict[RunnerId, RunnerHandle] = {}
        self.changed = anyio.Event()
        """Set (and replaced) whenever a local runner's status or tasks change."""

    def local_runners(self) -> dict[RunnerId, LocalRunner]:
        return {runner_id: handle.view() for runner_id, handle in self._runners.items()}

    def _notify(self) -> None:
        self.changed.set()
        self.changed = anyio.Event()

    async def _set_status(
        self,
        handle: RunnerHandle,
        status: RunnerStatus,
        error: str | None = None,
        compute_device: ComputeDevice | None = None,
        loaded_bytes: int | None = None,
        total_bytes: int | None = None,
    ) -> None:
        progress = loaded_bytes is not None or total_bytes is not None
        if handle.status == status and error is None and compute_device is None and not progress:
            return
        previous = handle.status
        handle.status = status
        if status != previous:
            _log_transition(handle, previous, status, error)
        self._notify()
        await self._emit(
            RunnerStatusUpdated(
                runner_id=handle.shard.runner_id,
                instance_id=handle.instance.instance_id,
                node_id=self._node_id,
                status=status,
                error=error,
                compute_device=compute_device,
                loaded_bytes=loaded_bytes,
                total_bytes=total_bytes,
            )
        )

    async def start_runner(self, group: TaskGroup, instance: Instance, shard: Shard) -> None:
        handle = RunnerHandle(instance=instance, shard=shard)
        self._runners[shard.runner_id] = handle
        await self._set_status(handle, "starting")
        handle.log_path = self._directory / f"{shard.runner_id}.log"
        compute_device = compute_device_for(shard, self.simulated_devices)
        try:
            self._directory.mkdir(parents=True, exist_ok=True)
            hostfile = None
            if shard.world_size > 1:
                hostfile = write_hostfile(
                    self._directory / f"{shard.runner_id}.hostfile.json", instance.ring_endpoints
                )
            command = runner_arguments(
                instance, shard, hostfile, self._weights_cache, compute_device
            ).command()
            # Unbuffered: a full disk shows at the write (which may fail: the runner starts
            # anyway), never at close.
            log = handle.log_path.open("ab", buffering=0)
        except OSError as error:
            await self._set_status(handle, "failed", f"could not start the runner: {error}")
            return
        try:
            with contextlib.suppress(OSError):
                log.write(log_header(instance, shard, compute_device, command).encode())
            handle.log_offset = log.tell()
            handle.started_at = time.monotonic()
            handle.process = await anyio.open_process(
                command,
                stdin=-1,
                stdout=-1,
                stderr=log,
                env=runner_environment(compute_device),
            )
        except OSError as error:
            reason = f"could not start the runner: {error}"
            with contextlib.suppress(OSError):
                log.write(f"--- {_now()} exo: {reason}\n".encode())
            await self._set_status(handle, "failed", reason)
            return
        finally:
            log.close()
        logger.info(
            f"started runner {shard.runner_id} (rank {shard.rank}/{shard.world_size}, "
            f"layers {shard.start_layer}-{shard.end_layer}, {shard.device_id}"
            + (f" computed on {compute_device})" if compute_device != shard.device_id else ")")
        )
        group.start_soon(self._watch, handle)

    async def _watch(self, handle: RunnerHandle) -> None:
        process = handle.process
        assert process is not None and process.stdout is not None
        reader = BufferedByteReceiveStream(process.stdout)
        try:
            while True:
                line = await reader.receive_until(b"\n", MAX_LINE_BYTES)
                await self._on_output(handle, line)
        except (anyio.EndOfStream, anyio.IncompleteRead, anyio.ClosedResourceError):
            pass
        code = await process.wait()
        await self._on_exit(handle, code)

    async def _on_output(self, handle: RunnerHandle, line: bytes) -> None:
        try:
            output = parse_output(line.decode(errors="replace"))
        except ValidationError:
            logger.warning(f"runner {handle.shard.runner_id}: unparseable output line")
            return
        match output:
            case StatusOutput():
                if output.status != "shut_down" or handle.stopping:
                    known = handle.compute_device
                    handle.compute_device = output.compute_device
                    await self._set_status(
                        handle,
                        output.status,
                        output.error,
                        output.compute_device if output.compute_device != known else None,
                        output.loaded_bytes,
                        output.total_bytes,
                    )
            case ChunkOutput():
                await self._on_chunk(handle, output)
            case RequestFailedOutput():
                task_id = TaskId(output.request_id)
                handle.open_tasks.discard(task_id)
                started = handle.task_started.pop(task_id, None)
                seconds = time.monotonic() - started if started is not None else 0.0
                logger.info(
                    f"request {task_id} failed on runner {handle.shard.runner_id} "
                    f"(model {handle.instance.model_id}) after {seconds:.2f} s: {output.error}"
                )
                await self._emit(
                    TaskStatusUpdated(task_id=task_id, status="failed", error=output.error)
                )
            case StageTimeOutput():
                await self._emit(
                    stage_time_measured(self._node_id, handle.instance, handle.shard, output)
                )

    async def _on_chunk(self, handle: RunnerHandle, output: ChunkOutput) -> None:
        chunk = output.chunk
        task_id = TaskId(chunk.request_id)
        index = handle.chunk_counts.get(task_id, 0)
        handle.chunk_counts[task_id] = index + 1
        await self._emit(
            ChunkGenerated(
                task_id=task_id,
                chunk_index=index,
                text=chunk.text,
                finish_reason=chunk.finish_reason,
                prompt_tokens=chunk.prompt_tokens,
                completion_tokens=chunk.completion_tokens,
                logprobs=chunk.logprobs,
            )
        )
        if chunk.finish_reason is not None:
            handle.open_tasks.discard(task_id)
            handle.chunk_counts.pop(task_id, None)
            started = handle.task_started.pop(task_id, None)
            logger.info(
                request_line(
                    task_id,
                    handle.instance.model_id,
                    chunk.prompt_tokens,
                    chunk.completion_tokens,
                    time.monotonic() - started if started is not None else None,
                    chunk.finish_reason,
                )
            )
            status = "cancelled" if chunk.finish_reason == "cancelled" else "complete"
            await self._emit(TaskStatusUpdated(task_id=task_id, status=status))

    async def _on_exit(self, handle: RunnerHandle, code: int) -> None:
        # A runner we were stopping ends with 0 or by our SIGTERM; any other end (a crash, a
        # SIGKILL from outside) is a failure even if a stop was under way when it came.
        if handle.stopping and (code in (0, -signal.SIGTERM) or handle.force_killed):
            await self._set_status(handle, "shut_down")
            await self._fail_open_tasks(handle, f"the runner was stopped: {handle.stop_reason}")
            return
        error = exit_error(code, log_tail(handle.log_path, handle.log_offset))
        await self._set_status(handle, "failed", error)
        await self._fail_open_tasks(handle, error)
        pipeline = {shard.runner_id for shard in handle.instance.shards}
        for other in list(self._runners.values()):
            if other.shard.runner_id in pipeline and other is not handle:
                await self.stop_runner(other.shard.runner_id, reason="a rank of its pipeline died")

    async def _fail_open_tasks(self, handle: RunnerHandle, error: str) -> None:
        handle.task_started.clear()
        for task_id in sorted(handle.open_tasks):
            await self._emit(TaskStatusUpdated(task_id=task_id, status="failed", error=error))
        handle.open_tasks.clear()

    async def forward_task(self, runner_id: RunnerId, task: Task) -> None:
        handle = self._runners[runner_id]
        handle.forwarded.add(task.task_id)
        handle.open_tasks.add(task.task_id)
        self._notify()
        messages = await self._fetch_prompt(task)
        if messages is None:
            handle.open_tasks.discard(task.task_id)
            await self._emit(
                TaskStatusUpdated(
                    task_id=task.task_id,
                    status="failed",
                    error=f"the prompt is no longer available from node {task.requested_by} "
                    "(it left, or the request ended)",
                )
            )
            return
        params = task.params
        request = GenerationRequest(
            request_id=task.task_id,
            messages=[message.model_dump() for message in messages],
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            seed=params.seed,
            stop=params.stop,
            presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty,
            logprobs=params.logprobs,
            top_logprobs=params.top_logprobs,
            response_format=params.response_format,
        )
        handle.task_started[task.task_id] = time.monotonic()  # for its line when it ends
        await self._emit(TaskStatusUpdated(task_id=task.task_id, status="running"))
        await self._write(handle, GenerateInput(request=request).model_dump_json())

    async def cancel_task(self, runner_id: RunnerId, task_id: TaskId) -> None:
        handle = self._runners[runner_id]
        handle.cancelled.add(task_id)
        self._notify()
        await self._write(handle, CancelInput(request_id=task_id).model_dump_json())

    async def _write(self, handle: RunnerHandle, line: str) -> None:
        process = handle.process
        if process is None or process.stdin is None:
            return
        try:
            await process.stdin.send((line + "\n").encode())
        except (anyio.BrokenResourceError, anyio.ClosedResourceError) as error:
            logger.warning(f"runner {handle.shard.runner_id} did not take input: {error}")

    async def stop_runner(self, runner_id: RunnerId, reason: str) -> None:
        """Stop the runner; ``reason`` is logged and given to the requests it fails."""
        handle = self._runners.get(runner_id)
        if handle is None or handle.stopping:
            return
        handle.stopping = True
        handle.stop_reason = reason
        process = handle.process
        logger.info(f"stopping runner {runner_id}: {reason}")
        if process is None:
            await self._set_status(handle, "shut_down")
            return
        if process.returncode is not None:
            return  # it ended by itself; _on_exit reports how
        with anyio.CancelScope(shield=True):
            process.terminate()
            with anyio.move_on_after(STOP_GRACE_S):
                await process.wait()
            if process.returncode is None:
                handle.force_killed = True
                process.kill()
                await process.wait()

    def forget_stopped_runners(self, in_use: set[RunnerId]) -> None:
        """Drop bookkeeping of stopped runners no instance uses any more."""
        for runner_id in [
            runner_id
            for runner_id, handle in self._runners.items()
            if runner_id not in in_use and handle.status in ("shut_down", "failed")
        ]:
            del self._runners[runner_id]

    async def stop_all(self) -> None:
        for runner_id in list(self._runners):
            await self.stop_runner(runner_id, reason="the node is shutting down")
