"""GGUF as an import: the bundled file becomes an MLX model directory that mlx-lm loads and
that generates exactly the tokens the hand-written engine did."""

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest

from exo.models.bundled import bundled_gguf_path
from exo.models.directory import card_from_directory
from exo.models.gguf_import import import_gguf, mlx_lm_name
from exo.models.gguf_metadata import GGUFImportError
from exo.models.safetensors import tensor_index
from exo.models.stage import ModelStage
from exo.models.tokenizer import ModelTokenizer
from exo.models.weights_cache import WeightsImportError, ensure_imported, imported_directory
from exo.shared.types.generation import GenerationRequest
from exo.worker.runner.engine import Engine, LocalStepper


def test_the_import_is_a_quantised_llama_directory(bundled_directory: Path) -> None:
    config = json.loads((bundled_directory / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["rope_traditional"] is True  # GGUF keeps llama.cpp's Q/K row order
    assert config["tie_word_embeddings"] is True
    assert (config["num_hidden_layers"], config["hidden_size"], config["head_dim"]) == (30, 576, 64)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert config["max_position_embeddings"] == 8192
    assert config["eos_token_id"] == [2, 0]  # <|im_end|>, then <|endoftext|>
    # Q4_1 layers, a Q8_0 embedding: the common width and a per-module override.
    assert config["quantization"] == {
        "group_size": 32,
        "bits": 4,
        "model.embed_tokens": {"group_size": 32, "bits": 8},
    }
    tensors = tensor_index(bundled_directory)
    assert all(name.startswith("model.") for name in tensors)
    assert tensors["model.layers.0.self_attn.q_proj.weight"].shape == (576, 72)  # packed 4-bit
    assert tensors["model.layers.0.input_layernorm.weight"].dtype == "F32"
    assert (bundled_directory / "tokenizer.json").is_file()
    tokenizer_config = json.loads((bundled_directory / "tokenizer_config.json").read_text())
    assert tokenizer_config["eos_token"] == "<|im_end|>"
    assert "<|im_start|>assistant" in tokenizer_config["chat_template"]


def test_its_card_matches_the_file(bundled_directory: Path) -> None:
    card = card_from_directory(bundled_directory)
    assert card.family == "llama"
    assert (card.n_layers, card.layer_bytes) == (30, 2_216_448)
    assert card.non_layer_bytes == 31_852_800  # the 8-bit embedding and the final norm
    # Float32 norms make the activations (and so the KV cache) float32.
    assert card.kv_cache_bytes_per_token == 30 * 2 * 3 * 64 * 4
    assert card.context_length == 8192


def test_greedy_tokens_are_the_hand_written_engines(
    bundled_stage: ModelStage,
    bundled_tokenizer: ModelTokenizer,
    golden_requests: list[dict[str, Any]],
) -> None:
    engine = Engine(bundled_tokenizer, LocalStepper(bundled_stage))
    for golden in golden_requests:
        request = GenerationRequest(messages=golden["messages"], max_tokens=48)
        assert engine.prompt_ids(request) == golden["prompt_ids"]
        result = engine.complete(request)
        assert result.token_ids == golden["token_ids"]
        assert result.finish_reason == golden["finish_reason"]
    capital = engine.complete(GenerationRequest(messages=golden_requests[0]["messages"]))
    assert capital.text == "The capital of France is Paris."


def test_tensor_names_map_onto_mlx_lm_llama() -> None:
    assert mlx_lm_name("blk.3.attn_q.scales") == "model.layers.3.self_attn.q_proj.scales"
    assert mlx_lm_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    assert mlx_lm_name("token_embd.biases") == "model.embed_tokens.biases"
    assert mlx_lm_name("output.weight") == "lm_head.weight"
    for unknown in ("blk.0.attn_qkv.weight", "rope_freqs.weight", "blk.x.attn_q.weight"):
        with pytest.raises(GGUFImportError):
            mlx_lm_name(unknown)


def _fake_gguf(path: Path, architecture: str) -> Path:
    metadata: dict[str, Any] = {
        "general.architecture": architecture,
        f"{architecture}.block_count": mx.array(1, dtype=mx.uint32),
    }
    mx.save_gguf(str(path), {"token_embd.weight": mx.zeros((4, 8))}, metadata)
    return path


def test_other_architectures_are_refused(tmp_path: Path) -> None:
    gguf = _fake_gguf(tmp_path / "gpt2.gguf", "gpt2")
    output = tmp_path / "out"
    output.mkdir()
    with pytest.raises(GGUFImportError, match="architecture 'gpt2'"):
        import_gguf(gguf, output)


def test_the_cache_imports_once_and_never_shows_half_a_directory(tmp_path: Path) -> None:
    gguf = bundled_gguf_path()
    cache = tmp_path / "weights"
    command = [sys.executable, "-m", "exo.models.weights_cache", str(gguf), str(cache)]
    racing = [subprocess.Popen(command, stderr=subprocess.PIPE) for _ in range(2)]
    assert [process.wait(timeout=120) for process in racing] == [0, 0]
    directory = imported_directory(gguf, cache)
    assert sorted(path.name for path in cache.iterdir()) == [directory.name]  # no temp left
    written = (directory / "model.safetensors").stat().st_mtime_ns
    assert ensure_imported(gguf, cache) == directory
    assert (directory / "model.safetensors").stat().st_mtime_ns == written  # not redone


def test_a_failed_import_says_why(tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_text("not a gguf file")
    with pytest.raises(WeightsImportError, match="could not import"):
        ensure_imported(broken, tmp_path / "weights")
    assert not imported_directory(broken, tmp_path / "weights").exists()
