"""OpenAI's error shape: {"error": {"message", "type", "param", "code"}}, so the SDK raises its usual errors."""

from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse


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
    param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
    body = {"message": f"{param or 'request'}: {first.get('msg', 'invalid request')}",
            "type": "invalid_request_error", "param": param, "code": "invalid_value"}
    return JSONResponse({"error": body}, status_code=400)
