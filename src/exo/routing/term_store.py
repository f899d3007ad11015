"""The term this node is in and whom it voted for in it, kept on disk.

Raft's two persistent facts besides the log: a node must never go back to an older term
nor vote twice in one term, also across a restart. ``EXO_HOME/term.json`` is rewritten
atomically (temporary file, fsync, rename) before the node acts on a new term or answers a
vote.

When the file cannot be written (a full disk, an I/O error) :meth:`TermStore.save` says so
and changes nothing: the node then grants no vote and does not stand, as Raft requires (a
vote that is not on disk could be given twice after a restart). A newer term learnt from
another node, and the committed membership, are kept in memory meanwhile
(:meth:`TermStore.remember`) and written by the next :meth:`TermStore.flush`. Each change
between "writable" and "not writable" is logged once, not each attempt.
"""

from pathlib import Path

from loguru import logger
from pydantic import BaseModel, ConfigDict, ValidationError

from exo.shared.atomic_file import write_atomically
from exo.shared.types.ids import NodeId

TERM_FILE = "term.json"


class TermRecord(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    term: int = 0
    voted_for: NodeId | None = None
    membership_committed_idx: int = -1
    """The last membership change this node knows to be committed (the two-member
    exception of :mod:`exo.routing.quorum` needs it also right after a restart)."""


class TermStoreError(ValueError):
    """The term file cannot be read; the message is one sentence."""


class TermStore:
    def __init__(self, home: Path | None) -> None:
        self._path = home / TERM_FILE if home is not None else None
        self._record = TermRecord()
        """What the node acts on; ahead of _durable only through remember()."""
        self._durable = TermRecord()
        """What the file holds (as far as this process knows)."""
        self._write_error: str | None = None

    def load(self) -> TermRecord:
        if self._path is not None and self._path.exists():
            try:
                self._record = TermRecord.model_validate_json(self._path.read_bytes())
            except ValidationError as error:
                raise TermStoreError(
                    f"the term file {self._path} is damaged ({error.error_count()} errors); "
                    "delete it only if this node's event log goes with it"
                ) from error
            self._durable = self._record
        return self._record

    @property
    def record(self) -> TermRecord:
        return self._record

    @property
    def write_error(self) -> str | None:
        """Why the last write of the term file failed, or None once one succeeds."""
        return self._write_error

    @property
    def durable(self) -> bool:
        """The file holds what the node acts on."""
        return self._record == self._durable

    def save(self, record: TermRecord) -> bool:
        """Write ``record`` to disk and act on it; False, changing nothing, when the file
        cannot be written (the caller must then not vote or stand on it)."""
        if record == self._durable:
            self._record = record
            return True
        if not self._write(record):
            return False
        self._record = record
        return True

    def remember(self, record: TermRecord) -> bool:
        """Act on ``record`` now and write it; when the write fails it is kept in memory
        and the next flush writes it. For what may hold without being on disk: a newer
        term (no vote in it yet) or the membership known committed. True if written."""
        self._record = record
        return self.flush()

    def flush(self) -> bool:
        """Write what the node acts on if the file does not hold it yet; True if it does."""
        return self.durable or self._write(self._record)

    def _write(self, record: TermRecord) -> bool:
        if self._path is not None:
            try:
                write_atomically(self._path, record.model_dump_json().encode())
            except OSError as error:
                reason = error.strerror or str(error)
                if self._write_error is None:
                    logger.error(
                        f"cannot write the term file {self._path}: {reason}; this node "
                        "grants no vote and does not stand for master until it can "
                        "(retried as it goes)"
                    )
                self._write_error = reason
                return False
        if self._write_error is not None:
            logger.info(f"the term file {self._path} is writable again")
            self._write_error = None
        self._durable = record
        return True
