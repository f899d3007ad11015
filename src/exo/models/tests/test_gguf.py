"""Loading the bundled GGUF: hyperparameters, quantization, stage-only loading, memory."""

import json
import subprocess
import sys

import mlx.core as mx
import pytest

from exo.models.bundled import bundled_gguf_path
from exo.models.gguf import StageWeights, load_stage, scalar_float


def test_hyperparameters(full_weights: StageWeights) -> None:
    h = full_weights.hyperparameters
    assert (h.block_count, h.hidden_size, h.intermediate_size) == (30, 576, 1536)
    assert (h.head_count, h.head_count_kv, h.head_dim) == (9, 3, 64)
    assert h.rope_base == pytest.approx(100000.0)
    assert h.rms_norm_eps == pytest.approx(1e-5)
    assert h.context_length == 8192
    assert h.vocab_size == 49152
    assert h.tied_embeddings  # no output.weight: the head is the token embedding


def test_quantization_is_derived_from_shapes(full_weights: StageWeights) -> None:
    layer = full_weights.layers[0]
    assert layer.query.bits == 4 and layer.query.group_size == 32
    assert (layer.query.out_features, layer.query.in_features) == (576, 576)
    assert (layer.key.out_features, layer.key.in_features) == (192, 576)
    assert (layer.down.out_features, layer.down.in_features) == (576, 1536)
    assert layer.down.bits == 4
    embedding = full_weights.token_embedding
    assert embedding is not None
    assert embedding.bits == 8  # Q8_0
    assert (embedding.out_features, embedding.in_features) == (49152, 576)
    assert layer.attention_norm.dtype == mx.float32


def test_quantized_weight_dequantizes_to_sensible_values(full_weights: StageWeights) -> None:
    query = full_weights.layers[0].query
    assert query.scales is not None
    dense = mx.dequantize(
        query.weight, query.scales, query.biases, group_size=query.group_size, bits=query.bits
    )
    assert dense.shape == (576, 576)
    magnitude = scalar_float(mx.abs(dense).mean())
    assert 1e-4 < magnitude < 1.0


def test_stages_hold_only_their_share(full_weights: StageWeights) -> None:
    path = bundled_gguf_path()
    first = load_stage(path, 0, 15)
    last = load_stage(path, 15, 30)
    middle = load_stage(path, 10, 20)

    assert first.is_first and not first.is_last
    assert first.token_embedding is not None and first.output_norm is None
    assert last.is_last and not last.is_first
    # Tied head: the last stage keeps the embedding matrix to use as its output head.
    assert last.token_embedding is not None and last.output_norm is not None
    assert last.output_head is None
    assert middle.token_embedding is None and middle.output_norm is None
    assert [len(s.layers) for s in (first, last, middle)] == [15, 15, 10]

    assert first.nbytes < full_weights.nbytes
    assert last.nbytes < full_weights.nbytes
    layer_bytes = full_weights.layers[0].nbytes
    assert middle.nbytes == pytest.approx(10 * layer_bytes, rel=0.01)
    # Everything is kept exactly once by a first+last split (the tied embedding twice).
    embedding_bytes = full_weights.token_embedding.nbytes if full_weights.token_embedding else 0
    assert first.nbytes + last.nbytes == full_weights.nbytes + embedding_bytes


@pytest.mark.parametrize("layer_range", [(-1, 10), (5, 5), (20, 31)])
def test_invalid_ranges_are_refused(layer_range: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="layer range"):
        load_stage(bundled_gguf_path(), *layer_range)


_RSS_SCRIPT = """
import gc, json, sys
import psutil
from exo.models.bundled import bundled_gguf_path
from exo.models.gguf import load_stage
stage = load_stage(bundled_gguf_path(), int(sys.argv[1]), int(sys.argv[2]))
gc.collect()
print(json.dumps({"rss": psutil.Process().memory_info().rss, "weights": stage.nbytes}))
"""


def _stage_rss(start: int, end: int) -> dict[str, int]:
    result = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, str(start), str(end)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_process_holding_part_of_the_model_uses_less_memory() -> None:
    full = _stage_rss(0, 30)
    middle = _stage_rss(10, 20)  # a third of the layers, no embedding, no head
    assert middle["weights"] < full["weights"] / 3
    # The resident set shrinks by most of the weights the stage dropped.
    dropped = full["weights"] - middle["weights"]
    assert full["rss"] - middle["rss"] > 0.5 * dropped
