"""Stages of mlx-lm models: a stage holding every layer is mlx-lm's model, chained stages
are the whole model, and each stage holds only its share."""

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.utils import load_model

from exo.models.directory import card_from_directory
from exo.models.safetensors import tensor_index
from exo.models.stage import ModelStage, StageLoadError, load_stage, parameter_bytes
from exo.models.tests.tiny_models import FAMILY_CONFIGS

PROMPT = [[5, 17, 99, 3, 44, 60, 61, 62, 63, 64, 65, 66]]
"""Longer than gemma3's sliding window of 8 in the tiny configs."""


def _decode(stages: list[ModelStage], steps: int) -> list[mx.array]:
    """Logits of a prefill then ``steps`` greedy decode steps through chained stages."""
    caches: list[list[Any]] = [stage.make_cache() for stage in stages]
    outputs: list[mx.array] = []
    inputs = mx.array(PROMPT)
    for _ in range(steps + 1):
        hidden = inputs
        for stage, cache in zip(stages, caches, strict=True):
            hidden = stage(hidden, cache)
        mx.eval(hidden)
        outputs.append(hidden[:, -1, :])
        inputs = mx.argmax(hidden[:, -1, :], axis=-1, keepdims=True)
    return outputs


@pytest.mark.parametrize("quantized", [False, True], ids=["dense", "q4"])
@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_whole_and_chained_stages_compute_mlx_lms_model(
    tiny_models: dict[tuple[str, bool], Path], family: str, quantized: bool
) -> None:
    directory = tiny_models[(family, quantized)]
    reference, _ = load_model(directory)
    whole = load_stage(directory)
    assert mx.array_equal(whole(mx.array(PROMPT)), reference(mx.array(PROMPT)))
    chained = [load_stage(directory, 0, 2), load_stage(directory, 2, 5), load_stage(directory, 5)]
    for ours, theirs in zip(_decode(chained, 6), _decode([whole], 6), strict=True):
        assert mx.array_equal(ours, theirs)


def _layer_bytes(directory: Path) -> dict[int, int]:
    result: dict[int, int] = {}
    for name, info in tensor_index(directory).items():
        match = re.match(r"model\.layers\.(\d+)\.", name)
        if match:
            result[int(match[1])] = result.get(int(match[1]), 0) + info.nbytes
    return result


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # untied and tied heads
def test_each_stage_holds_only_its_share(
    tiny_models: dict[tuple[str, bool], Path], family: str
) -> None:
    directory = tiny_models[(family, True)]
    tied = bool(FAMILY_CONFIGS[family]["tie_word_embeddings"])
    per_layer = _layer_bytes(directory)
    whole = load_stage(directory)
    first, middle, last = (load_stage(directory, *r) for r in ((0, 2), (2, 5), (5, 6)))

    def inner(stage: ModelStage) -> nn.Module:
        return cast(nn.Module, stage.model["model"])

    embedding = cast(nn.Module, inner(whole)["embed_tokens"])
    embedding_bytes = parameter_bytes(embedding)
    assert middle.nbytes == sum(per_layer[index] for index in range(2, 5))
    assert first.nbytes == sum(per_layer[index] for index in range(2)) + embedding_bytes
    assert "embed_tokens" not in inner(middle) and "norm" not in inner(middle)
    assert ("embed_tokens" in inner(last)) == tied  # a tied head is the embedding
    assert ("lm_head" in last.model) == (not tied)
    assert "lm_head" not in first.model
    assert whole.nbytes + (embedding_bytes if tied else 0) == first.nbytes + middle.nbytes + (
        last.nbytes
    )
    assert [s.is_first for s in (first, middle, last)] == [True, False, False]
    assert [s.is_last for s in (first, middle, last)] == [False, False, True]


@pytest.mark.parametrize("layer_range", [(-1, 3), (3, 3), (4, 7)])
def test_ranges_outside_the_model_are_refused(
    tiny_models: dict[tuple[str, bool], Path], layer_range: tuple[int, int]
) -> None:
    with pytest.raises(StageLoadError, match="layer range"):
        load_stage(tiny_models[("llama", False)], *layer_range)


def test_a_directory_mlx_lm_cannot_build_is_a_stage_load_error(
    tmp_path: Path, tiny_models: dict[tuple[str, bool], Path]
) -> None:
    source = tiny_models[("llama", False)]
    for file in source.iterdir():
        (tmp_path / file.name).symlink_to(file)
    (tmp_path / "config.json").unlink()
    config = json.loads((source / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"model_type": "nope"}))
    with pytest.raises(StageLoadError, match="mlx-lm cannot build"):
        load_stage(tmp_path)


_RSS_SCRIPT = """
import json, sys
from pathlib import Path
from exo.models.stage import load_stage
stage = load_stage(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
status = Path("/proc/self/status").read_text().splitlines()
peak = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
print(json.dumps({"peak": peak, "weights": stage.nbytes}))
"""


def _peak_bytes(directory: Path, start: int, end: int) -> dict[str, int]:
    result = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, str(directory), str(start), str(end)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_a_process_reads_only_its_stage(bundled_directory: Path) -> None:
    card = card_from_directory(bundled_directory)
    whole = _peak_bytes(bundled_directory, 0, 30)
    middle = _peak_bytes(bundled_directory, 10, 20)  # a third of the layers, no embedding
    assert middle["weights"] == 10 * card.layer_bytes
    # Lazy loading: the peak resident set shrinks by most of the weights left unread.
    dropped = whole["weights"] - middle["weights"]
    assert whole["peak"] - middle["peak"] > 0.7 * dropped
