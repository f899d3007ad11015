"""Import a Llama-architecture GGUF file as an MLX model directory that mlx-lm loads.

GGUF is an import format here, not a runtime one: :func:`import_gguf` writes
``config.json``, ``model.safetensors``, ``tokenizer.json`` and ``tokenizer_config.json``,
and from then on the model is loaded like any other MLX directory
(:mod:`exo.models.stage`). The per-machine cache that runs the import once lives in
:mod:`exo.models.weights_cache`.

* **Tensors.** ``mx.load`` reads the GGUF into MLX arrays; quantised blocks (Q4_0, Q4_1,
  Q8_0) come back already in MLX's affine format as ``.weight`` (packed ``uint32``),
  ``.scales`` and ``.biases``, one scale and bias per group of 32 values. They are renamed
  to mlx-lm's Llama names (``blk.N.attn_q`` -> ``model.layers.N.self_attn.q_proj``, ...)
  and kept packed. The bit width of each matrix follows from its shapes
  (``bits = packed_columns * 32 / (scale_columns * 32)``); config.json's ``quantization``
  names the most common width and lists the others per module (the 8-bit embedding of a
  Q4 file, say).
* **Rotary layout.** GGUF keeps llama.cpp's permutation of the Q/K rows, which pairs
  neighbouring dimensions, so config.json says ``rope_traditional: true``.
* **Precision.** Norm weights stay float32 and the quantisation scales and biases float16,
  as in the file; the embedding dequantises to float16, and the float32 norms lift every
  later activation to float32, as llama.cpp computes on a CPU.
"""

import json
from collections import Counter
from pathlib import Path

import mlx.core as mx

from exo.models.gguf_metadata import (
    GGUFImportError,
    Metadata,
    metadata_float,
    metadata_int,
    metadata_str,
    metadata_str_list,
)
from exo.models.gguf_tokenizer import stop_token_ids, write_tokenizer_files

GGUF_GROUP_SIZE = 32
"""Every quantised GGUF type MLX loads (Q4_0, Q4_1, Q8_0) uses blocks of 32 values."""

_LAYER_MODULES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_OTHER_MODULES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_TENSOR_PARTS = ("weight", "scales", "biases")


def mlx_lm_name(gguf_name: str) -> str:
    """``blk.3.attn_q.scales`` -> ``model.layers.3.self_attn.q_proj.scales``."""
    module, _, part = gguf_name.rpartition(".")
    if part not in _TENSOR_PARTS:
        raise GGUFImportError(f"unexpected GGUF tensor '{gguf_name}'")
    pieces = module.split(".")
    if len(pieces) == 3 and pieces[0] == "blk" and pieces[1].isdigit():
        renamed = _LAYER_MODULES.get(pieces[2])
        if renamed is not None:
            return f"model.layers.{pieces[1]}.{renamed}.{part}"
    elif module in _OTHER_MODULES:
        return f"{_OTHER_MODULES[module]}.{part}"
    raise GGUFImportError(f"GGUF tensor '{gguf_name}' has no place in a Llama model")


def _bits(name: str, weight: mx.array, scales: mx.array) -> int:
    in_features = scales.shape[-1] * GGUF_GROUP_SIZE
    packed_bits = weight.shape[-1] * 32
    if packed_bits % in_features != 0:
        raise GGUFImportError(
            f"'{name}': {weight.shape[-1]} packed columns do not divide into {in_features} inputs"
        )
    bits = packed_bits // in_features
    if bits not in (2, 3, 4, 5, 6, 8):
        raise GGUFImportError(f"'{name}': derived bit width {bits} is not supported")
    return bits


def _quantization(tensors: dict[str, mx.array]) -> dict[str, object] | None:
    """config.json's ``quantization``: the most common bit width, and per-module entries
    for the modules quantised otherwise."""
    widths: dict[str, int] = {}
    for name, scales in tensors.items():
        if name.endswith(".scales"):
            module = name.removesuffix(".scales")
            widths[module] = _bits(module, tensors[f"{module}.weight"], scales)
    if not widths:
        return None
    common = Counter(widths.values()).most_common(1)[0][0]
    quantization: dict[str, object] = {"group_size": GGUF_GROUP_SIZE, "bits": common}
    for module, bits in sorted(widths.items()):
        if bits != common:
            quantization[module] = {"group_size": GGUF_GROUP_SIZE, "bits": bits}
    return quantization


def _config(metadata: Metadata, tensors: dict[str, mx.array]) -> dict[str, object]:
    architecture = metadata_str(metadata, "general.architecture")
    if architecture != "llama":
        raise GGUFImportError(f"unsupported GGUF architecture '{architecture}' (want 'llama')")
    hidden_size = metadata_int(metadata, "llama.embedding_length")
    heads = metadata_int(metadata, "llama.attention.head_count")
    head_dim = hidden_size // heads
    if "llama.rope.dimension_count" in metadata:
        rope_dimension = metadata_int(metadata, "llama.rope.dimension_count")
        if rope_dimension != head_dim:
            raise GGUFImportError(
                f"rotary dimension {rope_dimension} differs from the head size {head_dim}"
            )
    scaling = (
        metadata_str(metadata, "llama.rope.scaling.type")
        if "llama.rope.scaling.type" in metadata
        else "none"
    )
    if scaling != "none":
        raise GGUFImportError(f"rope scaling '{scaling}' is not supported")
    vocab_size = (
        metadata_int(metadata, "llama.vocab_size")
        if "llama.vocab_size" in metadata
        else len(metadata_str_list(metadata, "tokenizer.ggml.tokens"))
    )
    config: dict[str, object] = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden_size,
        "num_hidden_layers": metadata_int(metadata, "llama.block_count"),
        "intermediate_size": metadata_int(metadata, "llama.feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": metadata_int(metadata, "llama.attention.head_count_kv"),
        "head_dim": head_dim,
        "rms_norm_eps": metadata_float(metadata, "llama.attention.layer_norm_rms_epsilon"),
        "rope_theta": (
            metadata_float(metadata, "llama.rope.freq_base")
            if "llama.rope.freq_base" in metadata
            else 10000.0
        ),
        "rope_traditional": True,
        "max_position_embeddings": metadata_int(metadata, "llama.context_length"),
        "vocab_size": vocab_size,
        "tie_word_embeddings": "lm_head.weight" not in tensors,
        "eos_token_id": stop_token_ids(metadata),
    }
    if "tokenizer.ggml.bos_token_id" in metadata:
        config["bos_token_id"] = metadata_int(metadata, "tokenizer.ggml.bos_token_id")
    quantization = _quantization(tensors)
    if quantization is not None:
        config["quantization"] = quantization
    return config


def import_gguf(gguf_path: Path, directory: Path) -> None:
    """Write the MLX model directory for ``gguf_path`` into ``directory`` (which must exist
    and be empty). Loads the whole file; run it in a short-lived process."""
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    loaded = mx.load(str(gguf_path), return_metadata=True)
    if not isinstance(loaded, tuple):
        raise GGUFImportError(f"{gguf_path} did not load as a GGUF file with metadata")
    gguf_tensors, metadata = loaded
    tensors = {mlx_lm_name(name): array for name, array in gguf_tensors.items()}
    config = _config(metadata, tensors)
    mx.save_safetensors(str(directory / "model.safetensors"), tensors, metadata={"format": "mlx"})
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    context_length = metadata_int(metadata, "llama.context_length")
    write_tokenizer_files(metadata, directory, context_length)
