"""Where a bench puts its nodes' homes and logs: a temporary directory, or one it keeps."""

import contextlib
import tempfile
from collections.abc import Generator
from pathlib import Path

KEEP_HELP = "put the nodes' homes and logs here and keep them afterwards"


@contextlib.contextmanager
def work_directory(keep: Path | None) -> Generator[Path]:
    """``keep`` (created if missing, left in place afterwards), else a temporary directory
    removed at the end."""
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep
        return
    with tempfile.TemporaryDirectory() as directory:
        yield Path(directory)
