"""RMSERVE_REDIS_URL: parse (and check at start-up) the three deployment shapes of Redis.

Pure parsing, no redis import, so settings can validate a URL without loading the client.

- one server: ``redis://[[user]:[password]@]host[:port][/db]``, ``rediss://`` (TLS), ``unix:///path.sock``;
  redis-py's own URL form, query options included.
- Sentinel: ``redis+sentinel://[[user]:[password]@]host[:port][,host2[:port2]...]/service_name[/db]``
  (``rediss+sentinel://`` for TLS to the master). The hosts are the sentinels (default port 26379); the
  credentials are the master's; ``?sentinel_username=...&sentinel_password=...`` authenticate to the
  sentinels.
- Cluster: ``redis+cluster://[[user]:[password]@]host[:port][,host2[:port2]...]`` (``rediss+cluster://`` for
  TLS). The hosts are startup nodes (default port 6379); the client discovers the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from urllib.parse import parse_qsl, unquote, urlsplit

Mode = Literal["single", "sentinel", "cluster"]

_SINGLE = {"redis", "rediss", "unix"}
_SENTINEL = {"redis+sentinel", "rediss+sentinel"}
_CLUSTER = {"redis+cluster", "rediss+cluster"}
_SENTINEL_OPTIONS = {"sentinel_username", "sentinel_password"}


@dataclass(frozen=True)
class RedisTarget:
    mode: Mode
    url: str  # the URL as given (single mode hands it to redis-py as is)
    hosts: tuple[tuple[str, int], ...] = ()  # sentinels or cluster startup nodes
    service_name: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False
    sentinel_username: str | None = None
    sentinel_password: str | None = None


def _hosts(netloc: str, default_port: int) -> tuple[tuple[str, int], ...]:
    out: list[tuple[str, int]] = []
    for part in netloc.split(","):
        part = part.strip()
        if not part:
            continue
        if part.startswith("["):  # [ipv6]:port
            host, _, rest = part[1:].partition("]")
            port_text = rest.removeprefix(":")
        else:
            host, _, port_text = part.rpartition(":") if ":" in part else (part, "", "")
        if not host:
            raise ValueError(f"redis URL host {part!r} is empty")
        try:
            port = int(port_text) if port_text else default_port
        except ValueError:
            raise ValueError(f"redis URL port in {part!r} is not a number") from None
        out.append((host, port))
    if not out:
        raise ValueError("redis URL names no host")
    return tuple(out)


def parse_redis_url(url: str) -> RedisTarget:
    """Parse RMSERVE_REDIS_URL; raises ValueError naming what is wrong."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep:
        raise ValueError(
            "redis URL needs a scheme: redis://, rediss://, redis+sentinel:// or redis+cluster://"
        )
    if scheme in _SINGLE:
        if scheme != "unix" and not urlsplit(url).hostname:
            raise ValueError("redis URL names no host")
        return RedisTarget("single", url)
    if scheme not in _SENTINEL | _CLUSTER:
        raise ValueError(
            f"redis URL scheme {scheme!r} is not one of redis, rediss, unix, redis+sentinel, redis+cluster "
            "(rediss+ for TLS)"
        )
    location, _, query = rest.partition("?")
    netloc, _, path = location.partition("/")
    userinfo, at, hostlist = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, pw = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if colon else None
    options = dict(parse_qsl(query))
    tls = scheme.startswith("rediss")
    if scheme in _CLUSTER:
        if path.strip("/"):
            raise ValueError("redis+cluster URL takes no path (Redis Cluster has only db 0)")
        if options:
            raise ValueError(f"redis+cluster URL options {sorted(options)} are not supported")
        return RedisTarget(
            "cluster", url, _hosts(hostlist, 6379), username=username, password=password, tls=tls
        )
    unknown = set(options) - _SENTINEL_OPTIONS
    if unknown:
        raise ValueError(f"redis+sentinel URL options {sorted(unknown)} are not supported")
    segments = [s for s in path.split("/") if s]
    if not segments or len(segments) > 2:
        raise ValueError("redis+sentinel URL needs /service_name[/db] after the sentinel hosts")
    try:
        db = int(segments[1]) if len(segments) == 2 else 0
    except ValueError:
        raise ValueError(f"redis+sentinel URL db {segments[1]!r} is not a number") from None
    return RedisTarget(
        "sentinel",
        url,
        _hosts(hostlist, 26379),
        service_name=unquote(segments[0]),
        db=db,
        username=username,
        password=password,
        tls=tls,
        sentinel_username=options.get("sentinel_username"),
        sentinel_password=options.get("sentinel_password"),
    )
