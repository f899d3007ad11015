"""The ring hostfile MLX's ring backend reads, and the environment that points MLX at it.

``MLX_RANK`` is a process's rank; ``MLX_HOSTFILE`` the path of a JSON list with, per rank,
the ``"ip:port"`` addresses it listens on: ``[["10.0.0.1:5000"], ["10.0.0.2:5001"], ...]``.
(No MLX here: the node writes hostfiles for runners it starts.)
"""

import json
from collections.abc import Sequence
from pathlib import Path
from typing import cast

HOSTFILE_ENV = "MLX_HOSTFILE"
RANK_ENV = "MLX_RANK"


class HostfileError(ValueError):
    """A hostfile that is not MLX's format; the message says what is off."""


def write_hostfile(path: Path | str, addresses: Sequence[str]) -> Path:
    """Write the ring hostfile: one ``"ip:port"`` per rank, in rank order."""
    path = Path(path)
    path.write_text(json.dumps([[address] for address in addresses]))
    return path


def read_hostfile(path: Path | str) -> list[list[str]]:
    data: object = json.loads(Path(path).read_text())
    if not isinstance(data, list):
        raise HostfileError(f"hostfile {path} is not a JSON list")
    hosts: list[list[str]] = []
    for entry in cast(list[object], data):
        addresses = [entry] if isinstance(entry, str) else entry
        if not isinstance(addresses, list) or not all(
            isinstance(address, str) for address in cast(list[object], addresses)
        ):
            raise HostfileError(f"hostfile {path}: entry {entry!r} is not a list of 'ip:port'")
        hosts.append(cast(list[str], addresses))
    return hosts
