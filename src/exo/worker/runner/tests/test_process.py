"""A runner process serving JSON-line requests on stdin, as a supervisor drives it."""

import subprocess
import sys

from exo.shared.types.generation import GenerationRequest
from exo.worker.runner.messages import (
    CancelInput,
    ChunkOutput,
    GenerateInput,
    RequestFailedOutput,
    ShutdownInput,
    StageTimeOutput,
    StatusOutput,
    parse_output,
)


def test_serves_requests_cancels_and_shuts_down() -> None:
    inputs = [
        GenerateInput(request=GenerationRequest(request_id="a", prompt="Hello", max_tokens=3)),
        GenerateInput(request=GenerationRequest(request_id="empty")),  # no prompt: rejected
        GenerateInput(request=GenerationRequest(request_id="c", prompt="Hello", max_tokens=6)),
        GenerateInput(request=GenerationRequest(request_id="d", prompt="Hello", max_tokens=6)),
        GenerateInput(
            request=GenerationRequest(
                request_id="b",
                messages=[{"role": "user", "content": "Write a long story about a dragon."}],
                max_tokens=200,
            )
        ),
        CancelInput(request_id="b"),
        ShutdownInput(),
    ]
    process = subprocess.run(
        [sys.executable, "-m", "exo.worker.runner.process", "--world-size", "1"],
        input="".join(message.model_dump_json() + "\n" for message in inputs),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert process.returncode == 0, process.stderr
    outputs = [parse_output(line) for line in process.stdout.splitlines() if line.strip()]
    statuses = [o.status for o in outputs if isinstance(o, StatusOutput)]
    assert statuses[0] == "loading"
    assert statuses[-1] == "shut_down"
    assert "ready" in statuses and "running" in statuses

    chunks = [o.chunk for o in outputs if isinstance(o, ChunkOutput)]
    finals = {c.request_id: c for c in chunks if c.finish_reason is not None}
    assert finals["a"].finish_reason == "length"
    assert finals["a"].completion_tokens == 3
    assert finals["b"].finish_reason == "cancelled"
    assert finals["b"].completion_tokens < 200
    failures = [o for o in outputs if isinstance(o, RequestFailedOutput)]
    assert [f.request_id for f in failures] == ["empty"]
    assert "messages or a prompt" in failures[0].error

    # "a" has too few decode tokens to report; "c" warms MLX up and is not reported; "d"
    # is the first report; "b" is too short or too soon after it.
    assert finals["c"].finish_reason == "length" and finals["c"].completion_tokens == 6
    assert finals["d"].finish_reason == "length" and finals["d"].completion_tokens == 6
    stage_times = [o for o in outputs if isinstance(o, StageTimeOutput)]
    assert len(stage_times) == 1, stage_times
    report = stage_times[0]
    assert (report.rank, report.tokens) == (0, 5)
    assert report.stage_ms_per_token > 0
    assert report.ms_per_token is not None and report.ms_per_token > 0
    assert report.time_to_first_token_ms is not None and report.time_to_first_token_ms > 0
    # It follows the request's last chunk.
    positions = [
        i
        for i, o in enumerate(outputs)
        if o is report or (isinstance(o, ChunkOutput) and o.chunk is finals["d"])
    ]
    assert outputs[positions[1]] is report


def test_a_runner_refuses_a_device_it_cannot_get_instead_of_using_another() -> None:
    # This machine's MLX has no CUDA (the CI and development machines are CPU-only).
    process = subprocess.run(
        [sys.executable, "-m", "exo.worker.runner.process", "--device", "cuda:0"],
        input="",
        capture_output=True,
        text=True,
        timeout=60,
    )
    outputs = [parse_output(line) for line in process.stdout.splitlines() if line.strip()]
    statuses = [o for o in outputs if isinstance(o, StatusOutput)]
    assert process.returncode == 1
    assert [s.status for s in statuses] == ["loading", "failed"]
    assert "cuda:0 is out of reach" in (statuses[-1].error or "")
    assert "--extra cuda13" in (statuses[-1].error or "")
    assert statuses[-1].weight_bytes is None  # it failed before loading anything
    assert statuses[-1].compute_device is None


def test_a_runner_reports_the_device_it_computes_on() -> None:
    request = GenerationRequest(request_id="a", prompt="Hello", max_tokens=2)
    process = subprocess.run(
        [sys.executable, "-m", "exo.worker.runner.process", "--device", "cpu:0"],
        input=GenerateInput(request=request).model_dump_json() + "\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert process.returncode == 0, process.stderr
    outputs = [parse_output(line) for line in process.stdout.splitlines() if line.strip()]
    statuses = [o for o in outputs if isinstance(o, StatusOutput)]
    assert all(s.compute_device is not None for s in statuses if s.status != "loading")
    device = statuses[-1].compute_device
    assert device is not None and (device.device_id, device.backend) == ("cpu:0", "cpu")
