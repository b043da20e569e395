"""OpenVINO engine for Intel-style CPUs: reads the bundle's ONNX file as it is (no second export).

OpenVINO uses AMX / AVX-512 BF16 units that ONNX Runtime's CPU provider leaves idle. fp32 keeps
``INFERENCE_PRECISION_HINT=f32`` so it is exact; bf16 is only served behind the quality gate.
The LATENCY hint with one stream suits our one-batch-at-a-time worker; threads are the CPUs the
process may use (a pod limited to 2 CPUs must not start one thread per node core).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from service.engines.base import EngineError, EngineInfo, TokenBatch

_HINTS = {"fp32": "f32", "bf16": "bf16"}


def openvino_present() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 math (AMX or AVX-512 BF16); emulated bf16 is no faster."""
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


class OpenVinoEngine:
    def __init__(self, model_path: Path, *, threads: int, precision: str = "fp32") -> None:
        try:
            import openvino as ov
        except ImportError as exc:
            raise EngineError(
                "provider 'openvino' needs the openvino package (pip install openvino)"
            ) from exc
        hint = _HINTS.get(precision)
        if hint is None:
            raise EngineError(f"the openvino engine serves fp32 or bf16, not {precision!r}")
        if precision == "bf16" and not cpu_supports_bf16():
            raise EngineError(
                "this CPU has no native bf16 units (AMX or AVX-512 BF16); bf16 would be emulated"
            )
        core = ov.Core()
        try:
            model = core.read_model(str(model_path))
            self._compiled = core.compile_model(
                model,
                "CPU",
                {
                    "PERFORMANCE_HINT": "LATENCY",
                    "NUM_STREAMS": 1,
                    "INFERENCE_NUM_THREADS": threads,
                    "INFERENCE_PRECISION_HINT": hint,
                    # Pinning threads to cores fights other processes on a shared node.
                    "ENABLE_CPU_PINNING": False,
                },
            )
        except Exception as exc:  # openvino raises RuntimeError subclasses with long texts
            raise EngineError(f"openvino could not compile {model_path}: {exc}") from exc
        self._inputs = [p.get_any_name() for p in self._compiled.inputs]
        self._request = self._compiled.create_infer_request()
        self.info = EngineInfo(
            provider="openvino",
            precision=precision,
            threads=threads,
            detail={
                "runtime": f"openvino {ov.get_version()}",
                "hint": "LATENCY",
                "inference_precision": hint,
            },
        )

    def infer(self, batch: TokenBatch) -> np.ndarray:
        # One request reused: infer() releases the GIL, so the event loop and the tokenizer threads
        # prepare the next batch while this one runs.
        result = self._request.infer(batch.feeds(self._inputs), share_inputs=True)
        return np.asarray(result[0], dtype=np.float32).reshape(-1)

    def close(self) -> None:
        self.__dict__.pop("_request", None)
        self.__dict__.pop("_compiled", None)
