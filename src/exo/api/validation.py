"""What a request body must be to be accepted: every bad input is a 4xx with a reason (422
``{"detail": reason}`` on the cluster endpoints, 400 in OpenAI's error shape with ``param``
naming the field on ``/v1``).

Every JSON body the API takes is an :class:`ApiRequest`:

* numbers are strict: ``true`` is not 1, ``"2"`` is not 2 (an integer is a valid float);
* ``NaN`` and ``Infinity`` (which Python's JSON parser accepts) are refused;
* no string may hold a lone UTF-16 surrogate (``"\\ud800"`` is valid JSON but no text: it
  cannot be encoded, stored or sent on);
* unknown fields are refused, except where an OpenAI-compatible endpoint must ignore them.

Every endpoint refuses a query parameter it does not declare the same way
(:func:`refuse_unknown_query_parameters`, one check for all routes, derived from each
route's own parameters), and an id in a path is at most :data:`MAX_ID_LENGTH` characters
(:data:`PathId`).

Validation errors name the field and the problem but never echo the value, so a large
body never comes back in the answer. The field names themselves come from the body too
(an unknown key is its own location), so each part of a location is cut to
:data:`MAX_LOCATION_PART` characters and only the first :data:`MAX_ERRORS_DESCRIBED` errors
are described: the reason stays under about 2 KB whatever the body.
"""

from collections.abc import Sequence
from typing import Annotated, Any, cast

from fastapi import Path, Request
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, model_validator
from starlette.exceptions import HTTPException

from exo.api.errors import is_openai_path
from exo.shared.echo import echoed

MAX_ID_LENGTH = 256
"""Longest model id or other identifier a request may carry."""
MAX_LOCATION_PART = 64
"""Longest part of an error's location (a field name, possibly the client's) described."""
MAX_MESSAGE_LENGTH = 200
"""Longest error message described (pydantic's own; a custom one may quote a location)."""
MAX_ERRORS_DESCRIBED = 5
"""Errors described one by one; the rest are counted."""

PathId = Annotated[str, Path(max_length=MAX_ID_LENGTH)]
"""An id in a request's path (instance, model): longer than :data:`MAX_ID_LENGTH` is a
validation error that says so (and, like every other, does not echo it)."""


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


def _shortened(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def describe_errors(errors: Sequence[Any]) -> str:
    """``field: problem`` for the first few validation errors, without the offending input
    and with long field names cut, then how many more there are: a bounded text."""
    problems: list[str] = []
    for error in errors[:MAX_ERRORS_DESCRIBED]:
        location = _location(error)
        message = _shortened(str(error.get("msg", "invalid")), MAX_MESSAGE_LENGTH)
        problems.append(f"{location}: {message}" if location else message)
    if len(errors) > MAX_ERRORS_DESCRIBED:
        problems.append(f"and {len(errors) - MAX_ERRORS_DESCRIBED} more")
    return "; ".join(problems)


def _location(error: Any) -> str:
    parts = [str(part) for part in error.get("loc", ()) if part != "body"]
    return _shortened(
        ".".join(_shortened(part, MAX_LOCATION_PART) for part in parts), 4 * MAX_LOCATION_PART
    )


def error_parameter(errors: Sequence[Any]) -> str | None:
    """The field the first error is about (``messages.0.content``), for OpenAI's ``param``;
    None when it is about the body as a whole (not JSON, missing)."""
    for error in errors[:1]:
        if error.get("type") != "json_invalid":
            return _location(error) or None
    return None


def error_code(errors: Sequence[Any]) -> str:
    """OpenAI's ``code`` for the first error: ``unsupported_parameter``,
    ``unknown_parameter``, ``missing_required_parameter`` or ``invalid_value``."""
    kind = str(errors[0].get("type", "")) if errors else ""
    if kind == "unsupported_parameter":
        return "unsupported_parameter"
    if kind == "extra_forbidden":
        return "unknown_parameter"
    if kind == "missing":
        return "missing_required_parameter"
    return "invalid_value"


UNCHECKED_QUERY_PATHS = ("/", "/dashboard/")
"""The dashboard page and its files take no parameters but are left alone: a browser or a
link may add its own (``?utm_source``), and they hold no data to get wrong."""


def _declared_query_names(dependant: Dependant) -> frozenset[str]:
    names = {field.alias for field in dependant.query_params}
    for dependency in dependant.dependencies:
        names |= _declared_query_names(dependency)
    return frozenset(names)


def declared_query_parameters(route: APIRoute) -> frozenset[str]:
    """The query parameters ``route`` takes (its own and its dependencies')."""
    return _declared_query_names(route.dependant)


async def refuse_unknown_query_parameters(request: Request) -> None:
    """An app-wide dependency: a query parameter the matched route does not declare is a
    validation error (``unknown_parameter``, at ``query.<name>``) naming it and the ones the
    route takes, answered like any other bad input (422 ``{"detail"}``; on ``/v1`` 400 in
    OpenAI's shape) instead of being silently ignored."""
    route = request.scope.get("route")
    path = request.url.path
    if not isinstance(route, APIRoute) or path == UNCHECKED_QUERY_PATHS[0]:
        return
    if path.startswith(UNCHECKED_QUERY_PATHS[1]):
        return
    allowed = declared_query_parameters(route)
    unknown = [name for name in dict.fromkeys(request.query_params.keys()) if name not in allowed]
    if not unknown:
        return
    takes = ", ".join(sorted(allowed)) or "none"
    message = f"unknown query parameter (this endpoint takes: {takes})"
    if not is_openai_path(path):
        names = ", ".join(echoed(name) for name in unknown[:5])
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        noun = "parameters" if len(unknown) > 1 else "parameter"
        raise HTTPException(
            400, f"unknown query {noun} {names}{more} (this endpoint takes: {takes})"
        )
    raise RequestValidationError(
        [{"type": "extra_forbidden", "loc": ("query", name), "msg": message} for name in unknown]
    )
