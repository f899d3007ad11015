"""Equal states are equal JSON on every node: a set-valued field dumps sorted, whatever the
process's string hashes (``PYTHONHASHSEED``) and the order its items went in."""

import importlib
import json
import os
import pkgutil
import subprocess
import sys
from types import ModuleType
from typing import Annotated, Any, get_args, get_origin

from pydantic import BaseModel, PlainSerializer

import exo.shared.types
from exo.shared.snapshot import Snapshot
from exo.shared.types.ids import NodeId
from exo.shared.types.sets import SortedFrozenSet
from exo.shared.types.state import State

NODE_IDS = [f"node-{index}" for index in range(12)]

DUMP_BOTH_ORDERS = """
import json, sys
from exo.shared.types.ids import NodeId
from exo.shared.types.state import State
ids = [NodeId(f"node-{index}") for index in range(12)]
forward = State(members=frozenset(ids))
backward = State(members=frozenset(reversed(ids)))
assert forward == backward
print(json.dumps([forward.model_dump_json(), backward.model_dump_json()]))
"""


def dumps_with_hash_seed(seed: int) -> list[str]:
    environment = {**os.environ, "PYTHONHASHSEED": str(seed)}
    completed = subprocess.run(
        [sys.executable, "-c", DUMP_BOTH_ORDERS],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    dumps: list[str] = json.loads(completed.stdout)
    return dumps


def test_equal_states_dump_to_the_same_json_under_different_hash_seeds() -> None:
    # Seeds 1 and 2 iterate these ids in different orders, and seed 2 differently again
    # for the two insertion orders: unsorted, the four dumps are not all the same.
    dumps = dumps_with_hash_seed(1) + dumps_with_hash_seed(2)
    assert len(set(dumps)) == 1, dumps
    assert json.loads(dumps[0])["members"] == sorted(NODE_IDS)


def test_members_dump_sorted_in_json_and_stay_a_set_in_python() -> None:
    state = State(members=frozenset(NodeId(node_id) for node_id in reversed(NODE_IDS)))
    assert state.model_dump(mode="json")["members"] == sorted(NODE_IDS)
    assert json.loads(state.model_dump_json())["members"] == sorted(NODE_IDS)
    assert state.model_dump()["members"] == frozenset(NODE_IDS)
    assert State.model_validate_json(state.model_dump_json()) == state
    snapshot = Snapshot(idx=3, term=1, state=state)
    assert json.loads(snapshot.model_dump_json())["state"]["members"] == sorted(NODE_IDS)


def _is_sorted_set(metadata: tuple[Any, ...]) -> bool:
    sorted_serializer = get_args(SortedFrozenSet)[1]
    return any(
        isinstance(item, PlainSerializer) and item.func is sorted_serializer.func
        for item in metadata
    )


def _unsorted_sets(annotation: Any, metadata: tuple[Any, ...]) -> bool:
    """Whether ``annotation`` (with the field's ``metadata``) holds a set that would dump
    in hash order."""
    origin = get_origin(annotation)
    if origin is Annotated:
        inner, *extra = get_args(annotation)
        return _unsorted_sets(inner, tuple(extra))
    if annotation in (set, frozenset) or origin in (set, frozenset):
        return not _is_sorted_set(metadata)
    return any(_unsorted_sets(argument, ()) for argument in get_args(annotation))


def _type_modules() -> list[ModuleType]:
    return [
        importlib.import_module(f"exo.shared.types.{module.name}")
        for module in pkgutil.iter_modules(exo.shared.types.__path__)
    ]


def test_every_set_valued_field_of_the_shared_types_dumps_sorted() -> None:
    unsorted: list[str] = []
    checked = 0
    for module in _type_modules():
        for name, value in vars(module).items():
            if not (isinstance(value, type) and issubclass(value, BaseModel)):
                continue
            if value.__module__ != module.__name__:
                continue
            for field_name, field in value.model_fields.items():
                checked += 1
                if _unsorted_sets(field.annotation, tuple(field.metadata)):
                    unsorted.append(f"{module.__name__}.{name}.{field_name}")
    assert checked > 50  # the walk saw the models
    assert not unsorted, f"set fields that dump in hash order: {unsorted}"
