"""Tensor names, dtypes, shapes and sizes from safetensors headers, without reading tensors.

A safetensors file is an 8-byte little-endian header length, that many bytes of JSON
(``{name: {"dtype", "shape", "data_offsets"}, "__metadata__": {...}}``), then the data.
"""

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import cast

WEIGHTS_GLOB = "model*.safetensors"
"""The weight files mlx-lm loads from a model directory."""

DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "I16": 2,
    "F16": 2,
    "BF16": 2,
    "U32": 4,
    "I32": 4,
    "F32": 4,
    "U64": 8,
    "I64": 8,
    "F64": 8,
}
_MAX_HEADER_BYTES = 100 * 1024 * 1024

JsonObject = dict[str, object]


class SafetensorsError(ValueError):
    """A weights file that cannot be used; the message names the file and the problem."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as a safetensors header describes it."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor names, dtypes, shapes and byte sizes from a safetensors file's JSON header
    (an 8-byte little-endian length, then that many bytes of JSON); no tensor is read."""
    try:
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) != 8:
                raise SafetensorsError(path, "too short to be a safetensors file")
            (length,) = struct.unpack("<Q", prefix)
            if length > _MAX_HEADER_BYTES:
                raise SafetensorsError(path, f"implausible safetensors header size {length}")
            raw = handle.read(length)
            file_size = path.stat().st_size
    except OSError as error:
        raise SafetensorsError(path, f"cannot read: {error.strerror or error}") from error
    if len(raw) != length:
        raise SafetensorsError(path, "safetensors header is truncated")
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SafetensorsError(path, f"safetensors header is not JSON: {error}") from error
    if not isinstance(header, dict):
        raise SafetensorsError(path, "safetensors header is not a JSON object")
    data_size = file_size - 8 - length
    tensors: dict[str, TensorInfo] = {}
    for name, entry in cast(JsonObject, header).items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise SafetensorsError(path, f"tensor '{name}' has a malformed header entry")
        fields = cast(JsonObject, entry)
        dtype = fields.get("dtype")
        shape = fields.get("shape")
        offsets = fields.get("data_offsets")
        if (
            not isinstance(dtype, str)
            or not isinstance(shape, list)
            or not isinstance(offsets, list)
            or len(cast(list[object], offsets)) != 2
        ):
            raise SafetensorsError(path, f"tensor '{name}' has a malformed header entry")
        dims = [int(cast(int, d)) for d in cast(list[object], shape)]
        begin, end = (int(cast(int, o)) for o in cast(list[object], offsets))
        item_bytes = DTYPE_BYTES.get(dtype)
        if item_bytes is None:
            raise SafetensorsError(path, f"tensor '{name}' has unsupported dtype {dtype}")
        if not 0 <= begin <= end <= data_size or end - begin != math.prod(dims) * item_bytes:
            raise SafetensorsError(
                path, f"tensor '{name}' data offsets do not match its shape or the file size"
            )
        tensors[name] = TensorInfo(file=path, dtype=dtype, shape=tuple(dims), nbytes=end - begin)
    return tensors


def tensor_index(directory: Path) -> dict[str, TensorInfo]:
    """Every tensor of the directory's weight files, by name."""
    files = sorted(directory.glob(WEIGHTS_GLOB))
    if not files:
        raise SafetensorsError(directory, f"no {WEIGHTS_GLOB} weights")
    index: dict[str, TensorInfo] = {}
    for file in files:
        for name, info in read_safetensors_header(file).items():
            if name in index:
                raise SafetensorsError(file, f"tensor '{name}' is also in {index[name].file.name}")
            index[name] = info
    return index
