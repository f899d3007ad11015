"""Build an MLX-format model directory from the bundled GGUF, as a Hugging Face → MLX
conversion would lay it out, so the directory loader can be tested without downloads.

* Tensors get Hugging Face names. The GGUF keeps llama.cpp's permutation of the Q/K rows
  (rotary pairs interleaved); they are permuted back to the Hugging Face order (pairs are
  the two halves of each head), so the directory only runs right with the half-split
  rotary layout.
* Quantised matrices stay MLX affine triplets (``weight``/``scales``/``biases``), with
  ``quantization`` in config.json: 4 bits in groups of 32 for the layers and an 8-bit
  override for the embedding (the GGUF's Q4_1 / Q8_0).
* The weights are split over two safetensors files (layers 0–14, the rest).
* tokenizer.json is built with the ``tokenizers`` library from the GGUF's vocabulary and
  merges; tokenizer_config.json carries its chat template and BOS/EOS tokens.
"""

import json
from pathlib import Path

import mlx.core as mx
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from exo.models.gguf import (
    load_gguf_file,
    metadata_bool,
    metadata_float,
    metadata_int,
    metadata_int_list,
    metadata_str,
    metadata_str_list,
)

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_OTHER_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
CONTROL_TOKEN_TYPE = 3


def unpermute_rotary_rows(array: mx.array, head_count: int) -> mx.array:
    """Undo llama.cpp's Q/K row permutation: within each head, GGUF row ``2i + j`` is
    Hugging Face row ``j * head_dim/2 + i``. Rows are independent in MLX's quantised layout
    (groups run along a row), so this applies to packed weights, scales and biases alike."""
    rows, columns = array.shape
    half = rows // head_count // 2
    return array.reshape(head_count, half, 2, columns).swapaxes(1, 2).reshape(rows, columns)


def hf_name(gguf_name: str) -> str:
    base, _, part = gguf_name.rpartition(".")
    pieces = base.split(".")
    if pieces[0] == "blk":
        return f"model.layers.{pieces[1]}.{_LAYER_NAMES[pieces[2]]}.{part}"
    return f"{_OTHER_NAMES[base]}.{part}"


def build_tokenizer(metadata: dict[str, object]) -> Tokenizer:
    tokens = metadata_str_list(metadata, "tokenizer.ggml.tokens")
    merges = metadata_str_list(metadata, "tokenizer.ggml.merges")
    token_types = metadata_int_list(metadata, "tokenizer.ggml.token_type")
    assert metadata_str(metadata, "tokenizer.ggml.pre") == "smollm"
    vocabulary = {token: index for index, token in enumerate(tokens)}
    pairs: list[tuple[str, str]] = []
    for merge in merges:
        left, _, right = merge.partition(" ")
        pairs.append((left, right))
    tokenizer = Tokenizer(models.BPE(vocab=vocabulary, merges=pairs))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(
        [
            AddedToken(token, special=True, normalized=False)
            for token, token_type in zip(tokens, token_types, strict=True)
            if token_type == CONTROL_TOKEN_TYPE
        ]
    )
    return tokenizer


def write_mlx_directory(gguf_path: Path, directory: Path) -> Path:
    """Write the GGUF at ``gguf_path`` as an MLX model directory; returns ``directory``."""
    tensors, metadata = load_gguf_file(gguf_path)
    head_count = metadata_int(metadata, "llama.attention.head_count")
    head_count_kv = metadata_int(metadata, "llama.attention.head_count_kv")
    block_count = metadata_int(metadata, "llama.block_count")
    directory.mkdir(parents=True, exist_ok=True)

    converted: dict[str, mx.array] = {}
    for name, array in tensors.items():
        if ".attn_q." in name:
            array = unpermute_rotary_rows(array, head_count)
        elif ".attn_k." in name:
            array = unpermute_rotary_rows(array, head_count_kv)
        converted[hf_name(name)] = array
    half = block_count // 2
    first = {
        k: v
        for k, v in converted.items()
        if k.startswith("model.layers.") and int(k.split(".")[2]) < half
    }
    second = {k: v for k, v in converted.items() if k not in first}
    files = {
        "model-00001-of-00002.safetensors": first,
        "model-00002-of-00002.safetensors": second,
    }
    weight_map: dict[str, str] = {}
    for file_name, part in files.items():
        mx.save_safetensors(str(directory / file_name), part, metadata={"format": "mlx"})
        weight_map.update(dict.fromkeys(part, file_name))
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}, indent=1)
    )

    tokens = metadata_str_list(metadata, "tokenizer.ggml.tokens")
    bos_id = metadata_int(metadata, "tokenizer.ggml.bos_token_id")
    eos_id = metadata_int(metadata, "tokenizer.ggml.eos_token_id")
    embedding_bits = (
        converted["model.embed_tokens.weight"].shape[-1]
        * 32
        // (converted["model.embed_tokens.scales"].shape[-1] * 32)
    )
    layer_bits = (
        converted["model.layers.0.self_attn.q_proj.weight"].shape[-1]
        * 32
        // (converted["model.layers.0.self_attn.q_proj.scales"].shape[-1] * 32)
    )
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "num_hidden_layers": block_count,
        "hidden_size": metadata_int(metadata, "llama.embedding_length"),
        "intermediate_size": metadata_int(metadata, "llama.feed_forward_length"),
        "num_attention_heads": head_count,
        "num_key_value_heads": head_count_kv,
        "rope_theta": metadata_float(metadata, "llama.rope.freq_base"),
        "rms_norm_eps": metadata_float(metadata, "llama.attention.layer_norm_rms_epsilon"),
        "max_position_embeddings": metadata_int(metadata, "llama.context_length"),
        "vocab_size": metadata_int(metadata, "llama.vocab_size"),
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "rope_scaling": None,
        "quantization": {
            "group_size": 32,
            "bits": layer_bits,
            "model.embed_tokens": {"group_size": 32, "bits": embedding_bits},
        },
    }
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    build_tokenizer(metadata).save(str(directory / "tokenizer.json"))
    tokenizer_config = {
        "add_bos_token": metadata_bool(metadata, "tokenizer.ggml.add_bos_token", False),
        "bos_token": tokens[bos_id],
        "eos_token": tokens[eos_id],
        "chat_template": metadata_str(metadata, "tokenizer.chat_template"),
        "model_max_length": config["max_position_embeddings"],
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=1))
    return directory
