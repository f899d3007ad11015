"""The API's two error shapes. On ``/v1`` OpenAI's, ``{"error": {"message", "type",
"param", "code"}}``; on the cluster endpoints ``{"detail": "<reason>", ...}``. The app's
handlers and the guard in front of it (401, 413) answer through these."""

from typing import Any

from fastapi.responses import JSONResponse

OPENAI_PREFIX = "/v1/"


def is_openai_path(path: str) -> bool:
    return path.startswith(OPENAI_PREFIX)


def error_type_for(status: int) -> str:
    """OpenAI's error ``type`` for an HTTP status."""
    if status == 503:
        return "service_unavailable"
    if status == 504:
        return "timeout"
    if status >= 500:
        return "server_error"
    if status == 401:
        return "authentication_error"
    return "invalid_request_error"


def openai_error_body(
    message: str, error_type: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def openai_error(
    status: int,
    message: str,
    error_type: str,
    code: str | None = None,
    param: str | None = None,
) -> JSONResponse:
    return JSONResponse(
        status_code=status, content=openai_error_body(message, error_type, code, param)
    )


def detail_response(status: int, reason: str, **extra: object) -> JSONResponse:
    """The cluster endpoints' one error shape: ``{"detail": reason}``, with any extra
    facts about it beside (e.g. ``instance_status``)."""
    return JSONResponse(status_code=status, content={**extra, "detail": reason})


def error_body(path: str, status: int, reason: str, code: str | None = None) -> dict[str, Any]:
    """An error's body in the shape of ``path``'s endpoints."""
    if is_openai_path(path):
        return openai_error_body(reason, error_type_for(status), code)
    return {"detail": reason}


def path_error(path: str, status: int, reason: str) -> JSONResponse:
    """An error in the shape of ``path``'s endpoints."""
    return JSONResponse(status_code=status, content=error_body(path, status, reason))
