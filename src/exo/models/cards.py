"""Model cards: the numbers placement needs about each model it can place.

Two kinds of card live here:

* the bundled ``SmolLM2-135M-Instruct``, measured from its import into the per-machine
  weights cache (:mod:`exo.models.weights_cache`; imported on first use, then read from
  the directory's headers like any MLX model directory), and
* planning-only cards for the Llama 3.1 family, derived from the published configurations.
  Their weights are not shipped; the cards exist so that placement can be planned,
  benchmarked and explained for models far larger than the machine at hand.

Planning-only byte counts assume **4.5 bits per weight effective** (4-bit weights plus one
fp16 scale and one fp16 bias per group of 64 weights, as MLX's 4-bit quantisation stores
them: 4 + 32/64 = 4.5). KV-cache bytes per token assume an fp16 cache:
``n_layers × 2 (K and V) × n_kv_heads × head_dim × 2 bytes``.

Other components add cards (for example for local MLX model directories) with
:func:`register_model_card`, or build their own :class:`ModelRegistry`.
"""

import time
from collections.abc import Iterable
from pathlib import Path

from loguru import logger

from exo.models.bundled import BUNDLED_MODEL_ID, BundledModelMissingError, bundled_gguf_path
from exo.models.directory import card_from_directory
from exo.models.weights_cache import default_weights_cache, ensure_imported
from exo.shared.types.models import ModelCard

BUNDLED_RETRY_S = 30.0
"""After a failed import of the bundled model, how long its card stays unavailable before
the next try (each try starts a process)."""

PLANNING_BITS_PER_WEIGHT = 4.5
"""Effective bits per weight of a 4-bit MLX-quantised model (group size 64, fp16 scale+bias)."""

FP16_BYTES = 2


def kv_cache_bytes_per_token(n_layers: int, n_kv_heads: int, head_dim: int) -> int:
    """fp16 KV-cache bytes per token for the whole model: layers × (K, V) × heads × dim × 2."""
    return n_layers * 2 * n_kv_heads * head_dim * FP16_BYTES


def _quantised_bytes(parameters: int) -> int:
    return round(parameters * PLANNING_BITS_PER_WEIGHT / 8)


def llama_planning_card(
    model_id: str,
    *,
    n_layers: int,
    hidden_size: int,
    intermediate_size: int,
    n_heads: int,
    n_kv_heads: int,
    vocab_size: int,
    tied_embeddings: bool = False,
    context_length: int = 4096,
) -> ModelCard:
    """A planning-only card for a Llama-architecture model from its published configuration.

    Per layer: q and o projections (hidden²), k and v projections (hidden × kv_dim), the
    gated MLP (3 × hidden × intermediate) and two RMS norms (hidden each). Outside the
    layers: the embedding matrix, the LM head (unless tied) and the final norm.
    """
    head_dim = hidden_size // n_heads
    kv_dim = n_kv_heads * head_dim
    layer_parameters = (
        2 * hidden_size * hidden_size
        + 2 * hidden_size * kv_dim
        + 3 * hidden_size * intermediate_size
        + 2 * hidden_size
    )
    embedding_parameters = vocab_size * hidden_size
    non_layer_parameters = embedding_parameters * (1 if tied_embeddings else 2) + hidden_size
    return ModelCard(
        model_id=model_id,
        n_layers=n_layers,
        layer_bytes=_quantised_bytes(layer_parameters),
        non_layer_bytes=_quantised_bytes(non_layer_parameters),
        hidden_size=hidden_size,
        vocab_size=vocab_size,
        embedding_bytes=_quantised_bytes(embedding_parameters),
        lm_head_bytes=0 if tied_embeddings else _quantised_bytes(embedding_parameters),
        tied_embeddings=tied_embeddings,
        parameters_per_layer=layer_parameters,
        kv_cache_bytes_per_token=kv_cache_bytes_per_token(n_layers, n_kv_heads, head_dim),
        context_length=context_length,
        source="planning_only",
    )


def bundled_model_card(weights_cache: Path) -> ModelCard:
    """The bundled SmolLM2-135M-Instruct card, from its import into ``weights_cache``."""
    gguf = bundled_gguf_path()
    directory = ensure_imported(gguf, weights_cache)
    return card_from_directory(
        directory, model_id=BUNDLED_MODEL_ID, source="bundled_gguf", weights_path=gguf
    )


def _planning_cards() -> list[ModelCard]:
    return [
        llama_planning_card(
            "Llama-3.1-8B-Instruct-4bit",
            n_layers=32,
            hidden_size=4096,
            intermediate_size=14336,
            n_heads=32,
            n_kv_heads=8,
            vocab_size=128256,
        ),
        llama_planning_card(
            "Llama-3.1-70B-Instruct-4bit",
            n_layers=80,
            hidden_size=8192,
            intermediate_size=28672,
            n_heads=64,
            n_kv_heads=8,
            vocab_size=128256,
        ),
        llama_planning_card(
            "Llama-3.1-405B-Instruct-4bit",
            n_layers=126,
            hidden_size=16384,
            intermediate_size=53248,
            n_heads=128,
            n_kv_heads=8,
            vocab_size=128256,
        ),
    ]


def _normalise(model_id: str) -> str:
    """``mlx-community/Meta-Llama-3.1-8B-Instruct-4bit`` and ``llama-3.1-8b-instruct-4bit``
    find the same card: the part after the last ``/``, lower case, without ``meta-``."""
    name = model_id.rsplit("/", 1)[-1].strip().lower()
    return name.removeprefix("meta-")


class ModelRegistry:
    """Cards by model id. The bundled card is measured on first use, not at construction."""

    def __init__(
        self,
        extra_cards: Iterable[ModelCard] = (),
        *,
        include_bundled: bool = True,
        weights_cache: Path | None = None,
    ):
        self._cards: dict[str, ModelCard] = {}
        self._include_bundled = include_bundled
        self._weights_cache = weights_cache
        self._bundled_card: ModelCard | None = None
        self._bundled_error: str | None = None
        self._bundled_failed_at = 0.0
        for card in _planning_cards():
            self.register(card)
        for card in extra_cards:
            self.register(card)

    @property
    def weights_cache(self) -> Path:
        return self._weights_cache or default_weights_cache()

    def use_weights_cache(self, directory: Path) -> None:
        """Import the bundled model into ``directory`` (a node's ``home/weights``)."""
        if directory != self._weights_cache:
            self._weights_cache = directory
            self._bundled_card = None
            self._bundled_error = None

    def register(self, card: ModelCard) -> None:
        """Add or replace a card (a later card with the same id wins)."""
        self._cards[_normalise(card.model_id)] = card

    def _bundled(self) -> ModelCard | None:
        if not self._include_bundled:
            return None
        recently_failed = time.monotonic() - self._bundled_failed_at < BUNDLED_RETRY_S
        if self._bundled_card is None and not (self._bundled_error and recently_failed):
            try:
                self._bundled_card = bundled_model_card(self.weights_cache)
                self._bundled_error = None
            except (BundledModelMissingError, OSError, ValueError) as error:
                if str(error) != self._bundled_error:
                    logger.warning(f"bundled model card unavailable: {error}")
                self._bundled_error = str(error)
                self._bundled_failed_at = time.monotonic()
        return self._bundled_card

    def get(self, model_id: str) -> ModelCard | None:
        key = _normalise(model_id)
        if key in self._cards:
            return self._cards[key]
        if key == _normalise(BUNDLED_MODEL_ID):
            return self._bundled()
        return None

    def unavailable_reason(self, model_id: str) -> str | None:
        """Why a model this registry knows has no card right now (the bundled model's
        import failed, say), or None."""
        if _normalise(model_id) == _normalise(BUNDLED_MODEL_ID) and self._bundled() is None:
            return self._bundled_error
        return None

    def all(self) -> dict[str, ModelCard]:
        cards: dict[str, ModelCard] = {}
        bundled = None if _normalise(BUNDLED_MODEL_ID) in self._cards else self._bundled()
        if bundled is not None:
            cards[bundled.model_id] = bundled
        for card in self._cards.values():
            cards[card.model_id] = card
        return cards


_default_registry = ModelRegistry()


def known_model_cards() -> dict[str, ModelCard]:
    """Every card the default registry knows, keyed by model id."""
    return _default_registry.all()


def get_model_card(model_id: str) -> ModelCard | None:
    """The card for ``model_id`` (case-insensitive; an ``org/`` prefix is ignored), or None."""
    return _default_registry.get(model_id)


def unavailable_reason(model_id: str) -> str | None:
    """Why a known model cannot be placed from this node right now, or None."""
    return _default_registry.unavailable_reason(model_id)


def register_model_card(card: ModelCard) -> None:
    """Make ``card`` known to :func:`get_model_card` (e.g. for a local MLX model directory)."""
    _default_registry.register(card)


def use_weights_cache(directory: Path) -> None:
    """Where the default registry imports the bundled model (a node's ``home/weights``)."""
    _default_registry.use_weights_cache(directory)
