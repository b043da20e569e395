"""One hierarchy for everything the client raises, and the one table from status code to error."""

from __future__ import annotations


class RewardServerError(Exception):
    """Base of every error the client raises. ``status`` is None when no HTTP answer came back."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        type: str | None = None,
        request_id: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.request_id = request_id
        self.retry_after_s = retry_after_s


class BadRequestError(RewardServerError):
    """A 4xx: the request is wrong as sent (the message names the item). Never retried."""


class AuthenticationError(BadRequestError):
    """401: the server wants an API key and got none or a wrong one."""


class ModelNotFoundError(BadRequestError):
    """404: no loaded bundle has that name (or several are loaded and none was named)."""


class RequestTooLargeError(BadRequestError):
    """413: too many items, a body too large, or an item over max_length with truncation "error"."""


class OverloadedError(RewardServerError):
    """429: the server's queue is full; it says when to come back (``retry_after_s``)."""


class ServerUnavailableError(RewardServerError):
    """503 (starting or draining), or 502 or a bare 500 from a proxy in front of it (the server
    behind it was lost)."""


class ServerConnectionError(ServerUnavailableError):
    """No answer: connection refused, reset or dropped before the response was complete."""


class DeadlineExceededError(RewardServerError):
    """504 from the server, or the client's own timeout while waiting for the answer."""


class ServerError(RewardServerError):
    """500 and any other 5xx: the server failed; the message carries its request id."""


class ProtocolError(RewardServerError):
    """The server answered 200 with a body that is not what the API promises."""


class RetryBudgetExceeded(RewardServerError):
    """Retries ran out; ``last_error`` is the error of the final attempt."""

    def __init__(self, message: str, last_error: RewardServerError, attempts: int) -> None:
        super().__init__(
            message,
            status=last_error.status,
            type=last_error.type,
            request_id=last_error.request_id,
            retry_after_s=last_error.retry_after_s,
        )
        self.last_error = last_error
        self.attempts = attempts


_STATUS_ERRORS: dict[int, type[RewardServerError]] = {
    401: AuthenticationError,
    404: ModelNotFoundError,
    413: RequestTooLargeError,
    429: OverloadedError,
    502: ServerUnavailableError,
    503: ServerUnavailableError,
    504: DeadlineExceededError,
}


def error_class(status: int) -> type[RewardServerError]:
    if status in _STATUS_ERRORS:
        return _STATUS_ERRORS[status]
    return BadRequestError if 400 <= status < 500 else ServerError
