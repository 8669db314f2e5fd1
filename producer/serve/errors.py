"""OpenAI's error shape: {"error": {"message", "type", "param", "code"}}, so the SDK raises its usual errors."""

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


async def api_error_handler(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return JSONResponse({"error": exc.body}, status_code=exc.status_code)


async def validation_error_handler(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":  # its loc holds a character offset, not a field
        where = first.get("loc", ("body", 0))[-1]
        reason = first.get("ctx", {}).get("error", "JSON decode error")
        return JSONResponse({"error": {"message": f"the request body is not valid JSON: {reason} at character {where}",
                                       "type": "invalid_request_error", "param": None, "code": "invalid_json"}},
                            status_code=400)
    param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
    body = {"message": f"{param or 'request'}: {first.get('msg', 'invalid request')}",
            "type": "invalid_request_error", "param": param, "code": "invalid_value"}
    return JSONResponse({"error": body}, status_code=400)


async def http_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """Unknown routes and methods in OpenAI's shape too (FastAPI's own is {"detail": ...})."""
    assert isinstance(exc, StarletteHTTPException)
    message = f"Invalid URL ({request.method} {request.url.path})" if exc.status_code == 404 else str(exc.detail)
    body = {"message": message, "type": "invalid_request_error", "param": None, "code": None}
    return JSONResponse({"error": body}, status_code=exc.status_code, headers=exc.headers)
