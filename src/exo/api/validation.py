"""What a request body must be to be accepted: every bad input is a 422 with a reason.

Every JSON body the API takes is an :class:`ApiRequest`:

* numbers are strict: ``true`` is not 1, ``"2"`` is not 2 (an integer is a valid float);
* ``NaN`` and ``Infinity`` (which Python's JSON parser accepts) are refused;
* no string may hold a lone UTF-16 surrogate (``"\\ud800"`` is valid JSON but no text: it
  cannot be encoded, stored or sent on);
* unknown fields are refused, except where an OpenAI-compatible endpoint must ignore them.

Validation errors name the field and the problem but never echo the value, so a large
body never comes back in the answer.
"""

from collections.abc import Sequence
from typing import Any, cast

from pydantic import BaseModel, ConfigDict, model_validator

MAX_ID_LENGTH = 256
"""Longest model id or other identifier a request may carry."""


def has_lone_surrogate(text: str) -> bool:
    return any(0xD800 <= ord(char) <= 0xDFFF for char in text)


def surrogate_paths(value: object, path: str = "") -> list[str]:
    """Where in ``value`` (nested models, lists, dicts) a string holds a lone surrogate."""
    found: list[str] = []
    if isinstance(value, str):
        if has_lone_surrogate(value):
            found.append(path or "body")
    elif isinstance(value, BaseModel):
        for name in type(value).model_fields:
            found += surrogate_paths(getattr(value, name), f"{path}.{name}" if path else name)
    elif isinstance(value, dict):
        for key, item in cast(dict[object, object], value).items():
            found += surrogate_paths(str(key), path)
            found += surrogate_paths(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list | tuple):
        for index, item in enumerate(cast(Sequence[object], value)):
            found += surrogate_paths(item, f"{path}.{index}" if path else str(index))
    return found


class ApiRequest(BaseModel):
    """Base of every request body."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid", frozen=True)

    @model_validator(mode="after")
    def _no_lone_surrogates(self) -> "ApiRequest":
        paths = surrogate_paths(self)
        if paths:
            raise ValueError(
                f"{', '.join(paths)}: text holds a lone UTF-16 surrogate (not valid Unicode)"
            )
        return self


def describe_errors(errors: Sequence[Any]) -> str:
    """``field: problem`` for each validation error, without the offending input."""
    problems: list[str] = []
    for error in errors:
        location = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
        message = str(error.get("msg", "invalid"))
        problems.append(f"{location}: {message}" if location else message)
    return "; ".join(problems)
