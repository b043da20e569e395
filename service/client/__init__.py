"""A Python client for rmserve, built like httpx: all logic in a base class with no I/O.

* ``base``: ``BaseRewardClient`` builds and chunks requests, decides retries and writes each
  operation as a generator of steps (``steps``); it never touches the network.
* ``responses``: answers -> results (``results``) or errors (``errors``: the one hierarchy).
* ``items``: every item shape a caller holds -> the API's JSON item.
* ``sync`` / ``aio``: ``RewardClient`` (httpx.Client, threads for chunks) and ``AsyncRewardClient``
  (httpx.AsyncClient, a semaphore for chunks) carry the steps out: thin mirrors.
"""

from rmserve.client.aio import AsyncRewardClient
from rmserve.client.base import (
    DEFAULT_LIMITS,
    DEFAULT_TIMEOUT,
    DEFAULT_URL,
    RETRY_STATUSES,
    BaseRewardClient,
    normalize_base_url,
)
from rmserve.client.errors import (
    AuthenticationError,
    BadRequestError,
    DeadlineExceededError,
    ModelNotFoundError,
    OverloadedError,
    ProtocolError,
    RequestTooLargeError,
    RetryBudgetExceeded,
    RewardServerError,
    ServerConnectionError,
    ServerError,
    ServerUnavailableError,
)
from rmserve.client.items import ItemLike, MessageLike, message_text, to_item
from rmserve.client.results import Health, RewardResult, ScoreResult, Usage
from rmserve.client.sync import RewardClient

__all__ = [
    "DEFAULT_LIMITS",
    "DEFAULT_TIMEOUT",
    "DEFAULT_URL",
    "RETRY_STATUSES",
    "AsyncRewardClient",
    "AuthenticationError",
    "BadRequestError",
    "BaseRewardClient",
    "DeadlineExceededError",
    "Health",
    "ItemLike",
    "MessageLike",
    "ModelNotFoundError",
    "OverloadedError",
    "ProtocolError",
    "RequestTooLargeError",
    "RetryBudgetExceeded",
    "RewardClient",
    "RewardResult",
    "RewardServerError",
    "ScoreResult",
    "ServerConnectionError",
    "ServerError",
    "ServerUnavailableError",
    "Usage",
    "message_text",
    "normalize_base_url",
    "to_item",
]
