"""A node's state at one committed index, so the log before it can go.

``EXO_HOME/events/snapshot.json`` holds one checksummed line (the same framing as a log
record: CRC-32 of the JSON, a space, the JSON) with the index and term of the last event it
covers and the state after it. It is replaced atomically (temporary file, fsync, rename,
fsync of the directory) before the log drops the records it covers, so a crash between the
two leaves a snapshot plus records it already covers, which loading skips.

A snapshot also travels: a node that needs events its peer has compacted away fetches the
peer's snapshot and installs it instead (:mod:`exo.routing.event_sync`).
"""

import zlib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from exo.shared.atomic_file import write_atomically
from exo.shared.types.state import State

SNAPSHOT_FILE_NAME = "snapshot.json"


class Snapshot(BaseModel):
    model_config = ConfigDict(frozen=True)

    idx: int
    """The last event whose effect the state holds."""
    term: int
    state: State


class SnapshotDamagedError(ValueError):
    """The snapshot file fails its checksum or does not parse; one sentence."""


def encode_snapshot(snapshot: Snapshot) -> bytes:
    body = snapshot.model_dump_json().encode()
    return f"{zlib.crc32(body):08x} ".encode() + body + b"\n"


def decode_snapshot(data: bytes, where: str) -> Snapshot:
    line = data.rstrip(b"\n")
    prefix, _, body = line.partition(b" ")
    try:
        if int(prefix, 16) != zlib.crc32(body):
            raise SnapshotDamagedError(f"the state snapshot {where} is damaged (bad checksum)")
        return Snapshot.model_validate_json(body)
    except (ValueError, ValidationError) as error:
        if isinstance(error, SnapshotDamagedError):
            raise
        raise SnapshotDamagedError(f"the state snapshot {where} is damaged") from error


def read_snapshot(directory: Path) -> Snapshot | None:
    path = directory / SNAPSHOT_FILE_NAME
    if not path.exists():
        return None
    return decode_snapshot(path.read_bytes(), str(path))


def write_snapshot(directory: Path, snapshot: Snapshot) -> int:
    """Atomically replace the snapshot file; returns its size in bytes. Raises OSError."""
    data = encode_snapshot(snapshot)
    write_atomically(directory / SNAPSHOT_FILE_NAME, data)
    return len(data)
