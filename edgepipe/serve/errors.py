"""Errors the server returns, as OpenAI's error JSON with the matching HTTP status.

OpenAI's body is `{"error": {"message", "type", "param", "code"}}`; its clients raise a typed
exception per status (400 `BadRequestError`, 401 `AuthenticationError`, 404 `NotFoundError`,
413 and 503 `APIStatusError`, 429 `RateLimitError`), so the status matters as much as the text.
"""

from __future__ import annotations


class APIError(Exception):
    """An error response.

    Args:
        status: the HTTP status.
        message: what went wrong and what to do.
        type: OpenAI's error type ("invalid_request_error", ...).
        param: the request field at fault, or None.
        code: a short machine-readable code, or None.
        headers: extra response headers (`Retry-After`).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code = param, code
        self.headers = headers or {}

    def body(self) -> dict:
        """The JSON body."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """A 400 for a request the server cannot honour as written."""
    return APIError(400, message, param=param, code=code)


def unsupported(param: str, what: str | None = None) -> APIError:
    """A 400 for an OpenAI field the server does not implement (yet)."""
    text = what or f"'{param}' is not supported by edgepipe serve yet"
    return APIError(400, text, param=param, code="unsupported_parameter")


def unauthorized() -> APIError:
    return APIError(
        401,
        "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
        type="invalid_request_error",
        code="invalid_api_key",
    )


def model_not_found(model: str, served: str) -> APIError:
    return APIError(
        404,
        f"The model '{model}' does not exist; this server serves '{served}' (see /v1/models)",
        param="model",
        code="model_not_found",
    )


def too_large(limit: int) -> APIError:
    return APIError(413, f"Request body is larger than the server's limit of {limit} bytes")


def rate_limited(what: str, retry_after: float) -> APIError:
    seconds = max(1, int(retry_after + 0.999))
    return APIError(
        429,
        f"Rate limit reached for {what}; retry after {seconds} s",
        type="rate_limit_error",
        code="rate_limit_exceeded",
        headers={"Retry-After": str(seconds)},
    )


def overloaded(message: str, retry_after: int = 1) -> APIError:
    return APIError(
        503,
        message,
        type="server_error",
        code="overloaded",
        headers={"Retry-After": str(retry_after)},
    )


def timed_out(seconds: float) -> APIError:
    return APIError(504, f"The request ran past the server's {seconds:g} s limit", type="timeout")
