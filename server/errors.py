"""OpenAI-style error bodies: {"error": {"message", "type", "param", "code"}}."""
from __future__ import annotations

import re

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lenserve.server.protocol import ErrorInfo, ErrorResponse

# pydantic puts union members and validator kinds into error locations ("prompt.str"): not params.
_TYPE_TAG = re.compile(r"^(str|int|float|bool|none|json-or-python|.*\[.*\]|function-.*|lax-.*|strict-.*)$")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    503: "service_unavailable",
}


class APIError(StarletteHTTPException):
    """An error with an OpenAI body. An HTTPException, so that FastAPI re-raises one that comes out
    of reading the body (GuardMiddleware's 413) rather than turning it into a generic 400."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(status_code=status, detail=message, headers=headers)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return ErrorResponse(error=ErrorInfo(message=message, type=_TYPES.get(status, "invalid_request_error"), param=param, code=code)).model_dump()


def error_response(status: int, message: str, param: str | None = None, code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


async def api_error_handler(request: Request, exc: APIError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)


async def validation_error_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    """pydantic's 422 becomes OpenAI's 400, naming the offending parameter."""
    errors = exc.errors()
    first = errors[0] if errors else {}
    loc = [str(x) for x in first.get("loc", ()) if x != "body" and not _TYPE_TAG.match(str(x))]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        message = "request body is not valid JSON: " + str(first.get("ctx", {}).get("error", first.get("msg", "")))
        param = None
    elif first.get("type") == "missing":
        message = f"missing required parameter: {param}"
    else:
        message = f"{param}: {first.get('msg', 'invalid value')}" if param else str(first.get("msg", "invalid request"))
    return error_response(400, message, param, code=first.get("type"))


async def http_error_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))


async def unhandled_error_handler(request: Request, exc: Exception) -> JSONResponse:
    import logging

    logging.getLogger("lenserve").exception("unhandled error in %s %s", request.method, request.url.path)
    return error_response(500, f"internal error: {type(exc).__name__}")
