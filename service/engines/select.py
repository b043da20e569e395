"""Which engine serves a bundle: the provider and precision asked for, or for ``auto`` a fixed rule.

The backends are the records of ``rmserve.engines.registry``. ``auto`` gives the same answer on the
same machine and bundle, start after start:

1. the backend: a GPU backend when one is present, else the present CPU backend of lowest
   ``auto_rank`` (OpenVINO, then ONNX Runtime);
2. the precision: the bundle's own (fp32 on a CPU), exact; or a reduced precision the backend's
   record says this CPU runs natively (bf16 on CPUs with AMX or AVX512-BF16 units), when it passes
   the quality gate against fp32. The gate compares fixed calibration pairs, so it answers the same
   on every start.

Speed decides nothing: measured at start-up, two starts on one machine saw 189.7 and 217.5 pairs/s
for the same engines, enough to flip a "fastest" rule. Both engines are still measured, for the
report; what was measured, and why the engine was chosen, are returned for ``/v1/models``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rmserve.bundle import Bundle
from rmserve.config import Settings
from rmserve.engines.base import Engine, EngineError, available_cpus, for_padding
from rmserve.engines.gate import MIN_AGREEMENT, MIN_SPEARMAN, calibration_items, run_gate, score_items
from rmserve.engines.registry import Backend, backend, backends
from rmserve.formatting import Formatter

log = logging.getLogger("rmserve.engines")


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
    """The engine of ``candidate`` for ``bundle``, fed as its manifest's ``padding`` says."""
    m = bundle.manifest
    engine = backend(candidate.provider).build(
        bundle.model_path, candidate.precision, threads, streams, m.extra_outputs
    )
    return for_padding(engine, bundle.manifest.padding, bundle.manifest.name)


def _pool(provider: str) -> list[Backend]:
    """The backends ``provider`` allows, in auto's order."""
    if provider != "auto":
        chosen = backend(provider)
        if not chosen.present():
            raise EngineError(f"provider {provider!r} is not available on this machine: {chosen.missing}")
        return [chosen]
    present = [b for b in backends().values() if b.present()]
    gpus = [b for b in present if b.device == "gpu"]
    return gpus[:1] if gpus else [b for b in present if b.device == "cpu"]


def candidates(bundle: Bundle, settings: Settings) -> list[Candidate]:
    """Every (provider, precision) the settings allow for this bundle on this machine, in auto's
    order of preference for the exact one."""
    native = bundle.manifest.precision
    wanted = settings.precision
    pool = _pool(settings.provider)
    if pool and pool[0].device == "gpu":
        if wanted not in ("auto", native):
            raise EngineError(
                f"precision {wanted!r} on {pool[0].name} needs a {wanted} bundle (rmserve export "
                f"--precision {wanted}); this bundle is {native}"
            )
        return [Candidate(pool[0].name, native)]
    if native != "fp32":
        raise EngineError(f"this bundle is {native}, made for the GPU; export an fp32 bundle for the CPU")
    found = [Candidate(b.name, p) for b in pool for p in b.precisions()]
    why = ""
    if bundle.manifest.kind == "process":
        # The quality gate ranks calibration pairs by score; it does not measure step rewards yet, so
        # a process bundle runs at its own precision only.
        found = [c for c in found if c.precision == native]
        why = "; a process bundle runs at its own precision (the quality gate does not measure steps)"
    allowed = [c for c in found if wanted == "auto" or c.precision == wanted]
    if not allowed:
        have = ", ".join(c.label for c in found) or "none"
        raise EngineError(
            f"precision {wanted!r} is not available with provider {settings.provider!r} on this machine "
            f"(available: {have}){why}"
        )
    return allowed


def create_engine(bundle: Bundle, settings: Settings) -> tuple[Engine, dict[str, Any]]:
    """Build the engine for ``bundle``; returns it with what was measured and why it was chosen."""
    threads = settings.threads or available_cpus()
    streams = settings.streams or default_streams(threads)
    options = candidates(bundle, settings)
    native = bundle.manifest.precision
    exact = next((c for c in options if c.precision == native), None)
    reduced = [c for c in options if c.precision != native]
    selection: dict[str, Any] = {"threads": threads}
    if exact is not None and (settings.precision != "auto" or not reduced):
        chosen, engine = exact, build(exact, bundle, threads, streams)
        selection["reason"] = _exact_reason(settings, exact)
    else:
        chosen, engine = _gate_and_choose(bundle, settings, exact, reduced, threads, streams, selection)
    log.info("serving %s: %s", chosen.label, selection["reason"])
    return engine, {
        "provider": chosen.provider,
        "precision": chosen.precision,
        "streams": engine.info.streams,
        **selection,
    }


def _exact_reason(settings: Settings, chosen: Candidate) -> str:
    if settings.provider != "auto" and settings.precision != "auto":
        return "as configured"
    if settings.provider != "auto":
        return f"provider {chosen.provider} as configured; the bundle's own precision (exact)"
    if settings.precision != "auto":
        return f"precision {settings.precision} as configured; {chosen.provider} ranks first of those present"
    return f"{chosen.provider} ranks first of the backends present; the bundle's own precision (exact)"


def _gate_and_choose(
    bundle: Bundle,
    settings: Settings,
    exact: Candidate | None,
    reduced: list[Candidate],
    threads: int,
    streams: int,
    selection: dict[str, Any],
) -> tuple[Candidate, Engine]:
    """A reduced precision, gated against fp32 (ONNX Runtime on the CPU, the reference); for auto,
    served when it passes (its speed is measured for the report only). Every engine built on the way
    but the chosen one is closed, also when the choice fails."""
    built: list[Engine] = []

    def make(cand: Candidate) -> Engine:
        built.append(build(cand, bundle, threads, streams))
        return built[-1]

    chosen: tuple[Candidate, Engine] | None = None
    try:
        chosen = _choose(bundle, settings, exact, reduced, selection, make)
        return chosen
    finally:
        for engine in built:
            if chosen is None or engine is not chosen[1]:
                engine.close()


def _choose(
    bundle: Bundle,
    settings: Settings,
    exact: Candidate | None,
    reduced: list[Candidate],
    selection: dict[str, Any],
    make: Callable[[Candidate], Engine],
) -> tuple[Candidate, Engine]:
    reference = make(Candidate("cpu", "fp32"))
    items = calibration_items(bundle, Formatter(bundle))
    pad_id = bundle.manifest.format.pad_token_id
    measured: dict[str, float] = {}
    gates: dict[str, dict[str, Any]] = {}
    selection["measured_pairs_per_s"] = measured
    selection["quality_gate"] = gates
    passed: tuple[Candidate, Engine] | None = None
    for cand in reduced:
        engine = make(cand)
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
                raise EngineError(f"precision {cand.precision} failed the quality gate: {report.summary()}")
            continue
        if passed is None:
            passed = (cand, engine)
    if exact is None:
        if passed is None:
            raise EngineError("no engine passed the quality gate")
        selection["reason"] = f"{passed[0].label} passed the quality gate"
        return passed
    exact_engine = reference if exact == Candidate("cpu", "fp32") else make(exact)
    if passed is None:
        selection["reason"] = (
            f"{exact.label}, the bundle's own precision: no reduced one passed the quality gate"
        )
        return exact, exact_engine
    # Measured for the report only: the same machine measures differently from start to start.
    measured[passed[0].label] = round(_pairs_per_second(passed[1], items, pad_id), 1)
    measured[exact.label] = round(_pairs_per_second(exact_engine, items, pad_id), 1)
    selection["reason"] = (
        f"{passed[0].label}: this CPU runs {passed[0].precision} natively and it passed the quality gate"
    )
    return passed


def _pairs_per_second(engine: Engine, items: list[Any], pad_id: int) -> float:
    score_items(engine, items, pad_id, batch=8)  # warm the shapes
    started = time.perf_counter()
    score_items(engine, items, pad_id, batch=8)
    return len(items) / (time.perf_counter() - started)


def default_batch_tokens(provider: str) -> int:
    return backend(provider).batch_tokens


def call_overhead_tokens(provider: str) -> int:
    return backend(provider).call_overhead_tokens


__all__ = [
    "MIN_AGREEMENT",
    "MIN_SPEARMAN",
    "call_overhead_tokens",
    "candidates",
    "create_engine",
    "default_batch_tokens",
    "default_streams",
]
