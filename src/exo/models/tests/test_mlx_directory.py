"""MLX-format model directories: cards from headers, stage loading, tokenizer, generation
identical to the bundled GGUF (single process and a 2-rank pipeline), scanning, wiring.

The directory is built from the bundled GGUF (``mlx_fixture``): Hugging Face tensor names,
Q/K rows permuted back to the Hugging Face order, MLX quantised triplets, two safetensors
shards, tokenizer.json and tokenizer_config.json.
"""

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from loguru import logger

from exo.main import build_parser, config_from_args
from exo.models.bundled import bundled_gguf_path
from exo.models.cards import bundled_model_card, get_model_card
from exo.models.gguf import StageWeights
from exo.models.llama import LlamaStage
from exo.models.loader import block_count_for, load_stage_for, load_tokenizer_for
from exo.models.mlx_directory import (
    MLXDirectoryError,
    card_from_directory,
    load_directory_stage,
    rope_periods,
    scan_models_dir,
)
from exo.models.tests.mlx_fixture import write_mlx_directory
from exo.models.tokenizer import GGUFTokenizer
from exo.node import StartupError, register_models_dir
from exo.shared.types.ids import DeviceId, InstanceId, NodeId, RunnerId
from exo.shared.types.instances import Instance, PlacementDecision, Shard
from exo.worker.runner.engine import Engine, GenerationRequest, LocalStepper
from exo.worker.runner.launch import run_local_pipeline
from exo.worker.supervisor import runner_command

MODEL_NAME = "SmolLM2-135M-Instruct-MLX"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
REQUEST = GenerationRequest(request_id="capital", messages=QUESTION, max_tokens=24)


@pytest.fixture(scope="session")
def mlx_directory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_mlx_directory(bundled_gguf_path(), tmp_path_factory.mktemp("models") / MODEL_NAME)


@pytest.fixture(scope="session")
def directory_weights(mlx_directory: Path) -> StageWeights:
    return load_stage_for(mlx_directory, 0, None)


@pytest.fixture(scope="session")
def directory_tokenizer(mlx_directory: Path) -> GGUFTokenizer:
    return load_tokenizer_for(mlx_directory)


@pytest.fixture(scope="session")
def gguf_answer(full_model: LlamaStage, tokenizer: GGUFTokenizer) -> str:
    return _generate(Engine(tokenizer, LocalStepper(full_model)))


def _generate(engine: Engine) -> str:
    return "".join(chunk.text for chunk in engine.generate(REQUEST, lambda: False))


@pytest.fixture
def warnings() -> Iterator[list[str]]:
    messages: list[str] = []
    sink = logger.add(lambda message: messages.append(str(message)), level="WARNING")
    yield messages
    logger.remove(sink)


# --- card and weights ---------------------------------------------------------------------


def test_card_sizes_come_from_the_safetensors_headers(mlx_directory: Path) -> None:
    card = card_from_directory(mlx_directory)
    gguf_card = bundled_model_card()
    assert card.model_id == MODEL_NAME
    assert card.source == "mlx_directory"
    assert card.weights_path == str(mlx_directory.resolve())
    assert card.n_layers == 30
    assert card.layer_bytes == pytest.approx(gguf_card.layer_bytes, rel=0.01)
    assert card.non_layer_bytes == pytest.approx(gguf_card.non_layer_bytes, rel=0.01)
    assert (card.hidden_size, card.context_length) == (576, 8192)
    assert card.kv_cache_bytes_per_token == gguf_card.kv_cache_bytes_per_token
    assert block_count_for(mlx_directory) == 30


def test_hyperparameters_match_the_gguf_but_for_the_rotary_layout(
    directory_weights: StageWeights, full_weights: StageWeights
) -> None:
    ours = directory_weights.hyperparameters
    theirs = full_weights.hyperparameters
    assert ours.rope_traditional is False and theirs.rope_traditional is True
    ignored = {"rope_traditional"}
    assert ours.model_dump(exclude=ignored) == theirs.model_dump(exclude=ignored)
    layer = directory_weights.layers[0]
    assert (layer.query.bits, layer.query.group_size) == (4, 32)
    assert (layer.key.out_features, layer.key.in_features) == (192, 576)
    embedding = directory_weights.token_embedding
    assert embedding is not None and embedding.bits == 8  # the per-module override
    assert directory_weights.nbytes == full_weights.nbytes


def test_a_stage_holds_only_its_share_and_stages_chain(
    mlx_directory: Path, directory_weights: StageWeights, directory_tokenizer: GGUFTokenizer
) -> None:
    middle = load_directory_stage(mlx_directory, 10, 20)
    assert middle.token_embedding is None and middle.output_norm is None
    assert middle.nbytes == 10 * directory_weights.layers[0].nbytes
    first = load_directory_stage(mlx_directory, 0, 15)
    last = load_directory_stage(mlx_directory, 15, 30)
    assert first.output_norm is None and first.token_embedding is not None
    assert last.token_embedding is not None and last.output_head is None  # tied head

    prompt = mx.array([directory_tokenizer.encode_chat(QUESTION)])
    whole = LlamaStage(directory_weights)
    expected = whole.forward(prompt, whole.new_cache())
    hidden = prompt
    for stage in (LlamaStage(first), LlamaStage(last)):
        hidden = stage.forward(hidden, stage.new_cache())
    np.testing.assert_array_equal(np.array(hidden), np.array(expected))
    with pytest.raises(ValueError, match="layer range"):
        load_directory_stage(mlx_directory, 20, 31)


# --- tokenizer and generation ---------------------------------------------------------------


def test_tokenizer_matches_the_gguf_tokenizer(
    directory_tokenizer: GGUFTokenizer, tokenizer: GGUFTokenizer
) -> None:
    sample = "Année 2024: 12345 dragons 🐉 say <|im_start|>hi<|im_end|>  twice\n"
    assert directory_tokenizer.encode(sample) == tokenizer.encode(sample)
    assert directory_tokenizer.encode_chat(QUESTION) == tokenizer.encode_chat(QUESTION)
    assert directory_tokenizer.stop_token_ids == tokenizer.stop_token_ids
    assert directory_tokenizer.eos_token_id == tokenizer.eos_token_id == 2
    everything = range(tokenizer.vocab_size)
    assert directory_tokenizer.token_bytes(everything) == tokenizer.token_bytes(everything)
    assert directory_tokenizer.special_token_ids == tokenizer.special_token_ids


def test_greedy_generation_matches_the_gguf_exactly(
    directory_weights: StageWeights, directory_tokenizer: GGUFTokenizer, gguf_answer: str
) -> None:
    engine = Engine(directory_tokenizer, LocalStepper(LlamaStage(directory_weights)))
    answer = _generate(engine)
    assert answer == gguf_answer
    assert "Paris" in answer


def test_the_interleaved_rotary_layout_would_be_wrong(
    directory_weights: StageWeights, directory_tokenizer: GGUFTokenizer
) -> None:
    """The Q/K rows really are in Hugging Face order: running them with GGUF's rotary
    layout changes the logits, so the equality above depends on the layout choice."""
    wrong = dataclasses.replace(
        directory_weights,
        hyperparameters=directory_weights.hyperparameters.model_copy(
            update={"rope_traditional": True}
        ),
    )
    prompt = mx.array([directory_tokenizer.encode_chat(QUESTION)])
    right_model, wrong_model = LlamaStage(directory_weights), LlamaStage(wrong)
    right = np.array(right_model.forward(prompt, right_model.new_cache()))
    wrong_logits = np.array(wrong_model.forward(prompt, wrong_model.new_cache()))
    assert np.abs(right - wrong_logits).max() > 0.5


def test_two_rank_pipeline_from_the_directory_gives_the_same_text(
    mlx_directory: Path, gguf_answer: str
) -> None:
    run = run_local_pipeline(
        2, REQUEST, layer_ranges=[(0, 15), (15, 30)], model_path=mlx_directory, timeout_s=90
    )
    assert run.return_codes == [0, 0], run.stderr
    assert run.text == gguf_answer
    final = run.final
    assert final is not None and final.finish_reason in ("stop", "length")


# --- scanning, registration, wiring ----------------------------------------------------------


def _copy_model(source: Path, target: Path, leave_out: str | None = None) -> Path:
    """A model directory whose files link to ``source``'s, optionally without one file."""
    target.mkdir(parents=True)
    for file in source.iterdir():
        if file.name != leave_out:
            (target / file.name).symlink_to(file)
    return target


def test_scan_skips_malformed_directories_with_one_warning_each(
    tmp_path: Path, mlx_directory: Path, warnings: list[str]
) -> None:
    models = tmp_path / "models"
    _copy_model(mlx_directory, models / "Good-Model")
    bad_config = _copy_model(mlx_directory, models / "Bad-Config", leave_out="config.json")
    (bad_config / "config.json").write_text("{not json")
    _copy_model(mlx_directory, models / "No-Tokenizer", leave_out="tokenizer.json")
    truncated = _copy_model(mlx_directory, models / "Truncated", leave_out="config.json")
    config = json.loads((mlx_directory / "config.json").read_text())
    (truncated / "config.json").write_text(json.dumps(config | {"num_hidden_layers": 31}))
    (models / "notes.txt").write_text("not a model")

    cards = scan_models_dir(models)

    assert [card.model_id for card in cards] == ["Good-Model"]
    assert len(warnings) == 3, warnings
    by_model = {name: [w for w in warnings if name in w] for name in ("Bad-", "No-", "Trunc")}
    assert all(len(found) == 1 for found in by_model.values()), warnings
    assert "config.json" in by_model["Bad-"][0] and "not valid JSON" in by_model["Bad-"][0]
    assert "tokenizer.json" in by_model["No-"][0] and "missing" in by_model["No-"][0]
    assert "model.layers.30" in by_model["Trunc"][0]


def test_unsupported_configs_are_refused(tmp_path: Path, mlx_directory: Path) -> None:
    config = json.loads((mlx_directory / "config.json").read_text())
    for name, change, problem in [
        ("Mistral", {"model_type": "mistral"}, "model_type"),
        ("Bits", {"quantization": {"group_size": 32, "bits": 8}}, "packed columns"),
        ("Rope", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
    ]:
        directory = _copy_model(mlx_directory, tmp_path / name, leave_out="config.json")
        (directory / "config.json").write_text(json.dumps(config | change))
        with pytest.raises(MLXDirectoryError, match=problem):
            card_from_directory(directory)


def test_rope_scaling_periods() -> None:
    path = Path("config.json")
    plain = [10000.0 ** (index / 64) for index in range(0, 64, 2)]
    assert rope_periods({}, path, 10000.0, 64) is None
    linear = rope_periods({"rope_scaling": {"type": "linear", "factor": 2.0}}, path, 10000.0, 64)
    assert linear == pytest.approx([2 * period for period in plain])
    scaling = {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192}
    llama3 = rope_periods({"rope_scaling": scaling}, path, 10000.0, 64)
    assert llama3 is not None
    assert llama3[0] == pytest.approx(plain[0])  # short wavelengths are kept
    assert llama3[-1] == pytest.approx(8 * plain[-1])  # long ones are stretched
    assert all(p <= q <= 8 * p for p, q in zip(plain, llama3, strict=True))


def test_registered_directory_cards_reach_the_runner_command(
    tmp_path: Path, mlx_directory: Path
) -> None:
    models = tmp_path / "models"
    _copy_model(mlx_directory, models / "Registered-MLX-Model")
    cards = register_models_dir(models)
    assert [card.model_id for card in cards] == ["Registered-MLX-Model"]
    card = get_model_card("Registered-MLX-Model")
    assert card is not None and card.source == "mlx_directory"

    def instance(model_id: str) -> Instance:
        shard = Shard(
            runner_id=RunnerId("r0"),
            node_id=NodeId("n0"),
            device_id=DeviceId("cpu:0"),
            rank=0,
            world_size=1,
            start_layer=0,
            end_layer=30,
        )
        decision = PlacementDecision(
            strategy="greedy",
            heterogeneous=False,
            predicted_ms_per_token=1.0,
            greedy_ms_per_token=1.0,
            solve_ms=0.0,
        )
        return Instance(
            instance_id=InstanceId("i0"), model_id=model_id, shards=[shard], placement=decision
        )

    directory_instance = instance("Registered-MLX-Model")
    command = runner_command(
        directory_instance, directory_instance.shards[0], None, tmp_path / "weights"
    )
    assert command[command.index("--model") + 1] == card.weights_path
    bundled = instance(bundled_model_card().model_id)
    assert "--model" not in runner_command(bundled, bundled.shards[0], None, tmp_path)
    unknown = instance("Not-In-Models-Dir")
    with pytest.raises(FileNotFoundError, match="--models-dir"):
        runner_command(unknown, unknown.shards[0], None, tmp_path)


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
