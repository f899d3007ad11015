"""Load progress: a stage reads its weights in parts and says how far it is; the runner
passes a few of those reports on as ``loading`` statuses, the last with every byte."""

from pathlib import Path

import mlx.nn as nn

from exo.models.stage import LOAD_STEPS, evaluate_parameters, load_stage, parameter_bytes
from exo.models.tests.tiny_models import build_tiny_model
from exo.worker.runner.arguments import RunnerArguments
from exo.worker.runner.messages import RunnerOutputMessage, StatusOutput
from exo.worker.runner.process import FixedRequests, LoadProgressReporter, run_rank


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_reporter_sends_the_first_the_last_and_at_most_one_per_interval() -> None:
    sent: list[tuple[int, int]] = []
    clock = Clock()
    report = LoadProgressReporter(lambda loaded, total: sent.append((loaded, total)), 0.5, clock)
    for now, loaded in [(0.0, 0), (0.1, 10), (0.4, 20), (0.6, 30), (0.7, 40), (1.2, 60)]:
        clock.now = now
        report(loaded, 100)
    clock.now = 1.3
    report(100, 100)  # the last, however soon
    report(100, 100)  # and only once
    assert sent == [(0, 100), (30, 100), (60, 100), (100, 100)]


def test_parameters_are_evaluated_in_parts_with_progress() -> None:
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(40)])
    calls: list[tuple[int, int]] = []
    evaluate_parameters(model, lambda loaded, total: calls.append((loaded, total)))
    total = parameter_bytes(model)
    assert calls[0] == (0, total)
    assert calls[-1] == (total, total)
    assert all(t == total for _, t in calls)
    loaded = [done for done, _ in calls]
    assert loaded == sorted(loaded) and len(set(loaded)) == len(loaded)
    assert 4 < len(calls) <= LOAD_STEPS + 2


def test_a_stage_reports_its_own_bytes(tmp_path: Path) -> None:
    directory = build_tiny_model(tmp_path / "llama", "llama", quantized=True)
    calls: list[tuple[int, int]] = []
    stage = load_stage(directory, 2, 4, lambda loaded, total: calls.append((loaded, total)))
    assert calls[-1] == (stage.nbytes, stage.nbytes)
    assert len(calls) > 2


def test_a_runner_reports_load_progress_in_its_loading_statuses() -> None:
    outputs: list[RunnerOutputMessage] = []
    config = RunnerArguments.parse(["--world-size", "1"])
    run_rank(config, FixedRequests([]), outputs.append)
    statuses = [output for output in outputs if isinstance(output, StatusOutput)]
    progress = [s for s in statuses if s.loaded_bytes is not None]
    assert progress and all(s.status == "loading" for s in progress)
    ready = next(s for s in statuses if s.status == "ready")
    assert ready.weight_bytes is not None
    assert (progress[-1].loaded_bytes, progress[-1].total_bytes) == (
        ready.weight_bytes,
        ready.weight_bytes,
    )
    assert progress[0].loaded_bytes == 0
    assert statuses.index(progress[-1]) < statuses.index(ready)
