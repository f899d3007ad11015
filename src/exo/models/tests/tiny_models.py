"""Tiny models of several mlx-lm families, built in the test and saved as MLX directories.

Each is mlx-lm's own model class with a small config and random weights (seeded), saved the
way mlx-lm saves models (``model.safetensors`` of ``model.parameters()``, ``config.json``
with a ``quantization`` entry when quantised), with a small byte-level BPE tokenizer and a
ChatML template. Nothing is downloaded.
"""

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.utils import _get_classes  # pyright: ignore[reportPrivateUsage]
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

VOCAB_SIZE = 288
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QUANTIZATION: dict[str, int] = {"group_size": 32, "bits": 4}

_COMMON: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 6,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "vocab_size": VOCAB_SIZE,
    "max_position_embeddings": 512,
}

FAMILY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {**_COMMON, "model_type": "llama", "tie_word_embeddings": False},
    "mistral": {
        **_COMMON,
        "model_type": "mistral",
        "rope_theta": 1_000_000.0,
        "tie_word_embeddings": False,
    },
    "qwen2": {**_COMMON, "model_type": "qwen2", "tie_word_embeddings": True},
    "qwen3": {
        **_COMMON,
        "model_type": "qwen3",
        "head_dim": 16,
        "rope_theta": 1_000_000.0,
        "tie_word_embeddings": True,
    },
    "phi3": {**_COMMON, "model_type": "phi3", "tie_word_embeddings": False},
    "gemma2": {
        **_COMMON,
        "model_type": "gemma2",
        "head_dim": 16,
        "query_pre_attn_scalar": 16,
    },
    "gemma3_text": {
        **_COMMON,
        "model_type": "gemma3_text",
        "head_dim": 16,
        "query_pre_attn_scalar": 16,
        "sliding_window": 8,
        "sliding_window_pattern": 3,
    },
}
"""Six layers each, so that 2- and 3-rank splits cut gemma3's sliding/global pattern
(every third layer global, windows of 8 tokens) in different places."""


def byte_level_tokenizer() -> Tokenizer:
    """A byte-level BPE over the 256 byte symbols (no merges) plus ChatML specials."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocabulary = {symbol: index for index, symbol in enumerate(sorted(alphabet))}
    tokenizer = Tokenizer(models.BPE(vocab=vocabulary, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(token, special=True) for token in SPECIAL_TOKENS])
    return tokenizer


def write_tokenizer(directory: Path) -> None:
    byte_level_tokenizer().save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "chat_template": CHAT_TEMPLATE,
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
            }
        )
    )


def build_tiny_model(directory: Path, family: str, *, quantized: bool, seed: int = 7) -> Path:
    """Write an MLX model directory of ``family`` (a key of :data:`FAMILY_CONFIGS`)."""
    config = dict(FAMILY_CONFIGS[family])
    mx.random.seed(seed)
    model_class, args_class = _get_classes(config)
    model: nn.Module = model_class(args_class.from_dict(config))
    if quantized:
        nn.quantize(model, group_size=QUANTIZATION["group_size"], bits=QUANTIZATION["bits"])
        config["quantization"] = dict(QUANTIZATION)
    directory.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.parameters()))
    mx.eval(weights)
    mx.save_safetensors(str(directory / "model.safetensors"), weights)
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    write_tokenizer(directory)
    return directory
