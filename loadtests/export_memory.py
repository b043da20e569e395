"""Export memory and time at real sizes: random-init decoders saved in bf16, as real checkpoints are,
exported to fp32 and to fp16/bf16 bundles, each export in its own process.

    python -m loadtests.export_memory [--sizes 0.4b 1.5b] [--precisions fp32 fp16 bf16] [--arch qwen2]
    python -m loadtests.export_memory --sizes 8b --arch llama --precisions fp16 --no-serve-check

For each export it prints the child process's peak resident memory (``ru_maxrss``, read by the child
at its end: everything it held, tokenizer and ONNX Runtime included), the bundle's weight bytes, the
goal (1.25 x weight bytes + 2 GiB), bytes per parameter and seconds per billion parameters. Parity
runs as in any export (the built-in pairs: short texts, so the reference forward's own cost stays
small). After each fp32 export it serves the bundle (a real ``rmserve serve`` on loopback, ONNX
Runtime CPU, fp32, no cache), scores conversations over ``/v1/score`` and prints the largest difference
from transformers' own float32 model run on the checkpoint as a model card's usage snippet runs it
(``apply_chat_template`` then ``logits[0][0]``), with the server's peak resident memory.
Checkpoints are written under ``--root`` (default: a temporary directory) and deleted after.
It asserts nothing; it is a benchmark. docs/export.md gives the table and what it implies for 8B and
27B models.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

GIB = 1024**3
# Qwen2-0.5B's and Qwen2-1.5B's bodies with a 32k vocabulary; Llama at the same sizes. "8b" is
# Llama-3.1-8B's body (7.1B parameters with the 32k vocabulary), its checkpoint written in 5 GB shards
# without building the model (loadtests/checkpoints.py); its fp32 bundle takes 27 GiB of disk, and
# serving that bundle more RAM than 24 GB (--no-serve-check).
SIZES = {
    "0.4b": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "heads": 14, "kv": 2},
    "1.5b": {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "heads": 12, "kv": 2},
    "8b": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "heads": 32,
        "kv": 8,
        "shard_bytes": 5 * 10**9,
    },
}
DEFAULT_SIZES = ["0.4b", "1.5b"]

# In its own process, so the checkpoint's model is not part of any export's peak.
_MAKE = """
import sys
from pathlib import Path
from loadtests.checkpoints import random_decoder
print(random_decoder(Path(sys.argv[3]), arch=sys.argv[1], **eval(sys.argv[2])))
"""

_EXPORT = """
import json, resource, sys, time
from rmserve.models.export import export_bundle
checkpoint, bundle, precision = sys.argv[1:4]
start = time.perf_counter()
manifest = export_bundle(
    checkpoint, bundle, name="bench", precision=precision, max_length=512, overwrite=True
)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
parity = manifest.parity
print("RESULT " + json.dumps({
    "seconds": seconds, "peak": peak, "graph": manifest.graph, "exporter": manifest.exporter,
    "max_rel_diff": parity.get("max_rel_diff"), "reduced": parity.get(precision),
}, default=str))
"""


# The card-style usage snippet, in its own process so its float32 model does not share the export's peak.
_PYTORCH = """
import json, sys, torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
checkpoint, conversations = sys.argv[1], json.loads(sys.argv[2])
tokenizer = AutoTokenizer.from_pretrained(checkpoint)
model = AutoModelForSequenceClassification.from_pretrained(checkpoint, dtype=torch.float32)
scores = []
with torch.no_grad():
    for conversation in conversations:
        ids = tokenizer.apply_chat_template(
            conversation, tokenize=True, return_tensors="pt", return_dict=True
        )
        scores.append(model(ids["input_ids"]).logits[0][0].item())
print("RESULT " + json.dumps(scores))
"""

_TOPICS = [
    ("How do I boil an egg?", "Put it in boiling water for eight minutes, then cool it in cold water."),
    ("What is the capital of Australia?", "Canberra, not Sydney as many people guess."),
    (
        "Write a haiku about rain.",
        "Soft rain on the roof / the gutters hum a slow song / the street turns to glass",
    ),
    (
        "Explain recursion briefly.",
        "A function that calls itself on a smaller input until a base case stops it.",
    ),
    (
        "Is it safe to eat raw cookie dough?",
        "Raw flour and raw eggs can carry bacteria, so it is safer not to.",
    ),
    ("Translate 'good morning' to German.", "Guten Morgen."),
]


def conversations() -> list[list[dict[str, str]]]:
    """Fixed conversations: one turn each, and a multi-turn one (about 330 tokens with the benchmark's
    tokenizer: within max_length, so nothing is truncated and both sides see the same tokens)."""
    convs = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in _TOPICS]
    long: list[dict[str, str]] = []
    for q, a in _TOPICS[:4]:
        long += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return [*convs, long]


def served_scores(
    bundle: Path, convs: list[list[dict[str, str]]]
) -> tuple[list[float], dict[str, object], int]:
    """Scores from a real server process on ``bundle``; what served them (headers, tokens, truncated
    items) and the server's peak RSS in bytes."""
    import httpx

    from tests.support.server import free_port, wait_ready

    port = free_port()
    command = [
        sys.executable,
        "-m",
        "rmserve.cli",
        "serve",
        "--models",
        f"bench={bundle}",
        "--provider",
        "cpu",
        "--precision",
        "fp32",
        "--cache",
        "off",
        "--port",
        str(port),
    ]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, server, timeout=1800)
        items = [{"messages": conv} for conv in convs]
        answer = httpx.post(url + "/v1/score", json={"items": items}, timeout=600)
        answer.raise_for_status()
        status = Path(f"/proc/{server.pid}/status").read_text()
        peak = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))) * 1024
        served = {k: answer.headers[k] for k in ("x-backend", "x-precision")}
        served |= {k: answer.json()["usage"][k] for k in ("tokens", "truncated")}
        return list(answer.json()["scores"]), served, peak
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=120)


def serve_check(checkpoint: Path, bundle: Path) -> dict[str, object]:
    convs = conversations()
    served, headers, peak = served_scores(bundle, convs)
    reference = json.loads(_run(_PYTORCH, str(checkpoint), json.dumps(convs)).split("RESULT ", 1)[1])
    return {
        "served_by": headers,
        "items": len(convs),
        "served_vs_pytorch_max_abs_diff": max(abs(a - b) for a, b in zip(served, reference, strict=True)),
        "server_peak_gib": round(peak / GIB, 2),
    }


def _run(code: str, *args: str) -> str:
    env = os.environ | {"RMSERVE_PARITY_DATA": "/nonexistent"}  # the built-in pairs: short texts
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, check=False
    )
    if done.returncode:
        raise SystemExit(f"failed:\n{done.stderr[-3000:]}")
    return done.stdout


def stored_parameters(checkpoint: Path) -> int:
    """The parameter count of a checkpoint already written, from its safetensors headers."""
    from math import prod

    from rmserve.models.lean.source import SafetensorsSource

    source = SafetensorsSource(checkpoint)
    return sum(prod(source.shape(name)) for name in source.names())


def weight_bytes(bundle: Path) -> int:
    return sum(f.stat().st_size for f in bundle.glob("model.onnx*"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", nargs="+", default=DEFAULT_SIZES, choices=list(SIZES))
    parser.add_argument("--precisions", nargs="+", default=["fp32", "fp16", "bf16"])
    parser.add_argument("--arch", default="qwen2")
    parser.add_argument("--root", type=Path, default=None)
    parser.add_argument(
        "--no-serve-check",
        dest="serve_check",
        action="store_false",
        help="skip serving each fp32 bundle and comparing its scores with transformers' own",
    )
    parser.add_argument(
        "--checkpoints",
        type=Path,
        default=None,
        help="keep the random checkpoints here and reuse one already there (an 8B one takes minutes to make)",
    )
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="rmserve-export-bench-", dir=args.root))
    rows = []
    try:
        for size in args.sizes:
            checkpoint = (args.checkpoints or root) / f"{args.arch}-{size}"
            if (checkpoint / "config.json").is_file():
                params = stored_parameters(checkpoint)
            else:
                params = int(_run(_MAKE, args.arch, repr(SIZES[size]), str(checkpoint)).split()[-1])
            for precision in args.precisions:
                bundle = root / f"bundle-{size}-{precision}"
                out = _run(_EXPORT, str(checkpoint), str(bundle), precision)
                result = json.loads(out.split("RESULT ", 1)[1])
                weights = weight_bytes(bundle)
                goal = 1.25 * weights + 2 * GIB
                row = {
                    "model": f"{args.arch} {params / 1e9:.2f}B (bf16 checkpoint)",
                    "bundle": precision,
                    "peak_gib": round(result["peak"] / GIB, 2),
                    "goal_gib": round(goal / GIB, 2),
                    "within_goal": result["peak"] <= goal,
                    "weights_gib": round(weights / GIB, 2),
                    "peak_bytes_per_param": round(result["peak"] / params, 2),
                    "seconds": round(result["seconds"], 1),
                    "seconds_per_billion": round(result["seconds"] / (params / 1e9), 1),
                    "max_rel_diff": result["max_rel_diff"],
                    "graph": result["graph"],
                    "weights_from": result["exporter"].get("weights"),
                }
                if precision == "fp32" and args.serve_check:
                    row |= serve_check(checkpoint, bundle)
                row["load_average"] = [round(x, 1) for x in os.getloadavg()]
                rows.append(row)
                print(json.dumps(row), flush=True)
                shutil.rmtree(bundle, ignore_errors=True)
            if args.checkpoints is None:
                shutil.rmtree(checkpoint, ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
