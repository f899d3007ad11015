"""Replacing a small file so that a crash leaves either the old or the new content: write a
temporary file next to it, fsync it, rename it over the old one, fsync the directory."""

import os
from pathlib import Path


def write_atomically(path: Path, data: bytes) -> None:
    """Raises OSError (the old file, if any, is left as it was)."""
    temporary = path.with_name(path.name + ".tmp")
    try:
        with temporary.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError:
        temporary.unlink(missing_ok=True)
        raise
    descriptor = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
