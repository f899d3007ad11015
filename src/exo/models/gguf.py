"""Loading a Llama-architecture GGUF file with MLX, whole or one pipeline stage at a time.

``mx.load`` reads a GGUF file into a flat ``{name: array}`` dictionary plus a metadata
dictionary. Quantized tensors (Q4_0, Q4_1, Q8_0) come back already converted to MLX's affine
format as a triplet ``<name>.weight`` (``uint32``, packed), ``<name>.scales`` and
``<name>.biases`` (``float16``), one scale and bias per group of 32 values; other tensors
(the RMS-norm weights, F16/F32 matrices) come back as plain arrays under ``<name>.weight``.

The bit width of a quantized matrix is not stored separately; it follows from the shapes:
``in_features = scales.shape[-1] * group_size`` and ``bits = packed_columns * 32 / in_features``.

A stage keeps only what it runs: its layers ``[layer_start, layer_end)``, the token embedding
when it is the first stage (or when the output head is tied to the embedding and it is the
last stage), and the final norm and head when it is the last stage. Everything else is
dropped right after ``mx.load`` and the allocator's cache is cleared, so a process's memory
follows its share of the model.
"""

import gc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
from loguru import logger
from pydantic import BaseModel, ConfigDict

GGUF_GROUP_SIZE = 32
"""Every quantized GGUF type MLX loads (Q4_0, Q4_1, Q8_0) uses blocks of 32 values."""

LAYER_PREFIX = "blk."
TOKEN_EMBEDDING = "token_embd"
OUTPUT_NORM = "output_norm"
OUTPUT_HEAD = "output"

Metadata = dict[str, Any]


class GGUFFormatError(ValueError):
    """The file is not a Llama GGUF this loader understands; the message says what is off."""


class LlamaHyperparameters(BaseModel):
    """The shape of a Llama model, read from GGUF metadata (``llama.*`` keys)."""

    model_config = ConfigDict(frozen=True)

    block_count: int
    hidden_size: int
    intermediate_size: int
    head_count: int
    head_count_kv: int
    head_dim: int
    rope_dimension: int
    rope_base: float
    rms_norm_eps: float
    context_length: int
    vocab_size: int
    tied_embeddings: bool
    rope_traditional: bool = True
    """Rotary pairs: interleaved (GGUF keeps llama.cpp's Q/K row permutation) when True;
    the two halves of each head (Hugging Face / MLX checkpoints) when False."""
    rope_periods: tuple[float, ...] | None = None
    """Per-pair rotation periods (``base ** (2i / rope_dimension)``, rescaled), for rope
    scaling schemes; None: plain ``rope_base``."""


@dataclass
class LinearWeights:
    """One linear layer's weight, ``out_features x in_features``, quantized or dense."""

    weight: mx.array
    scales: mx.array | None = None
    biases: mx.array | None = None
    bits: int | None = None
    group_size: int = GGUF_GROUP_SIZE

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        if self.scales is None:
            return self.weight.shape[-1]
        return self.scales.shape[-1] * self.group_size

    @property
    def nbytes(self) -> int:
        total = self.weight.nbytes
        if self.scales is not None:
            total += self.scales.nbytes
        if self.biases is not None:
            total += self.biases.nbytes
        return total

    def arrays(self) -> list[mx.array]:
        return [a for a in (self.weight, self.scales, self.biases) if a is not None]


@dataclass
class LayerWeights:
    """One decoder block (GGUF names ``blk.N.*``)."""

    attention_norm: mx.array
    query: LinearWeights
    key: LinearWeights
    value: LinearWeights
    attention_output: LinearWeights
    feed_forward_norm: mx.array
    gate: LinearWeights
    up: LinearWeights
    down: LinearWeights

    def linears(self) -> list[LinearWeights]:
        return [
            self.query,
            self.key,
            self.value,
            self.attention_output,
            self.gate,
            self.up,
            self.down,
        ]

    @property
    def nbytes(self) -> int:
        return (
            sum(linear.nbytes for linear in self.linears())
            + self.attention_norm.nbytes
            + self.feed_forward_norm.nbytes
        )

    def arrays(self) -> list[mx.array]:
        result = [self.attention_norm, self.feed_forward_norm]
        for linear in self.linears():
            result.extend(linear.arrays())
        return result


@dataclass
class StageWeights:
    """What one pipeline stage holds: layers ``[layer_start, layer_end)`` and, as needed,
    the token embedding (first stage; last stage too when the head is tied to it) and the
    final norm + head (last stage)."""

    hyperparameters: LlamaHyperparameters
    layer_start: int
    layer_end: int
    layers: list[LayerWeights]
    token_embedding: LinearWeights | None
    output_norm: mx.array | None
    output_head: LinearWeights | None
    """None on the last stage when the head is tied: it then uses ``token_embedding``."""
    metadata: Metadata = field(default_factory=lambda: cast(Metadata, {}))

    @property
    def is_first(self) -> bool:
        return self.layer_start == 0

    @property
    def is_last(self) -> bool:
        return self.layer_end == self.hyperparameters.block_count

    @property
    def nbytes(self) -> int:
        """Bytes of weights this stage holds."""
        return sum(a.nbytes for a in self.arrays())

    def arrays(self) -> list[mx.array]:
        result: list[mx.array] = []
        for layer in self.layers:
            result.extend(layer.arrays())
        if self.token_embedding is not None:
            result.extend(self.token_embedding.arrays())
        if self.output_norm is not None:
            result.append(self.output_norm)
        if self.output_head is not None:
            result.extend(self.output_head.arrays())
        return result


# --- metadata -----------------------------------------------------------------------------


def scalar_int(array: mx.array) -> int:
    """A one-element integer array as ``int`` (``item()`` is typed as any scalar)."""
    return int(cast(int, array.item()))


def scalar_float(array: mx.array) -> float:
    """A one-element array as ``float``."""
    return float(cast(float, array.item()))


def _metadata_value(metadata: Metadata, key: str) -> object:
    if key not in metadata:
        raise GGUFFormatError(f"GGUF metadata has no '{key}'")
    return metadata[key]


def metadata_int(metadata: Metadata, key: str) -> int:
    value = _metadata_value(metadata, key)
    if isinstance(value, mx.array):
        return scalar_int(value)
    if isinstance(value, int):
        return value
    raise GGUFFormatError(f"GGUF metadata '{key}' is not an integer: {value!r}")


def metadata_float(metadata: Metadata, key: str) -> float:
    value = _metadata_value(metadata, key)
    if isinstance(value, mx.array):
        return scalar_float(value)
    if isinstance(value, int | float):
        return float(value)
    raise GGUFFormatError(f"GGUF metadata '{key}' is not a number: {value!r}")


def metadata_bool(metadata: Metadata, key: str, default: bool) -> bool:
    if key not in metadata:
        return default
    value = metadata[key]
    if isinstance(value, mx.array):
        return bool(value.item())
    return bool(value)


def metadata_str(metadata: Metadata, key: str) -> str:
    value = _metadata_value(metadata, key)
    if not isinstance(value, str):
        raise GGUFFormatError(f"GGUF metadata '{key}' is not a string: {value!r}")
    return value


def metadata_str_list(metadata: Metadata, key: str) -> list[str]:
    value = _metadata_value(metadata, key)
    if not isinstance(value, list):
        raise GGUFFormatError(f"GGUF metadata '{key}' is not a list")
    items = cast(list[object], value)
    if not all(isinstance(item, str) for item in items):
        raise GGUFFormatError(f"GGUF metadata '{key}' is not a list of strings")
    return cast(list[str], items)


def metadata_int_list(metadata: Metadata, key: str) -> list[int]:
    value = _metadata_value(metadata, key)
    if isinstance(value, mx.array):
        return cast(list[int], value.tolist())
    if isinstance(value, list):
        return [int(cast(int, item)) for item in cast(list[object], value)]
    raise GGUFFormatError(f"GGUF metadata '{key}' is not a list of integers")


def read_hyperparameters(metadata: Metadata, tensor_names: set[str]) -> LlamaHyperparameters:
    architecture = metadata_str(metadata, "general.architecture")
    if architecture != "llama":
        raise GGUFFormatError(f"unsupported GGUF architecture '{architecture}' (want 'llama')")
    hidden_size = metadata_int(metadata, "llama.embedding_length")
    head_count = metadata_int(metadata, "llama.attention.head_count")
    head_dim = hidden_size // head_count
    rope_dimension = (
        metadata_int(metadata, "llama.rope.dimension_count")
        if "llama.rope.dimension_count" in metadata
        else head_dim
    )
    vocab_size = (
        metadata_int(metadata, "llama.vocab_size")
        if "llama.vocab_size" in metadata
        else len(metadata_str_list(metadata, "tokenizer.ggml.tokens"))
    )
    return LlamaHyperparameters(
        block_count=metadata_int(metadata, "llama.block_count"),
        hidden_size=hidden_size,
        intermediate_size=metadata_int(metadata, "llama.feed_forward_length"),
        head_count=head_count,
        head_count_kv=metadata_int(metadata, "llama.attention.head_count_kv"),
        head_dim=head_dim,
        rope_dimension=rope_dimension,
        rope_base=(
            metadata_float(metadata, "llama.rope.freq_base")
            if "llama.rope.freq_base" in metadata
            else 10000.0
        ),
        rms_norm_eps=metadata_float(metadata, "llama.attention.layer_norm_rms_epsilon"),
        context_length=metadata_int(metadata, "llama.context_length"),
        vocab_size=vocab_size,
        tied_embeddings=f"{OUTPUT_HEAD}.weight" not in tensor_names,
    )


# --- tensors ------------------------------------------------------------------------------


def _linear(tensors: dict[str, mx.array], name: str) -> LinearWeights:
    weight_key = f"{name}.weight"
    if weight_key not in tensors:
        raise GGUFFormatError(f"GGUF has no tensor '{weight_key}'")
    weight = tensors[weight_key]
    scales = tensors.get(f"{name}.scales")
    if scales is None:
        return LinearWeights(weight=weight)
    biases = tensors.get(f"{name}.biases")
    in_features = scales.shape[-1] * GGUF_GROUP_SIZE
    packed_bits = weight.shape[-1] * 32
    if packed_bits % in_features != 0:
        raise GGUFFormatError(
            f"'{name}': {weight.shape[-1]} packed columns do not divide into {in_features} inputs"
        )
    bits = packed_bits // in_features
    if bits not in (2, 3, 4, 5, 6, 8):
        raise GGUFFormatError(f"'{name}': derived bit width {bits} is not supported")
    return LinearWeights(
        weight=weight, scales=scales, biases=biases, bits=bits, group_size=GGUF_GROUP_SIZE
    )


def stage_bounds(
    hyperparameters: LlamaHyperparameters, layer_start: int, layer_end: int | None
) -> tuple[int, bool, bool, bool]:
    """(end, is_first, is_last, needs_embedding) for the stage [layer_start, layer_end);
    raises ValueError when the range is not inside the model. The embedding is needed by
    the first stage, and by the last one when the output head is tied to it."""
    end = hyperparameters.block_count if layer_end is None else layer_end
    if not 0 <= layer_start < end <= hyperparameters.block_count:
        raise ValueError(
            f"layer range [{layer_start}, {end}) is not inside [0, {hyperparameters.block_count})"
        )
    is_first = layer_start == 0
    is_last = end == hyperparameters.block_count
    return end, is_first, is_last, is_first or (is_last and hyperparameters.tied_embeddings)


@dataclass(frozen=True)
class TensorNames:
    """Where a checkpoint format keeps the pieces of a Llama model: module names, whose
    tensors are ``<module>.weight`` (and ``.scales``/``.biases`` when quantized)."""

    layer_prefix: str
    """Layer N's modules are under ``f"{layer_prefix}{N}."``."""
    layer_modules: dict[str, str]
    """:class:`LayerWeights` field -> module name under the layer's prefix."""
    embedding: str
    final_norm: str
    head: str


GGUF_NAMES = TensorNames(
    layer_prefix=LAYER_PREFIX,
    layer_modules={
        "attention_norm": "attn_norm",
        "query": "attn_q",
        "key": "attn_k",
        "value": "attn_v",
        "attention_output": "attn_output",
        "feed_forward_norm": "ffn_norm",
        "gate": "ffn_gate",
        "up": "ffn_up",
        "down": "ffn_down",
    },
    embedding=TOKEN_EMBEDDING,
    final_norm=OUTPUT_NORM,
    head=OUTPUT_HEAD,
)


def assemble_stage(
    hyperparameters: LlamaHyperparameters,
    tensors: dict[str, mx.array],
    names: TensorNames,
    linear: Callable[[dict[str, mx.array], str], LinearWeights],
    layer_start: int,
    layer_end: int | None,
    source: str,
    metadata: Metadata | None = None,
) -> StageWeights:
    """The :class:`StageWeights` for layers ``[layer_start, layer_end)`` (None: to the last)
    picked out of ``tensors`` (both loaders' common part). ``linear`` builds one module's
    :class:`LinearWeights` (each format knows its quantization). ``tensors`` is emptied:
    what the stage does not keep is released, its own arrays are evaluated (read from disk
    when they were mapped lazily) and the allocator's cache is cleared."""
    end, _, is_last, needs_embedding = stage_bounds(hyperparameters, layer_start, layer_end)

    def plain(module: str) -> mx.array:
        key = f"{module}.weight"
        if key not in tensors:
            raise GGUFFormatError(f"{source} has no tensor '{key}'")
        return tensors[key]

    def layer(index: int) -> LayerWeights:
        prefix = f"{names.layer_prefix}{index}."
        modules = names.layer_modules
        return LayerWeights(
            attention_norm=plain(prefix + modules["attention_norm"]),
            query=linear(tensors, prefix + modules["query"]),
            key=linear(tensors, prefix + modules["key"]),
            value=linear(tensors, prefix + modules["value"]),
            attention_output=linear(tensors, prefix + modules["attention_output"]),
            feed_forward_norm=plain(prefix + modules["feed_forward_norm"]),
            gate=linear(tensors, prefix + modules["gate"]),
            up=linear(tensors, prefix + modules["up"]),
            down=linear(tensors, prefix + modules["down"]),
        )

    stage = StageWeights(
        hyperparameters=hyperparameters,
        layer_start=layer_start,
        layer_end=end,
        layers=[layer(index) for index in range(layer_start, end)],
        token_embedding=linear(tensors, names.embedding) if needs_embedding else None,
        output_norm=plain(names.final_norm) if is_last else None,
        output_head=(
            linear(tensors, names.head) if is_last and not hyperparameters.tied_embeddings else None
        ),
        metadata=metadata if metadata is not None else {},
    )
    total_bytes = sum(array.nbytes for array in tensors.values())
    tensors.clear()
    gc.collect()
    mx.eval(stage.arrays())
    mx.clear_cache()
    logger.debug(
        "loaded layers [{}, {}) of {} from {}: {:.1f} MB of {:.1f} MB",
        layer_start,
        end,
        hyperparameters.block_count,
        source,
        stage.nbytes / 1e6,
        total_bytes / 1e6,
    )
    return stage


def load_gguf_file(path: Path | str) -> tuple[dict[str, mx.array], Metadata]:
    """All tensors and the metadata of a GGUF file, as ``mx.load`` returns them."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    loaded = mx.load(str(path), return_metadata=True)
    if not isinstance(loaded, tuple):
        raise GGUFFormatError(f"{path} did not load as a GGUF file with metadata")
    tensors, metadata = loaded
    return tensors, metadata


def read_metadata(path: Path | str) -> tuple[Metadata, LlamaHyperparameters]:
    """Metadata and hyperparameters (loads the file, then lets the tensors go)."""
    tensors, metadata = load_gguf_file(path)
    hyperparameters = read_hyperparameters(metadata, set(tensors))
    del tensors
    gc.collect()
    mx.clear_cache()
    return metadata, hyperparameters


def load_stage(
    path: Path | str,
    layer_start: int = 0,
    layer_end: int | None = None,
    cache_dir: Path | None = None,
) -> StageWeights:
    """Load layers ``[layer_start, layer_end)`` and the end pieces that stage needs.

    ``layer_end=None`` means the last layer. Without ``cache_dir`` the full file passes
    through memory briefly (``mx.load`` reads it whole); tensors outside the stage are
    released before returning. With ``cache_dir`` the weights come from the per-machine
    safetensors cache (``exo.models.tensor_cache``) and only the stage's tensors are read.
    """
    if cache_dir is not None:
        from exo.models.tensor_cache import load_cached

        tensors, metadata = load_cached(Path(path), cache_dir)
    else:
        tensors, metadata = load_gguf_file(path)
    hyperparameters = read_hyperparameters(metadata, set(tensors))
    # Only the first stage (rank 0) builds the tokenizer; the others drop its tables.
    if layer_start != 0:
        metadata = {k: v for k, v in metadata.items() if not k.startswith("tokenizer.")}
    return assemble_stage(
        hyperparameters,
        tensors,
        GGUF_NAMES,
        _linear,
        layer_start,
        layer_end,
        Path(path).name,
        metadata,
    )
