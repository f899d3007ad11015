"""Typed reads of GGUF metadata as ``mx.load(path, return_metadata=True)`` returns it:
scalars come back as one-element ``mx.array``s (or Python values), strings as ``str``,
arrays as lists or ``mx.array``s."""

from typing import Any, cast

import mlx.core as mx

Metadata = dict[str, Any]


class GGUFImportError(ValueError):
    """The GGUF file cannot be imported; the message says what is off."""


def _value(metadata: Metadata, key: str) -> object:
    if key not in metadata:
        raise GGUFImportError(f"GGUF metadata has no '{key}'")
    return metadata[key]


def metadata_int(metadata: Metadata, key: str) -> int:
    value = _value(metadata, key)
    if isinstance(value, mx.array):
        return int(cast(int, value.item()))
    if isinstance(value, int):
        return value
    raise GGUFImportError(f"GGUF metadata '{key}' is not an integer: {value!r}")


def metadata_float(metadata: Metadata, key: str) -> float:
    value = _value(metadata, key)
    if isinstance(value, mx.array):
        return float(cast(float, value.item()))
    if isinstance(value, int | float):
        return float(value)
    raise GGUFImportError(f"GGUF metadata '{key}' is not a number: {value!r}")


def metadata_bool(metadata: Metadata, key: str, default: bool) -> bool:
    if key not in metadata:
        return default
    value = metadata[key]
    if isinstance(value, mx.array):
        return bool(value.item())
    return bool(value)


def metadata_str(metadata: Metadata, key: str) -> str:
    value = _value(metadata, key)
    if not isinstance(value, str):
        raise GGUFImportError(f"GGUF metadata '{key}' is not a string: {value!r}")
    return value


def metadata_str_list(metadata: Metadata, key: str) -> list[str]:
    value = _value(metadata, key)
    if not isinstance(value, list) or not all(
        isinstance(item, str) for item in cast(list[object], value)
    ):
        raise GGUFImportError(f"GGUF metadata '{key}' is not a list of strings")
    return cast(list[str], value)


def metadata_int_list(metadata: Metadata, key: str) -> list[int]:
    value = _value(metadata, key)
    if isinstance(value, mx.array):
        return cast(list[int], value.tolist())
    if isinstance(value, list):
        return [int(cast(int, item)) for item in cast(list[object], value)]
    raise GGUFImportError(f"GGUF metadata '{key}' is not a list of integers")
