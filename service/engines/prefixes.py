"""The prefix cache: key/value tensors of token-id prefixes already computed, bounded in bytes.

A prefix is named by the token ids it holds, cut in blocks of ``BLOCK`` tokens: the name of the first
``k * BLOCK`` ids is a hash chained over the blocks (``block_hashes``), so two items share a cached
prefix exactly when their first ``k * BLOCK`` ids are equal, and finding the longest cached prefix
of an item is one dictionary probe per block, longest first. One entry holds one computed sequence's
keys and values (every layer, ``[layers, length, kv_width]``) and, for a process graph, its value at
each token; every block boundary inside it is indexed, so a shorter prefix of it is a view, not a
copy. An entry that a longer one extends whole is dropped when the longer one arrives.

The budget is kept on every insert: least recently used entries leave first, and an entry unused for
``ttl_s`` leaves at the next insert or lookup. Entries are never written after insert, so forward
passes on several streams read them without copies; the index is guarded by one lock.

``seen`` remembers (without tensors) the block hashes of recently scored items, each with how many
blocks before its item's last boundary it lies: a later item that shares a block boundary with an
earlier one is the sign that its prefix is worth keeping (a GRPO group's prompt, a growing solution).
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BLOCK = 16  # tokens per block: prefixes are cached and found at multiples of it
SEEN_BOUNDARIES = 1 << 16  # block hashes remembered from recent items (about 3 MB)


def default_budget_bytes(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """1/16 of the memory this process may use (its cgroup's limit when lower than the machine's),
    at least 64 MB and at most 4096 MB: the cache lives in host memory on every provider."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            total = min(total, int(limit))
    except (OSError, ValueError):
        pass
    return int(min(4096 << 20, max(64 << 20, total // 16)))


def block_hashes(ids: np.ndarray, blocks: int) -> list[bytes]:
    """The names of ``ids[:BLOCK]``, ``ids[:2 * BLOCK]``, ... ``ids[:blocks * BLOCK]``."""
    names: list[bytes] = []
    last = b""
    raw = np.ascontiguousarray(ids[: blocks * BLOCK], dtype=np.int64).tobytes()
    step = BLOCK * 8
    for k in range(blocks):
        last = hashlib.blake2b(last + raw[k * step : (k + 1) * step], digest_size=16).digest()
        names.append(last)
    return names


@dataclass(frozen=True, eq=False)
class Prefix:
    """A computed sequence: its keys and values, and a process graph's value at each token."""

    keys: np.ndarray  # [layers, length, kv_width]
    values: np.ndarray
    token_values: np.ndarray | None  # [length] for a process graph
    names: tuple[bytes, ...]  # block hashes, one per block

    @property
    def length(self) -> int:
        return int(self.keys.shape[1])

    @property
    def nbytes(self) -> int:
        extra = self.token_values.nbytes if self.token_values is not None else 0
        return int(self.keys.nbytes + self.values.nbytes + extra)


@dataclass(frozen=True)
class CacheStats:
    bytes: int
    entries: int


# Called with (event, amount): "hit"/"miss" (items), "reused" (tokens), "evicted:<reason>" (entries),
# "bytes" (the cache's size after a change).
Counter = Callable[[str, int], None]


def _ignore(event: str, amount: int) -> None:
    return None


class PrefixCache:
    def __init__(self, budget_bytes: int, ttl_s: float, count: Counter = _ignore) -> None:
        self.budget_bytes = budget_bytes
        self.ttl_s = ttl_s
        self._count = count
        self._lock = threading.Lock()
        self._entries: OrderedDict[int, tuple[Prefix, float]] = OrderedDict()  # id -> (entry, last use)
        self._index: dict[bytes, tuple[Prefix, int]] = {}  # block hash -> (entry, blocks)
        self._seen: OrderedDict[bytes, int] = OrderedDict()  # block hash -> blocks before its item's last
        self._bytes = 0

    def count(self, event: str, amount: int) -> None:
        if amount:
            self._count(event, amount)

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(self._bytes, len(self._entries))

    def longest(self, names: Sequence[bytes]) -> tuple[Prefix, int] | None:
        """The entry holding the longest cached prefix among ``names`` (ascending), and its blocks."""
        with self._lock:
            self._expire(time.monotonic())
            for name in reversed(names):
                found = self._index.get(name)
                if found is not None:
                    entry = found[0]
                    self._entries[id(entry)] = (entry, time.monotonic())
                    self._entries.move_to_end(id(entry))
                    return found
        return None

    def seen(self, name: bytes) -> int | None:
        """How many blocks before an earlier item's last boundary ``name`` lay; None if never seen."""
        with self._lock:
            return self._seen.get(name)

    def sight(self, names: Sequence[bytes]) -> None:
        with self._lock:
            last = len(names) - 1
            for k, name in enumerate(names):
                self._seen[name] = min(last - k, self._seen.get(name, last - k))
                self._seen.move_to_end(name)
            while len(self._seen) > SEEN_BOUNDARIES:
                self._seen.popitem(last=False)

    def put(self, entry: Prefix) -> bool:
        """Keep ``entry`` (False when it alone is over the budget)."""
        size = entry.nbytes
        if size > self.budget_bytes or not entry.names:
            return False
        now = time.monotonic()
        with self._lock:
            self._expire(now)
            shorter = self._index.get(entry.names[-1])
            if shorter is not None and shorter[0].length >= entry.length:
                return True  # the same prefix (another stream computed it): keep the first
            for k, name in enumerate(entry.names, start=1):
                old = self._index.get(name)
                self._index[name] = (entry, k)
                if old is not None and old[0].names[-1] == name:
                    self._drop(old[0], "superseded")  # every block of it is in the new entry
            self._entries[id(entry)] = (entry, now)
            self._bytes += size
            while self._bytes > self.budget_bytes:
                self._drop(next(iter(self._entries.values()))[0], "budget")
            self._count("bytes", self._bytes)
        return True

    def _expire(self, now: float) -> None:
        while self._entries:
            entry, used = next(iter(self._entries.values()))
            if now - used <= self.ttl_s:
                return
            self._drop(entry, "ttl")
            self._count("bytes", self._bytes)

    def _drop(self, entry: Prefix, reason: str) -> None:
        if self._entries.pop(id(entry), None) is None:
            return
        self._bytes -= entry.nbytes
        for name in entry.names:
            found = self._index.get(name)
            if found is not None and found[0] is entry:
                del self._index[name]
        self._count(f"evicted:{reason}", 1)
