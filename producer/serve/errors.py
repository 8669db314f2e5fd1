"""OpenAI's error shape: {"error": {"message", "type", "param", "code"}}, so the SDK raises its usual errors;
under /v1/messages (Anthropic's Message Batches), Anthropic's: {"type": "error", "error": {"type", "message"}}."""

from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class ApiError(Exception):
    def __init__(self, status_code: int, message: str, code: str | None = None, param: str | None = None,
                 type_: str = "invalid_request_error", **extra: Any):
        super().__init__(message)
        self.status_code = status_code
        self.body = {"message": message, "type": type_, "param": param, "code": code, **extra}


def not_found(kind: str, object_id: str) -> ApiError:
    return ApiError(404, f"No {kind} found with id '{object_id}'.", code="not_found")


def unknown_parameter(param: str) -> ApiError:
    """A field we do not serve: refused by name, never silently dropped."""
    return ApiError(400, f"Unknown parameter: '{param}'.", code="unknown_parameter", param=param)


ANTHROPIC_PREFIX = "/v1/messages"
ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                   404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error"}


def error_response(request: Request, status_code: int, body: dict[str, Any],
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """body: OpenAI's error object; an Anthropic client's path gets Anthropic's envelope with the same message."""
    if request.url.path.startswith(ANTHROPIC_PREFIX):
        kind = ANTHROPIC_TYPES.get(status_code, "api_error")
        content: dict[str, Any] = {"type": "error", "error": {"type": kind, "message": body["message"]}}
    else:
        content = {"error": body}
    return JSONResponse(content, status_code=status_code, headers=headers)


async def api_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(request, exc.status_code, exc.body)


async def validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":  # its loc holds a character offset, not a field
        where = first.get("loc", ("body", 0))[-1]
        reason = first.get("ctx", {}).get("error", "JSON decode error")
        return error_response(request, 400, {"message": f"the request body is not valid JSON: {reason} at character "
                                                        f"{where}", "type": "invalid_request_error", "param": None,
                                             "code": "invalid_json"})
    param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
    if first.get("type") == "extra_forbidden" and param:
        return error_response(request, 400, unknown_parameter(param).body)
    body = {"message": f"{param or 'request'}: {first.get('msg', 'invalid request')}",
            "type": "invalid_request_error", "param": param, "code": "invalid_value"}
    return error_response(request, 400, body)


async def http_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """Unknown routes and methods in OpenAI's shape too (FastAPI's own is {"detail": ...})."""
    assert isinstance(exc, StarletteHTTPException)
    message = f"Invalid URL ({request.method} {request.url.path})" if exc.status_code == 404 else str(exc.detail)
    body = {"message": message, "type": "invalid_request_error", "param": None, "code": None}
    return error_response(request, exc.status_code, body, exc.headers)
