"""A lean bundle's two graphs and their weights: bytes on disk, the time to write the graphs, and the
memory of a process that serves both.

    python -m loadtests.shared_weights [--layers 4] [--repeats 3] [--streams 2] [--lanes]

A random-init Qwen2 (896 hidden, 4864 intermediate, a 32k vocabulary: Qwen2-0.5B's layer) is saved in
float32 and exported with its prefix-reuse graph, its weights forced to external data. It prints:

* the bundle's files and their bytes;
* the seconds ``write_lean_graph`` takes to write both graphs from the checkpoint's safetensors
  (the best of ``--repeats``; the rest of an export, parity above all, is not counted);
* in a fresh process, the memory after loading the ONNX Runtime CPU engine as the server does
  (``--streams`` sessions) and then the prefix-reuse runner beside it, each after a forward pass:
  ``Pss`` (/proc/self/smaps_rollup: a page mapped by several sessions counted once) and ``VmRSS``
  (/proc/self/status: counted once per mapping);
* in a fresh process each, ``--streams`` plain ONNX Runtime sessions of each graph with MLAS's weight
  prepacking on (the engines' setting) and off (``session.disable_prepacking``): their memory after a
  forward pass each, and the scoring graph's best time at a few batch shapes;
* with ``--lanes``, instead of the two above: in a fresh process each, the engine and the prefix-reuse
  runner with ``--streams`` lanes sharing one session per graph (the engines' layout) and with a session
  per lane (their layout before, ``loadtests.lanes.SessionPerLane``), each lane having run a forward
  pass side by side with the others.

It asserts nothing; it is a benchmark. docs/prefix-reuse.md gives the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from loadtests.checkpoints import random_decoder

MIB = 1024**2


_FIELDS = """
def status():
    rollup = dict(line.split(":", 1) for line in open("/proc/self/smaps_rollup") if line[0].isupper())
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    pss = {k: int(rollup[k].split()[0]) * 1024 for k in ("Pss", "Pss_Anon", "Pss_File")}
    return pss | {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS",)}
"""

_MEMORY = """
import json, sys
import numpy as np
from rmserve.bundle import load_bundle
from rmserve.config import Settings
from rmserve.engines.base import pad_batch
from rmserve.engines.reuse import with_prefix_reuse
from rmserve.engines.select import create_engine

MEMORY_FIELDS
bundle = load_bundle(sys.argv[1])
streams = int(sys.argv[2])
settings = Settings(provider="cpu", precision="fp32", threads=streams, streams=streams)
rows = [list(range(5, 300)), list(range(5, 280))]
pad = bundle.manifest.format.pad_token_id
out = {"before": status()}
engine, _ = create_engine(bundle, settings)
engine.infer(pad_batch(rows, pad))
out["scoring engine"] = status()
reusing, about = with_prefix_reuse(engine, bundle, settings, lambda event, amount: None)
assert about["enabled"], about
for _ in range(3):  # the second and third pass reuse the prompt through the prefix-reuse graph
    reusing.infer(pad_batch(rows, pad))
out["with the prefix-reuse graph"] = status()
print("RESULT " + json.dumps(out))
""".replace("MEMORY_FIELDS", _FIELDS)

_PREPACK = """
import json, sys, time
from pathlib import Path
import numpy as np
import onnxruntime as ort
MEMORY_FIELDS
bundle, streams, prepack = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "on"

def session(name):
    o = ort.SessionOptions()
    o.intra_op_num_threads = 1
    o.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not prepack:
        o.add_session_config_entry("session.disable_prepacking", "1")
    return ort.InferenceSession(str(bundle / name), o, providers=["CPUExecutionProvider"])

def feeds(s, rows, tokens):
    ids = np.random.default_rng(0).integers(5, 300, (rows, tokens))
    out = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for i in s.get_inputs():
        if i.name == "past_mask":
            out[i.name] = np.zeros((rows, 0), np.int64)
        elif i.name.startswith("past_"):
            out[i.name] = np.zeros((rows, 0, i.shape[-1]), np.float32)
    return out

sessions = [session(name) for name in ("model.onnx", "model_past.onnx") for _ in range(streams)]
for s in sessions:
    s.run(["scores"], feeds(s, 2, 300))
out = {"memory": status(), "ms": {}}
for rows, tokens in ((1, 16), (1, 64), (2, 300)):
    f = feeds(sessions[0], rows, tokens)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        sessions[0].run(["scores"], f)
        best = min(best, time.perf_counter() - start)
    out["ms"][f"{rows}x{tokens}"] = round(best * 1e3, 1)
print("RESULT " + json.dumps(out))
""".replace("MEMORY_FIELDS", _FIELDS)


_LANES = """
import json, sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
import numpy as np
from loadtests.lanes import RunnerPerLane, SessionPerLane
from rmserve.bundle import load_bundle
from rmserve.engines.base import infer_all, pad_batch
from rmserve.engines.onnxruntime import OnnxRuntimeEngine
from rmserve.engines.past import PastPass, PastRunner

MEMORY_FIELDS
bundle = load_bundle(sys.argv[1])
streams, shared = int(sys.argv[2]), sys.argv[3] == "shared"
past = bundle.path / bundle.manifest.past_graph
pad = bundle.manifest.format.pad_token_id
out = {"before": status()}
if shared:
    engine = OnnxRuntimeEngine(bundle.model_path, threads=streams, streams=streams)
else:
    engine = SessionPerLane(bundle.model_path, streams, streams)
rows = [list(range(5, 300)), list(range(5, 280))]
infer_all(engine, [pad_batch(rows, pad)] * streams)  # every lane at once
out["scoring engine"] = status()
if shared:
    runner = PastRunner(past, threads=streams, streams=streams)
else:
    runner = RunnerPerLane(past, streams, streams)
ids = np.arange(5, 69, dtype=np.int64).reshape(2, 32)
keys, values = runner.empty(2)
step = PastPass(ids, np.ones_like(ids), np.zeros((2, 0), np.int64), keys, values)
with ThreadPoolExecutor(streams) as pool:
    list(pool.map(lambda _: runner.run(step, presents=True), range(streams)))
out["and the prefix-reuse runner"] = status()
print("RESULT " + json.dumps(out))
""".replace("MEMORY_FIELDS", _FIELDS)


def _child(code: str, *args: str) -> dict[str, Any]:
    env = os.environ | {"RMSERVE_PARITY_DATA": "/nonexistent"}
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, check=False
    )
    if done.returncode:
        raise SystemExit(f"failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.split("RESULT ", 1)[1])
    return result


def make_checkpoint(directory: Path, layers: int) -> int:
    """Qwen2-0.5B's layer shapes, ``layers`` of them, saved in float32."""
    return random_decoder(
        directory,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=layers,
        heads=14,
        kv=2,
        dtype="float32",
    )


def write_seconds(checkpoint: Path, directory: Path, repeats: int) -> float:
    from rmserve.models.heads import load_score_model
    from rmserve.models.lean import write_lean_graph
    from rmserve.models.lean.source import SafetensorsSource

    model, _, _ = load_score_model(checkpoint, layerwise=True)
    best = float("inf")
    for _ in range(repeats):
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        start = time.perf_counter()
        write_lean_graph(
            model,
            512,
            directory,
            precision="fp32",
            external_data_bytes=0,
            source=SafetensorsSource(checkpoint),
            past=True,
        )
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--streams", type=int, default=2)
    parser.add_argument("--root", type=Path, default=None)
    parser.add_argument("--lanes", action="store_true", help="shared session against a session per lane")
    args = parser.parse_args(argv)
    from rmserve.models.export import export_bundle

    root = Path(tempfile.mkdtemp(prefix="rmserve-shared-weights-", dir=args.root))
    try:
        checkpoint = root / "checkpoint"
        params = make_checkpoint(checkpoint, args.layers)
        bundle = root / "bundle"
        os.environ["RMSERVE_PARITY_DATA"] = "/nonexistent"  # the built-in pairs: short texts
        export_bundle(checkpoint, bundle, name="bench", max_length=512, external_data_bytes=0)
        files = {f.name: f.stat().st_size for f in sorted(bundle.iterdir()) if f.name.startswith("model")}
        print(json.dumps({"params": params, "files_mib": {k: round(v / MIB, 1) for k, v in files.items()}}))
        if args.lanes:
            for layout in ("session per lane", "shared", "session per lane", "shared"):
                result = _child(_LANES, str(bundle), str(args.streams), layout.split()[0])
                for stage, values in result.items():
                    mib = {k: round(v / MIB) for k, v in values.items()}
                    print(json.dumps({"layout": layout, "streams": args.streams, "stage": stage, **mib}))
            return 0
        seconds = write_seconds(checkpoint, root / "graphs", args.repeats)
        memory = _child(_MEMORY, str(bundle), str(args.streams))
        prepacking = {side: _child(_PREPACK, str(bundle), str(args.streams), side) for side in ("on", "off")}
        print(json.dumps({"write_lean_graph_s": round(seconds, 2), "repeats": args.repeats}))
        for stage, values in memory.items():
            print(json.dumps({"stage": stage, **{k: round(v / MIB) for k, v in values.items()}}))
        for side, result in prepacking.items():
            mib = {k: round(v / MIB) for k, v in result["memory"].items()}
            print(json.dumps({"prepacking": side, "sessions": 2 * args.streams, **mib, "ms": result["ms"]}))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
