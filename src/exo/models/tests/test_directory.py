"""Model cards from MLX model directories of several families, and the scan's refusals."""

import itertools
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from exo.master.placement import place_instance
from exo.master.tests.placement_helpers import node_info
from exo.models.config import ModelConfig, ModelConfigError
from exo.models.directory import ModelDirectoryError, card_from_directory, scan_models_dir
from exo.models.families import FAMILIES, UnsupportedFamilyError, mlx_lm_module
from exo.models.safetensors import tensor_index
from exo.models.tests.tiny_models import FAMILY_CONFIGS
from exo.shared.types.commands import PlaceInstance
from exo.shared.types.ids import NodeId
from exo.shared.types.state import State

EXPECTED_FAMILY = {"mistral": "llama"}  # mlx-lm implements Mistral with its Llama module


@pytest.mark.parametrize("quantized", [False, True], ids=["dense", "q4"])
@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_the_card_describes_the_directory(
    tiny_models: dict[tuple[str, bool], Path], family: str, quantized: bool
) -> None:
    directory = tiny_models[(family, quantized)]
    config = FAMILY_CONFIGS[family]
    card = card_from_directory(directory)
    tensors = tensor_index(directory)
    per_layer = [0] * config["num_hidden_layers"]
    for name, info in tensors.items():
        match = re.match(r"model\.layers\.(\d+)\.", name)
        if match:
            per_layer[int(match[1])] += info.nbytes
    assert card.model_id == directory.name
    assert card.family == EXPECTED_FAMILY.get(family, family)
    assert card.n_layers == config["num_hidden_layers"]
    assert card.layer_bytes == max(per_layer)
    assert card.non_layer_bytes == sum(info.nbytes for info in tensors.values()) - sum(per_layer)
    head_dim = config.get("head_dim", config["hidden_size"] // config["num_attention_heads"])
    # Random weights are float32 (dense and the quantisation scales alike).
    assert card.kv_cache_bytes_per_token == (
        config["num_hidden_layers"] * 2 * config["num_key_value_heads"] * head_dim * 4
    )
    assert card.context_length == config["max_position_embeddings"]
    assert card.source == "mlx_directory" and card.weights_path == str(directory.resolve())


def test_a_linked_directory_is_listed_under_the_links_name(
    tmp_path: Path, tiny_models: dict[tuple[str, bool], Path]
) -> None:
    target = tiny_models[("phi3", True)]
    (tmp_path / "My-Phi").symlink_to(target)
    card = card_from_directory(tmp_path / "My-Phi")
    assert card.model_id == "My-Phi"
    assert card.weights_path == str(target.resolve())


def test_quantised_cards_are_smaller(tiny_models: dict[tuple[str, bool], Path]) -> None:
    dense = card_from_directory(tiny_models[("qwen3", False)])
    quantised = card_from_directory(tiny_models[("qwen3", True)])
    assert quantised.layer_bytes < dense.layer_bytes / 3


def test_each_family_places_on_a_cluster(tiny_models: dict[tuple[str, bool], Path]) -> None:
    state = State(nodes={NodeId(name): node_info(name) for name in ("a", "b", "c")})
    for (family, _), directory in tiny_models.items():
        card = card_from_directory(directory)
        instance = place_instance(PlaceInstance(model_id=card.model_id, min_nodes=3), state, card)
        ranges = [(shard.start_layer, shard.end_layer) for shard in instance.shards]
        assert len({shard.node_id for shard in instance.shards}) == 3, family
        assert ranges[0][0] == 0 and ranges[-1][1] == card.n_layers
        assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))


def test_a_multimodal_config_is_read_from_its_text_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "gemma3",
                "text_config": {
                    "num_hidden_layers": 4,
                    "hidden_size": 64,
                    "num_attention_heads": 4,
                    "max_position_embeddings": 1024,
                },
            }
        )
    )
    config, raw = ModelConfig.read(tmp_path)
    assert config.model_type == "gemma3"  # the wrapper's type picks mlx-lm's model class
    assert (config.num_hidden_layers, config.hidden_size, config.context_length) == (4, 64, 1024)
    assert raw["model_type"] == "gemma3"


def _link_model(source: Path, target: Path, leave_out: str | None = None) -> Path:
    """A model directory whose files link to ``source``'s, optionally without one file."""
    target.mkdir(parents=True)
    for file in source.iterdir():
        if file.name != leave_out:
            (target / file.name).symlink_to(file)
    return target


def _with_config(source: Path, target: Path, **changes: object) -> Path:
    directory = _link_model(source, target, leave_out="config.json")
    config = json.loads((source / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(config | changes))
    return directory


def test_the_scan_skips_what_a_runner_could_not_use(
    tmp_path: Path, tiny_models: dict[tuple[str, bool], Path], logged_warnings: list[str]
) -> None:
    good = tiny_models[("llama", True)]
    models = tmp_path / "models"
    _link_model(good, models / "Good-Model")
    (_link_model(good, models / "Bad-Json", leave_out="config.json") / "config.json").write_text(
        "{not json"
    )
    _with_config(good, models / "No-Layers", num_hidden_layers="many")
    _with_config(good, models / "Too-Many-Layers", num_hidden_layers=9)
    _with_config(good, models / "Unknown-Family", model_type="no-such-family")
    _link_model(good, models / "No-Tokenizer", leave_out="tokenizer.json")
    _link_model(good, models / "No-Weights", leave_out="model.safetensors")
    no_template = _link_model(good, models / "No-Template", leave_out="tokenizer_config.json")
    (no_template / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    (models / "notes.txt").write_text("not a model")

    cards = scan_models_dir(models)

    assert [card.model_id for card in cards] == ["Good-Model"]
    expected = {
        "Bad-Json": "not valid JSON",
        "No-Layers": "num_hidden_layers",
        "Too-Many-Layers": "9 layers but the weights hold 6",
        "Unknown-Family": "no model for model_type 'no-such-family'",
        "No-Tokenizer": "no tokenizer.json",
        "No-Weights": "no model*.safetensors",
        "No-Template": "no chat template",
    }
    assert len(logged_warnings) == len(expected), logged_warnings
    for name, problem in expected.items():
        found = [warning for warning in logged_warnings if name in warning]
        assert len(found) == 1 and problem in found[0], (name, logged_warnings)


def test_errors_are_value_errors_naming_the_file(
    tmp_path: Path, tiny_models: dict[tuple[str, bool], Path]
) -> None:
    good = tiny_models[("qwen2", False)]
    with pytest.raises(ModelConfigError, match=r"config\.json: missing"):
        ModelConfig.read(tmp_path)
    with pytest.raises(UnsupportedFamilyError):
        card_from_directory(_with_config(good, tmp_path / "x", model_type="nope"))
    assert issubclass(ModelDirectoryError, ValueError)
    assert issubclass(UnsupportedFamilyError, ValueError)


@pytest.mark.parametrize("module_name", sorted(FAMILIES))
def test_a_known_family_is_the_module_mlx_lm_itself_picks(module_name: str) -> None:
    """The short way (no mlx-lm import) gives what mlx-lm's own rule gives."""
    from mlx_lm.utils import _get_classes  # pyright: ignore[reportPrivateUsage]

    model_class, _ = _get_classes({"model_type": module_name})
    assert mlx_lm_module({"model_type": module_name}) == model_class.__module__.rsplit(".", 1)[-1]
    assert mlx_lm_module({"model_type": "mistral"}) == "llama"  # the long way: mlx-lm's remap


def test_reading_a_known_familys_card_does_not_import_mlx_lm(
    tiny_models: dict[tuple[str, bool], Path],
) -> None:
    """A node reads the bundled model's card at start: importing mlx-lm (and transformers)
    there would cost seconds of CPU on every start."""
    directory = tiny_models[("llama", False)]
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from exo.models.directory import card_from_directory\n"
        f"card = card_from_directory(Path({str(directory)!r}))\n"
        "print(card.family, sorted(m for m in sys.modules if m.split('.')[0] in "
        "('mlx_lm', 'transformers')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.split(None, 1) == ["llama", "[]\n"], result.stdout + result.stderr
