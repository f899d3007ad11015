"""The runner command line: one model builds and parses it; the supervisor fills it from a
shard and the model's card."""

import os
from pathlib import Path

import pytest

from exo.main import build_parser, config_from_args
from exo.models.cards import get_model_card, register_model_card
from exo.models.directory import card_from_directory
from exo.node import StartupError
from exo.shared.tests.instances import single_shard_instance
from exo.shared.types.generation import GenerationRequest
from exo.shared.types.ids import DeviceId
from exo.shared.types.instances import Instance
from exo.worker.runner.arguments import RUNNER_MODULE, RunnerArguments, RunnerArgumentsError
from exo.worker.supervisor import compute_device_for, runner_arguments, runner_environment


def test_argv_and_parse_are_inverse() -> None:
    arguments = RunnerArguments(
        rank=2,
        world_size=3,
        hostfile=Path("/tmp/hosts.json"),
        layer_start=20,
        layer_end=30,
        model=Path("/models/Qwen3-0.6B-4bit"),
        weights_cache=Path("/home/exo/weights"),
        request=GenerationRequest(request_id="r", prompt="hi", max_tokens=3),
    )
    argv = arguments.argv()
    assert argv[:4] == ["--rank", "2", "--world-size", "3"]
    assert RunnerArguments.parse(argv) == arguments
    assert arguments.command()[1:3] == ["-m", RUNNER_MODULE]
    assert RunnerArguments().argv() == ["--rank", "0", "--world-size", "1", "--layer-start", "0"]


@pytest.mark.parametrize(
    ("argv", "problem"),
    [
        (["--rnak", "1"], "unknown runner option '--rnak'"),
        (["--rank"], "--rank needs a value"),
        (["--rank", "-1"], "--rank"),
        (["--layer-end", "zero"], "--layer-end"),
        (["--request", "{not json"], "--request"),
    ],
)
def test_bad_command_lines_are_one_sentence(argv: list[str], problem: str) -> None:
    with pytest.raises(RunnerArgumentsError, match=problem):
        RunnerArguments.parse(argv)


def _instance(model_id: str) -> Instance:
    return single_shard_instance(model_id)


def test_the_supervisor_passes_the_cards_weights(
    tmp_path: Path, tiny_models: dict[tuple[str, bool], Path]
) -> None:
    directory = tiny_models[("qwen3", True)]
    register_model_card(card_from_directory(directory, model_id="Registered-Qwen3"))
    instance = _instance("Registered-Qwen3")
    arguments = runner_arguments(instance, instance.shards[0], None, tmp_path / "weights")
    assert arguments.model == directory.resolve()
    assert (arguments.layer_start, arguments.layer_end) == (0, 6)
    assert arguments.weights_cache == tmp_path / "weights"

    bundled = _instance("SmolLM2-135M-Instruct")
    card = get_model_card("SmolLM2-135M-Instruct")
    assert card is not None and card.weights_path is not None
    bundled_arguments = runner_arguments(bundled, bundled.shards[0], None, tmp_path)
    assert bundled_arguments.model == Path(card.weights_path)  # the GGUF, imported there

    unknown = _instance("Not-In-Models-Dir")
    with pytest.raises(FileNotFoundError, match="--models-dir"):
        runner_arguments(unknown, unknown.shards[0], None, tmp_path)
    planning = _instance("Llama-3.1-70B-Instruct-4bit")
    with pytest.raises(FileNotFoundError, match="planning only"):
        runner_arguments(planning, planning.shards[0], None, tmp_path)


def test_models_dir_flag_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EXO_MODELS_DIR", raising=False)
    parser = build_parser()
    assert config_from_args(parser.parse_args([])).models_dir is None
    given = config_from_args(parser.parse_args(["--models-dir", str(tmp_path)]))
    assert given.models_dir == tmp_path
    with pytest.raises(StartupError, match="is not a directory"):
        config_from_args(parser.parse_args(["--models-dir", str(tmp_path / "absent")]))
    monkeypatch.setenv("EXO_MODELS_DIR", str(tmp_path))
    assert config_from_args(parser.parse_args([])).models_dir == tmp_path
    monkeypatch.setenv("EXO_MODELS_DIR", str(tmp_path / "absent"))
    with pytest.raises(StartupError, match="EXO_MODELS_DIR"):
        config_from_args(parser.parse_args([]))


def test_runners_compute_on_the_placed_device_and_see_only_their_gpu() -> None:
    instance = _instance("SmolLM2-135M-Instruct")
    shard = instance.shards[0].model_copy(update={"device_id": DeviceId("cuda:2")})
    assert compute_device_for(shard, simulated_devices=False) == "cuda:2"
    # A simulated GPU is a placement target for tests and demos: it computes on the CPU.
    assert compute_device_for(shard, simulated_devices=True) == "cpu:0"
    cuda = runner_environment("cuda:2")
    assert cuda["CUDA_VISIBLE_DEVICES"] == "2" and cuda["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    cpu = runner_environment("cpu:0")  # a CPU runner's environment is the node's
    assert cpu.get("CUDA_VISIBLE_DEVICES") == os.environ.get("CUDA_VISIBLE_DEVICES")
    arguments = runner_arguments(instance, shard, None, Path("/w"), "cuda:2")
    assert arguments.device == "cuda:2"
