"""The global log on disk: one JSON line per indexed event under ``EXO_HOME/events/``.

Ephemeral events (token chunks) are written as an ``EventElided`` line so indices stay
gap-free without keeping their bodies. On load, a truncated or corrupt record (power loss
mid-write) and everything after it is logged and cut; the node then catches up from the
cluster.
"""

import os
from pathlib import Path
from typing import IO

from loguru import logger
from pydantic import ValidationError

from exo.shared.types.events import IndexedEvent, elided

LOG_FILE_NAME = "global_events.jsonl"


class DiskEventLog:
    """Append-only, index-checked file of IndexedEvents. Not thread-safe; one owner."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._path = directory / LOG_FILE_NAME
        self._offsets: list[int] = []
        """Byte offset where each index's line starts; len == number of events."""
        self._file: IO[bytes] | None = None
        self._dirty = False

    @property
    def path(self) -> Path:
        return self._path

    def open(self) -> list[IndexedEvent]:
        """Create the directory if needed, read back every good record, cut a bad tail,
        and open the file for appending. Returns the events read."""
        self._directory.mkdir(parents=True, exist_ok=True)
        events: list[IndexedEvent] = []
        good_end = 0
        if self._path.exists():
            events, good_end = self._read_good_prefix()
            size = self._path.stat().st_size
            if good_end < size:
                logger.warning(
                    f"event log {self._path}: cutting {size - good_end} bytes of truncated or "
                    f"corrupt records after index {len(events) - 1}"
                )
                with self._path.open("r+b") as handle:
                    handle.truncate(good_end)
        self._file = self._path.open("ab")
        return events

    def _read_good_prefix(self) -> tuple[list[IndexedEvent], int]:
        events: list[IndexedEvent] = []
        offset = 0
        with self._path.open("rb") as handle:
            for line in handle:
                if not line.endswith(b"\n"):
                    break
                try:
                    indexed = IndexedEvent.model_validate_json(line)
                except ValidationError:
                    break
                if indexed.idx != len(events):
                    break
                self._offsets.append(offset)
                events.append(indexed)
                offset += len(line)
        return events, offset

    def append(self, indexed: IndexedEvent) -> None:
        if self._file is None:
            raise RuntimeError("event log is not open")
        if indexed.idx != len(self._offsets):
            raise ValueError(f"event log expects index {len(self._offsets)}, got {indexed.idx}")
        stored = elided(indexed) if indexed.event.ephemeral else indexed
        line = stored.model_dump_json().encode() + b"\n"
        self._offsets.append(self._file.tell())
        self._file.write(line)
        self._file.flush()
        self._dirty = True

    def truncate_after(self, last_kept_idx: int) -> None:
        """Drop every event with index > last_kept_idx (divergence repair)."""
        if self._file is None:
            raise RuntimeError("event log is not open")
        keep = last_kept_idx + 1
        if keep >= len(self._offsets):
            return
        cut_at = self._offsets[keep]
        self._file.flush()
        self._file.truncate(cut_at)
        self._file.seek(cut_at)
        del self._offsets[keep:]
        self.sync()

    def sync(self) -> None:
        """fsync pending appends; called periodically and on close."""
        if self._file is not None and self._dirty:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._dirty = False

    def close(self) -> None:
        if self._file is not None:
            self.sync()
            self._file.close()
            self._file = None
