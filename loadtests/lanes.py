"""ONNX Runtime CPU streams, A/B: one session shared by the lanes (the engine) against one session per
lane (the layout the engine had before), scoring throughput on real text.

    python -m loadtests.lanes [--runs 3] [--pairs 256] [--batch-sizes 1,4] [--bundle DIR ...]
                              [--decoder-layers 4]

Each run measures both layouts, in alternating order (A B, then B A, ...), on each bundle: the default
bundle, and a random-init Qwen2 decoder (``loadtests.shared_weights``'s, ``--decoder-layers`` layers;
0 leaves it out). The measurement is ``loadtests.bench.bench_engine``: length-sorted batches of
each size, as many in flight as the engine has streams. It prints every run; it asserts nothing.
``loadtests.shared_weights --lanes`` measures the memory of the two layouts.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import tempfile
from pathlib import Path

import numpy as np

from rmserve.bundle import default_bundle_path
from rmserve.engines.base import EngineInfo, TokenBatch, available_cpus
from rmserve.engines.onnxruntime import OnnxRuntimeEngine
from rmserve.engines.past import PastOutput, PastPass, PastRunner
from rmserve.engines.select import default_streams


def lane_threads(threads: int, streams: int) -> list[int]:
    """Each lane's share of ``threads``, as evenly as possible, at least one each."""
    base, extra = divmod(max(threads, streams), streams)
    return [base + (1 if i < extra else 0) for i in range(streams)]


class SessionPerLane:
    """The engine as it was: ``streams`` one-stream engines, a session each, with its share of threads."""

    def __init__(self, model: Path, threads: int, streams: int) -> None:
        engines = [OnnxRuntimeEngine(model, threads=n, streams=1) for n in lane_threads(threads, streams)]
        self._free: queue.SimpleQueue[OnnxRuntimeEngine] = queue.SimpleQueue()
        for e in engines:
            self._free.put(e)
        self._all = engines
        self.info = EngineInfo("cpu", "fp32", threads, streams, {"sessions": streams})

    def infer(self, batch: TokenBatch) -> np.ndarray:
        engine = self._free.get()
        try:
            return engine.infer(batch)
        finally:
            self._free.put(engine)

    def close(self) -> None:
        for e in self._all:
            e.close()


class RunnerPerLane:
    """The prefix-reuse runner as it was: a one-stream runner (a session) per lane."""

    def __init__(self, model: Path, threads: int, streams: int) -> None:
        self._free: queue.SimpleQueue[PastRunner] = queue.SimpleQueue()
        for n in lane_threads(threads, streams):
            self._free.put(PastRunner(model, threads=n, streams=1))
        self._first = self._free.get()
        self._free.put(self._first)

    def empty(self, rows: int) -> tuple[np.ndarray, np.ndarray]:
        return self._first.empty(rows)

    def run(self, step: PastPass, *, presents: bool) -> PastOutput:
        runner = self._free.get()
        try:
            return runner.run(step, presents=presents)
        finally:
            self._free.put(runner)


def decoder_bundle(root: Path, layers: int) -> Path:
    from loadtests.shared_weights import make_checkpoint
    from rmserve.models.export import export_bundle

    make_checkpoint(root / "checkpoint", layers)
    os.environ["RMSERVE_PARITY_DATA"] = "/nonexistent"  # the built-in pairs: short texts
    export_bundle(root / "checkpoint", root / "bundle", name="lanes", max_length=512, external_data_bytes=0)
    return root / "bundle"


def main(argv: list[str] | None = None) -> int:
    from loadtests.bench import DEFAULT_DATA, bench_engine, load_pairs

    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--batch-sizes", default="1,4")
    parser.add_argument("--bundle", type=Path, action="append", default=None)
    parser.add_argument("--decoder-layers", type=int, default=4)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    args = parser.parse_args(argv)
    threads = available_cpus()
    streams = default_streams(threads)
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    pairs = load_pairs(args.data, args.pairs)
    root = Path(tempfile.mkdtemp(prefix="rmserve-lanes-"))
    try:
        bundles = list(args.bundle or [default_bundle_path()])
        if args.decoder_layers:
            bundles.append(decoder_bundle(root, args.decoder_layers))
        layouts = {
            "shared session": lambda m: OnnxRuntimeEngine(m, threads=threads, streams=streams),
            "session per lane": lambda m: SessionPerLane(m, threads, streams),
        }
        print(json.dumps({"threads": threads, "streams": streams, "pairs": len(pairs), "batch_sizes": sizes}))
        for run in range(args.runs):
            order = list(layouts) if run % 2 == 0 else list(reversed(layouts))
            for bundle in bundles:
                for name in order:
                    model = bundle / "model.onnx"
                    rows = bench_engine(name, lambda m=model, n=name: layouts[n](m), bundle, pairs, sizes)
                    for size, row in zip(sizes, rows, strict=True):
                        line = {"run": run, "bundle": bundle.name, "layout": name, "batch": size}
                        print(json.dumps(line | {"pairs_per_s": round(row.pairs_per_s, 1)}), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
