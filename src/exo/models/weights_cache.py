"""The per-machine cache of imported models: a GGUF file becomes an MLX model directory once.

``ensure_imported(gguf, cache_dir)`` returns ``cache_dir/<name>-<size>-<mtime>/``, importing
the file first when that directory does not exist yet. The import (``mx.load`` reads the
whole GGUF) runs in a short-lived child process, so its peak memory never lands in a node
or a runner; it writes into a temporary directory that is renamed into place when complete,
so processes importing at once never see half a directory, and a crash leaves no partial
one behind.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from loguru import logger

IMPORT_TIMEOUT_S = 600
CONFIG_FILE = "config.json"
WEIGHTS_DIRECTORY = "weights"


WEIGHTS_CACHE_ENV = "EXO_WEIGHTS_CACHE"


def weights_cache_in(home: Path) -> Path:
    """A node's weights cache: ``$EXO_WEIGHTS_CACHE`` when set (one cache for every node on
    the machine, e.g. several nodes on one host), else ``home/weights``."""
    shared = os.environ.get(WEIGHTS_CACHE_ENV)
    return Path(shared).expanduser() if shared else home / WEIGHTS_DIRECTORY


def default_weights_cache() -> Path:
    """The weights cache of the default home, ``$EXO_HOME`` or ``~/.exo``."""
    return weights_cache_in(Path(os.environ.get("EXO_HOME", "~/.exo")).expanduser())


class WeightsImportError(ValueError):
    """The import did not produce a model directory; the message carries its error."""


def imported_directory(gguf_path: Path, cache_dir: Path) -> Path:
    """Where the import of ``gguf_path`` lives (a changed file gets a new directory)."""
    stat = gguf_path.stat()
    return cache_dir / f"{gguf_path.stem}-{stat.st_size}-{int(stat.st_mtime)}"


def import_into_cache(gguf_path: Path, cache_dir: Path) -> Path:
    """Import ``gguf_path`` into the cache in this process (what the child process runs)."""
    from exo.models.gguf_import import import_gguf  # MLX: only in the importing process

    final = imported_directory(gguf_path, cache_dir)
    if (final / CONFIG_FILE).is_file():
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    temporary = cache_dir / f".{final.name}.{os.getpid()}.tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    try:
        import_gguf(gguf_path, temporary)
        try:
            temporary.rename(final)
        except OSError:  # another process finished first: keep its directory
            if not (final / CONFIG_FILE).is_file():
                raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return final


def ensure_imported(gguf_path: Path, cache_dir: Path) -> Path:
    """The MLX model directory for ``gguf_path``, importing it (in a child process) first
    if needed."""
    final = imported_directory(gguf_path, cache_dir)
    if (final / CONFIG_FILE).is_file():
        return final
    logger.info(f"importing {gguf_path.name} into {cache_dir} (once per machine)")
    result = subprocess.run(
        [sys.executable, "-m", "exo.models.weights_cache", str(gguf_path), str(cache_dir)],
        capture_output=True,
        text=True,
        timeout=IMPORT_TIMEOUT_S,
        check=False,
    )
    if result.returncode != 0 or not (final / CONFIG_FILE).is_file():
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
        raise WeightsImportError(
            f"could not import {gguf_path.name}: {lines[-1] if lines else 'no output'}"
        )
    return final


def main() -> int:
    import_into_cache(Path(sys.argv[1]), Path(sys.argv[2]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
