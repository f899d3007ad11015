"""Model cards: the bundled card is measured from the real GGUF; planning cards match the
published sizes."""

from pathlib import Path

import mlx.core as mx
import pytest

from exo.master.planning import plan_instance
from exo.models.bundled import bundled_gguf_path
from exo.models.cards import (
    ModelRegistry,
    get_model_card,
    known_model_cards,
    kv_cache_bytes_per_token,
    register_model_card,
)
from exo.shared.types.commands import CommandResult, PlaceInstance
from exo.shared.types.models import ModelCard
from exo.shared.types.state import State

GB = 1e9


def test_bundled_card_is_measured_from_the_gguf() -> None:
    card = get_model_card("SmolLM2-135M-Instruct")
    assert card is not None
    assert card.n_layers == 30
    assert card.hidden_size == 576
    assert card.source == "bundled_gguf"
    loaded = mx.load(str(bundled_gguf_path()), return_metadata=True)
    arrays: dict[str, mx.array] = loaded[0]  # type: ignore[index]
    first_layer = sum(array.nbytes for name, array in arrays.items() if name.startswith("blk.0."))
    everything = sum(array.nbytes for array in arrays.values())
    assert card.layer_bytes == first_layer
    assert card.non_layer_bytes + 30 * card.layer_bytes == everything
    # 30 layers × K,V × 3 KV heads × head_dim 64 × 4 bytes (its float32 norms make the
    # activations, and so the cache, float32).
    assert card.kv_cache_bytes_per_token == 30 * 2 * 3 * 64 * 4
    assert card.context_length == 8192


@pytest.mark.parametrize(
    ("model_id", "layers", "hidden", "total_gb"),
    [
        ("Llama-3.1-8B-Instruct-4bit", 32, 4096, 4.5),
        ("Llama-3.1-70B-Instruct-4bit", 80, 8192, 40.0),
        ("Llama-3.1-405B-Instruct-4bit", 126, 16384, 228.0),
    ],
)
def test_planning_cards_match_the_published_sizes(
    model_id: str, layers: int, hidden: int, total_gb: float
) -> None:
    card = get_model_card(model_id)
    assert card is not None
    assert card.source == "planning_only"
    assert card.n_layers == layers
    assert card.hidden_size == hidden
    assert card.total_bytes / GB == pytest.approx(total_gb, rel=0.03)
    assert card.kv_cache_bytes_per_token == kv_cache_bytes_per_token(layers, 8, 128)


def test_lookup_ignores_case_and_organisation_prefix() -> None:
    direct = get_model_card("Llama-3.1-8B-Instruct-4bit")
    assert get_model_card("mlx-community/Meta-Llama-3.1-8B-Instruct-4bit") == direct
    assert get_model_card("HuggingFaceTB/smollm2-135m-instruct") is not None
    assert get_model_card("no-such-model") is None


def test_known_cards_list_every_model() -> None:
    cards = known_model_cards()
    assert {
        "SmolLM2-135M-Instruct",
        "Llama-3.1-8B-Instruct-4bit",
        "Llama-3.1-70B-Instruct-4bit",
        "Llama-3.1-405B-Instruct-4bit",
    } <= set(cards)


def test_cards_can_be_registered() -> None:
    card = ModelCard(
        model_id="local/My-Model-4bit",
        n_layers=4,
        layer_bytes=1000,
        non_layer_bytes=10,
        hidden_size=64,
        kv_cache_bytes_per_token=128,
        source="mlx_directory",
        weights_path="/tmp/my-model",
    )
    registry = ModelRegistry([card], include_bundled=False)
    assert registry.get("My-Model-4bit") == card
    assert "SmolLM2-135M-Instruct" not in registry.all()
    register_model_card(card)
    assert get_model_card("local/My-Model-4bit") == card


def test_a_bundled_model_that_cannot_be_imported_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("x")
    registry = ModelRegistry(weights_cache=blocker / "weights")
    assert registry.get("SmolLM2-135M-Instruct") is None
    reason = registry.unavailable_reason("SmolLM2-135M-Instruct")
    assert reason is not None and "could not import SmolLM2-135M-Instruct.Q4_1.gguf" in reason
    assert registry.unavailable_reason("Llama-3.1-8B-Instruct-4bit") is None

    monkeypatch.setattr("exo.models.cards._default_registry", registry)
    result = plan_instance(PlaceInstance(model_id="SmolLM2-135M-Instruct"), State())
    assert isinstance(result, CommandResult) and result.status_code == 503
    assert result.error is not None and "cannot be placed from this node now" in result.error
