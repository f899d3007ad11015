"""One pipeline stage of an mlx-lm model: a contiguous range of its decoder layers.

:func:`load_stage` builds the family's model with mlx-lm (``load_model(lazy=True)``: every
tensor is mapped from its safetensors file, none is read), cuts it down to layers
``[layer_start, layer_end)`` plus what the stage's position needs, and only then evaluates
the parameters, so a rank reads and holds only its share:

* the first stage keeps the embedding (and turns token ids into the hidden state);
* the last stage keeps the final norm and the output head (the embedding too when the head
  is tied to it) and turns the hidden state into logits;
* a middle stage keeps its layers alone.

A stage holding every layer is the whole model. It is called like an mlx-lm model,
``stage(inputs, cache)``, so mlx-lm's ``generate_step`` drives it in a single process; in a
pipeline each rank calls its own stage on what the previous rank sent. The per-family
differences around the layers (embedding scale, mask kind, logit soft cap) come from
:mod:`exo.models.families`.
"""

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn
from loguru import logger
from mlx.utils import tree_flatten
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import RotatingKVCache, make_prompt_cache
from mlx_lm.utils import load_model

from exo.models.config import DEFAULT_CONTEXT_LENGTH, ModelConfig
from exo.models.families import StageFamily, family_for


class StageLoadError(ValueError):
    """The model directory cannot be split into this stage; the message says why."""


@dataclass(frozen=True)
class _ModulePlace:
    """A child module: its parent and its name there."""

    parent: nn.Module
    name: str


def _owner_of_layers(model: nn.Module, layers: list[Any]) -> nn.Module:
    """The module whose ``layers`` attribute holds the model's decoder layers (``model.layers``
    may be a copy of that list, as for mlx-lm's pipeline-aware families)."""
    for _, module in [("", model), *model.named_modules()]:
        if not isinstance(module, nn.Module):
            continue
        candidate = module.get("layers")
        if (
            isinstance(candidate, list)
            and len(cast(list[Any], candidate)) == len(layers)
            and all(a is b for a, b in zip(cast(list[Any], candidate), layers, strict=True))
        ):
            return module
    raise StageLoadError("cannot find the module that holds the model's decoder layers")


def _find_child(model: nn.Module, name: str) -> _ModulePlace | None:
    """The (first) module named ``name`` anywhere in ``model``."""
    for _, module in model.named_modules():
        if isinstance(module, nn.Module) and isinstance(module.get(name), nn.Module):
            return _ModulePlace(parent=module, name=name)
    return None


def parameter_bytes(model: nn.Module) -> int:
    leaves = cast(list[tuple[str, mx.array]], tree_flatten(model.parameters()))
    return sum(array.nbytes for _, array in leaves)


class ModelStage:
    """Layers ``[layer_start, layer_end)`` of an mlx-lm model and the end pieces they need."""

    def __init__(
        self,
        model: nn.Module,
        config: dict[str, Any],
        family: StageFamily,
        layer_start: int,
        layer_end: int | None = None,
        context_length: int = DEFAULT_CONTEXT_LENGTH,
    ) -> None:
        all_layers = list(cast(list[Any], model.layers))
        total = len(all_layers)
        end = total if layer_end is None else layer_end
        if not 0 <= layer_start < end <= total:
            raise StageLoadError(f"layer range [{layer_start}, {end}) is not inside [0, {total})")
        owner = _owner_of_layers(model, all_layers)
        if family.embedding not in owner or family.final_norm not in owner:
            raise StageLoadError(
                f"the {type(model).__module__} model has no '{family.embedding}' or "
                f"'{family.final_norm}' beside its layers; exo cannot split this family"
            )
        head = _find_child(model, family.head)
        self.model = model
        self.family = family
        self.layer_start = layer_start
        self.layer_end = end
        self.n_layers_total = total
        self.is_first = layer_start == 0
        self.is_last = end == total
        self.tied_head = head is None
        self.context_length = context_length
        softcap = (
            getattr(model, family.final_logit_softcap, None) if family.final_logit_softcap else None
        )
        self.logit_softcap: float | None = float(softcap) if softcap is not None else None
        embedding: nn.Module = owner[family.embedding]
        probe = embedding(mx.array([[0]]))  # lazy: only its shape and dtype are read
        self.hidden_size: int = probe.shape[-1]
        self.activation_dtype: mx.Dtype = probe.dtype
        # Each new sequence gets fresh copies of the stage's share of the model's caches
        # (a family may mix plain and sliding-window caches across layers).
        self._cache_templates = make_prompt_cache(model)[layer_start:end]

        owner["layers"] = all_layers[layer_start:end]
        keeps_embedding = self.is_first or (self.is_last and self.tied_head)
        if not keeps_embedding:
            owner.pop(family.embedding)
        if not self.is_last:
            owner.pop(family.final_norm)
            if head is not None:
                head.parent.pop(head.name)
        self._embedding: nn.Module | None = owner.get(family.embedding)
        self._norm: nn.Module | None = owner.get(family.final_norm)
        self._head: nn.Module | None = head.parent[head.name] if head and self.is_last else None
        self.layers: list[Any] = owner["layers"]

    @property
    def nbytes(self) -> int:
        """Bytes of the parameters this stage holds."""
        return parameter_bytes(self.model)

    def parameters(self) -> Any:
        return self.model.parameters()

    def make_cache(self) -> list[Any]:
        """Empty KV caches for this stage's layers (one sequence)."""
        return copy.deepcopy(self._cache_templates)

    def embed(self, token_ids: mx.array) -> mx.array:
        if self._embedding is None:
            raise StageLoadError("only the first stage embeds token ids")
        hidden = self._embedding(token_ids)
        if self.family.embedding_scale is not None:
            hidden = self.family.embedding_scale(hidden, self.hidden_size)
        return hidden

    def run_layers(self, hidden: mx.array, cache: list[Any]) -> mx.array:
        masks: dict[int | None, Any] = {}
        for layer, layer_cache in zip(self.layers, cache, strict=True):
            window = layer_cache.max_size if isinstance(layer_cache, RotatingKVCache) else None
            if window not in masks:
                masks[window] = create_attention_mask(
                    hidden,
                    layer_cache,
                    window_size=window,
                    return_array=self.family.mask_as_array,
                )
            hidden = layer(hidden, masks[window], layer_cache)
        return hidden

    def logits(self, hidden: mx.array) -> mx.array:
        if self._norm is None:
            raise StageLoadError("only the last stage computes logits")
        hidden = self._norm(hidden)
        if self._head is not None:
            logits = self._head(hidden)
        elif self._embedding is not None:
            as_linear: Any = self._embedding.as_linear
            logits = as_linear(hidden)
        else:
            raise StageLoadError("the last stage has neither an output head nor a tied embedding")
        if self.logit_softcap is not None:
            logits = mx.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits

    def __call__(self, inputs: mx.array, cache: list[Any] | None = None) -> mx.array:
        """Token ids (first stage) or hidden states in; hidden states out, or logits for
        every position on the last stage (computed only if evaluated)."""
        hidden = self.embed(inputs) if self.is_first else inputs
        hidden = self.run_layers(hidden, cache if cache is not None else self.make_cache())
        return self.logits(hidden) if self.is_last else hidden


def mlx_lm_module_name(model: nn.Module) -> str:
    """``llama`` for a model built by ``mlx_lm.models.llama``."""
    return type(model).__module__.rsplit(".", 1)[-1]


LoadProgress = Callable[[int, int], None]
"""``progress(loaded_bytes, total_bytes)`` while a stage's weights are read."""

LOAD_STEPS = 32
"""A stage's parameters are evaluated (read from disk) in about this many parts, so that
loading can report progress between them."""


def evaluate_parameters(model: nn.Module, progress: LoadProgress | None = None) -> None:
    """Evaluate (read) every parameter of ``model`` in parts of about 1/LOAD_STEPS of its
    bytes, calling ``progress`` after each part and once before the first (0 loaded)."""
    flat = cast(list[tuple[str, mx.array]], tree_flatten(model.parameters()))
    leaves = [array for _, array in flat]
    if progress is None:
        mx.eval(leaves)
        return
    total = sum(array.nbytes for array in leaves)
    step = max(1, total // LOAD_STEPS)
    progress(0, total)
    loaded = 0
    part: list[mx.array] = []
    part_bytes = 0
    for array in leaves:
        part.append(array)
        part_bytes += array.nbytes
        if part_bytes >= step:
            mx.eval(part)
            loaded += part_bytes
            progress(loaded, total)
            part, part_bytes = [], 0
    if part:
        mx.eval(part)
        progress(total, total)


def load_stage(
    directory: Path,
    layer_start: int = 0,
    layer_end: int | None = None,
    progress: LoadProgress | None = None,
) -> ModelStage:
    """Layers ``[layer_start, layer_end)`` (None: to the last) of the MLX model directory,
    evaluated: only this stage's tensors are read from disk. ``progress(loaded, total)``
    hears, in bytes, how far the reading is (a few dozen calls, the last with all)."""
    try:
        model, config = load_model(directory, lazy=True)
    except (ValueError, FileNotFoundError, KeyError, TypeError) as error:
        raise StageLoadError(f"mlx-lm cannot build the model in {directory}: {error}") from error
    module = mlx_lm_module_name(model)
    family = family_for(module)
    if not family.tested:
        logger.warning(
            f"the {module} family is not among those exo's tests split into stages; "
            "its layers run through the generic stage wrapper"
        )
    hyperparameters, _ = ModelConfig.read(directory)
    stage = ModelStage(
        model, config, family, layer_start, layer_end, hyperparameters.context_length
    )
    evaluate_parameters(stage.model, progress)
    logger.debug(
        "loaded layers [{}, {}) of {} from {}: {:.1f} MB",
        stage.layer_start,
        stage.layer_end,
        stage.n_layers_total,
        directory.name,
        stage.nbytes / 1e6,
    )
    return stage
