"""The GPU check: realistic random-init decoder reward models, exported to fp16 bundles, served on CUDA.

Two stages, so the export (torch only) can run while onnxruntime-gpu is still being unpacked:

* ``export``: per model, a Qwen2-shaped reward model (random init, seeded, configs in code, a
  byte-level BPE tokenizer trained here: no hub needed) -> fp32 PyTorch reference scores on the
  GPU -> torch.onnx export of the fp32 graph (models/export.py) -> fp16 conversion with the
  overflow guard (models/fp16.py) -> a bundle; writes ``<work>/<model>/DONE``.
* ``serve``: per exported bundle, rmserve's own engine selection (provider ``cuda``) and batcher:
  parity of the fp16 engine against the fp32 PyTorch scores (padded batches, both sides), recorded
  in the bundle's manifest; pairs/s and tokens/s at 512 and 2,048 tokens with 1-item and 64-item
  requests; achieved fraction of the GPU's dense fp16 peak; then one pass through the real HTTP
  server. Prints a table and writes it (and JSON) to ``--out``.

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


SHAPES = {
    "qwen2-0.5b": Shape("qwen2", 896, 24, 14, 2, 64, 4864, 151936),
    "qwen2-1.5b": Shape("qwen2", 1536, 28, 12, 2, 128, 8960, 151936),
    "qwen3-1.7b": Shape("qwen3", 2048, 28, 16, 8, 128, 6144, 151936),
    "tiny": Shape("qwen2", 64, 2, 4, 2, 16, 128, 1000),
    "tiny-qwen3": Shape("qwen3", 64, 2, 4, 2, 16, 128, 1000),
}
DEFAULT_MODELS = "qwen2-0.5b,qwen2-1.5b,qwen3-1.7b"
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
    return AutoConfig.for_model(
        shape.family,
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


def export_stage(name: str, work: Path, device: str, max_len: int, legacy: bool) -> None:
    """``legacy``: eager attention through the TorchScript exporter (unfused; the old graph)."""
    import torch

    from rmserve.bundle import unsealed_bundle, write_manifest
    from rmserve.formatting import Formatter
    from rmserve.models import attention, graph
    from rmserve.models import export as ex
    from rmserve.models.fp16 import convert_model_fp16
    from rmserve.models.heads import ModelMeta
    from rmserve.models.parity import reference_scores

    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference is fp32
    torch.backends.cudnn.allow_tf32 = False
    root = work / name
    bundle_dir, fp32_dir = root / "bundle", root / "fp32"
    bundle_dir.mkdir(parents=True, exist_ok=True)
    fp32_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tokenizer = build_tokenizer()
    model = build_model(name, tokenizer, device, attn="eager" if legacy else "sdpa")
    family, arch = SHAPES[name].family, architecture(name)
    total, nonemb = flop_params(model)
    log(
        f"{name}: built {total / 1e6:.0f}M parameters ({nonemb / 1e6:.0f}M outside the embedding) "
        f"on {device} "
        f"in {time.perf_counter() - started:.1f}s"
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
    plan = (
        attention.unfused(ex.DEFAULT_OPSET, "--exporter legacy")
        if legacy
        else attention.plan("decoder", fuse=True, opset=None, default_opset=ex.DEFAULT_OPSET)
    )
    settings = ex.format_settings(tokenizer, meta, max_length=4096, input_format="chat_template")
    ex.save_tokenizer(tokenizer, bundle_dir)
    provisional = unsealed_bundle(
        bundle_dir,
        name=name,
        architecture=arch,
        model_type=family,
        family="decoder",
        base_model=meta.base_model,
        format=settings,
        opset=plan.opset,
        inputs=["input_ids", "attention_mask"],
    )
    formatter = Formatter(provisional)
    encoded = parity_items(formatter, len(tokenizer), max_len)
    t = time.perf_counter()
    reference = reference_scores(model, encoded, meta.pad_token_id, batch=8)
    log(
        f"{name}: fp32 PyTorch reference on {device} for {len(encoded)} items "
        f"in {time.perf_counter() - t:.1f}s"
    )
    t = time.perf_counter()
    model = model.cpu()
    exporter = ""
    if not legacy:
        try:
            exporter = ex.export_onnx(
                model, meta, fp32_dir, opset=plan.opset, external_data_bytes=ex.EXTERNAL_DATA_BYTES
            )
            problem = attention.check_fused(attention.op_counts(fp32_dir / "model.onnx"), meta.num_layers)
        except Exception as exc:  # the dynamo exporter raises many kinds; the run must go on
            problem = f"{type(exc).__name__}: {str(exc)[:300]}"
        if problem is not None:  # measure the unfused graph rather than nothing
            log(f"{name}: not fused ({problem}); exporting the unfused graph instead")
            plan = attention.unfused(ex.DEFAULT_OPSET, f"not fused on this machine: {problem}")
            model = build_model(name, tokenizer, "cpu", attn="eager")
            legacy = True
    if legacy:
        # TorchScript: eager attention, unfused, in seconds.
        for stale in fp32_dir.glob("model.onnx*"):
            stale.unlink()
        ids = torch.full((2, 8), 5, dtype=torch.long)
        mask = torch.ones_like(ids)
        mask[1, :3] = 0
        external = sum(p.numel() * p.element_size() for p in model.parameters()) > ex.EXTERNAL_DATA_BYTES
        graph.export_legacy(
            model,
            (ids, mask),
            ["input_ids", "attention_mask"],
            fp32_dir / "model.onnx",
            plan.opset,
            external,
        )
        exporter = "torch.onnx.export(dynamo=False)"
    fused_ops = attention.fused_ops_summary(attention.op_counts(fp32_dir / "model.onnx"))
    log(f"{name}: {exporter} fp32 graph ({plan.label}, {fused_ops}) in {time.perf_counter() - t:.1f}s")
    t = time.perf_counter()
    guard = convert_model_fp16(
        fp32_dir / "model.onnx", bundle_dir / "model.onnx", external_data_bytes=ex.EXTERNAL_DATA_BYTES
    )
    log(
        f"{name}: fp16 conversion in {time.perf_counter() - t:.1f}s; guard {guard['fp32_ops']}, "
        f"{guard['fp32_residual_and_mask_adds']} adds kept fp32"
    )
    ex.write_calibration(bundle_dir, ex.calibration_set("builtin"))
    fields = {
        "name": name,
        "architecture": arch,
        "model_type": family,
        "family": "decoder",
        "base_model": meta.base_model,
        "format": settings,
        "opset": plan.opset,
        "inputs": ["input_ids", "attention_mask"],
        "calibration_file": "calibration.jsonl",
        "precision": "fp16",
        "attention": plan.label,
        "attention_reason": plan.reason,
        "exporter": {"path": exporter, "torch": torch.__version__, "fp16": guard, "fused_ops": fused_ops},
    }
    write_manifest(bundle_dir, **fields)
    np.save(root / "reference.npy", reference)
    (root / "items.json").write_text(json.dumps([list(e.ids) for e in encoded]))
    (root / "meta.json").write_text(
        json.dumps(
            {
                "params": total,
                "params_nonembedding": nonemb,
                "fields": {k: v for k, v in fields.items() if k != "format"},
                "shape": asdict(SHAPES[name]),
                "export_s": time.perf_counter() - started,
            }
        )
    )
    if not (fp32_dir / "model.onnx.data").exists():
        (fp32_dir / "model.onnx").replace(root / "fp32_model.onnx")
    shutil.rmtree(fp32_dir)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    (root / "DONE").write_text("ok\n")
    log(f"{name}: bundle ready in {time.perf_counter() - started:.1f}s")


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
    name: str,
    bundle: Any,
    engine: Any,
    meta: dict[str, Any],
    lengths: list[int],
    sizes: list[int],
    counts: dict[int, int],
    peak: float | None,
    budget_tokens: int,
) -> list[Row]:
    from rmserve.batching import Batcher, BatchPolicy
    from rmserve.engines.base import pad_batch
    from rmserve.metrics import Metrics

    policy = BatchPolicy(max_batch_tokens=budget_tokens, max_wait_s=0.0, max_queue_items=100_000)
    pad_id = bundle.manifest.format.pad_token_id
    batcher = Batcher(name, engine, policy, pad_id=pad_id, with_type_ids=False, metrics=Metrics())
    await batcher.warmup(max(lengths))
    batcher.start()
    rows: list[Row] = []
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
            rows.append(_row(name, length, n, n / sec, meta, peak, path=f"engine.infer x{n}"))
            log(f"{name} L={length} engine.infer x{n}: {rows[-1].pairs_s:.1f} pairs/s")
            for size in sizes:
                total = counts[length] if size == 1 else max(counts[length], 4 * size)
                pool = (items * (total // len(items) + 1))[:total]
                requests = [pool[i : i + size] for i in range(0, total, size)]
                concurrency = 64 if size == 1 else 2
                await drive(
                    batcher, requests[: max(1, len(requests) // 4)], concurrency
                )  # warm this shape mix
                sec = await drive(batcher, requests, concurrency)
                lone = []
                if size == 1:
                    for e in items[:8]:
                        t = time.perf_counter()
                        await asyncio.gather(*batcher.submit([e], time.monotonic() + 600))
                        lone.append(time.perf_counter() - t)
                row = _row(
                    name, length, size, total / sec, meta, peak, path=f"batcher, {concurrency} callers"
                )
                row.p50_ms = round(float(np.median(lone)) * 1000, 2) if lone else None
                rows.append(row)
                log(
                    f"{name} L={length} {size}-item requests: {row.pairs_s:.1f} pairs/s, "
                    f"{row.tokens_s:.0f} tokens/s, {row.tflops:.1f} TFLOP/s"
                    + (f", {row.peak_pct:.1f}% of peak" if row.peak_pct is not None else "")
                )
    finally:
        await batcher.stop()
    return rows


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
    work: Path,
    provider: str,
    lengths: list[int],
    sizes: list[int],
    counts: dict[int, int],
    peak: float | None,
) -> tuple[list[Row], dict[str, Any]]:
    from rmserve.bundle import load_bundle, read_manifest, write_manifest
    from rmserve.config import Settings
    from rmserve.engines.onnxruntime import OnnxRuntimeEngine
    from rmserve.engines.select import create_engine, default_batch_tokens
    from rmserve.formatting import Encoded
    from rmserve.models.fp16 import measure_fp16

    root = work / name
    meta = json.loads((root / "meta.json").read_text())
    bundle = load_bundle(root / "bundle")
    t = time.perf_counter()
    if provider == "cuda":
        engine, selection = create_engine(bundle, Settings.model_validate({"provider": "cuda"}))
    else:  # the server refuses fp16 bundles on the CPU by design; the engine itself runs them
        engine = OnnxRuntimeEngine(
            bundle.model_path, provider="cpu", threads=os.cpu_count() or 1, precision="fp16"
        )
        selection = {"provider": "cpu", "reason": "dry run: engine built directly"}
    log(
        f"{name}: engine {engine.info.provider}/{engine.info.precision} "
        f"ready in {time.perf_counter() - t:.1f}s "
        f"({selection.get('reason')})"
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
    )
    parity = report.as_manifest() | {"problems": report.problems}
    log(
        f"{name}: parity fp16 ({engine.info.provider}) vs fp32 PyTorch in {time.perf_counter() - t:.1f}s: "
        f"max abs {report.max_abs_diff:.3g}, max rel {report.max_rel_diff:.3g}, "
        f"drift {report.batch_invariance_max:.3g}, ranking agreement {report.extra['ranking_agreement']}, "
        f"spearman {report.extra['spearman']}, score range {report.score_range}"
        + (f"; PROBLEMS: {report.problems}" if report.problems else "")
    )
    manifest = read_manifest(bundle.path)
    fields = manifest.model_dump(exclude={"digest", "version", "files"}) | {"parity": parity}
    write_manifest(bundle.path, **fields)
    budget = default_batch_tokens(engine.info.provider if provider == "cuda" else "cuda")
    rows = asyncio.run(bench_model(name, bundle, engine, meta, lengths, sizes, counts, peak, budget))
    engine.close()
    return rows, {
        "parity": parity,
        "params": meta["params"],
        "params_nonembedding": meta["params_nonembedding"],
        "export_s": round(meta["export_s"], 1),
        "selection": selection,
        "attention": bundle.manifest.attention,
    }


def http_pass(name: str, work: Path, provider: str, out: Path) -> dict[str, Any]:
    """One pass through the real server process: ready, /v1/score, /get_reward, /v1/models."""
    import httpx

    from tests.support.server import serve

    bundle = work / name / ("bundle" if provider == "cuda" else "bundle_fp32")
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
            "ready_s": round(ready_s, 1),
            "score_status": r.status_code,
            "score": r.json(),
            "get_reward_status": g.status_code,
            "get_reward": g.json(),
            "models_provider": json.dumps(models)[:400],
        }


def print_table(device: str, rows: list[Row], summaries: dict[str, Any], quiet: bool = False) -> str:
    lines = [
        f"device: {device}",
        "",
        "| model | params (non-emb) | attention | parity max abs / max rel | ranking agreement | drift |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, s in summaries.items():
        p = s["parity"]
        lines.append(
            f"| {name} | {s['params'] / 1e6:.0f}M ({s['params_nonembedding'] / 1e6:.0f}M) "
            f"| {s['attention']} | "
            f"{p['max_abs_diff']:.3g} / {p['max_rel_diff']:.3g} | {p['ranking_agreement']} "
            f"(spearman {p['spearman']}) | {p['batch_invariance_max']:.3g} |"
        )
    lines += [
        "",
        "| model | tokens/item | items/request | path | pairs/s | tokens/s | TFLOP/s | % dense fp16 peak "
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
    text = "\n".join(lines)
    if not quiet:
        print(text, flush=True)
    return text


def ratio_table(rows: list[Row]) -> list[str]:
    """Per model and length: rmserve's engine and batcher (1-item requests) over the baselines."""
    from loadtests.gpu_baseline import COMPILE, SDPA

    lines = [
        "| model | tokens/item | engine | batcher, 1-item | HF + SDPA | + torch.compile | engine / SDPA "
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


def baseline_stage(
    name: str,
    meta: dict[str, Any],
    shapes: list[tuple[int, int]],
    device: str,
    peak: float | None,
    compile_too: bool,
    time_left: Any,
    rows: list[Row],
    save: Any,
) -> None:
    """HF + SDPA (and torch.compile) on the same card, each row printed and saved as it lands."""
    import torch

    from loadtests import gpu_baseline

    tokenizer = build_tokenizer()
    dtype = torch.float16 if device == "cuda" else torch.float32

    def build() -> Any:
        return build_hf(name, tokenizer, device, dtype, "sdpa").eval()

    def report(path: str, items: int, tokens: int, rate: float) -> None:
        rows.append(_row(name, tokens, items, rate, meta, peak, path=path))
        log(f"{name} L={tokens} {path} x{items}: {rate:.1f} pairs/s")
        save()

    gpu_baseline.baseline(
        build, shapes, 700, device, compile_too=compile_too, report=report, time_left=time_left
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=["export", "serve", "all"], default="all")
    parser.add_argument("--cpu-dry-run", action="store_true", help="tiny shapes, CPU provider, here")
    parser.add_argument("--models", default=DEFAULT_MODELS)
    parser.add_argument("--work", type=Path, default=Path("/tmp/gpucheck"))
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/gpucheck-out")))
    parser.add_argument("--deadline-s", type=float, default=420.0, help="skip what would start after this")
    parser.add_argument("--wait-s", type=float, default=300.0, help="serve: how long to wait for each export")
    parser.add_argument("--no-http", action="store_true")
    parser.add_argument(
        "--baselines",
        default=None,
        help="comma-separated: sdpa (HF + SDPA), compile (+ torch.compile), none; default sdpa,compile "
        "on a GPU, sdpa in the dry run",
    )
    parser.add_argument(
        "--exporter",
        choices=["fused", "legacy"],
        default="fused",
        help="fused: SDPA through the dynamo exporter at opset 23, one Attention op per layer (what "
        "rmserve export writes); legacy: eager attention through TorchScript (the old unfused graph)",
    )
    args = parser.parse_args(argv)
    t0 = time.monotonic()
    dry = args.cpu_dry_run
    names = args.models.split(",")
    if dry and args.models == DEFAULT_MODELS:
        names = ["tiny"]
    provider = "cpu" if dry else "cuda"
    lengths = [64, 128] if dry else [512, 2048]
    sizes = [1, 8] if dry else [1, 64]
    counts = {64: 32, 128: 32} if dry else {512: 512, 2048: 256}
    baselines = set((args.baselines or ("sdpa" if dry else "sdpa,compile")).split(","))
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)

    def time_left() -> float:
        return args.deadline_s - (time.monotonic() - t0)

    if args.stage in ("export", "all"):
        for name in names:
            if time_left() <= 0:
                log(f"{name}: skipped export, past the deadline")
                continue
            export_stage(
                name,
                args.work,
                "cpu" if dry else "cuda",
                max_len=256 if dry else 1024,
                legacy=args.exporter == "legacy",
            )
            if dry:  # an fp32 bundle for the HTTP pass (the server serves fp32 only on a CPU)
                _fp32_copy(args.work / name)
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
    log(f"device: {device}; dense fp16 peak {peak / 1e12 if peak else 'unknown'} TFLOP/s")
    rows: list[Row] = []
    summaries: dict[str, Any] = {}
    http: dict[str, Any] = {}

    def save() -> None:
        """Results so far, rewritten after every row: a run cut short still leaves its table."""
        result = {
            "device": device,
            "peak_flops": peak,
            "rows": [asdict(r) for r in rows],
            "models": summaries,
            "http": http,
            "elapsed_s": round(time.monotonic() - t0, 1),
        }
        (args.out / "gpu_check.json").write_text(json.dumps(result, indent=1, default=str))
        (args.out / "gpu_check.md").write_text(print_table(device, rows, summaries, quiet=True) + "\n")

    for name in names:
        done = args.work / name / "DONE"
        while not done.exists() and time.monotonic() - t0 < min(args.deadline_s, args.wait_s):
            time.sleep(1)
        if not done.exists():
            log(f"{name}: no bundle (export not finished in time); skipped")
            continue
        if time_left() <= 0:
            log(f"{name}: skipped serving, past the deadline")
            continue
        model_rows, summaries[name] = serve_stage(name, args.work, provider, lengths, sizes, counts, peak)
        rows += model_rows
        save()
        if baselines & {"sdpa", "compile"} and time_left() > 30:
            meta = json.loads((args.work / name / "meta.json").read_text())
            shapes = [(min(max(sizes), max(1, engine_batch_tokens() // n)), n) for n in lengths]
            baseline_stage(name, meta, shapes, provider, peak, "compile" in baselines, time_left, rows, save)
    print_table(device, rows, summaries)
    if not args.no_http and summaries and time_left() > 0:
        name = next(iter(summaries))
        try:
            http = http_pass(name, args.work, provider, args.out)
            log(f"HTTP pass ({name}): {json.dumps(http)[:1500]}")
        except Exception as exc:  # report, never lose the table over the optional pass
            log(f"HTTP pass failed: {type(exc).__name__}: {str(exc)[-3000:]}")
            http = {"error": f"{type(exc).__name__}: {str(exc)[-3000:]}"}
    save()
    log(f"done in {time.monotonic() - t0:.0f}s")
    return 0 if rows else 1


def engine_batch_tokens() -> int:
    """Padded tokens per engine batch, as serve_stage sizes it (the baselines run the same batches)."""
    from rmserve.engines.select import default_batch_tokens

    return default_batch_tokens("cuda")


def _fp32_copy(root: Path) -> None:
    """Dry run only: the fp32 graph as a bundle of its own, for the CPU server."""
    from rmserve.bundle import read_manifest, write_manifest

    dest = root / "bundle_fp32"
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(root / "bundle", dest)
    shutil.copyfile(root / "fp32_model.onnx", dest / "model.onnx")
    fields = read_manifest(dest).model_dump(exclude={"digest", "version", "files"}) | {"precision": "fp32"}
    write_manifest(dest, **fields)


if __name__ == "__main__":
    raise SystemExit(main())
