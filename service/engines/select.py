"""Which engine serves a bundle: the provider asked for, or for ``auto`` the best one present."""

from __future__ import annotations

from typing import Any

from service.bundle import Bundle
from service.config import Settings
from service.engines.base import Engine, EngineError, available_cpus
from service.engines.onnxruntime import OnnxRuntimeEngine

# Padded tokens per forward pass. On a CPU, attention and padding grow faster than the gain from
# bigger GEMMs, so small batches win (see loadtests/README.md); a GPU wants large ones.
DEFAULT_BATCH_TOKENS = {"cpu": 2048, "openvino": 2048, "cuda": 65536}


def create_engine(bundle: Bundle, settings: Settings) -> tuple[Engine, dict[str, Any]]:
    """Build the engine for ``bundle``; returns it with the reason it was chosen."""
    threads = settings.threads or available_cpus()
    provider = settings.provider
    precision = settings.precision
    if precision not in ("auto", "fp32", bundle.manifest.precision):
        raise EngineError(
            f"precision {precision!r} is not available for this bundle on provider {provider!r} "
            f"(the bundle is {bundle.manifest.precision})"
        )
    if provider == "auto":
        provider = "cpu"
        reason = "auto: ONNX Runtime CPU provider (the only backend measured for this bundle)"
    else:
        reason = f"asked for provider {provider!r}"
    if provider == "openvino":
        raise EngineError("the openvino provider is not available in this build")
    engine = OnnxRuntimeEngine(bundle.model_path, provider=provider, threads=threads,
                               precision=bundle.manifest.precision)
    return engine, {"provider": provider, "reason": reason, "threads": threads}


def default_batch_tokens(provider: str) -> int:
    return DEFAULT_BATCH_TOKENS.get(provider, 2048)
