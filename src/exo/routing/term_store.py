"""The term this node is in and whom it voted for in it, kept on disk.

Raft's two persistent facts besides the log: a node must never go back to an older term
nor vote twice in one term, also across a restart. ``EXO_HOME/term.json`` is rewritten
atomically (temporary file, fsync, rename) before the node acts on a new term or answers a
vote.
"""

from pathlib import Path

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

    def load(self) -> TermRecord:
        if self._path is not None and self._path.exists():
            try:
                self._record = TermRecord.model_validate_json(self._path.read_bytes())
            except ValidationError as error:
                raise TermStoreError(
                    f"the term file {self._path} is damaged ({error.error_count()} errors); "
                    "delete it only if this node's event log goes with it"
                ) from error
        return self._record

    @property
    def record(self) -> TermRecord:
        return self._record

    def save(self, record: TermRecord) -> None:
        if record == self._record:
            return
        if self._path is not None:
            write_atomically(self._path, record.model_dump_json().encode())
        self._record = record
