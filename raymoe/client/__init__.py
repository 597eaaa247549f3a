"""raymoe's Python SDK: `Client` (blocking) and `AsyncClient` (asyncio) for a raymoe server.

Responses are pydantic models (`raymoe.serve.openai_api`); failures are typed errors
(`raymoe.client.errors`) carrying the server's message. Only requests the server refused (429/503)
or never received are retried, plus GETs; a generation is never sent twice after it was accepted.
"""

from raymoe.client.async_client import AsyncClient
from raymoe.client.errors import (
    APIConnectionError, APIError, APITimeoutError, AuthenticationError, BadRequestError, InternalServerError,
    NotFoundError, NotImplementedByServerError, RateLimitError, RequestTooLargeError, ServiceUnavailableError,
)  # fmt: skip
from raymoe.client.sync import Client

__all__ = [
    "AsyncClient", "Client", "APIConnectionError", "APIError", "APITimeoutError", "AuthenticationError",
    "BadRequestError", "InternalServerError", "NotFoundError", "NotImplementedByServerError", "RateLimitError",
    "RequestTooLargeError", "ServiceUnavailableError",
]  # fmt: skip
