"""The cluster secret: what every node must hold to be part of the cluster.

Nodes authenticate each other with zenoh's own user-password authentication
(``transport/auth/usrpwd``): every node presents user :data:`CLUSTER_USER` with the secret
as password, and accepts only peers that present the same pair (its dictionary file holds
just that line). A peer without the secret cannot open a zenoh session with any node, so it
can neither read nor publish anything: no events, commands, election announcements,
liveliness tokens or log queries.

Where the secret comes from, in order: ``--cluster-secret``, ``$EXO_CLUSTER_SECRET``, the
home's ``cluster_secret`` file. A node that finds none makes one on its first start (so one
node works out of the box), stores it (mode 0600) and prints how to give it to the others.
A given secret is stored too, so the next start needs no flag.
"""

import os
import secrets
from pathlib import Path

from pydantic import BaseModel, ConfigDict

CLUSTER_USER = "exo"
SECRET_FILE = "cluster_secret"
DICTIONARY_FILE = "cluster_users"
SECRET_ENV = "EXO_CLUSTER_SECRET"
MIN_SECRET_LENGTH = 16


class ClusterSecretError(ValueError):
    """A secret that cannot be used; the message is one sentence for the user."""


class ClusterSecret(BaseModel):
    model_config = ConfigDict(frozen=True)

    value: str
    created: bool = False
    """Made on this start (the node prints it, to be given to the other nodes)."""
    source: str
    """Where it came from: the flag, the environment, or the home's file."""
    dictionary_file: Path
    """zenoh's user-password dictionary: the one ``exo:<secret>`` line."""
    replaced: bool = False
    """The home held a different secret, now replaced by the given one."""


def check_secret(value: str) -> str:
    secret = value.strip()
    if len(secret) < MIN_SECRET_LENGTH:
        raise ClusterSecretError(f"a cluster secret needs at least {MIN_SECRET_LENGTH} characters")
    if not secret.isprintable() or ":" in secret or any(char.isspace() for char in secret):
        raise ClusterSecretError("a cluster secret is printable characters without spaces or ':'")
    return secret


def _write_private(path: Path, text: str) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.unlink(missing_ok=True)
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)
    os.replace(temporary, path)


def resolve_cluster_secret(given: str | None, home: Path) -> ClusterSecret:
    """The secret this node uses (see the module docstring), stored in ``home`` with the
    dictionary file zenoh reads. Raises :class:`ClusterSecretError` or ``OSError``."""
    stored_path = home / SECRET_FILE
    created = False
    if given:
        source, text = "--cluster-secret", given
    elif os.environ.get(SECRET_ENV):
        source, text = SECRET_ENV, os.environ[SECRET_ENV]
    elif stored_path.is_file():
        source, text = str(stored_path), stored_path.read_text()
    else:
        source, text, created = str(stored_path), secrets.token_urlsafe(24), True
    try:
        value = check_secret(text)
    except ClusterSecretError as error:
        raise ClusterSecretError(f"{source}: {error}") from error
    replaced = stored_path.is_file() and stored_path.read_text().strip() != value
    if replaced or not stored_path.is_file():
        _write_private(stored_path, value + "\n")
    dictionary = home / DICTIONARY_FILE
    _write_private(dictionary, f"{CLUSTER_USER}:{value}\n")
    return ClusterSecret(
        value=value,
        created=created,
        source=source,
        dictionary_file=dictionary,
        replaced=replaced,
    )
