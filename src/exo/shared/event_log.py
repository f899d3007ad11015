"""The global log on disk: one checksummed line per indexed event under ``EXO_HOME/events/``.

Format of ``global_events.jsonl``: one record per line, in index order with no gap, from
the index after the state snapshot (:mod:`exo.shared.snapshot`; from 0 without one)::

    <crc32 of the JSON bytes, 8 lowercase hex digits> <JSON of the IndexedEvent>\\n

Ephemeral events (token chunks) are written as an ``EventElided`` record so indices stay
gap-free without keeping their bodies.

Reading (``open``) checks every line: the checksum, that the JSON is an event, and that its
index is the next one.

- A bad *last* line (no line end, or a bad checksum, event or index) is a record torn by a
  power loss mid-write: it is logged and cut, and the node catches up from the cluster.
- A bad line anywhere else is damage (a flipped bit, a lost write), not a torn write:
  ``open`` raises ``LogDamagedError`` naming the record and leaves the file as it is. A last
  line that holds a bad record running into a good next one (its line end was damaged)
  counts as damage too. ``salvage`` then keeps the intact records before the damaged one in
  a fresh file, sets the damaged file aside as ``global_events.jsonl.damaged-<unix
  seconds>``, and the node refetches the rest from a peer.
- A file written before records had checksums (every line plain JSON starting with ``{``)
  is read by the same rules without checksums, then rewritten in the checksummed format
  (atomically: a temporary file, fsync, rename, fsync of the directory). The file's first
  line decides its format: a line of the other format is damage at that line (or, as the
  last line, cut like any bad last line).

Writing: ``append`` writes a record with ``os.pwrite`` on an unbuffered descriptor (no
buffered bytes can reach the file later) and does not fsync; ``sync`` fsyncs, on a timer, on
close, and before a node acknowledges records to its master (``durable_idx`` is the last
record the last good fsync covered; records read at ``open`` count only after the first
``sync``, as they may sit in the page cache of a process that crashed). When a write fails
(disk full, I/O error, quota) the partial record is cut off again so the file holds only
whole records (if even that fails, the cut is retried before the next write), the record
counts as not stored, and ``LogWriteError`` is raised. When an fsync fails, the records
written since the last good one stay in the file and the next ``sync`` writes them again
before it fsyncs, because the kernel may have dropped them while reporting the error only
once.

``sync`` blocks its caller for the fsync. An owner that must not block (a node's event
loop) splits it: ``begin_sync`` (on the owner's thread: what an fsync now covers, on a
duplicate of the descriptor), ``PendingSync.fsync`` (any thread), ``finish_sync`` (the
owner's thread again). Appends may go on meanwhile; a cut, compaction or reopen meanwhile
makes the result count for nothing (the next sync covers what is left).
"""

import errno
import os
import re
import time
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from loguru import logger
from pydantic import ValidationError

from exo.shared.types.events import IndexedEvent, elided

LOG_FILE_NAME = "global_events.jsonl"
CHECKSUM_DIGITS = 8
_HEX_DIGITS = frozenset(b"0123456789abcdef")
_RECORD_START = re.compile(rb"[0-9a-f]{8} ")
_COPY_CHUNK = 1 << 20


class LogDamagedError(ValueError):
    """A record before the last one is damaged; the file was left as it is."""

    def __init__(self, path: Path, record_idx: int, reason: str, line: int) -> None:
        self.path = path
        self.record_idx = record_idx
        """Index of the first damaged record."""
        self.line = line
        """The file's line that holds it (from 1; the file starts after the snapshot)."""
        self.reason = reason
        super().__init__(
            f"event log {path}: record {record_idx} (line {line}) is damaged "
            f"({reason}); the records before it are intact"
        )


class LogWriteError(OSError):
    """The log could not be written; it still holds only whole records."""

    def __init__(self, path: Path, cause: OSError) -> None:
        reason = cause.strerror or (os.strerror(cause.errno) if cause.errno else str(cause))
        self.path = path
        self.message = f"cannot write the event log {path}: {reason}"
        super().__init__(self.message)
        self.errno = cause.errno

    def __str__(self) -> str:
        return self.message


def encode_record(indexed: IndexedEvent) -> bytes:
    """The line that stores indexed, checksum and line end included."""
    return _frame(indexed.model_dump_json().encode())


def _frame(body: bytes) -> bytes:
    return f"{zlib.crc32(body):0{CHECKSUM_DIGITS}x} ".encode() + body + b"\n"


def _parse_event(body: bytes, expected_idx: int, invalid: str) -> IndexedEvent | str:
    """The event in body, or why it is not the record expected at expected_idx."""
    try:
        indexed = IndexedEvent.model_validate_json(body)
    except ValidationError:
        return invalid
    if indexed.idx != expected_idx:
        return f"it holds index {indexed.idx}"
    return indexed


def _parse_checksummed(line: bytes, expected_idx: int) -> IndexedEvent | str:
    """A record's line without its line end: the event, or why it is damaged."""
    if line.startswith(b"{"):
        return "no checksum: a record of the old format"
    prefix = line[:CHECKSUM_DIGITS]
    if (
        len(line) <= CHECKSUM_DIGITS
        or line[CHECKSUM_DIGITS] != ord(" ")
        or not _HEX_DIGITS.issuperset(prefix)
    ):
        return "no checksum"
    body = line[CHECKSUM_DIGITS + 1 :]
    if int(prefix, 16) != zlib.crc32(body):
        return "checksum mismatch"
    return _parse_event(body, expected_idx, "its checksum matches but it is not an event")


def _parse_legacy(line: bytes, expected_idx: int) -> IndexedEvent | str:
    """A line of a file written before checksums, without its line end."""
    if _RECORD_START.match(line):
        return "a checksummed record among records of the old format"
    return _parse_event(line, expected_idx, "not an event")


def _runs_into_next_record(line: bytes, next_idx: int) -> bool:
    """Whether a bad line ends with the whole, good record next_idx: then the bad record's
    line end was damaged, which no torn write does."""
    for start in _RECORD_START.finditer(line, 1):
        if isinstance(_parse_checksummed(line[start.start() : -1], next_idx), IndexedEvent):
            return True
    return False


@dataclass
class _Scan:
    """What reading a log file found."""

    events: list[IndexedEvent] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    legacy_bodies: list[bytes] = field(default_factory=list)
    """The JSON of each good record, kept only for a file of the old format."""
    good_end: int = 0
    """Bytes of whole good records at the start of the file."""
    size: int = 0
    legacy: bool = False
    damage: tuple[int, str] | None = None
    """(record index, reason) of a damaged record that is not a torn tail."""


def _scan(path: Path, base: int) -> _Scan:
    scan = _Scan()
    with path.open("rb") as handle:
        scan.size = os.fstat(handle.fileno()).st_size
        lines: Iterator[bytes] = iter(handle)  # a binary file splits at b"\n" only
        line = next(lines, None)
        if line is None:
            return scan
        scan.legacy = line.startswith(b"{")
        parse = _parse_legacy if scan.legacy else _parse_checksummed
        while line is not None:
            following = next(lines, None)
            expected_idx = base + len(scan.events)
            ended = line.endswith(b"\n")
            parsed = parse(line[:-1], expected_idx) if ended else "no line end"
            if isinstance(parsed, str):
                if following is not None:
                    scan.damage = (expected_idx, parsed)
                elif ended and not scan.legacy and _runs_into_next_record(line, expected_idx + 1):
                    scan.damage = (expected_idx, f"{parsed}, and it runs into the next record")
                break
            scan.offsets.append(scan.good_end)
            scan.events.append(parsed)
            if scan.legacy:
                scan.legacy_bodies.append(line[:-1])
            scan.good_end += len(line)
            line = following
    return scan


def _first_index(path: Path) -> int | None:
    """The index the file's first line claims, if it reads as a record at all."""
    with path.open("rb") as handle:
        line = handle.readline()
    body = line if line.startswith(b"{") else line[CHECKSUM_DIGITS + 1 :]
    try:
        return IndexedEvent.model_validate_json(body).idx
    except ValidationError:
        return None


def _fsync_directory(directory: Path) -> None:
    """Make a rename in directory durable; a failure is logged, as the rename stands."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
    except OSError as error:
        logger.warning(f"cannot fsync the directory {directory}: {error}")


@dataclass(frozen=True)
class PendingSync:
    """An fsync begun by :meth:`DiskEventLog.begin_sync`: run :meth:`fsync` (on any thread),
    then hand the outcome to :meth:`DiskEventLog.finish_sync`."""

    descriptor: int
    """A duplicate of the log's descriptor, closed by :meth:`fsync`."""
    end: int
    """The file's length of whole records when it began."""
    last_idx: int
    """The last record it covers."""
    layout: int
    """The log's layout count when it began (a cut, compaction or reopen changes it)."""

    def fsync(self) -> OSError | None:
        """fsync and close the duplicate; the error, if any."""
        try:
            os.fsync(self.descriptor)
        except OSError as error:
            return error
        finally:
            os.close(self.descriptor)
        return None


class DiskEventLog:
    """Append-only, checksummed, index-checked file of IndexedEvents. Not thread-safe; one
    owner."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._path = directory / LOG_FILE_NAME
        self._base = 0
        """Index of the file's first record (the one after the snapshot)."""
        self._offsets: list[int] = []
        """Byte offset where each record's line starts, record ``base + i`` at ``[i]``."""
        self._end = 0
        """Bytes of whole records in the file: where the next record goes."""
        self._descriptor: int | None = None
        self._dirty = False
        """Records were written since the last good fsync."""
        self._synced_end = 0
        """Bytes known durable: the file's length at the last good fsync (or open)."""
        self._unsynced = bytearray()
        """The file's bytes from _synced_end to _end, to write again after a failed fsync."""
        self._sync_failed = False
        self._tail_dirty = False
        """The file may hold bytes past _end (a failed write that could not be cut off)."""
        self._durable_idx = -1
        """The last record a good fsync covered (base - 1: none)."""
        self._layout = 0
        """Counts cuts, compactions and reopens: a sync begun before one covers nothing."""

    @property
    def path(self) -> Path:
        return self._path

    @property
    def base(self) -> int:
        """Index of the file's first record."""
        return self._base

    @property
    def durable_idx(self) -> int:
        """The last index on stable storage: covered by a good fsync (base - 1: none)."""
        return self._durable_idx

    @property
    def sync_failed(self) -> bool:
        """The last fsync failed and no later one succeeded."""
        return self._sync_failed

    def open(self, base: int = 0) -> list[IndexedEvent]:
        """Create the directory if needed, read back every record, cut a torn last record,
        rewrite a file of the old format, and open the file for appending. Returns the
        events read. Raises LogDamagedError (leaving the file as it is) when a record
        before the last is damaged, and LogWriteError when a cut or rewrite fails."""
        return self._open(salvage=False, base=base)

    def salvage(self, base: int = 0) -> list[IndexedEvent]:
        """Like open, but when a record before the last is damaged: move the file aside as
        global_events.jsonl.damaged-<unix seconds>, start a fresh file holding the intact
        records before the damaged one, open it and return those events. For a node that
        will refetch the rest from a peer."""
        return self._open(salvage=True, base=base)

    def _open(self, *, salvage: bool, base: int) -> list[IndexedEvent]:
        if self._descriptor is not None:
            raise RuntimeError("event log is already open")
        self._directory.mkdir(parents=True, exist_ok=True)
        if self._path.exists():
            first = _first_index(self._path)
            if first is not None and first < base:
                base = first  # a crash after a snapshot, before the compaction: see load
            scan = _scan(self._path, base)
        else:
            scan = _Scan()
        offsets, end = scan.offsets, scan.good_end
        if scan.damage is not None:
            record_idx, reason = scan.damage
            damage = LogDamagedError(self._path, record_idx, reason, line=record_idx - base + 1)
            if not salvage:
                raise damage
            offsets, end = self._set_damaged_file_aside(scan, damage)
        elif scan.legacy:
            if scan.good_end < scan.size:
                self._warn_cut(scan)
            offsets, end = self._replace_file(self._new_format_prefix(scan), None)
            logger.info(
                f"event log {self._path}: rewrote {len(scan.events)} records of the old "
                f"format with checksums"
            )
        elif scan.good_end < scan.size:
            self._warn_cut(scan)
            try:
                os.truncate(self._path, scan.good_end)
            except OSError as error:
                raise LogWriteError(self._path, error) from error
        try:
            self._descriptor = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as error:
            raise LogWriteError(self._path, error) from error
        self._base = base
        self._offsets = offsets
        self._end = self._synced_end = end
        self._unsynced.clear()
        self._sync_failed = self._tail_dirty = False
        # What was read may be in the page cache only (the last process crashed before its
        # fsync): the first sync covers it before it counts as durable.
        self._dirty = bool(offsets)
        self._durable_idx = base - 1
        self._layout += 1
        return scan.events

    def _warn_cut(self, scan: _Scan) -> None:
        kept = f"after index {scan.events[-1].idx}" if scan.events else "(no record kept)"
        logger.warning(
            f"event log {self._path}: cutting {scan.size - scan.good_end} bytes of truncated or "
            f"corrupt records {kept}"
        )

    def _new_format_prefix(self, scan: _Scan) -> tuple[list[int], list[bytes]]:
        """Offsets and lines of the scan's good records in the checksummed format."""
        lines = [_frame(body) for body in scan.legacy_bodies]
        offsets: list[int] = []
        position = 0
        for line in lines:
            offsets.append(position)
            position += len(line)
        return offsets, lines

    def _set_damaged_file_aside(
        self, scan: _Scan, damage: LogDamagedError
    ) -> tuple[list[int], int]:
        if scan.legacy:
            prefix = self._new_format_prefix(scan)
        else:
            prefix = scan.offsets, self._file_range(0, scan.good_end)
        aside = self._path.with_name(f"{LOG_FILE_NAME}.damaged-{int(time.time())}")
        number = 1
        while aside.exists():
            number += 1
            aside = self._path.with_name(f"{LOG_FILE_NAME}.damaged-{int(time.time())}-{number}")
        offsets, end = self._replace_file(prefix, aside)
        logger.warning(
            f"{damage}: moved the damaged file to {aside} and kept the {len(offsets)} intact "
            f"records in a fresh {self._path}"
        )
        return offsets, end

    def _replace_file(
        self, prefix: tuple[list[int], Iterable[bytes]], aside: Path | None
    ) -> tuple[list[int], int]:
        """Atomically make the log file hold exactly the given lines, moving the old file to
        aside first if given. Returns the offsets and the new length."""
        offsets, chunks = prefix
        temporary = self._path.with_name(f"{LOG_FILE_NAME}.tmp")
        try:
            length = 0
            with temporary.open("wb") as handle:
                for chunk in chunks:
                    handle.write(chunk)
                    length += len(chunk)
                handle.flush()
                os.fsync(handle.fileno())
            if aside is not None:
                os.rename(self._path, aside)
            try:
                os.replace(temporary, self._path)
            except OSError:
                if aside is not None:
                    os.rename(aside, self._path)
                raise
        except OSError as error:
            temporary.unlink(missing_ok=True)
            raise LogWriteError(self._path, error) from error
        _fsync_directory(self._directory)
        return offsets, length

    def append(self, indexed: IndexedEvent) -> None:
        """Write the next record (not fsynced: see sync). Raises LogWriteError, with the
        record not stored and the file holding only whole records, when the write fails."""
        descriptor = self._open_descriptor()
        expected = self._base + len(self._offsets)
        if indexed.idx != expected:
            raise ValueError(f"event log expects index {expected}, got {indexed.idx}")
        stored = elided(indexed) if indexed.event.ephemeral else indexed
        line = encode_record(stored)
        try:
            self._cut_dirty_tail(descriptor)
            self._write_at(descriptor, self._end, line)
        except OSError as error:
            self._tail_dirty = True
            try:
                self._cut_dirty_tail(descriptor)
            except OSError:
                logger.warning(
                    f"event log {self._path}: cannot cut a partly written record off yet; "
                    f"retrying before the next write"
                )
            raise LogWriteError(self._path, error) from error
        self._offsets.append(self._end)
        self._end += len(line)
        self._unsynced += line
        self._dirty = True

    def truncate_after(self, last_kept_idx: int) -> None:
        """Drop every event with index > last_kept_idx (divergence repair). Raises
        LogWriteError, with nothing changed, when the file cannot be cut; a failed fsync of
        the cut is logged and retried by the next sync."""
        descriptor = self._open_descriptor()
        keep = last_kept_idx + 1 - self._base
        if keep >= len(self._offsets):
            return
        if keep < 0:
            raise ValueError(f"cannot cut the log into its snapshot (up to {self._base - 1})")
        cut_at = self._offsets[keep]
        try:
            os.ftruncate(descriptor, cut_at)
        except OSError as error:
            raise LogWriteError(self._path, error) from error
        del self._offsets[keep:]
        self._layout += 1
        self._end = cut_at
        self._durable_idx = min(self._durable_idx, last_kept_idx)
        self._tail_dirty = False
        if cut_at < self._synced_end:
            self._synced_end = cut_at
            self._unsynced.clear()
        else:
            del self._unsynced[cut_at - self._synced_end :]
        self._dirty = True
        try:
            self.sync()
        except LogWriteError as error:
            logger.warning(f"{error}; the cut is fsynced at the next sync")

    def sync(self) -> None:
        """fsync pending appends; called periodically and on close. Raises LogWriteError
        when the fsync fails; the records stay, and the next sync writes them again."""
        pending = self.begin_sync()
        if pending is not None:
            self.finish_sync(pending, pending.fsync())

    def begin_sync(self) -> PendingSync | None:
        """Write again what a failed fsync may have lost, cut a partly written tail, and
        return the fsync that makes every record written so far durable (None: nothing to
        sync). Raises LogWriteError when those writes fail."""
        descriptor = self._descriptor
        if descriptor is None or not (self._dirty or self._sync_failed or self._tail_dirty):
            return None
        try:
            self._cut_dirty_tail(descriptor)
            if self._sync_failed and self._unsynced:
                self._write_at(descriptor, self._synced_end, bytes(self._unsynced))
            duplicate = os.dup(descriptor)
        except OSError as error:
            self._sync_failed = True
            raise LogWriteError(self._path, error) from error
        return PendingSync(duplicate, self._end, self._base + len(self._offsets) - 1, self._layout)

    def finish_sync(self, pending: PendingSync, error: OSError | None) -> None:
        """Count what ``pending`` covered as durable; raises LogWriteError when its fsync
        failed (the records stay, and the next sync writes them again)."""
        if pending.layout != self._layout:
            return  # cut, compacted or reopened meanwhile: the next sync covers what is left
        if error is not None:
            self._sync_failed = True
            raise LogWriteError(self._path, error) from error
        covered = pending.end - self._synced_end
        if covered > 0:  # (else a later sync finished first, or nothing was written since open)
            del self._unsynced[:covered]
            self._synced_end = pending.end
        self._dirty = self._end > pending.end
        self._sync_failed = False
        self._durable_idx = max(self._durable_idx, pending.last_idx)

    def compact(self, first_kept_idx: int) -> None:
        """Drop the records before first_kept_idx (a snapshot holds their effect now): the
        file is replaced atomically by one holding only the later records. Raises
        LogWriteError, with nothing changed, when that fails."""
        keep = first_kept_idx - self._base
        if keep <= 0:
            return
        self.sync()
        cut_at = self._offsets[keep] if keep < len(self._offsets) else self._end
        lines = self._file_range(cut_at, self._end)
        self._reopen_with(
            first_kept_idx, [offset - cut_at for offset in self._offsets[keep:]], lines
        )

    def reset(self, base: int) -> None:
        """Start over with an empty file whose first record will be base (a snapshot from
        the master replaced this node's log). Raises LogWriteError when that fails."""
        self._reopen_with(base, [], [])

    def _reopen_with(self, base: int, offsets: list[int], lines: Iterable[bytes]) -> None:
        descriptor = self._open_descriptor()
        self._replace_file((offsets, lines), None)
        self._descriptor = None
        os.close(descriptor)
        try:
            self._descriptor = os.open(self._path, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as error:
            raise LogWriteError(self._path, error) from error
        self._base = base
        self._offsets = offsets
        self._end = self._synced_end = os.fstat(self._descriptor).st_size
        self._unsynced.clear()
        self._dirty = self._sync_failed = self._tail_dirty = False
        self._durable_idx = base + len(offsets) - 1  # _replace_file fsynced it
        self._layout += 1

    def _file_range(self, start: int, end: int) -> Iterator[bytes]:
        with self._path.open("rb") as handle:
            handle.seek(start)
            left = end - start
            while left > 0:
                chunk = handle.read(min(left, _COPY_CHUNK))
                if not chunk:
                    return
                left -= len(chunk)
                yield chunk

    def close(self) -> None:
        """Sync and close. Raises LogWriteError when the last fsync fails (closed anyway)."""
        descriptor = self._descriptor
        if descriptor is None:
            return
        try:
            self.sync()
        finally:
            self._descriptor = None
            self._layout += 1
            try:
                os.close(descriptor)
            except OSError as error:
                raise LogWriteError(self._path, error) from error

    def _open_descriptor(self) -> int:
        if self._descriptor is None:
            raise RuntimeError("event log is not open")
        return self._descriptor

    def _cut_dirty_tail(self, descriptor: int) -> None:
        if self._tail_dirty:
            os.ftruncate(descriptor, self._end)
            self._tail_dirty = False

    @staticmethod
    def _write_at(descriptor: int, offset: int, data: bytes) -> None:
        view = memoryview(data)
        written = 0
        while written < len(view):
            count = os.pwrite(descriptor, view[written:], offset + written)
            if count == 0:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            written += count
