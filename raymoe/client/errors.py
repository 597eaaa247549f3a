"""Errors the SDK raises: one class per kind of failure, each carrying the server's message."""

from __future__ import annotations

from raymoe.errors import RaymoeError


class APIError(RaymoeError):
    """The server answered with an error. `message`, `type`, `param`, `code` are its error body."""

    def __init__(self, status_code: int, message: str, type: str | None = None, param: str | None = None,
                 code: str | None = None, retry_after: float | None = None):  # fmt: skip
        super().__init__(f"{status_code} {type or 'error'}: {message}")
        self.status_code, self.message, self.type, self.param, self.code = status_code, message, type, param, code
        self.retry_after = retry_after


class BadRequestError(APIError):  # 400: fix the request
    pass


class AuthenticationError(APIError):  # 401: wrong or missing API key
    pass


class NotFoundError(APIError):  # 404: unknown model or route
    pass


class RequestTooLargeError(APIError):  # 413
    pass


class RateLimitError(APIError):  # 429: retried (the server did not take the request)
    pass


class NotImplementedByServerError(APIError):  # 501: e.g. scaling with the engine backend
    pass


class ServiceUnavailableError(APIError):  # 503: queues full or not ready; retried
    pass


class InternalServerError(APIError):  # other 5xx
    pass


class APIConnectionError(RaymoeError):
    """No answer: the server could not be reached, or the connection broke."""


class APITimeoutError(APIConnectionError):
    """No answer within the client's timeout."""


_BY_STATUS = {400: BadRequestError, 401: AuthenticationError, 404: NotFoundError, 413: RequestTooLargeError,
              422: BadRequestError, 429: RateLimitError, 501: NotImplementedByServerError,
              503: ServiceUnavailableError}  # fmt: skip


def error_from_response(status_code: int, body: bytes, headers) -> APIError:
    import json

    try:
        detail = json.loads(body)["error"]
        message, type_, param, code = detail.get("message", ""), detail.get("type"), detail.get("param"), detail.get("code")
    except (ValueError, KeyError, TypeError):
        message, type_, param, code = body.decode(errors="replace")[:500] or f"HTTP {status_code}", None, None, None
    retry_after = headers.get("retry-after")
    try:
        retry_after = float(retry_after) if retry_after is not None else None
    except ValueError:
        retry_after = None
    cls = _BY_STATUS.get(status_code, InternalServerError if status_code >= 500 else APIError)
    return cls(status_code, message, type_, param, code, retry_after)
