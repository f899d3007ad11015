"""A per-machine cache that makes loading a layer range cost only that range's memory.

``mx.load`` reads a GGUF file whole (and converts its quantised blocks), so every rank
would briefly hold the entire model. Converted once to safetensors (MLX's own layout of the
same quantised tensors) plus a JSON sidecar of the GGUF metadata, the weights load lazily:
a rank reads only the tensors it keeps. The conversion runs in a short-lived child process,
so its peak memory never lands in a runner; files appear atomically (written under a
temporary name, then renamed), so ranks converting at once cannot see half a file.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
from loguru import logger

from exo.models.gguf import GGUFFormatError, Metadata, load_gguf_file

CONVERSION_TIMEOUT_S = 600


def cache_key(gguf_path: Path) -> str:
    stat = gguf_path.stat()
    return f"{gguf_path.stem}-{stat.st_size}-{int(stat.st_mtime)}"


def cached_paths(gguf_path: Path, cache_dir: Path) -> tuple[Path, Path]:
    key = cache_key(gguf_path)
    return cache_dir / f"{key}.safetensors", cache_dir / f"{key}.metadata.json"


def _json_value(value: object) -> object:
    if isinstance(value, mx.array):
        return value.tolist()
    return value


def convert(gguf_path: Path, cache_dir: Path) -> None:
    """Write the safetensors file and metadata sidecar for gguf_path (in this process)."""
    tensors, metadata = load_gguf_file(gguf_path)
    tensors_path, metadata_path = cached_paths(gguf_path, cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    suffix = f".{os.getpid()}.tmp"
    temporary_tensors = tensors_path.with_name(tensors_path.stem + suffix + ".safetensors")
    temporary_metadata = metadata_path.with_name(metadata_path.name + suffix)
    mx.save_safetensors(str(temporary_tensors), tensors)
    temporary_metadata.write_text(
        json.dumps({key: _json_value(value) for key, value in metadata.items()})
    )
    os.replace(temporary_metadata, metadata_path)
    os.replace(temporary_tensors, tensors_path)


def ensure_cached(gguf_path: Path, cache_dir: Path) -> tuple[Path, Path]:
    """The cached files for gguf_path, converting first (in a child process) if needed."""
    tensors_path, metadata_path = cached_paths(gguf_path, cache_dir)
    if tensors_path.is_file() and metadata_path.is_file():
        return tensors_path, metadata_path
    logger.info(f"converting {gguf_path.name} for per-layer loading into {cache_dir}")
    result = subprocess.run(
        [sys.executable, "-m", "exo.models.tensor_cache", str(gguf_path), str(cache_dir)],
        capture_output=True,
        text=True,
        timeout=CONVERSION_TIMEOUT_S,
        check=False,
    )
    if result.returncode != 0 or not tensors_path.is_file():
        raise GGUFFormatError(
            f"could not convert {gguf_path} for per-layer loading: {result.stderr.strip()[-500:]}"
        )
    return tensors_path, metadata_path


def load_cached(gguf_path: Path, cache_dir: Path) -> tuple[dict[str, mx.array], Metadata]:
    """Lazily loaded tensors (read from disk only when evaluated) and the metadata."""
    tensors_path, metadata_path = ensure_cached(gguf_path, cache_dir)
    loaded = mx.load(str(tensors_path))
    if not isinstance(loaded, dict):
        raise GGUFFormatError(f"{tensors_path} did not load as a dictionary of arrays")
    metadata = cast(dict[str, Any], json.loads(metadata_path.read_text()))
    return loaded, metadata


def main() -> int:
    gguf_path, cache_dir = Path(sys.argv[1]), Path(sys.argv[2])
    convert(gguf_path, cache_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
