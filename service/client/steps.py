"""The steps an operation yields, and what the clients answer them with.

Each operation of ``BaseRewardClient`` is a generator that yields ``Step``s and receives their
outcomes: ``Send`` one request (gets a ``Reply`` or the ``httpx.TransportError``), ``Sleep`` (gets
None), or ``Gather`` the chunks of a long call (gets their parsed answers, in order).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import httpx

T = TypeVar("T")


@dataclass(frozen=True)
class Call:
    """One HTTP request to make (one chunk of a larger call)."""

    method: str
    path: str
    body: dict[str, Any] | None = None
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Reply:
    status: int
    headers: Mapping[str, str]
    content: bytes


@dataclass(frozen=True)
class Send:
    call: Call


@dataclass(frozen=True)
class Sleep:
    seconds: float


@dataclass(frozen=True)
class Gather(Generic[T]):
    """Run ``exchange(call)`` for every call, up to ``max_concurrency`` at a time, and ``parse``
    each answer as it comes; the first failure fails the whole step."""

    calls: list[Call]
    parse: Callable[[Call, Any], T]


Step = Send | Sleep | Gather[Any]
Outcome = Reply | httpx.TransportError
Operation = Generator[Step, Any, T]


def reply_of(resp: httpx.Response) -> Reply:
    return Reply(resp.status_code, resp.headers, resp.content)
