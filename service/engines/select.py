"""Which engine serves a bundle: the provider and precision asked for, or for ``auto`` the fastest
one present that passes the quality gate, measured on the bundle's own calibration pairs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from rmserve.bundle import Bundle
from rmserve.config import Settings
from rmserve.engines.base import Engine, EngineError, available_cpus
from rmserve.engines.gate import MIN_AGREEMENT, MIN_SPEARMAN, calibration_items, run_gate, score_items
from rmserve.engines.onnxruntime import OnnxRuntimeEngine, cuda_present
from rmserve.engines.openvino import OpenVinoEngine, cpu_supports_bf16, openvino_present
from rmserve.formatting import Formatter

log = logging.getLogger("rmserve.engines")

# Padded tokens per forward pass, measured per backend on the 2-vCPU development machine with two
# streams (loadtests/README.md): ONNX Runtime is fastest at batches of 1 to 4 HH pairs and loses 15%
# at 2,048 tokens; OpenVINO is flat from 1,024 to 2,048. A GPU wants large batches.
DEFAULT_BATCH_TOKENS = {"cpu": 512, "openvino": 2048, "cuda": 65536}

# The fixed cost of one forward pass in padded tokens, which the batcher weighs against padding.
# On the 2-vCPU development machine (MiniLM-L6) a call costs about 4 ms and a token about 70 us;
# on a GPU a launch costs as much as thousands of tokens, so it almost never splits a batch.
CALL_OVERHEAD_TOKENS = {"cpu": 64, "openvino": 64, "cuda": 8192}


def default_streams(threads: int) -> int:
    """Forward passes side by side on a CPU: small batches cannot keep many threads busy.

    Measured on 2 vCPUs (loadtests/README.md): two one-thread streams beat one two-thread stream
    by 5-25% for every batch size and backend. Wider CPUs get about one stream per four threads,
    as OpenVINO's own THROUGHPUT hint does; RMSERVE_STREAMS overrides.
    """
    if threads < 2:
        return 1
    if threads < 8:
        return 2
    return min(8, threads // 4)


@dataclass(frozen=True)
class Candidate:
    provider: str
    precision: str

    @property
    def label(self) -> str:
        return f"{self.provider}/{self.precision}"


def build(candidate: Candidate, bundle: Bundle, threads: int, streams: int = 1) -> Engine:
    if candidate.provider == "openvino":
        return OpenVinoEngine(
            bundle.model_path, threads=threads, precision=candidate.precision, streams=streams
        )
    return OnnxRuntimeEngine(
        bundle.model_path,
        provider=candidate.provider,
        threads=threads,
        precision=candidate.precision,
        streams=streams,
    )


def candidates(bundle: Bundle, settings: Settings) -> list[Candidate]:
    """Every (provider, precision) the settings allow for this bundle on this machine."""
    native = bundle.manifest.precision
    wanted = settings.precision
    provider = settings.provider
    if provider == "cuda" or (provider == "auto" and cuda_present()):
        if wanted not in ("auto", native):
            raise EngineError(
                f"precision {wanted!r} on cuda needs a {wanted} bundle (rmserve export "
                f"--precision {wanted}); this bundle is {native}"
            )
        return [Candidate("cuda", native)]
    if native != "fp32":
        raise EngineError(f"this bundle is {native}, made for the GPU; export an fp32 bundle for the CPU")
    found: list[Candidate] = []
    if provider in ("auto", "cpu"):
        found.append(Candidate("cpu", "fp32"))
    if provider in ("auto", "openvino"):
        if not openvino_present():
            if provider == "openvino":
                raise EngineError("provider 'openvino' needs the openvino package (pip install openvino)")
        else:
            found.append(Candidate("openvino", "fp32"))
            if cpu_supports_bf16():
                found.append(Candidate("openvino", "bf16"))
    allowed = [c for c in found if wanted == "auto" or c.precision == wanted]
    if not allowed:
        have = ", ".join(c.label for c in found) or "none"
        raise EngineError(
            f"precision {wanted!r} is not available with provider {provider!r} on this machine "
            f"(available: {have})"
        )
    return allowed


def create_engine(bundle: Bundle, settings: Settings) -> tuple[Engine, dict[str, Any]]:
    """Build the engine for ``bundle``; returns it with what was measured and why it was chosen."""
    threads = settings.threads or available_cpus()
    streams = settings.streams or default_streams(threads)
    options = candidates(bundle, settings)
    if len(options) == 1 and options[0].precision == bundle.manifest.precision:
        chosen = options[0]  # nothing to compare and nothing to gate
        why = "the only option the settings allow" if settings.provider != "auto" else "a GPU is present"
        if chosen.provider == "cpu" and settings.provider == "auto":
            why = "the only backend present"
        engine = build(chosen, bundle, threads, streams)
        return engine, {
            "provider": chosen.provider,
            "precision": chosen.precision,
            "threads": threads,
            "streams": engine.info.streams,
            "reason": why,
        }
    return _measure_and_choose(bundle, settings, options, threads, streams)


def _measure_and_choose(
    bundle: Bundle, settings: Settings, options: list[Candidate], threads: int, streams: int
) -> tuple[Engine, dict[str, Any]]:
    formatter = Formatter(bundle)
    items = calibration_items(bundle, formatter)
    pad_id = bundle.manifest.format.pad_token_id
    reference = build(Candidate("cpu", "fp32"), bundle, threads, streams)
    measured: dict[str, float] = {}
    gates: dict[str, dict[str, Any]] = {}
    best: tuple[float, Candidate, Engine] | None = None
    try:
        for cand in options:
            engine = reference if cand == Candidate("cpu", "fp32") else build(cand, bundle, threads, streams)
            if cand.precision != "fp32":
                report = run_gate(
                    reference,
                    engine,
                    items,
                    pad_id=pad_id,
                    min_agreement=settings.gate_min_agreement,
                    min_spearman=settings.gate_min_spearman,
                )
                gates[cand.label] = report.as_dict()
                log.info("quality gate %s: %s", "passed" if report.passed else "FAILED", report.summary())
                if not report.passed:
                    if settings.precision != "auto":
                        raise EngineError(
                            f"precision {cand.precision} failed the quality gate: {report.summary()}"
                        )
                    engine.close()
                    continue
            rate = _pairs_per_second(engine, items, pad_id)
            measured[cand.label] = round(rate, 1)
            if best is None or rate > best[0]:
                if best is not None and best[2] is not reference:
                    best[2].close()
                best = (rate, cand, engine)
            elif engine is not reference:
                engine.close()
    finally:
        if best is None or best[2] is not reference:
            reference.close()
    if best is None:
        raise EngineError("no engine passed the quality gate")
    rate, chosen, engine = best
    reason = (
        f"fastest of {', '.join(f'{k} {v} pairs/s' for k, v in measured.items())} "
        f"on {len(items)} calibration pairs" + (" that passed the quality gate" if gates else "")
    )
    log.info("serving %s: %s", chosen.label, reason)
    return engine, {
        "provider": chosen.provider,
        "precision": chosen.precision,
        "threads": threads,
        "streams": engine.info.streams,
        "reason": reason,
        "measured_pairs_per_s": measured,
        "quality_gate": gates,
    }


def _pairs_per_second(engine: Engine, items: list[Any], pad_id: int) -> float:
    score_items(engine, items, pad_id, batch=8)  # warm the shapes
    started = time.perf_counter()
    score_items(engine, items, pad_id, batch=8)
    return len(items) / (time.perf_counter() - started)


def default_batch_tokens(provider: str) -> int:
    return DEFAULT_BATCH_TOKENS.get(provider, 2048)


def call_overhead_tokens(provider: str) -> int:
    return CALL_OVERHEAD_TOKENS.get(provider, 64)


__all__ = [
    "MIN_AGREEMENT",
    "MIN_SPEARMAN",
    "call_overhead_tokens",
    "candidates",
    "create_engine",
    "default_batch_tokens",
    "default_streams",
]
