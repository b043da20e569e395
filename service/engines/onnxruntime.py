"""ONNX Runtime engine: the CPU provider, or CUDA when asked for and present."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.engines.base import EngineError, EngineInfo, TokenBatch

_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def cuda_present() -> bool:
    """onnxruntime-gpu is installed and sees a device."""
    return "CUDAExecutionProvider" in ort.get_available_providers()


class OnnxRuntimeEngine:
    def __init__(self, model_path: Path, *, provider: str = "cpu", threads: int = 1, precision: str = "fp32") -> None:
        wanted = _PROVIDERS.get(provider)
        if wanted is None:
            raise EngineError(f"onnxruntime has no provider {provider!r}; choose one of {sorted(_PROVIDERS)}")
        present = ort.get_available_providers()
        if wanted not in present:
            raise EngineError(
                f"provider {provider!r} needs {wanted}, which this onnxruntime build lacks "
                f"(it has {', '.join(present)}); install onnxruntime-gpu instead of onnxruntime"
            )
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Spinning threads burn the cores that tokenization and HTTP need between batches.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = [wanted] if wanted == "CPUExecutionProvider" else [wanted, "CPUExecutionProvider"]
        try:
            self._session = ort.InferenceSession(str(model_path), sess_options=opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise EngineError(f"onnxruntime could not load {model_path}: {exc}") from exc
        self._inputs = [i.name for i in self._session.get_inputs()]
        self._output = self._session.get_outputs()[0].name
        self.info = EngineInfo(provider=provider, precision=precision, threads=threads,
                               detail={"runtime": f"onnxruntime {ort.__version__}", "providers": providers})

    def infer(self, batch: TokenBatch) -> np.ndarray:
        (scores,) = self._session.run([self._output], batch.feeds(self._inputs))
        return np.asarray(scores, dtype=np.float32).reshape(-1)

    def close(self) -> None:
        del self._session
