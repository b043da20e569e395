"""Twice the measured capacity against a real server: do deadlines hold, and is overload refused?

    python -m loadtests.overload [--seconds 20] [--deadline 2] [--per-request 1]

Starts ``rmserve serve`` with default settings (cache off, so every item reaches the model), measures
its capacity with 64 closed-loop clients (enough to fill its batches), then offers twice that as an
open loop of distinct items, each request with ``X-Request-Timeout``. Prints the statuses (a request
with no answer is counted under its exception's name), how many responses came later than the
deadline + 1 s by the server's own clock (``Server-Timing``), and the largest latencies. Exits 0; it
is a benchmark, not a test (tests/test_hardening.py asserts the same on a shorter run).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import tempfile
import time
from pathlib import Path

import httpx

from tests.support.server import serve


def _server_seconds(resp: httpx.Response) -> float:
    return float(resp.headers["server-timing"].partition(";dur=")[2]) / 1000


async def run(url: str, seconds: float, deadline_s: float, per_request: int) -> dict[str, object]:
    counter = iter(range(10**9))
    limits = httpx.Limits(max_connections=1000)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def one(record: list[tuple[int | str, float, float]]) -> None:
            n = next(counter)
            body = {
                "items": [
                    {"prompt": f"question {n} {j} about things", "response": f"answer {n}"}
                    for j in range(per_request)
                ]
            }
            t0 = time.monotonic()
            try:
                resp = await client.post(
                    "/v1/score", json=body, headers={"X-Request-Timeout": str(deadline_s)}
                )
            except httpx.HTTPError as exc:  # no answer: counted under the exception's name
                record.append((type(exc).__name__, 0.0, time.monotonic() - t0))
                return
            record.append((resp.status_code, _server_seconds(resp), time.monotonic() - t0))

        closed: list[tuple[int | str, float, float]] = []
        stop = time.monotonic() + 5.0

        async def loop_client() -> None:
            while time.monotonic() < stop:
                await one(closed)

        await asyncio.gather(*(loop_client() for _ in range(64)))
        capacity = sum(1 for c in closed if c[0] == 200) / 5.0  # requests/s
        rate = 2 * capacity
        record: list[tuple[int | str, float, float]] = []
        tasks = []
        start = time.monotonic()
        for n in range(int(rate * seconds)):
            await asyncio.sleep(max(0.0, start + n / rate - time.monotonic()))
            tasks.append(asyncio.create_task(one(record)))
        await asyncio.gather(*tasks)
    statuses = collections.Counter(r[0] for r in record)
    return {
        "capacity_requests_per_s": round(capacity, 1),
        "offered_requests_per_s": round(rate, 1),
        "requests": len(record),
        "statuses": dict(sorted(statuses.items(), key=str)),
        "late_over_deadline_plus_1s": sum(1 for r in record if r[1] > deadline_s + 1.0),
        "server_max_s": round(max(r[1] for r in record), 2),
        "client_max_s": round(max(r[2] for r in record), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--deadline", type=float, default=2.0)
    parser.add_argument("--per-request", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, serve({"RMSERVE_CACHE": "off"}, Path(tmp)) as server:
        model = httpx.get(server.url + "/v1/models").json()["data"][0]
        print(f"serving {model['provider']}/{model['precision']}, queue limit {1024} items (default)")
        print(asyncio.run(run(server.url, args.seconds, args.deadline, args.per_request)))


if __name__ == "__main__":
    main()
