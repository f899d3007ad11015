"""One way to load a model stage and its tokenizer, whatever the weights are.

``model_path`` is what a runner gets as ``--model``:

* None: the bundled SmolLM2 GGUF;
* a ``.gguf`` file: the GGUF loader (through the per-machine weights cache when
  ``cache_dir`` is given, so only the stage's tensors are read);
* a directory: an MLX-format model directory (``exo.models.mlx_directory``), whose
  safetensors already load lazily, so the cache is not used.
"""

from pathlib import Path

from exo.models.bundled import bundled_gguf_path
from exo.models.gguf import StageWeights, load_stage, read_metadata
from exo.models.mlx_directory import (
    DirectoryTokenizer,
    load_directory_stage,
    read_directory_model,
)
from exo.models.tokenizer import GGUFTokenizer

GGUF_SUFFIX = ".gguf"


def _resolve(model_path: Path | None) -> Path:
    if model_path is None:
        return bundled_gguf_path()
    if model_path.is_dir():
        return model_path
    if model_path.is_file():
        if model_path.suffix.lower() != GGUF_SUFFIX:
            raise ValueError(f"{model_path} is neither a .gguf file nor an MLX model directory")
        return model_path
    raise FileNotFoundError(f"model not found: {model_path}")


def load_stage_for(
    model_path: Path | None,
    layer_start: int = 0,
    layer_end: int | None = None,
    cache_dir: Path | None = None,
) -> StageWeights:
    """Layers ``[layer_start, layer_end)`` (None: to the last) and the end pieces that
    stage needs, from the bundled GGUF, a GGUF file or an MLX model directory."""
    path = _resolve(model_path)
    if path.is_dir():
        return load_directory_stage(path, layer_start, layer_end)
    return load_stage(path, layer_start, layer_end, cache_dir)


def load_tokenizer_for(
    model_path: Path | None, weights: StageWeights | None = None
) -> GGUFTokenizer:
    """The tokenizer for ``model_path``. A GGUF's tokenizer lives in its metadata: pass the
    first stage's ``weights`` (their metadata keeps the tokenizer tables) to avoid reading
    the file again."""
    path = _resolve(model_path)
    if path.is_dir():
        return DirectoryTokenizer(path)
    if weights is None or not any(key.startswith("tokenizer.") for key in weights.metadata):
        metadata, _ = read_metadata(path)
        return GGUFTokenizer(metadata)
    return GGUFTokenizer(weights.metadata)


def block_count_for(model_path: Path | None) -> int:
    """How many layers the model has (reads only headers for a directory)."""
    path = _resolve(model_path)
    if path.is_dir():
        return read_directory_model(path).hyperparameters.block_count
    _, hyperparameters = read_metadata(path)
    return hyperparameters.block_count
