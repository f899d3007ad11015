"""MLX model directories: find them and describe each as a model card.

A directory is a model when it holds ``config.json`` (a ``model_type`` mlx-lm implements),
its weights as ``model*.safetensors`` (mlx-lm's names; quantised linears as MLX's affine
``weight``/``scales``/``biases`` triplets) and its tokenizer (``tokenizer.json`` or
``tokenizer.model``, with a chat template in ``tokenizer_config.json``,
``chat_template.jinja`` or ``chat_template.json``). This is the layout ``mlx_lm.convert``
writes and that mlx-community publishes.

The card is read from config.json and the safetensors headers alone; no tensor is read:

* layers, hidden size, heads and context come from config.json (:class:`ModelConfig`);
* ``layer_bytes`` is the largest total of one decoder layer's tensors (those under
  ``…layers.N.``), so every layer fits where the card says one does; every other tensor
  (embedding, final norm, head) is ``non_layer_bytes``;
* the KV cache holds keys and values for every layer in the activations' dtype, the widest
  float dtype among the weights other than quantisation scales and biases (norms in
  float32 make the activations float32):
  ``layers × 2 × kv_heads × head_dim × bytes``.
"""

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, cast

from loguru import logger

from exo.models.config import ModelConfig
from exo.models.families import mlx_lm_module
from exo.models.safetensors import DTYPE_BYTES, TensorInfo, tensor_index
from exo.shared.types.models import ModelCard, WeightsSource

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
_LAYER = re.compile(r"^(?P<prefix>(?:.*\.)?)layers\.(?P<index>\d+)\.")
_FLOAT_DTYPES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
_QUANTISATION_PARTS = (".scales", ".biases")


class ModelDirectoryError(ValueError):
    """A directory that is not a usable model; the message names the file and the problem."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


def _has_chat_template(directory: Path) -> bool:
    if any((directory / name).is_file() for name in CHAT_TEMPLATE_FILES):
        return True
    config_path = directory / TOKENIZER_CONFIG_FILE
    if not config_path.is_file():
        return False
    try:
        config: object = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelDirectoryError(config_path, f"cannot read: {error}") from error
    return isinstance(config, dict) and bool(cast(dict[str, Any], config).get("chat_template"))


def _layer_bytes(
    tensors: dict[str, TensorInfo], n_layers: int, directory: Path
) -> tuple[list[int], int]:
    """Bytes per decoder layer and bytes of everything else. The decoder layers are the
    ``…layers.N.`` tensors under the prefix that has them all (a multimodal checkpoint
    may have other numbered layers, e.g. of a vision tower)."""
    by_prefix: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    for name, info in tensors.items():
        match = _LAYER.match(name)
        if match is not None:
            by_prefix[match["prefix"]][int(match["index"])] += info.nbytes
    complete = [
        prefix for prefix, layers in by_prefix.items() if all(i in layers for i in range(n_layers))
    ]
    if not complete:
        found = max((len(layers) for layers in by_prefix.values()), default=0)
        raise ModelDirectoryError(
            directory, f"config.json has {n_layers} layers but the weights hold {found}"
        )
    prefix = max(complete, key=lambda candidate: sum(by_prefix[candidate].values()))
    per_layer = [by_prefix[prefix][index] for index in range(n_layers)]
    # Layers past num_hidden_layers (e.g. multi-token-prediction heads) are dropped by
    # mlx-lm when it loads; they count towards nothing.
    extra = sum(size for index, size in by_prefix[prefix].items() if index >= n_layers)
    total = sum(info.nbytes for info in tensors.values())
    return per_layer, total - sum(per_layer) - extra


def _module_bytes(tensors: dict[str, TensorInfo], module: str) -> int:
    """Bytes of the tensors of one top-level module (``embed_tokens``, ``lm_head``): its
    weight and, when quantised, its scales and biases."""
    return sum(
        info.nbytes
        for name, info in tensors.items()
        if name == module or name.startswith(f"{module}.") or f".{module}." in name
    )


def _parameters(tensors: dict[str, TensorInfo], names: list[str], bits: int | None) -> int:
    """Weights in ``names``: a packed quantised weight (uint32) holds 32/bits of them; scales
    and biases are bookkeeping, not weights."""
    count = 0
    for name in names:
        info = tensors[name]
        if name.endswith(_QUANTISATION_PARTS):
            continue
        elements = 1
        for size in info.shape:
            elements *= size
        count += elements * (32 // bits) if info.dtype == "U32" and bits else elements
    return count


def activation_bytes(tensors: dict[str, TensorInfo]) -> int:
    """Bytes per activation element: the widest float dtype among the weights that are not
    quantisation scales or biases (2 when there is none)."""
    widths = [
        _FLOAT_DTYPES[info.dtype]
        for name, info in tensors.items()
        if info.dtype in _FLOAT_DTYPES and not name.endswith(_QUANTISATION_PARTS)
    ]
    return max(widths, default=DTYPE_BYTES["F16"])


def _quantisation_bits(raw_config: dict[str, Any]) -> int | None:
    quantisation = raw_config.get("quantization") or raw_config.get("quantization_config")
    if isinstance(quantisation, dict):
        bits = cast(dict[str, Any], quantisation).get("bits")
        if isinstance(bits, int) and bits > 0:
            return bits
    return None


def card_from_directory(
    directory: Path,
    *,
    model_id: str | None = None,
    source: WeightsSource = "mlx_directory",
    weights_path: Path | None = None,
) -> ModelCard:
    """The card of the MLX model directory (model id: the directory's name unless given).

    Raises :class:`ModelDirectoryError` (or a ``ValueError`` naming the file) when
    something a runner will need is missing, inconsistent or not supported by mlx-lm."""
    model_id = model_id or directory.name  # the name it is listed under, even as a link
    directory = directory.resolve()
    config, raw_config = ModelConfig.read(directory)
    family = mlx_lm_module(raw_config)
    tensors = tensor_index(directory)
    per_layer, non_layer_bytes = _layer_bytes(tensors, config.num_hidden_layers, directory)
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise ModelDirectoryError(directory, "no tokenizer.json or tokenizer.model")
    if not _has_chat_template(directory):
        raise ModelDirectoryError(directory, "no chat template (tokenizer_config.json or .jinja)")
    element_bytes = activation_bytes(tensors)
    layer_zero = [name for name in tensors if _LAYER.match(name) and ".layers.0." in f".{name}"]
    embedding = _module_bytes(tensors, "embed_tokens")
    head = _module_bytes(tensors, "lm_head")
    return ModelCard(
        model_id=model_id,
        family=family,
        n_layers=config.num_hidden_layers,
        layer_bytes=max(per_layer),
        non_layer_bytes=non_layer_bytes,
        hidden_size=config.hidden_size,
        kv_cache_bytes_per_token=(
            config.num_hidden_layers * 2 * config.kv_heads * config.head_size * element_bytes
        ),
        context_length=config.context_length,
        activation_bytes_per_token=config.hidden_size * element_bytes,
        vocab_size=config.vocab_size or 0,
        embedding_bytes=embedding,
        lm_head_bytes=head,
        tied_embeddings=head == 0,
        parameters_per_layer=_parameters(tensors, layer_zero, _quantisation_bits(raw_config)),
        source=source,
        weights_path=str(weights_path or directory),
    )


def scan_models_dir(path: Path) -> list[ModelCard]:
    """Cards for every model directory directly under ``path`` (sorted by name). A
    subdirectory that is not a usable model is skipped with one warning saying why; an
    unreadable ``path`` raises ``OSError``."""
    cards: list[ModelCard] = []
    for child in sorted(path.iterdir()):
        if child.name.startswith(".") or not child.is_dir():
            continue
        try:
            cards.append(card_from_directory(child))
        except (OSError, ValueError) as error:  # each error names the file and the problem
            logger.warning(f"skipping model directory {child.name}: {error}")
    return cards
