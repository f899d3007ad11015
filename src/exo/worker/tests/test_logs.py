"""What a node logs about its runners and requests, the runner log it keeps, and
``--log-format json``."""

import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from loguru import logger

from exo.main import build_parser, configure_logging
from exo.shared.tests.instances import single_shard_instance
from exo.shared.types.events import Event, RunnerStatusUpdated, TaskStatusUpdated
from exo.shared.types.ids import CommandId, InstanceId, NodeId, RunnerId, TaskId
from exo.shared.types.instances import Instance, Shard
from exo.shared.types.tasks import ChatCompletionParams, ChatMessage, Task
from exo.worker import supervisor as supervisor_module
from exo.worker.supervisor import RunnerSupervisor

pytestmark = pytest.mark.anyio

FAKE_RUNNER = """
import json, sys
def out(message):
    print(json.dumps(message), flush=True)
out({"type": "status", "rank": 0, "status": "loading", "loaded_bytes": 0, "total_bytes": 100})
out({"type": "status", "rank": 0, "status": "loading", "loaded_bytes": 100, "total_bytes": 100})
out({"type": "status", "rank": 0, "status": "ready"})
for line in sys.stdin:
    request = json.loads(line)["request"]["request_id"]
    for index, finish in ((1, None), (2, "stop")):
        chunk = {"request_id": request, "text": "x", "token_ids": [index], "finish_reason": finish,
                 "prompt_tokens": 7, "completion_tokens": index}
        out({"type": "chunk", "chunk": chunk})
"""


class FakeArguments:
    def __init__(self, script: str) -> None:
        self._script = script

    def command(self) -> list[str]:
        return [sys.executable, "-c", self._script]


@pytest.fixture
def info_lines() -> Iterator[list[tuple[str, str]]]:
    lines: list[tuple[str, str]] = []

    def sink(message: Any) -> None:
        lines.append((message.record["level"].name, str(message.record["message"])))

    sink_id = logger.add(sink, level="INFO", format="{message}")
    yield lines
    logger.remove(sink_id)


def use_script(monkeypatch: pytest.MonkeyPatch, script: str) -> None:
    def fake(*_: object) -> FakeArguments:
        return FakeArguments(script)

    monkeypatch.setattr(supervisor_module, "runner_arguments", fake)


async def until(condition: Any, timeout_s: float = 20.0) -> None:
    with anyio.fail_after(timeout_s):
        while not condition():
            await anyio.sleep(0.02)


def shard_of(instance: Instance) -> Shard:
    return instance.shards[0]


async def no_prompt(task: Task) -> list[ChatMessage] | None:
    return [ChatMessage(role="user", content="hi")]


async def test_progress_ready_and_request_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, info_lines: list[tuple[str, str]]
) -> None:
    use_script(monkeypatch, FAKE_RUNNER)
    events: list[Event] = []

    async def emit(event: Event) -> None:
        events.append(event)

    supervisor = RunnerSupervisor(NodeId("n0"), tmp_path, emit, no_prompt)
    instance = single_shard_instance("tiny-model", node_id="n0", runner_id="r0")
    task = Task(
        task_id=TaskId("t1"),
        command_id=CommandId("c1"),
        instance_id=InstanceId(instance.instance_id),
        requested_by=NodeId("n0"),
        params=ChatCompletionParams(model="tiny-model"),
        runner_id=RunnerId("r0"),
    )
    async with anyio.create_task_group() as group:
        await supervisor.start_runner(group, instance, shard_of(instance))
        await until(lambda: supervisor.local_runners()[RunnerId("r0")].status == "ready")
        await supervisor.forward_task(RunnerId("r0"), task)
        await until(
            lambda: any(isinstance(e, TaskStatusUpdated) and e.status == "complete" for e in events)
        )
        await supervisor.stop_runner(RunnerId("r0"), reason="the test is over")
    progress = [
        (e.status, e.loaded_bytes, e.total_bytes)
        for e in events
        if isinstance(e, RunnerStatusUpdated) and e.loaded_bytes is not None
    ]
    assert progress == [("loading", 0, 100), ("loading", 100, 100)]
    ready = [m for level, m in info_lines if "ready" in m and level == "INFO"]
    assert len(ready) == 1 and "runner r0 (tiny-model, rank 0) ready" in ready[0], info_lines
    requests = [m for _, m in info_lines if m.startswith("request t1")]
    assert len(requests) == 1, info_lines
    assert "(tiny-model): 7 prompt + 2 completion tokens in " in requests[0]
    assert "tokens/s, finish stop" in requests[0]
    log = (tmp_path / "runners" / "r0.log").read_text()
    assert log.startswith("--- ") and "exo starts runner r0 of tiny-model" in log


async def run_until_failed(supervisor: RunnerSupervisor, events: list[Event]) -> str:
    instance = single_shard_instance("tiny-model", node_id="n0", runner_id="r0")
    before = len(events)

    def failed() -> str | None:
        for event in events[before:]:
            if isinstance(event, RunnerStatusUpdated) and event.status == "failed":
                return event.error or ""
        return None

    async with anyio.create_task_group() as group:
        await supervisor.start_runner(group, instance, shard_of(instance))
        await until(lambda: failed() is not None)
    error = failed()
    assert error is not None
    return error


async def test_a_runner_that_dies_before_writing_anything_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, info_lines: list[tuple[str, str]]
) -> None:
    events: list[Event] = []

    async def emit(event: Event) -> None:
        events.append(event)

    supervisor = RunnerSupervisor(NodeId("n0"), tmp_path, emit, no_prompt)
    use_script(monkeypatch, "import sys; sys.stderr.write('old trouble'); sys.exit(1)")
    first = await run_until_failed(supervisor, events)
    assert first == "runner process exited with code 1: ...old trouble"
    use_script(monkeypatch, "import sys; sys.exit(3)")
    second = await run_until_failed(supervisor, events)
    # Only this start's output counts; the log has the header of each start.
    assert second == "runner process exited with code 3 before writing anything"
    log = (tmp_path / "runners" / "r0.log").read_text()
    assert log.count("exo starts runner r0") == 2 and "old trouble" in log
    assert sys.executable in log
    failures = [m for level, m in info_lines if level == "ERROR" and "failed" in m]
    assert failures[-1].endswith("failed: " + second), info_lines


def test_json_log_lines(capsys: pytest.CaptureFixture[str]) -> None:
    assert build_parser().parse_args(["--log-format", "json"]).log_format == "json"
    assert build_parser().parse_args([]).log_format == "text"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--log-format", "xml"])
    capsys.readouterr()
    root = logging.getLogger()
    root_handlers, root_level = root.handlers[:], root.level
    configure_logging(0, False, "json")
    try:
        logger.info('a "quoted" line\nand another')
        logger.debug("not at INFO")
        try:
            raise ValueError("bad")
        except ValueError:
            logger.exception("it broke")
        # A library's standard-library records (uvicorn's, say) come out as JSON lines too;
        # below WARNING they are left out (httpx logs every request at INFO).
        logging.getLogger("uvicorn.error").warning("port %d is slow", 80)
        logging.getLogger("httpx").info("HTTP Request: GET /")
    finally:
        logger.remove()
        # Whatever sys.stderr is when a record comes (each later test's capture), not this
        # test's captured stream, which pytest closes.
        logger.add(_to_current_stderr)
        root.handlers[:] = root_handlers
        root.setLevel(root_level)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3, lines
    first, second, library = (json.loads(line) for line in lines)
    assert library["message"] == "port 80 is slow" and library["level"] == "WARNING"
    assert library["logger"] == "uvicorn.error" and library["function"] == "test_json_log_lines"
    assert first["message"] == 'a "quoted" line\nand another'
    assert first["level"] == "INFO"
    assert first["logger"] == __name__
    assert "T" in first["time"] and first["time"][-6] in "+-"
    assert second["level"] == "ERROR" and "ValueError: bad" in second["exception"]


def _to_current_stderr(message: str) -> None:
    sys.stderr.write(message)
