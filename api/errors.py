"""The one error shape of the API and the handlers that produce it.

Every error is ``{"error": {"type", "code", "message", "param"}}`` (+ ``decline_code`` and
``payment`` for card errors). Submitted values are never echoed back or logged: the body of a
POST /v1/payment_methods carries a card number, and a validation message that quoted its input
would put the number in a response, a log line, or a client's crash report.
"""

from __future__ import annotations

import re
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = structlog.get_logger("api.errors")

INVALID_REQUEST = "invalid_request_error"
API_ERROR = "api_error"
CARD_ERROR = "card_error"
AUTHENTICATION_ERROR = "authentication_error"
PERMISSION_ERROR = "permission_error"
IDEMPOTENCY_ERROR = "idempotency_error"


class ApiError(Exception):
    """Raised anywhere in a request to answer with the error shape."""

    def __init__(
        self,
        status: int,
        type: str,
        code: str,
        message: str,
        param: str | None = None,
        *,
        decline_code: str | None = None,
        payment: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.type = type
        self.code = code
        self.message = message
        self.param = param
        self.decline_code = decline_code
        self.payment = payment
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(
            self.type,
            self.code,
            self.message,
            self.param,
            decline_code=self.decline_code,
            payment=self.payment,
        )

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(
    type: str,
    code: str,
    message: str,
    param: str | None = None,
    *,
    decline_code: str | None = None,
    payment: dict[str, Any] | None = None,
) -> dict[str, Any]:
    err: dict[str, Any] = {"type": type, "code": code, "message": message, "param": param}
    if decline_code is not None or type == CARD_ERROR:
        err["decline_code"] = decline_code
    if payment is not None:
        err["payment"] = payment
    return {"error": err}


# A run of digits as long as a card number (spaces or dashes between groups allowed).
_PAN_LIKE = re.compile(r"\d(?:[ -]?\d){11,18}")


def redact(text: str) -> str:
    """Blank out anything shaped like a card number in text we echo (ids, field names)."""
    return _PAN_LIKE.sub("[redacted]", text)


def route_template(request: Request) -> str:
    """The matched route's template (/v1/payments/{payment_id}), never the raw path."""
    route = request.scope.get("route")
    return str(getattr(route, "path", None) or "unmatched")


# ---- constructors for the common cases ----


def invalid(code: str, message: str, param: str | None = None, status: int = 400) -> ApiError:
    return ApiError(status, INVALID_REQUEST, code, message, param)


def not_found(object_name: str, object_id: str, param: str = "id") -> ApiError:
    # Same answer for "does not exist" and "belongs to another merchant": ids do not leak.
    return ApiError(
        404, INVALID_REQUEST, "resource_missing", f"No such {object_name}: '{redact(object_id)}'", param
    )


def conflict(code: str, message: str, param: str | None = None) -> ApiError:
    return ApiError(409, INVALID_REQUEST, code, message, param)


def unavailable(code: str, message: str, *, payment: dict[str, Any] | None = None) -> ApiError:
    return ApiError(503, API_ERROR, code, message, payment=payment)


# ---- validation errors ----

_INTERNAL_LOC = {"body", "query", "path", "header", "cookie"}


def _param(loc: tuple[Any, ...] | list[Any]) -> str | None:
    parts = [str(p) for p in loc]
    if parts and parts[0] in _INTERNAL_LOC:
        parts = parts[1:]
    # field names are the client's text too (metadata keys, unknown fields): redact them as well
    return redact(".".join(parts)) or None


def _safe_message(msg: str, value: Any) -> str:
    """Pydantic messages describe the expectation, but a few (union tags) quote the input."""
    msg = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if isinstance(value, str | int) and not isinstance(value, bool):
        text = str(value)
        if len(text) >= 2 and text in msg:
            return "Invalid value"
    return msg


def validation_error_to_api_error(errors: list[dict[str, Any]] | tuple[Any, ...]) -> ApiError:
    """Turn the first pydantic error into our shape (Stripe also reports one error at a time)."""
    if not errors:
        return invalid("parameter_invalid", "Invalid request.")
    err = errors[0]
    etype = str(err.get("type", ""))
    loc = tuple(err.get("loc", ()))
    if etype == "json_invalid":
        return invalid("invalid_json", "The request body is not valid JSON.")
    param = _param(loc)
    if loc and loc[0] == "header":
        param = None if param is None else param.lower()
    if etype == "missing":
        if param is None:
            return invalid("parameter_missing", "A JSON request body is required.")
        return invalid("parameter_missing", f"Missing required param: {param}.", param)
    if etype == "extra_forbidden":
        return invalid("parameter_unknown", f"Received unknown parameter: {param}.", param)
    if param is None and etype in ("model_attributes_type", "dict_type", "model_type"):
        return invalid("parameter_invalid", "The request body must be a JSON object.")
    message = _safe_message(str(err.get("msg", "Invalid value")), err.get("input"))
    where = f"Invalid {param}: " if param else "Invalid request: "
    return invalid("parameter_invalid", f"{where}{message}", param)


# ---- handlers ----


async def _api_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return exc.response()


async def _validation_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    api_error = validation_error_to_api_error(list(exc.errors()))
    # Log where it failed, never what was sent (str(exc) would include the input values).
    log.info("request_invalid", route=route_template(request), code=api_error.code, param=api_error.param)
    return api_error.response()


_HTTP_CODES: dict[int, tuple[str, str]] = {
    400: ("parameter_invalid", "The request could not be parsed."),
    401: ("invalid_api_key", "Invalid API key provided."),
    403: ("insufficient_permissions", "This key may not perform this request."),
    404: ("resource_missing", "Not found."),
    405: ("method_not_allowed", "Method not allowed."),
    413: ("request_too_large", "The request body is too large."),
    415: ("unsupported_media_type", "Send a JSON body with Content-Type: application/json."),
    429: ("rate_limit", "Too many requests."),
}


async def _http_exception_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    headers = dict(exc.headers) if exc.headers else None
    if status == 404 and request.scope.get("route") is None:
        # No route matched: say which URL, as Stripe does; "resource_missing" is for objects.
        body = error_body(
            INVALID_REQUEST,
            "unrecognized_url",
            f"Unrecognized request URL ({request.method}: {redact(request.url.path)}).",
        )
        return JSONResponse(body, status_code=404, headers=headers)
    if status == 405:
        body = error_body(
            INVALID_REQUEST,
            "method_not_allowed",
            f"{request.method} is not allowed on {route_template(request)}.",
        )
        return JSONResponse(body, status_code=405, headers=headers)
    code, message = _HTTP_CODES.get(status, ("api_error" if status >= 500 else "invalid_request", ""))
    if not message:
        message = "An unexpected error occurred." if status >= 500 else "Invalid request."
    etype = API_ERROR if status >= 500 else INVALID_REQUEST
    if status == 401:
        etype = AUTHENTICATION_ERROR
    return JSONResponse(error_body(etype, code, message), status_code=status, headers=headers)


def internal_error_response() -> JSONResponse:
    return JSONResponse(
        error_body(API_ERROR, "internal_error", "An unexpected error occurred. It has been logged."),
        status_code=500,
    )


async def _unhandled_handler(request: Request, exc: Exception) -> JSONResponse:
    # Reached only if an exception escapes the request middleware (which handles and logs it).
    log.error(
        "unhandled_error", method=request.method, route=route_template(request), error=type(exc).__name__
    )
    return internal_error_response()


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error_handler)
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(StarletteHTTPException, _http_exception_handler)
    app.add_exception_handler(Exception, _unhandled_handler)
