"""Set-valued fields that serialise the same on every node.

A ``frozenset`` dumps to JSON in its iteration order, which follows the string hashes of
the process (``PYTHONHASHSEED``) and the order the items went in: two nodes holding the same
set would write different JSON. Every set-valued field of the shared types is a
:data:`SortedFrozenSet`, which dumps (in JSON mode) as a sorted list.
"""

from typing import Annotated, TypeVar

from pydantic import PlainSerializer

Item = TypeVar("Item", bound=str)


def _sorted_list(values: frozenset[str]) -> list[str]:
    return sorted(values)


SortedFrozenSet = Annotated[frozenset[Item], PlainSerializer(_sorted_list, when_used="json")]
"""A frozenset of ids (or other strings) that serialises to JSON as a sorted list."""
