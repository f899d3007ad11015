"""Where a runner's model is: the MLX model directory for what it was given as ``--model``.

* nothing: the bundled SmolLM2 GGUF, imported into the weights cache;
* a ``.gguf`` file: imported into the weights cache (once per machine);
* a directory: an MLX model directory, used as it is.
"""

from pathlib import Path

from exo.models.bundled import bundled_gguf_path
from exo.models.weights_cache import ensure_imported

GGUF_SUFFIX = ".gguf"


def model_directory(model_path: Path | None, weights_cache: Path) -> Path:
    """The MLX model directory to load; raises ``FileNotFoundError`` or ``ValueError`` with
    the reason."""
    path = bundled_gguf_path() if model_path is None else model_path
    if path.is_dir():
        return path
    if not path.is_file():
        raise FileNotFoundError(f"model not found: {path}")
    if path.suffix.lower() != GGUF_SUFFIX:
        raise ValueError(f"{path} is neither a .gguf file nor an MLX model directory")
    return ensure_imported(path, weights_cache)
