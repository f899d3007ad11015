"""What a pipeline stage needs to know about a model family beyond mlx-lm's model class.

mlx-lm builds every family's model; a stage (:mod:`exo.models.stage`) runs a contiguous
range of its decoder layers. The layers themselves are the family's own modules, called as
``layer(hidden, mask, cache)``. What differs between families is only around them: how the
first stage turns token ids into the hidden state, which attention mask a layer takes, and
how the last stage turns the final hidden state into logits. Everything not listed in
:data:`FAMILIES` uses :data:`DEFAULT_FAMILY` (plain embedding, no scaling, boolean or
``"causal"`` masks, a linear or tied head), which is what llama, mistral, qwen2, qwen3 and
phi3 are.

Families are keyed by the mlx-lm module that implements them (``mistral`` is implemented by
``llama``), so :func:`family_for` takes that module's name.
"""

import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # MLX is imported where a stage runs, not where cards are read
    import mlx.core as mx

EmbeddingScale = Callable[["mx.array", int], "mx.array"]
"""(embedded tokens, hidden size) -> the first stage's hidden state."""


def _times_sqrt_hidden(embedded: "mx.array", hidden_size: int) -> "mx.array":
    """Gemma 2 scales the embedding by sqrt(hidden size), in the embedding's dtype."""
    return embedded * (hidden_size**0.5)


def _times_sqrt_hidden_rounded_to_bfloat16(embedded: "mx.array", hidden_size: int) -> "mx.array":
    """Gemma 3 rounds sqrt(hidden size) to bfloat16 first (as its reference does)."""
    import mlx.core as mx

    return embedded * mx.array(hidden_size**0.5, mx.bfloat16).astype(embedded.dtype)


@dataclass(frozen=True)
class StageFamily:
    """Where a family's pieces live and how the end stages use them.

    The embedding and the final norm are attributes of the module that holds the layer
    list (``model.model`` for most families); the untied output head is the module named
    ``head`` anywhere in the model (``lm_head``). A model without that module has its head
    tied to the embedding (``embedding.as_linear``).
    """

    embedding: str = "embed_tokens"
    final_norm: str = "norm"
    head: str = "lm_head"
    embedding_scale: EmbeddingScale | None = None
    mask_as_array: bool = False
    """The family's attention adds the mask to its scores itself, so it needs an array
    rather than mlx-lm's ``"causal"`` shorthand."""
    final_logit_softcap: str | None = None
    """Attribute of the model holding a ``tanh`` soft cap applied to the logits (Gemma 2)."""
    tested: bool = False
    """Covered by exo's family tests (tiny models through 1-, 2- and 3-rank pipelines)."""


DEFAULT_FAMILY = StageFamily()

FAMILIES: dict[str, StageFamily] = {
    "llama": StageFamily(tested=True),
    "qwen2": StageFamily(tested=True),
    "qwen3": StageFamily(tested=True),
    "phi3": StageFamily(tested=True),
    "gemma2": StageFamily(
        embedding_scale=_times_sqrt_hidden,
        mask_as_array=True,
        final_logit_softcap="final_logit_softcapping",
        tested=True,
    ),
    "gemma3_text": StageFamily(embedding_scale=_times_sqrt_hidden_rounded_to_bfloat16, tested=True),
}


def family_for(module_name: str) -> StageFamily:
    """The stage description for the mlx-lm module ``mlx_lm.models.<module_name>``."""
    return FAMILIES.get(module_name, DEFAULT_FAMILY)


class UnsupportedFamilyError(ValueError):
    """mlx-lm has no model class for the directory's ``model_type``."""


def mlx_lm_module(config: Mapping[str, Any]) -> str:
    """The mlx-lm module that builds the model config.json describes (``llama`` for
    ``mistral``: mlx-lm's own remapping); raises :class:`UnsupportedFamilyError`.

    A family of :data:`FAMILIES` is its own module: that needs only to find the module's
    file. Any other imports mlx-lm (and through it transformers: a few seconds of CPU,
    once per process) to ask mlx-lm's own rule."""
    model_type = config.get("model_type")
    if isinstance(model_type, str) and model_type in FAMILIES and _has_module_file(model_type):
        return model_type
    from mlx_lm.utils import _get_classes  # pyright: ignore[reportPrivateUsage]

    try:
        model_class, _ = _get_classes(dict(config))
    except (ValueError, KeyError) as error:
        raise UnsupportedFamilyError(
            f"mlx-lm has no model for model_type {config.get('model_type')!r}"
        ) from error
    return str(model_class.__module__).rsplit(".", 1)[-1]


def _has_module_file(module_name: str) -> bool:
    """Whether ``mlx_lm/models/<module_name>.py`` exists (found without importing mlx-lm)."""
    spec = importlib.util.find_spec("mlx_lm")
    if spec is None or spec.origin is None:
        return False
    return (Path(spec.origin).parent / "models" / f"{module_name}.py").is_file()
