"""MLX-format Llama model directories: find them, describe them as model cards, load stages.

A directory is a model when it holds

* ``config.json`` with ``model_type == "llama"`` (``num_hidden_layers``, ``hidden_size``,
  ``intermediate_size``, ``num_attention_heads``, ``num_key_value_heads``, optional
  ``head_dim``, ``rope_theta``, ``rms_norm_eps``, ``max_position_embeddings``,
  ``vocab_size``, ``tie_word_embeddings``, ``rope_scaling``) and, for quantised weights,
  ``quantization: {group_size, bits}`` (per-module overrides keyed by module path, e.g.
  ``"model.embed_tokens": {"group_size": 32, "bits": 8}``, or ``false`` for a module left
  dense);
* one or more ``*.safetensors`` files with Hugging Face tensor names
  (``model.embed_tokens``, ``model.layers.N.self_attn.{q,k,v,o}_proj``,
  ``model.layers.N.mlp.{gate,up,down}_proj``, ``model.layers.N.input_layernorm``,
  ``model.layers.N.post_attention_layernorm``, ``model.norm``, ``lm_head``); a quantised
  linear is MLX's affine triplet ``.weight`` (packed ``uint32``), ``.scales``, ``.biases``;
* ``tokenizer.json`` (the ``tokenizers`` library's format) and a chat template, in
  ``tokenizer_config.json`` (``chat_template``) or ``chat_template.jinja``.

Sizes for the card come from the safetensors headers alone (no tensor is read). A stage
loads lazily: MLX maps safetensors tensors on demand, so a rank reads only the tensors of
its layers and end pieces. The weights land in the same :class:`StageWeights` the GGUF
loader builds, with ``rope_traditional=False``: Hugging Face checkpoints keep Q/K rows in
the order that pairs the two halves of each head for rotary embeddings, where GGUF files
hold llama.cpp's interleaved permutation of them.
"""

import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import mlx.core as mx
from loguru import logger
from tokenizers import Tokenizer

from exo.models.cards import kv_cache_bytes_per_token
from exo.models.gguf import (
    LinearWeights,
    LlamaHyperparameters,
    StageWeights,
    TensorNames,
    assemble_stage,
)
from exo.models.tokenizer import (
    ChatTemplate,
    GGUFTokenizer,
    byte_level_token_bytes,
    stop_token_ids,
)
from exo.shared.types.models import ModelCard

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
GENERATION_CONFIG_FILE = "generation_config.json"
WEIGHTS_GLOB = "*.safetensors"

SUPPORTED_MODEL_TYPES = {"llama"}
SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
LAYERS_PREFIX = "model.layers."
EMBEDDING = "model.embed_tokens"
FINAL_NORM = "model.norm"
LM_HEAD = "lm_head"

# Per layer: our name -> the module's name under ``model.layers.N.``.
LAYER_LINEARS = {
    "query": "self_attn.q_proj",
    "key": "self_attn.k_proj",
    "value": "self_attn.v_proj",
    "attention_output": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
LAYER_NORMS = {"attention_norm": "input_layernorm", "feed_forward_norm": "post_attention_layernorm"}
HF_NAMES = TensorNames(
    layer_prefix=LAYERS_PREFIX,
    layer_modules={**LAYER_LINEARS, **LAYER_NORMS},
    embedding=EMBEDDING,
    final_norm=FINAL_NORM,
    head=LM_HEAD,
)

_SAFETENSORS_DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "I16": 2,
    "F16": 2,
    "BF16": 2,
    "U32": 4,
    "I32": 4,
    "F32": 4,
    "U64": 8,
    "I64": 8,
    "F64": 8,
}
_MAX_HEADER_BYTES = 100 * 1024 * 1024

JsonObject = dict[str, object]


class MLXDirectoryError(ValueError):
    """A model directory this loader cannot use; the message names the file and the problem."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


# --- files --------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as a safetensors header describes it."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor names, dtypes, shapes and byte sizes from a safetensors file's JSON header
    (an 8-byte little-endian length, then that many bytes of JSON); no tensor is read."""
    try:
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) != 8:
                raise MLXDirectoryError(path, "too short to be a safetensors file")
            (length,) = struct.unpack("<Q", prefix)
            if length > _MAX_HEADER_BYTES:
                raise MLXDirectoryError(path, f"implausible safetensors header size {length}")
            raw = handle.read(length)
            file_size = path.stat().st_size
    except OSError as error:
        raise MLXDirectoryError(path, f"cannot read: {error.strerror or error}") from error
    if len(raw) != length:
        raise MLXDirectoryError(path, "safetensors header is truncated")
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise MLXDirectoryError(path, f"safetensors header is not JSON: {error}") from error
    if not isinstance(header, dict):
        raise MLXDirectoryError(path, "safetensors header is not a JSON object")
    data_size = file_size - 8 - length
    tensors: dict[str, TensorInfo] = {}
    for name, entry in cast(JsonObject, header).items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise MLXDirectoryError(path, f"tensor '{name}' has a malformed header entry")
        fields = cast(JsonObject, entry)
        dtype = fields.get("dtype")
        shape = fields.get("shape")
        offsets = fields.get("data_offsets")
        if (
            not isinstance(dtype, str)
            or not isinstance(shape, list)
            or not isinstance(offsets, list)
            or len(cast(list[object], offsets)) != 2
        ):
            raise MLXDirectoryError(path, f"tensor '{name}' has a malformed header entry")
        dims = [int(cast(int, d)) for d in cast(list[object], shape)]
        begin, end = (int(cast(int, o)) for o in cast(list[object], offsets))
        item_bytes = _SAFETENSORS_DTYPE_BYTES.get(dtype)
        if item_bytes is None:
            raise MLXDirectoryError(path, f"tensor '{name}' has unsupported dtype {dtype}")
        if not 0 <= begin <= end <= data_size or end - begin != math.prod(dims) * item_bytes:
            raise MLXDirectoryError(
                path, f"tensor '{name}' data offsets do not match its shape or the file size"
            )
        tensors[name] = TensorInfo(file=path, dtype=dtype, shape=tuple(dims), nbytes=end - begin)
    return tensors


def _read_json_object(path: Path) -> JsonObject:
    if not path.is_file():
        raise MLXDirectoryError(path, "missing")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise MLXDirectoryError(path, f"cannot read: {error.strerror or error}") from error
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise MLXDirectoryError(path, f"not valid JSON: {error}") from error
    if not isinstance(value, dict):
        raise MLXDirectoryError(path, "not a JSON object")
    return cast(JsonObject, value)


def tensor_index(directory: Path) -> dict[str, TensorInfo]:
    """Every tensor of the directory's ``*.safetensors`` files, by name."""
    files = sorted(directory.glob(WEIGHTS_GLOB))
    if not files:
        raise MLXDirectoryError(directory, "no *.safetensors weights")
    index: dict[str, TensorInfo] = {}
    for file in files:
        for name, info in read_safetensors_header(file).items():
            if name in index:
                raise MLXDirectoryError(file, f"tensor '{name}' is also in {index[name].file.name}")
            index[name] = info
    return index


# --- configuration ------------------------------------------------------------------------


@dataclass(frozen=True)
class Quantization:
    group_size: int
    bits: int


@dataclass(frozen=True)
class DirectoryModel:
    """What a directory's config.json and safetensors headers say, checked for consistency."""

    directory: Path
    hyperparameters: LlamaHyperparameters
    tensors: dict[str, TensorInfo]
    default_quantization: Quantization | None
    quantization_overrides: dict[str, Quantization | None]

    def quantization_for(self, module: str) -> Quantization | None:
        if module in self.quantization_overrides:
            return self.quantization_overrides[module]
        return self.default_quantization


def _int(config: JsonObject, key: str, path: Path, default: int | None = None) -> int:
    value = config.get(key)
    if value is None:
        if default is None:
            raise MLXDirectoryError(path, f"has no '{key}'")
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise MLXDirectoryError(path, f"'{key}' is not a positive integer: {value!r}")
    return value


def _float(config: JsonObject, key: str, path: Path, default: float) -> float:
    value = config.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MLXDirectoryError(path, f"'{key}' is not a number: {value!r}")
    return float(value)


def _quantization(value: object, path: Path, where: str) -> Quantization:
    if not isinstance(value, dict):
        raise MLXDirectoryError(path, f"'{where}' is not an object")
    fields = cast(JsonObject, value)
    mode = fields.get("mode", "affine")
    if mode != "affine":
        raise MLXDirectoryError(path, f"'{where}': quantization mode {mode!r} is not supported")
    group_size = _int(fields, "group_size", path)
    bits = _int(fields, "bits", path)
    if bits not in SUPPORTED_BITS:
        raise MLXDirectoryError(path, f"'{where}': {bits}-bit quantization is not supported")
    return Quantization(group_size=group_size, bits=bits)


def rope_periods(
    config: JsonObject, path: Path, base: float, dimension: int
) -> tuple[float, ...] | None:
    """Rotation periods per rotary pair for ``config["rope_scaling"]``, or None when the
    plain ``base`` applies. ``linear`` stretches every period by ``factor``; ``llama3``
    (Llama 3.1) stretches long wavelengths by ``factor``, keeps short ones and blends the
    band in between."""
    scaling = config.get("rope_scaling")
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise MLXDirectoryError(path, "'rope_scaling' is not an object")
    fields = cast(JsonObject, scaling)
    kind = fields.get("rope_type", fields.get("type", "default"))
    periods = [base ** (index / dimension) for index in range(0, dimension, 2)]
    if kind == "default":
        return None
    factor = _float(fields, "factor", path, 1.0)
    if kind == "linear":
        return tuple(period * factor for period in periods)
    if kind == "llama3":
        low = _float(fields, "low_freq_factor", path, 1.0)
        high = _float(fields, "high_freq_factor", path, 4.0)
        original = _float(fields, "original_max_position_embeddings", path, 8192.0)
        low_wavelength, high_wavelength = original / low, original / high
        result: list[float] = []
        for period in periods:
            wavelength = 2 * math.pi * period
            if wavelength < high_wavelength:
                result.append(period)
            elif wavelength > low_wavelength:
                result.append(period * factor)
            else:
                smooth = (original / wavelength - low) / (high - low)
                frequency = (1 - smooth) / (period * factor) + smooth / period
                result.append(1 / frequency)
        return tuple(result)
    raise MLXDirectoryError(path, f"rope_scaling type {kind!r} is not supported")


def _check_linear(model: DirectoryModel, module: str) -> None:
    """The module's tensors exist and their shapes agree with its quantization."""
    weight = model.tensors.get(f"{module}.weight")
    config_path = model.directory / CONFIG_FILE
    if weight is None:
        raise MLXDirectoryError(model.directory, f"no tensor '{module}.weight'")
    scales = model.tensors.get(f"{module}.scales")
    quantization = model.quantization_for(module)
    if scales is None:
        if len(weight.shape) != 2:
            raise MLXDirectoryError(weight.file, f"'{module}.weight' is not a matrix")
        return
    if quantization is None:
        raise MLXDirectoryError(
            config_path, f"'{module}' is quantised but config.json has no 'quantization'"
        )
    if f"{module}.biases" not in model.tensors:
        raise MLXDirectoryError(weight.file, f"'{module}' has scales but no biases")
    in_features = scales.shape[-1] * quantization.group_size
    if weight.shape[-1] * 32 != in_features * quantization.bits:
        raise MLXDirectoryError(
            weight.file,
            f"'{module}': {weight.shape[-1]} packed columns do not hold {in_features} inputs "
            f"at {quantization.bits} bits",
        )


def read_directory_model(directory: Path) -> DirectoryModel:
    """Read and check config.json against the safetensors headers (no tensor is read)."""
    config_path = directory / CONFIG_FILE
    config = _read_json_object(config_path)
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise MLXDirectoryError(
            config_path, f"model_type {model_type!r} is not supported (want 'llama')"
        )
    tensors = tensor_index(directory)
    hidden_size = _int(config, "hidden_size", config_path)
    head_count = _int(config, "num_attention_heads", config_path)
    head_dim = _int(config, "head_dim", config_path, hidden_size // head_count)
    rope_base = _float(config, "rope_theta", config_path, 10000.0)
    tied = config.get("tie_word_embeddings")
    if tied is None:
        tied = f"{LM_HEAD}.weight" not in tensors
    if not isinstance(tied, bool):
        raise MLXDirectoryError(config_path, f"'tie_word_embeddings' is not a boolean: {tied!r}")
    hyperparameters = LlamaHyperparameters(
        block_count=_int(config, "num_hidden_layers", config_path),
        hidden_size=hidden_size,
        intermediate_size=_int(config, "intermediate_size", config_path),
        head_count=head_count,
        head_count_kv=_int(config, "num_key_value_heads", config_path, head_count),
        head_dim=head_dim,
        rope_dimension=head_dim,
        rope_base=rope_base,
        rms_norm_eps=_float(config, "rms_norm_eps", config_path, 1e-6),
        context_length=_int(config, "max_position_embeddings", config_path, 4096),
        vocab_size=_int(config, "vocab_size", config_path),
        tied_embeddings=tied,
        rope_traditional=bool(config.get("rope_traditional", False)),
        rope_periods=rope_periods(config, config_path, rope_base, head_dim),
    )
    raw_quantization = config.get("quantization", config.get("quantization_config"))
    default: Quantization | None = None
    overrides: dict[str, Quantization | None] = {}
    if raw_quantization is not None:
        if not isinstance(raw_quantization, dict):
            raise MLXDirectoryError(config_path, "'quantization' is not an object")
        fields = cast(JsonObject, raw_quantization)
        default = _quantization(
            {k: v for k, v in fields.items() if not isinstance(v, dict | bool)},
            config_path,
            "quantization",
        )
        for key, value in fields.items():
            if isinstance(value, bool):
                overrides[key] = default if value else None
            elif isinstance(value, dict):
                overrides[key] = _quantization(value, config_path, f"quantization.{key}")
    model = DirectoryModel(
        directory=directory,
        hyperparameters=hyperparameters,
        tensors=tensors,
        default_quantization=default,
        quantization_overrides=overrides,
    )
    for index in range(hyperparameters.block_count):
        prefix = f"{LAYERS_PREFIX}{index}."
        for module in LAYER_LINEARS.values():
            _check_linear(model, prefix + module)
        for module in LAYER_NORMS.values():
            if f"{prefix}{module}.weight" not in tensors:
                raise MLXDirectoryError(directory, f"no tensor '{prefix}{module}.weight'")
    _check_linear(model, EMBEDDING)
    if f"{FINAL_NORM}.weight" not in tensors:
        raise MLXDirectoryError(directory, f"no tensor '{FINAL_NORM}.weight'")
    if not tied:
        _check_linear(model, LM_HEAD)
    return model


# --- cards ----------------------------------------------------------------------------------


def layer_of(tensor_name: str) -> int | None:
    """N for ``model.layers.N.*``, else None."""
    if not tensor_name.startswith(LAYERS_PREFIX):
        return None
    number = tensor_name[len(LAYERS_PREFIX) :].split(".", 1)[0]
    return int(number) if number.isdigit() else None


def card_from_directory(directory: Path) -> ModelCard:
    """A model card for an MLX model directory (model id = the directory's name).

    Layer bytes are the largest ``model.layers.N.*`` total (so every layer fits); all other
    tensors count as non-layer bytes. Raises :class:`MLXDirectoryError` when something the
    runner will need is missing or inconsistent, tokenizer files included.
    """
    model_id = directory.name
    directory = directory.resolve()
    model = read_directory_model(directory)
    hyperparameters = model.hyperparameters
    if not (directory / TOKENIZER_FILE).is_file():
        raise MLXDirectoryError(directory / TOKENIZER_FILE, "missing")
    read_chat_template(directory)
    per_layer = [0] * hyperparameters.block_count
    non_layer_bytes = 0
    for name, info in model.tensors.items():
        layer = layer_of(name)
        if layer is None:
            non_layer_bytes += info.nbytes
        elif layer < hyperparameters.block_count:
            per_layer[layer] += info.nbytes
        else:
            raise MLXDirectoryError(
                info.file,
                f"tensor '{name}' is beyond num_hidden_layers={hyperparameters.block_count}",
            )
    return ModelCard(
        model_id=model_id,
        n_layers=hyperparameters.block_count,
        layer_bytes=max(per_layer),
        non_layer_bytes=non_layer_bytes,
        hidden_size=hyperparameters.hidden_size,
        kv_cache_bytes_per_token=kv_cache_bytes_per_token(
            hyperparameters.block_count, hyperparameters.head_count_kv, hyperparameters.head_dim
        ),
        context_length=hyperparameters.context_length,
        source="mlx_directory",
        weights_path=str(directory),
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
        except (OSError, ValueError) as error:  # MLXDirectoryError names the file
            logger.warning(f"skipping model directory {child.name}: {error}")
    return cards


# --- loading a stage ----------------------------------------------------------------------


def _load_tensors(model: DirectoryModel) -> dict[str, mx.array]:
    """Every tensor of the directory, lazily mapped from its file (read when evaluated)."""
    result: dict[str, mx.array] = {}
    for file in sorted({info.file for info in model.tensors.values()}):
        loaded = mx.load(str(file))
        if not isinstance(loaded, dict):
            raise MLXDirectoryError(file, "did not load as a dictionary of arrays")
        result.update(loaded)
    return result


def _linear(model: DirectoryModel, tensors: dict[str, mx.array], module: str) -> LinearWeights:
    weight = tensors[f"{module}.weight"]
    scales = tensors.get(f"{module}.scales")
    quantization = model.quantization_for(module)
    if scales is None or quantization is None:
        return LinearWeights(weight=weight)
    return LinearWeights(
        weight=weight,
        scales=scales,
        biases=tensors[f"{module}.biases"],
        bits=quantization.bits,
        group_size=quantization.group_size,
    )


def load_directory_stage(
    directory: Path, layer_start: int = 0, layer_end: int | None = None
) -> StageWeights:
    """Layers ``[layer_start, layer_end)`` of an MLX model directory, plus the embedding
    (first stage; last stage too with a tied head) and the final norm and head (last
    stage). Only those tensors are read from disk."""
    model = read_directory_model(directory)

    def linear(tensors: dict[str, mx.array], module: str) -> LinearWeights:
        return _linear(model, tensors, module)

    return assemble_stage(
        model.hyperparameters,
        _load_tensors(model),
        HF_NAMES,
        linear,
        layer_start,
        layer_end,
        directory.name,
    )


# --- tokenizer ------------------------------------------------------------------------------


def read_chat_template(directory: Path) -> str:
    """The chat template: ``tokenizer_config.json``'s ``chat_template`` (a string, or a list
    of named templates, of which ``default`` is used), else ``chat_template.jinja``."""
    config_path = directory / TOKENIZER_CONFIG_FILE
    template: object = None
    if config_path.is_file():
        template = _read_json_object(config_path).get("chat_template")
    if isinstance(template, list):
        named = {
            str(cast(JsonObject, entry).get("name")): cast(JsonObject, entry).get("template")
            for entry in cast(list[object], template)
            if isinstance(entry, dict)
        }
        template = named.get("default")
    if isinstance(template, str) and template:
        return template
    jinja_path = directory / CHAT_TEMPLATE_FILE
    if jinja_path.is_file():
        return jinja_path.read_text(encoding="utf-8")
    if not config_path.is_file():
        raise MLXDirectoryError(config_path, "missing (it holds the chat template)")
    raise MLXDirectoryError(config_path, "has no 'chat_template'")


def _token_text(value: object) -> str | None:
    """``"<s>"`` or ``{"content": "<s>", ...}`` (both forms occur in tokenizer_config.json)."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        content = cast(JsonObject, value).get("content")
        return content if isinstance(content, str) else None
    return None


def _token_ids(value: object) -> list[int]:
    """``eos_token_id`` may be an int or a list of ints."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [item for item in cast(list[object], value) if isinstance(item, int)]
    return []


def _decoder_kinds(decoder: object) -> set[str]:
    """Types of a tokenizer.json decoder, looking inside ``Sequence`` decoders."""
    if not isinstance(decoder, dict):
        return set()
    fields = cast(JsonObject, decoder)
    kinds = {str(fields.get("type"))}
    inner = fields.get("decoders")
    if isinstance(inner, list):
        for item in cast(list[object], inner):
            kinds |= _decoder_kinds(item)
    return kinds


class DirectoryTokenizer(GGUFTokenizer):
    """The tokenizer of an MLX model directory, with :class:`GGUFTokenizer`'s interface
    (encode, chat template, stop tokens, byte-exact streaming decode), built from
    ``tokenizer.json``, ``tokenizer_config.json`` and ``config.json`` instead of GGUF
    metadata."""

    def __init__(self, directory: Path) -> None:  # builds every attribute the base class sets
        tokenizer_path = directory / TOKENIZER_FILE
        raw = _read_json_object(tokenizer_path)
        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_path))
        except Exception as error:  # the library raises its own exception type
            raise MLXDirectoryError(tokenizer_path, f"cannot load: {error}") from error
        config_path = directory / TOKENIZER_CONFIG_FILE
        tokenizer_config = _read_json_object(config_path) if config_path.is_file() else {}
        model_config = _read_json_object(directory / CONFIG_FILE)
        generation_path = directory / GENERATION_CONFIG_FILE
        generation_config = _read_json_object(generation_path) if generation_path.is_file() else {}

        size = tokenizer.get_vocab_size(with_added_tokens=True)
        tokens = [tokenizer.id_to_token(index) or "" for index in range(size)]
        added = raw.get("added_tokens")
        special: set[int] = set()
        added_ids: set[int] = set()
        for entry in cast(list[object], added) if isinstance(added, list) else []:
            if isinstance(entry, dict):
                fields = cast(JsonObject, entry)
                token_id = fields.get("id")
                if isinstance(token_id, int) and 0 <= token_id < size:
                    added_ids.add(token_id)
                    if fields.get("special") is True:
                        special.add(token_id)
        self.special_token_ids = frozenset(special)
        self._tokenizer = tokenizer
        self._tokens = tokens
        self._token_bytes = self._build_token_bytes(tokenizer, tokens, added_ids, raw)

        def lookup(text: str | None) -> int | None:
            return tokenizer.token_to_id(text) if text is not None else None

        bos_text = _token_text(tokenizer_config.get("bos_token"))
        eos_text = _token_text(tokenizer_config.get("eos_token"))
        bos_ids = _token_ids(model_config.get("bos_token_id"))
        self.bos_token_id = lookup(bos_text)
        if self.bos_token_id is None and bos_ids:
            self.bos_token_id = bos_ids[0]
        eos_ids = [
            *([found] if (found := lookup(eos_text)) is not None else []),
            *_token_ids(model_config.get("eos_token_id")),
            *_token_ids(generation_config.get("eos_token_id")),
        ]
        if not eos_ids:
            raise MLXDirectoryError(
                directory, "no end-of-sequence token (eos_token / eos_token_id)"
            )
        self.eos_token_id = eos_ids[0]
        self.stop_token_ids = stop_token_ids(eos_ids, special, tokenizer.token_to_id)

        add_bos = tokenizer_config.get("add_bos_token")
        if isinstance(add_bos, bool):
            self.add_bos_token = add_bos
        else:  # the post-processor may add it (e.g. Llama 3's template processing)
            with_special = tokenizer.encode("a", add_special_tokens=True).ids
            self.add_bos_token = bool(with_special) and with_special[0] == self.bos_token_id
        bos_token = bos_text or (tokens[self.bos_token_id] if self.bos_token_id is not None else "")
        self.chat_template = ChatTemplate(
            source=read_chat_template(directory),
            bos_token=bos_token,
            eos_token=eos_text or tokens[self.eos_token_id],
        )

    @staticmethod
    def _build_token_bytes(
        tokenizer: Tokenizer, tokens: list[str], added_ids: set[int], raw: JsonObject
    ) -> list[bytes]:
        """The bytes each token stands for. Byte-level BPE tokens are in GPT-2's printable
        byte alphabet; SentencePiece-style tokens use ``▁`` for a space and ``<0xNN>`` for
        a raw byte; anything else is decoded by the library one token at a time."""
        kinds = _decoder_kinds(raw.get("decoder"))
        if "ByteLevel" in kinds:
            return byte_level_token_bytes(tokens, added_ids)
        result: list[bytes] = []
        byte_fallback = "ByteFallback" in kinds
        for index, token in enumerate(tokens):
            if index in added_ids:
                result.append(token.encode("utf-8"))
            elif byte_fallback and len(token) == 6 and token.startswith("<0x") and token[-1] == ">":
                result.append(bytes([int(token[3:5], 16)]))
            elif byte_fallback:
                result.append(token.replace("\u2581", " ").encode("utf-8"))
            else:
                result.append(tokenizer.decode([index], skip_special_tokens=False).encode("utf-8"))
        return result

    def encode_chat(
        self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True
    ) -> list[int]:
        """Like the base class, without a second BOS when the template writes one."""
        text = self.apply_chat_template(messages, add_generation_prompt)
        bos_text = self.chat_template.bos_token if self.chat_template is not None else ""
        add_bos = self.add_bos_token and not (bos_text and text.startswith(bos_text))
        return self.encode(text, add_bos=add_bos)
