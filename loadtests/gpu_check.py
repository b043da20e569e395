"""The GPU check: random-init decoder reward models of real shapes, as fp16/bf16 bundles served on CUDA.

Two stages, so the export (torch only) can run while onnxruntime-gpu is still being unpacked:

* ``export``: per model, a Qwen2-, Qwen3- or Llama-3.1-shaped reward model (random init, seeded,
  configs in code, a byte-level BPE tokenizer trained here: no hub needed) -> fp32 PyTorch reference
  scores and the residual stream's headroom on the GPU -> the lean graph (models/lean, what ``rmserve
  export`` writes) built in each of the shape's precisions (fp16 with the fp32 residual guard only if
  the headroom asks for it) -> one bundle per precision; writes ``<work>/<model>/DONE``.
* ``serve``: per bundle, rmserve's own engine selection (provider ``cuda``) and batcher: parity of
  the reduced-precision engine against the fp32 PyTorch scores (right-padded batches of 1/7/32),
  recorded in the bundle's manifest; pairs/s and tokens/s at 512 and 2,048 tokens with 1-item and
  64-item requests; achieved fraction of the GPU's dense peak; beside it HF + SDPA (and
  ``torch.compile`` where time allows) on the same card; the GRPO-shaped workload
  (loadtests/grpo_workload.py) on one model; then one pass through the real HTTP server. Prints the
  tables and writes them (and JSON) to ``--out``. Before the models, a placement probe: tiny lean
  graphs in fp16 and bf16 on CUDA, and which of their nodes ONNX Runtime leaves on the CPU.

Model FLOPs per item of L tokens: 2 * (parameters outside the embedding table) * L, plus causal
attention 2 * L^2 * (heads * head_dim) per layer (QK^T and PV over the unmasked half).

``--cpu-dry-run`` runs both stages here with tiny shapes and the CPU provider, through the same code.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


@dataclass(frozen=True)
class Shape:
    """A decoder's shape; ``family`` qwen3 adds RMSNorms over each head's q and k."""

    family: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    # The bundles made of it: fp16 for every shape, bf16 beside it where asked.
    precisions: tuple[str, ...] = ("fp16",)


# Llama 3.1's rotary embedding (rope_type llama3), as its config.json has it.
LLAMA31_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
SHAPES = {
    "qwen2-0.5b": Shape("qwen2", 896, 24, 14, 2, 64, 4864, 151936),
    "qwen2-1.5b": Shape("qwen2", 1536, 28, 12, 2, 128, 8960, 151936),
    "qwen3-1.7b": Shape("qwen3", 2048, 28, 16, 8, 128, 6144, 151936),
    # Llama-3.1-8B's layer (Skywork-Reward-V2-Llama-3.1-8B's) with 8 of its 32 layers: per-layer figures
    # are what matter, and the whole model's export would not fit one device lease.
    "llama-8b-l8": Shape("llama", 4096, 8, 32, 8, 128, 14336, 128256, ("bf16", "fp16")),
    "tiny": Shape("qwen2", 64, 2, 4, 2, 16, 128, 1000),
    "tiny-qwen3": Shape("qwen3", 64, 2, 4, 2, 16, 128, 1000),
    "tiny-llama": Shape("llama", 64, 2, 4, 2, 16, 128, 1000, ("bf16", "fp16")),
}
DEFAULT_MODELS = "qwen2-0.5b,qwen2-1.5b,qwen3-1.7b,llama-8b-l8"
DRY_MODELS = "tiny,tiny-llama"
# The model the GRPO-shaped workload runs on (its first precision).
GRPO_MODEL, DRY_GRPO_MODEL = "qwen2-1.5b", "tiny"
MAX_LENGTH = 4096
# Dense (no sparsity) fp16 tensor-core peaks, FLOP/s.
PEAKS = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
]
PARITY_TEXTS = 32
PARITY_RANDOM = 32
SEED = 0


@dataclass
class Row:
    model: str
    tokens: int
    request_items: int
    pairs_s: float
    tokens_s: float
    tflops: float
    peak_pct: float | None
    p50_ms: float | None = None
    path: str = "batcher"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- stage 1: export -----------------------------------------------------------------------------


def build_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from rmserve.models.parity import builtin_pairs

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [p.prompt + p.response for p in builtin_pairs()] * 4
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=800, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    template = (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
        "<|im_end|>\n{% endfor %}"
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        chat_template=template,
        model_max_length=32768,
    )


def hf_config(name: str, pad_token_id: int, eos_token_id: int) -> Any:
    from transformers import AutoConfig

    shape = SHAPES[name]
    rope = {"rope_parameters": LLAMA31_ROPE} if shape.family == "llama" else {}
    return AutoConfig.for_model(
        shape.family,
        **rope,
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        intermediate_size=shape.intermediate,
        max_position_embeddings=32768,
        num_labels=1,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        tie_word_embeddings=True,
        architectures=[architecture(name)],
    )


def architecture(name: str) -> str:
    return f"{SHAPES[name].family.capitalize()}ForSequenceClassification"


def build_hf(name: str, tokenizer: Any, device: str, dtype: Any, attn: str) -> Any:
    """The random-init (seeded) HF sequence-classification model of ``name``'s shape."""
    import torch
    from transformers import AutoModelForSequenceClassification

    config = hf_config(name, tokenizer.pad_token_id, tokenizer.eos_token_id)
    torch.manual_seed(SEED)
    with torch.device(device):
        return AutoModelForSequenceClassification.from_config(config, attn_implementation=attn, dtype=dtype)


def build_model(name: str, tokenizer: Any, device: str, attn: str = "sdpa") -> Any:
    import torch

    from rmserve.models.heads import ScoreModel

    hf = build_hf(name, tokenizer, device, torch.float32, attn)
    return ScoreModel(hf, "last_token", "decoder").eval()


def flop_params(model: Any) -> tuple[int, int]:
    """(all parameters, parameters outside the embedding table)."""
    total = sum(p.numel() for p in model.parameters())
    emb = model.hf_model.base_model.embed_tokens.weight.numel()
    return total, total - emb


def parity_items(formatter: Any, vocab_used: int, max_len: int) -> list[Any]:
    """32 real-text chat items (the built-in pairs) and 32 random-token items of 16..max_len tokens."""
    from rmserve.formatting import Encoded
    from rmserve.models.parity import builtin_pairs, spread_by_length

    texts = spread_by_length(builtin_pairs(), PARITY_TEXTS)
    encoded = formatter.encode([p.as_item(True) for p in texts])
    rng = np.random.default_rng(SEED)
    for length in np.linspace(16, max_len, PARITY_RANDOM).astype(int):
        ids = tuple(int(i) for i in rng.integers(3, vocab_used, size=int(length)))
        encoded.append(Encoded(ids=ids, type_ids=None, truncated=False))
    return encoded


def export_stage(
    name: str, work: Path, device: str, max_len: int, exporter: str, precisions: list[str]
) -> None:
    """One bundle per precision in ``<work>/<name>/bundle-<precision>``, all from one fp32 model.

    ``exporter``: lean (rmserve's own graph, built in each precision from the weights, as ``rmserve
    export`` writes it), fused (torch.onnx dynamo, one Attention op per layer, then fp16 by the guarded
    converter) or legacy (eager attention through TorchScript, unfused). fp16 of the lean graph keeps
    the fp32 residual guard only when the headroom measured on the calibration pairs asks for it.
    """
    import torch

    from rmserve.bundle import unsealed_bundle
    from rmserve.formatting import Formatter
    from rmserve.models import export as ex
    from rmserve.models.headroom import measure_headroom
    from rmserve.models.heads import ModelMeta
    from rmserve.models.parity import reference_scores

    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference is fp32
    torch.backends.cudnn.allow_tf32 = False
    root = work / name
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tokenizer = build_tokenizer()
    model = build_model(name, tokenizer, device, attn="eager" if exporter == "legacy" else "sdpa")
    family, arch = SHAPES[name].family, architecture(name)
    total, nonemb = flop_params(model)
    log(
        f"{name}: built {total / 1e6:.0f}M parameters ({nonemb / 1e6:.0f}M outside the embedding) "
        f"on {device} in {time.perf_counter() - started:.1f}s"
    )
    meta = ModelMeta(
        family="decoder",
        pooling="last_token",
        model_type=family,
        architecture=arch,
        base_model=f"random-init {name} (gpu_check)",
        pad_token_id=int(tokenizer.pad_token_id),
        uses_token_type_ids=False,
        max_position_embeddings=32768,
        num_layers=SHAPES[name].layers,
    )
    settings = ex.format_settings(tokenizer, meta, max_length=MAX_LENGTH, input_format="chat_template")
    base_fields: dict[str, Any] = {
        "name": name,
        "architecture": arch,
        "model_type": family,
        "family": "decoder",
        "base_model": meta.base_model,
        "format": settings,
        "inputs": ["input_ids", "attention_mask"],
        "calibration_file": "calibration.jsonl",
    }
    probe = root / "tokenizer"
    probe.mkdir(exist_ok=True)
    ex.save_tokenizer(tokenizer, probe)
    formatter = Formatter(unsealed_bundle(probe, **base_fields, opset=23, precision="fp32"))
    encoded = parity_items(formatter, len(tokenizer), max_len)
    t = time.perf_counter()
    reference = reference_scores(model, encoded, meta.pad_token_id, batch=8)
    calibration = formatter.encode([p.as_item(True) for p in ex.calibration_set("builtin")])
    room = measure_headroom(model, calibration, meta.pad_token_id)
    log(
        f"{name}: fp32 PyTorch reference on {device} for {len(encoded)} items, headroom "
        f"{room.residual_max_abs:.4g} (fits fp16: {room.fits_fp16}) in {time.perf_counter() - t:.1f}s"
    )
    graphs = write_graphs(name, model, meta, root, exporter, precisions, room.fits_fp16)
    for precision, record in graphs.items():
        bundle_dir = root / f"bundle-{precision}"
        ex.save_tokenizer(tokenizer, bundle_dir)
        ex.write_calibration(bundle_dir, ex.calibration_set("builtin"))
        fields = base_fields | record.pop("fields") | {"precision": precision}
        fields["exporter"] = record | {"torch": torch.__version__, "headroom": room.as_manifest()}
        ex.write_manifest(bundle_dir, **fields)
    np.save(root / "reference.npy", reference)
    (root / "items.json").write_text(json.dumps([list(e.ids) for e in encoded]))
    (root / "meta.json").write_text(
        json.dumps(
            {
                "params": total,
                "params_nonembedding": nonemb,
                "shape": asdict(SHAPES[name]),
                "headroom": room.as_manifest(),
                "precisions": list(graphs),
                "export_s": time.perf_counter() - started,
            }
        )
    )
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    (root / "DONE").write_text("ok\n")
    log(f"{name}: bundles {list(graphs)} ready in {time.perf_counter() - started:.1f}s")


def write_graphs(
    name: str, model: Any, meta: Any, root: Path, exporter: str, precisions: list[str], fits_fp16: bool
) -> dict[str, dict[str, Any]]:
    """precision -> what ``<root>/bundle-<precision>/model.onnx`` is (manifest fields and exporter record)."""
    from rmserve.models import attention
    from rmserve.models import export as ex
    from rmserve.models.fp16 import convert_model_fp16
    from rmserve.models.graph import save_onnx
    from rmserve.models.lean import EXPORTER, LEAN_OPSET, build_lean_graph
    from rmserve.models.lean.body import layer_node_counts
    from rmserve.models.lean.weights import decoder_weights, score_head

    out: dict[str, dict[str, Any]] = {}
    fp32 = root / "fp32" / "model.onnx"
    if exporter != "lean":
        if precisions != ["fp16"]:
            raise SystemExit(f"--exporter {exporter} writes fp16 bundles only")
        plan = traced_fp32(name, model, meta, fp32, legacy=exporter == "legacy")
        t = time.perf_counter()
        dest = root / "bundle-fp16" / "model.onnx"
        guard = convert_model_fp16(fp32, dest, external_data_bytes=ex.EXTERNAL_DATA_BYTES)
        log(f"{name}: fp16 conversion (guarded) in {time.perf_counter() - t:.1f}s")
        fields = {"opset": plan.opset, "attention": plan.label, "attention_reason": plan.reason}
        fused = attention.fused_ops_summary(attention.op_counts(dest))
        out["fp16"] = {"fields": fields, "path": exporter, "fp16": guard, "fused_ops": fused}
        shutil.rmtree(fp32.parent)
        return out
    t = time.perf_counter()
    weights, score = decoder_weights(model.body, MAX_LENGTH), score_head(model.hf_model)
    lean_fields = {"opset": LEAN_OPSET, "attention": "fused:Attention", "graph": "lean", "padding": "right"}
    for precision in precisions:
        dest = root / f"bundle-{precision}" / "model.onnx"
        guard = precision == "fp16" and not fits_fp16
        proto = build_lean_graph(weights, score, "fp32" if guard else precision)
        nodes = layer_node_counts(proto)
        if guard:  # the stream does not fit fp16 with the margin: the guarded converter keeps it fp32
            save_onnx(proto, fp32, ex.EXTERNAL_DATA_BYTES)
            convert_model_fp16(fp32, dest, external_data_bytes=ex.EXTERNAL_DATA_BYTES)
            shutil.rmtree(fp32.parent)
        else:
            save_onnx(proto, dest, ex.EXTERNAL_DATA_BYTES)
        del proto
        per_layer = max(n for scope, n in nodes.items() if scope.startswith("layer"))
        out[precision] = {
            "fields": lean_fields,
            "path": EXPORTER,
            "nodes": nodes,
            "nodes_per_layer": per_layer,
            "residual_guard": guard,
        }
        log(
            f"{name}: lean {precision} graph ({per_layer} nodes per layer, guard {guard}) in "
            f"{time.perf_counter() - t:.1f}s"
        )
    return out


def traced_fp32(name: str, model: Any, meta: Any, path: Path, *, legacy: bool) -> Any:
    """The torch.onnx graph (fused through dynamo, or legacy eager); unfused with the reason if it
    does not fuse here."""
    import torch

    from rmserve.models import attention, graph
    from rmserve.models import export as ex

    path.parent.mkdir(parents=True, exist_ok=True)
    plan = attention.plan("decoder", fuse=True, opset=None, default_opset=ex.DEFAULT_OPSET)
    model = model.cpu()
    if not legacy:
        try:
            ex.export_onnx(
                model, meta, path.parent, opset=plan.opset, external_data_bytes=ex.EXTERNAL_DATA_BYTES
            )
            problem = attention.check_fused(attention.op_counts(path), meta.num_layers)
        except Exception as exc:  # the dynamo exporter raises many kinds; the run must go on
            problem = f"{type(exc).__name__}: {str(exc)[:300]}"
        if problem is None:
            return plan
        log(f"{name}: not fused ({problem}); exporting the unfused graph instead")
    plan = attention.unfused(ex.DEFAULT_OPSET, "--exporter legacy" if legacy else "not fused on this machine")
    for stale in path.parent.glob("model.onnx*"):
        stale.unlink()
    eager = build_model(name, build_tokenizer(), "cpu", attn="eager")
    ids = torch.full((2, 8), 5, dtype=torch.long)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    external = sum(p.numel() * p.element_size() for p in eager.parameters()) > ex.EXTERNAL_DATA_BYTES
    graph.export_legacy(eager, (ids, mask), ["input_ids", "attention_mask"], path, plan.opset, external)
    return plan


# -- stage 2: serve ------------------------------------------------------------------------------


def gpu_name_and_peak(provider: str) -> tuple[str, float | None]:
    if provider != "cuda":
        return "cpu (dry run)", None
    try:
        name = (
            subprocess.run(
                ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            .stdout.strip()
            .splitlines()[0]
        )
    except (OSError, IndexError, subprocess.SubprocessError):
        import torch

        name = torch.cuda.get_device_name(0)
    for key, peak in PEAKS:
        if key in name:
            return name, peak
    return name, None


def model_flops(meta: dict[str, Any], tokens: int) -> float:
    shape = meta["shape"]
    attention_width = shape["heads"] * shape["head_dim"]
    dense = 2.0 * meta["params_nonembedding"] * tokens
    return dense + shape["layers"] * 2.0 * tokens * tokens * attention_width


def random_items(n: int, length: int, vocab_used: int, seed: int) -> list[Any]:
    from rmserve.formatting import Encoded

    rng = np.random.default_rng(seed)
    return [
        Encoded(
            ids=tuple(int(i) for i in rng.integers(3, vocab_used, size=length)),
            type_ids=None,
            truncated=False,
        )
        for _ in range(n)
    ]


async def drive(batcher: Any, requests: list[list[Any]], concurrency: int) -> float:
    """``requests`` through the batcher from ``concurrency`` closed-loop callers; returns seconds."""
    queue = list(reversed(requests))

    async def caller() -> None:
        while queue:
            items = queue.pop()
            await asyncio.gather(*batcher.submit(items, time.monotonic() + 600))

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return time.perf_counter() - started


async def bench_model(
    label: str,
    bundle: Any,
    engine: Any,
    meta: dict[str, Any],
    lengths: list[int],
    sizes: list[int],
    counts: dict[int, int],
    peak: float | None,
    budget_tokens: int,
    grpo: Any | None,
) -> tuple[list[Row], list[dict[str, Any]]]:
    """The engine alone and through the batcher; with ``grpo`` (a Workload) also its rmserve rows."""
    from loadtests.grpo_workload import CountingEngine, rmserve_rates
    from rmserve.batching import Batcher, BatchPolicy
    from rmserve.engines.base import pad_batch
    from rmserve.metrics import Metrics

    policy = BatchPolicy(max_batch_tokens=budget_tokens, max_wait_s=0.0, max_queue_items=100_000)
    pad_id = bundle.manifest.format.pad_token_id
    counter = CountingEngine(engine)
    batcher = Batcher(label, counter, policy, pad_id=pad_id, with_type_ids=False, metrics=Metrics())
    await batcher.warmup(max(lengths))
    batcher.start()
    rows: list[Row] = []
    grpo_rows: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    try:
        for length in lengths:
            items = random_items(max(sizes) * 2, length, 700, seed=length)
            # The engine alone, one batch of the largest request: the ceiling the batcher is held to.
            n = min(max(sizes), max(1, budget_tokens // length))
            batch = pad_batch([e.ids for e in items[:n]], pad_id)
            await loop.run_in_executor(None, engine.infer, batch)
            times = []
            for _ in range(5):
                t = time.perf_counter()
                await loop.run_in_executor(None, engine.infer, batch)
                times.append(time.perf_counter() - t)
            sec = float(np.median(times))
            rows.append(_row(label, length, n, n / sec, meta, peak, path=f"engine.infer x{n}"))
            log(f"{label} L={length} engine.infer x{n}: {rows[-1].pairs_s:.1f} pairs/s")
            for size in sizes:
                total = counts[length] if size == 1 else max(counts[length], 4 * size)
                pool = (items * (total // len(items) + 1))[:total]
                requests = [pool[i : i + size] for i in range(0, total, size)]
                concurrency = 64 if size == 1 else 2
                await drive(batcher, requests[: max(1, len(requests) // 4)], concurrency)  # warm this mix
                sec = await drive(batcher, requests, concurrency)
                lone = []
                if size == 1:
                    for e in items[:8]:
                        t = time.perf_counter()
                        await asyncio.gather(*batcher.submit([e], time.monotonic() + 600))
                        lone.append(time.perf_counter() - t)
                row = _row(
                    label, length, size, total / sec, meta, peak, path=f"batcher, {concurrency} callers"
                )
                row.p50_ms = round(float(np.median(lone)) * 1000, 2) if lone else None
                rows.append(row)
                log(
                    f"{label} L={length} {size}-item requests: {row.pairs_s:.1f} pairs/s, "
                    f"{row.tokens_s:.0f} tokens/s, {row.tflops:.1f} TFLOP/s"
                    + (f", {row.peak_pct:.1f}% of peak" if row.peak_pct is not None else "")
                )
        if grpo is not None:
            grpo_rows = await rmserve_rates(batcher, counter, grpo)
            for r in grpo_rows:
                log(
                    f"{label} GRPO {r['path']}: {r['pairs_s']:.1f} pairs/s, padded {r['padded_fraction']:.1%}"
                )
    finally:
        await batcher.stop()
    return rows, grpo_rows


def _row(
    name: str, length: int, size: int, pairs_s: float, meta: dict[str, Any], peak: float | None, path: str
) -> Row:
    flops = model_flops(meta, length) * pairs_s
    return Row(
        model=name,
        tokens=length,
        request_items=size,
        pairs_s=round(pairs_s, 2),
        tokens_s=round(pairs_s * length, 1),
        tflops=round(flops / 1e12, 2),
        peak_pct=round(100 * flops / peak, 2) if peak else None,
        path=path,
    )


def serve_stage(
    name: str,
    precision: str,
    work: Path,
    provider: str,
    lengths: list[int],
    sizes: list[int],
    counts: dict[int, int],
    peak: float | None,
    grpo: Any | None,
) -> tuple[list[Row], dict[str, Any], list[dict[str, Any]]]:
    from rmserve.bundle import load_bundle, read_manifest, write_manifest
    from rmserve.config import Settings
    from rmserve.engines.select import create_engine, default_batch_tokens
    from rmserve.formatting import Encoded
    from rmserve.models.fp16 import measure_fp16

    label = f"{name}/{precision}"
    root = work / name
    meta = json.loads((root / "meta.json").read_text())
    bundle = load_bundle(root / f"bundle-{precision}")
    t = time.perf_counter()
    if provider == "cuda":
        engine, selection = create_engine(bundle, Settings.model_validate({"provider": "cuda"}))
    else:
        engine, selection = dry_run_engine(bundle, precision)
    log(
        f"{label}: engine {engine.info.provider}/{engine.info.precision} ready in "
        f"{time.perf_counter() - t:.1f}s ({selection.get('reason')})"
    )
    reference = np.load(root / "reference.npy")
    encoded = [
        Encoded(ids=tuple(ids), type_ids=None, truncated=False)
        for ids in json.loads((root / "items.json").read_text())
    ]
    t = time.perf_counter()
    report = measure_fp16(
        bundle,
        engine,
        encoded,
        reference,
        text_source="built-in pairs + random tokens",
        batch_sizes=(1, 7, 32),
        precision=precision,
    )
    parity = report.as_manifest() | {"problems": report.problems}
    log(
        f"{label}: parity {precision} ({engine.info.provider}) vs fp32 PyTorch "
        f"in {time.perf_counter() - t:.1f}s: "
        f"max abs {report.max_abs_diff:.3g}, max rel {report.max_rel_diff:.3g}, "
        f"drift {report.batch_invariance_max:.3g}, ranking agreement {report.extra['ranking_agreement']}, "
        f"spearman {report.extra['spearman']}, score range {report.score_range}"
        + (f"; PROBLEMS: {report.problems}" if report.problems else "")
    )
    manifest = read_manifest(bundle.path)
    fields = manifest.model_dump(exclude={"digest", "version", "files"}) | {"parity": parity}
    write_manifest(bundle.path, **fields)
    budget = default_batch_tokens("cuda")
    rows, grpo_rows = asyncio.run(
        bench_model(label, bundle, engine, meta, lengths, sizes, counts, peak, budget, grpo)
    )
    engine.close()
    exporter = manifest.exporter  # type: ignore[attr-defined]
    return (
        rows,
        {
            "parity": parity,
            "params": meta["params"],
            "params_nonembedding": meta["params_nonembedding"],
            "export_s": round(meta["export_s"], 1),
            "selection": selection,
            "attention": bundle.manifest.attention,
            "graph": bundle.manifest.graph,
            "nodes_per_layer": exporter.get("nodes_per_layer"),
            "residual_guard": exporter.get("residual_guard", True),
            "headroom": meta["headroom"]["residual_max_abs"],
        },
        grpo_rows,
    )


def dry_run_engine(bundle: Any, precision: str) -> tuple[Any, dict[str, Any]]:
    """The dry run's engine: the server refuses reduced precisions on a CPU by design, but ONNX Runtime's
    CPU provider runs fp16 graphs and OpenVINO runs bf16 ones (ONNX Runtime's CPU provider cannot)."""
    from rmserve.engines.base import for_padding
    from rmserve.engines.onnxruntime import OnnxRuntimeEngine
    from rmserve.engines.openvino import OpenVinoEngine, cpu_supports_bf16

    threads = os.cpu_count() or 1
    if precision == "bf16":
        hint = "bf16" if cpu_supports_bf16() else "fp32"
        engine: Any = OpenVinoEngine(bundle.model_path, threads=threads, precision=hint)
    else:
        engine = OnnxRuntimeEngine(bundle.model_path, provider="cpu", threads=threads, precision=precision)
    engine = for_padding(engine, bundle.manifest.padding, bundle.manifest.name)
    return engine, {"provider": engine.info.provider, "reason": "dry run: engine built directly"}


def http_pass(label: str, bundle: Path, provider: str, out: Path) -> dict[str, Any]:
    """One pass through the real server process: ready, /v1/score, /get_reward, /v1/models."""
    import httpx

    from tests.support.server import serve

    name = label.split("/")[0]
    env = {
        "RMSERVE_MODELS": f"{name}={bundle}",
        "RMSERVE_PROVIDER": provider,
        "RMSERVE_MAX_BATCH_TOKENS": "8192",
        "RMSERVE_CACHE": "off",
    }
    started = time.perf_counter()
    with serve(env, out, timeout=150) as server:
        ready_s = time.perf_counter() - started
        items = [
            {"prompt": "How do I boil an egg?", "response": "Boil it for nine minutes."},
            {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
        ]
        r = httpx.post(server.url + "/v1/score", json={"model": name, "items": items}, timeout=60)
        g = httpx.post(
            server.url + "/get_reward", json={"query": ["<|im_start|>user\nhi<|im_end|>\n"]}, timeout=60
        )
        models = httpx.get(server.url + "/v1/models", timeout=10).json()
        return {
            "bundle": label,
            "ready_s": round(ready_s, 1),
            "score_status": r.status_code,
            "score": r.json(),
            "get_reward_status": g.status_code,
            "get_reward": g.json(),
            "models_provider": json.dumps(models)[:400],
        }


def placement_probe(provider: str) -> dict[str, Any]:
    """Tiny lean graphs (Llama and Qwen3 layers) in fp16 and bf16 on the check's provider: whether they
    run, and which nodes ONNX Runtime leaves on the CPU (the readers of its MemcpyToHost copies)."""
    import onnx
    import onnxruntime as ort

    from rmserve.models.lean import build_lean_graph
    from rmserve.models.lean.weights import decoder_weights, score_head

    tokenizer = build_tokenizer()
    found: dict[str, Any] = {}
    scratch = Path(os.environ.get("TMPDIR", "/tmp")) / "rmserve-placement"
    scratch.mkdir(parents=True, exist_ok=True)
    for name in ("tiny-llama", "tiny-qwen3"):
        hf = build_model(name, tokenizer, "cpu").hf_model
        weights, score = decoder_weights(hf.base_model, 256), score_head(hf)
        for precision in ("fp16", "bf16"):
            label = f"{name}/{precision}"
            if provider != "cuda":
                found[label] = "not run: no CUDA here"
                continue
            source, optimized = scratch / f"{name}-{precision}.onnx", scratch / f"{name}-{precision}.opt.onnx"
            onnx.save(build_lean_graph(weights, score, precision), str(source))
            try:
                options = ort.SessionOptions()
                options.optimized_model_filepath = str(optimized)
                session = ort.InferenceSession(
                    str(source), options, providers=["CUDAExecutionProvider", "CPUExecutionProvider"]
                )
                ids = np.full((4, 96), 7, dtype=np.int64)
                (scores,) = session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
                nodes = onnx.load(str(optimized)).graph.node
                copies = [n for n in nodes if n.op_type.startswith("Memcpy")]
                to_host = {o for n in copies if n.op_type == "MemcpyToHost" for o in n.output}
                on_cpu = sorted({n.op_type for n in nodes if set(n.input) & to_host})
                found[label] = {
                    "runs": bool(np.isfinite(scores).all()),
                    "nodes": len(nodes),
                    "memcpy_nodes": len(copies),
                    "ops_reading_host_copies": on_cpu,
                }
            except Exception as exc:  # report what failed, never lose the run over the probe
                found[label] = f"{type(exc).__name__}: {str(exc)[:400]}"
            log(f"placement {label}: {found[label]}")
    return found


def print_table(
    device: str,
    rows: list[Row],
    summaries: dict[str, Any],
    grpo: dict[str, Any] | None = None,
    placement: dict[str, Any] | None = None,
    quiet: bool = False,
) -> str:
    from loadtests import grpo_workload

    lines = [
        f"device: {device}",
        "",
        "| bundle | params (non-emb) | graph | nodes/layer | fp32 residual guard (headroom) "
        "| parity max abs / max rel | ranking agreement | drift |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, s in summaries.items():
        p = s["parity"]
        lines.append(
            f"| {label} | {s['params'] / 1e6:.0f}M ({s['params_nonembedding'] / 1e6:.0f}M) "
            f"| {s['graph']}, {s['attention']} | {s['nodes_per_layer'] or ''} "
            f"| {'yes' if s['residual_guard'] else 'no'} ({s['headroom']:.4g}) | "
            f"{p['max_abs_diff']:.3g} / {p['max_rel_diff']:.3g} | {p['ranking_agreement']} "
            f"(spearman {p['spearman']}) | {p['batch_invariance_max']:.3g} |"
        )
    lines += [
        "",
        "| bundle | tokens/item | items/request | path | pairs/s | tokens/s | TFLOP/s | % dense peak "
        "| lone 1-item p50 ms |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        pct = f"{r.peak_pct:.1f}" if r.peak_pct is not None else "n/a"
        p50 = f"{r.p50_ms}" if r.p50_ms is not None else ""
        lines.append(
            f"| {r.model} | {r.tokens} | {r.request_items} | {r.path} | {r.pairs_s:.1f} | {r.tokens_s:.0f} "
            f"| {r.tflops:.1f} | {pct} | {p50} |"
        )
    lines += ["", *ratio_table(rows)]
    if grpo:
        lines += ["", f"GRPO-shaped workload: {grpo['workload']}", ""]
        lines += grpo_workload.table(grpo["bundle"], grpo["rows"])
    if placement:
        lines += ["", "| placement probe | result |", "| --- | --- |"]
        lines += [f"| {label} | {json.dumps(v)} |" for label, v in placement.items()]
    text = "\n".join(lines)
    if not quiet:
        print(text, flush=True)
    return text


def ratio_table(rows: list[Row]) -> list[str]:
    """Per bundle and length: rmserve's engine and batcher (1-item requests) over the baselines."""
    from loadtests.gpu_baseline import COMPILE, SDPA

    lines = [
        "| bundle | tokens/item | engine | batcher, 1-item | HF + SDPA | + torch.compile | engine / SDPA "
        "| batcher / SDPA | engine / compile | batcher / compile |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for model, length in dict.fromkeys((r.model, r.tokens) for r in rows):
        mine = [r for r in rows if (r.model, r.tokens) == (model, length)]
        engine = next((r.pairs_s for r in mine if r.path.startswith("engine")), None)
        lone = [r for r in mine if r.path.startswith("batcher") and r.request_items == 1]
        batcher = lone[0].pairs_s if lone else None
        sdpa = next((r.pairs_s for r in mine if r.path == SDPA), None)
        compiled = next((r.pairs_s for r in mine if r.path == COMPILE), None)

        def ratio(a: float | None, b: float | None) -> str:
            return f"{a / b:.2f}x" if a and b else ""

        def num(v: float | None) -> str:
            return f"{v:.1f}" if v else ""

        lines.append(
            f"| {model} | {length} | {num(engine)} | {num(batcher)} | {num(sdpa)} | {num(compiled)} "
            f"| {ratio(engine, sdpa)} | {ratio(batcher, sdpa)} | {ratio(engine, compiled)} "
            f"| {ratio(batcher, compiled)} |"
        )
    return lines


def hf_dtype(precision: str, device: str) -> Any:
    import torch

    if device != "cuda":
        return torch.float32  # the dry run: the same code, on the CPU
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def baseline_stage(
    label: str,
    meta: dict[str, Any],
    shapes: list[tuple[int, int]],
    device: str,
    peak: float | None,
    paths: set[str],
    time_left: Any,
    rows: list[Row],
    save: Any,
) -> None:
    """HF + SDPA and/or torch.compile on the same card, each row printed and saved as it lands."""
    from loadtests import gpu_baseline

    name, precision = label.split("/")
    tokenizer = build_tokenizer()

    def build() -> Any:
        return build_hf(name, tokenizer, device, hf_dtype(precision, device), "sdpa").eval()

    def report(path: str, items: int, tokens: int, rate: float) -> None:
        rows.append(_row(label, tokens, items, rate, meta, peak, path=path))
        log(f"{label} L={tokens} {path} x{items}: {rate:.1f} pairs/s")
        save()

    gpu_baseline.baseline(build, shapes, 700, device, paths=paths, report=report, time_left=time_left)


def grpo_baseline(label: str, device: str, workload: Any, pad_id: int) -> list[dict[str, Any]]:
    """The GRPO workload through HF + SDPA micro-batches with a padding mask (arrival order, sorted)."""
    import torch

    from loadtests.grpo_workload import hf_rates

    name, precision = label.split("/")
    model = build_hf(name, build_tokenizer(), device, hf_dtype(precision, device), "sdpa").eval()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def forward(ids: np.ndarray, mask: np.ndarray) -> Any:
        with torch.inference_mode():
            return model(
                input_ids=torch.from_numpy(ids).to(device), attention_mask=torch.from_numpy(mask).to(device)
            ).logits

    return hf_rates(forward, sync, workload, pad_id)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=["export", "serve", "all"], default="all")
    parser.add_argument("--cpu-dry-run", action="store_true", help="tiny shapes, CPU provider, here")
    parser.add_argument("--models", default=DEFAULT_MODELS)
    parser.add_argument("--work", type=Path, default=Path("/tmp/gpucheck"))
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/gpucheck-out")))
    parser.add_argument("--deadline-s", type=float, default=480.0, help="skip what would start after this")
    parser.add_argument("--wait-s", type=float, default=300.0, help="serve: how long to wait for each export")
    parser.add_argument("--no-http", action="store_true")
    parser.add_argument(
        "--grpo-model", default=None, help=f"the GRPO workload's model (default {GRPO_MODEL})"
    )
    parser.add_argument("--grpo-prompts", type=int, default=None, help="prompts of 8 responses (default 32)")
    parser.add_argument(
        "--baselines",
        default=None,
        help="comma-separated: sdpa (HF + SDPA), compile (+ torch.compile, after every bundle's rows, while "
        "time allows), none; default sdpa,compile on a GPU, sdpa in the dry run",
    )
    parser.add_argument(
        "--exporter",
        choices=["lean", "fused", "legacy"],
        default="lean",
        help="lean: rmserve's own graph (what rmserve export writes for these models); fused: torch.onnx "
        "dynamo at opset 23, one Attention op per layer with a mask; legacy: eager attention through "
        "TorchScript (unfused). fused and legacy write fp16 bundles only",
    )
    args = parser.parse_args(argv)
    t0 = time.monotonic()
    dry = args.cpu_dry_run
    names = (DRY_MODELS if dry and args.models == DEFAULT_MODELS else args.models).split(",")
    provider = "cpu" if dry else "cuda"
    lengths = [64, 128] if dry else [512, 2048]
    sizes = [1, 8] if dry else [1, 64]
    counts = {64: 32, 128: 32} if dry else {512: 512, 2048: 256}
    baselines = set((args.baselines or ("sdpa" if dry else "sdpa,compile")).split(","))
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)

    def time_left() -> float:
        return args.deadline_s - (time.monotonic() - t0)

    def precisions(name: str) -> list[str]:
        return ["fp16"] if args.exporter != "lean" else list(SHAPES[name].precisions)

    if args.stage in ("export", "all"):
        for name in names:
            if time_left() <= 0:
                log(f"{name}: skipped export, past the deadline")
                continue
            # The dry run also writes an fp32 bundle, for the HTTP pass (a CPU serves fp32 only).
            export_stage(
                name,
                args.work,
                "cpu" if dry else "cuda",
                max_len=256 if dry else 1024,
                exporter=args.exporter,
                precisions=precisions(name) + (["fp32"] if dry and args.exporter == "lean" else []),
            )
    if args.stage == "export":
        return 0
    if provider == "cuda":
        import onnxruntime as ort

        try:
            ort.preload_dlls()  # CUDA/cuDNN from the nvidia-* wheels PyTorch brought
        except Exception as exc:  # older builds have no preload_dlls; the libraries may be on the path
            log(f"preload_dlls: {exc}")
        log(
            f"onnxruntime {ort.__version__} from {Path(ort.__file__).parent}; providers "
            f"{ort.get_available_providers()}"
        )
    device, peak = gpu_name_and_peak(provider)
    log(f"device: {device}; dense fp16/bf16 peak {peak / 1e12 if peak else 'unknown'} TFLOP/s")
    rows: list[Row] = []
    summaries: dict[str, Any] = {}
    http: dict[str, Any] = {}
    grpo: dict[str, Any] = {}
    placement = placement_probe(provider)

    def save() -> None:
        """Results so far, rewritten after every row: a run cut short still leaves its table."""
        result = {
            "device": device,
            "peak_flops": peak,
            "rows": [asdict(r) for r in rows],
            "models": summaries,
            "grpo": grpo,
            "placement": placement,
            "http": http,
            "elapsed_s": round(time.monotonic() - t0, 1),
        }
        (args.out / "gpu_check.json").write_text(json.dumps(result, indent=1, default=str))
        table = print_table(device, rows, summaries, grpo, placement, quiet=True)
        (args.out / "gpu_check.md").write_text(table + "\n")

    grpo_model = args.grpo_model or (DRY_GRPO_MODEL if dry else GRPO_MODEL)
    shapes = [(min(max(sizes), max(1, engine_batch_tokens() // n)), n) for n in lengths]
    served: list[str] = []
    for name in names:
        done = args.work / name / "DONE"
        while not done.exists() and time.monotonic() - t0 < min(args.deadline_s, args.wait_s):
            time.sleep(1)
        if not done.exists():
            log(f"{name}: no bundle (export not finished in time); skipped")
            continue
        meta = json.loads((args.work / name / "meta.json").read_text())
        for i, precision in enumerate(precisions(name)):
            label = f"{name}/{precision}"
            if time_left() <= 0:
                log(f"{label}: skipped serving, past the deadline")
                continue
            workload = None
            if name == grpo_model and i == 0:
                workload = make_grpo_workload(dry, args.grpo_prompts)
                grpo.update({"bundle": label, "workload": workload.description, "rows": []})
            model_rows, summaries[label], grpo_rows = serve_stage(
                name, precision, args.work, provider, lengths, sizes, counts, peak, workload
            )
            rows += model_rows
            served.append(label)
            if workload is not None:
                grpo["rows"] += grpo_rows
            save()
            if "sdpa" in baselines and time_left() > 30:
                baseline_stage(label, meta, shapes, provider, peak, {"sdpa"}, time_left, rows, save)
            if workload is not None and time_left() > 30:
                pad_id = build_tokenizer().pad_token_id
                grpo["rows"] += grpo_baseline(label, provider, workload, pad_id)
                free_gpu_memory(provider)
                log(f"GRPO workload: {grpo['rows']}")
                save()
    if "compile" in baselines:  # only where time allows, after every bundle's own rows
        for label in served:
            meta = json.loads((args.work / label.split("/")[0] / "meta.json").read_text())
            baseline_stage(label, meta, shapes, provider, peak, {"compile"}, time_left, rows, save)
    print_table(device, rows, summaries, grpo, placement)
    if not args.no_http and served and time_left() > 0:
        label = served[0]
        name, precision = label.split("/")
        bundle = args.work / name / f"bundle-{'fp32' if dry else precision}"
        try:
            http = http_pass(label, bundle, provider, args.out)
            log(f"HTTP pass ({label}): {json.dumps(http)[:1500]}")
        except Exception as exc:  # report, never lose the table over the optional pass
            log(f"HTTP pass failed: {type(exc).__name__}: {str(exc)[-3000:]}")
            http = {"error": f"{type(exc).__name__}: {str(exc)[-3000:]}"}
    save()
    log(f"done in {time.monotonic() - t0:.0f}s")
    return 0 if rows else 1


def free_gpu_memory(provider: str) -> None:
    if provider == "cuda":
        import gc

        import torch

        gc.collect()
        torch.cuda.empty_cache()


def make_grpo_workload(dry: bool, prompts: int | None) -> Any:
    from loadtests.grpo_workload import grpo_workload

    if dry:  # the same shape of workload, scaled to the tiny models
        return grpo_workload(prompts or 4, prompt_tokens=(8, 64), response_tokens=(16, 192), max_length=256)
    return grpo_workload(prompts or 32, max_length=MAX_LENGTH)


def engine_batch_tokens() -> int:
    """Padded tokens per engine batch, as serve_stage sizes it (the baselines run the same batches)."""
    from rmserve.engines.select import default_batch_tokens

    return default_batch_tokens("cuda")


if __name__ == "__main__":
    raise SystemExit(main())
