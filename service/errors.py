"""One error hierarchy for the whole service, and the one table that maps it to HTTP."""

from __future__ import annotations


class RMServeError(Exception):
    """Base of every error the service reports to a caller. ``message`` is safe to show."""

    status = 500
    type = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def headers(self) -> dict[str, str]:
        return {}


class BadRequest(RMServeError):
    status = 400
    type = "bad_request"


class InvalidRequest(RMServeError):
    """A request-level value is wrong (a header, a setting of the request), not one item."""

    status = 422
    type = "invalid_request"


class RequestTimeout(RMServeError):
    """The client did not send its request within the server's read timeout."""

    status = 408
    type = "request_timeout"

    def headers(self) -> dict[str, str]:
        return {"Connection": "close"}


class InvalidItem(RMServeError):
    """One item of a request cannot be scored as given."""

    status = 422
    type = "invalid_item"

    def __init__(self, index: int, reason: str, field: str | None = None) -> None:
        super().__init__(f"items[{index}]{'.' + field if field else ''}: {reason}")
        self.index = index
        self.reason = reason
        self.field = field  # where in the item, when it is one field: "messages[2].role"

    def at(self, index: int) -> InvalidItem:
        return InvalidItem(index, self.reason, self.field)


class Unauthorized(RMServeError):
    status = 401
    type = "unauthorized"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class ModelNotFound(RMServeError):
    status = 404
    type = "model_not_found"


class TooLarge(RMServeError):
    status = 413
    type = "too_large"


class ItemTooLong(TooLarge):
    def __init__(self, index: int, tokens: int, limit: int) -> None:
        super().__init__(
            f"items[{index}]: {tokens} tokens is over the model's max_length of {limit} "
            '(send truncation: "auto" to truncate instead)'
        )
        self.index = index
        self.tokens = tokens
        self.limit = limit

    def at(self, index: int) -> ItemTooLong:
        return ItemTooLong(index, self.tokens, self.limit)


class Overloaded(RMServeError):
    status = 429
    type = "overloaded"

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, round(self.retry_after_s)))}


class NotReady(RMServeError):
    status = 503
    type = "not_ready"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class DeadlineExceeded(RMServeError):
    status = 504
    type = "deadline_exceeded"


class InferenceFailed(RMServeError):
    """The model failed on a batch; the request id, not the exception, goes to the caller."""

    status = 500
    type = "inference_failed"


class ComponentFailed(RMServeError):
    """A component of a composite failed: the error it met, named by composite and component, with that
    error's status and headers (a full queue stays a 429, a passed deadline a 504, a fault a 500)."""

    status = 500
    type = "component_failed"

    def __init__(self, composite: str, component: str, cause: BaseException) -> None:
        if isinstance(cause, RMServeError):
            what, self.status, self.type, self._headers = (
                cause.message,
                cause.status,
                cause.type,
                cause.headers(),
            )
        else:
            what, self.status, self.type, self._headers = (
                f"failed ({type(cause).__name__})",
                500,
                "component_failed",
                {},
            )
        super().__init__(f"composite {composite!r}, component {component!r}: {what}")
        self.composite = composite
        self.component = component

    def headers(self) -> dict[str, str]:
        return self._headers
