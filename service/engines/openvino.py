"""OpenVINO engine for Intel-style CPUs: reads the bundle's ONNX file as it is (no second export).

OpenVINO uses AMX / AVX-512 BF16 units that ONNX Runtime's CPU provider leaves idle. fp32 keeps
``INFERENCE_PRECISION_HINT=f32`` so it is exact; bf16 is only served behind the quality gate.
With one stream the LATENCY hint runs each batch on every thread. With ``streams`` > 1 the
THROUGHPUT hint splits the threads between that many streams and the engine keeps one infer
request per stream, so the batcher can run that many batches side by side (on this project's
2-vCPU machine two one-thread streams do about 20% more work than one two-thread stream; see
loadtests/README.md). Threads are the CPUs the process may use, never one per node core.
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import Any

import numpy as np

from rmserve.engines.base import EngineError, EngineInfo, TokenBatch, with_columns
from rmserve.engines.registry import Backend

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
    def __init__(
        self,
        model_path: Path,
        *,
        threads: int,
        precision: str = "fp32",
        streams: int = 1,
        extra_outputs: tuple[str, ...] = (),
    ) -> None:
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
        streams = max(1, min(streams, threads))
        hint_name = "LATENCY" if streams == 1 else "THROUGHPUT"
        self._compiled = compile_cpu(model_path, threads, precision, streams)
        self._inputs = [p.get_any_name() for p in self._compiled.inputs]
        self._extra = extra_outputs  # returned as columns after the score (rmserve.engines.base)
        # [batch]: an outcome graph's scores; [batch, length]: a process graph's value per token.
        self._per_token = self._compiled.outputs[0].get_partial_shape().rank.get_length() == 2
        # One infer request per stream, handed to whichever worker thread runs a batch next.
        self._api = threading.Lock()
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        for _ in range(streams):
            self._requests.put(self._compiled.create_infer_request())
        self.info = EngineInfo(
            provider="openvino",
            precision=precision,
            threads=threads,
            streams=streams,
            detail={
                "runtime": f"openvino {ov.get_version()}",
                "hint": hint_name,
                "inference_precision": hint,
            },
        )

    def infer(self, batch: TokenBatch) -> np.ndarray:
        request = self._requests.get()
        try:
            # Python threads touching OpenVINO's API at once can deadlock on the GIL (two
            # streams' first sync infer() calls hung a server start in about one of ten tries), so
            # one thread at a time sets inputs and starts a request, and reads its output; the
            # forward passes themselves run side by side on OpenVINO's own stream threads, and
            # wait() releases the GIL for the event loop and the tokenizer meanwhile.
            with self._api:
                request.start_async(batch.feeds(self._inputs), share_inputs=True)
            request.wait()
            with self._api:
                out = np.array(request.get_output_tensor(0).data, dtype=np.float32)
                extras = [np.array(request.get_tensor(n).data, dtype=np.float32) for n in self._extra]
            scores = out.reshape(batch.shape) if self._per_token else out.reshape(-1)
            return with_columns(scores, extras) if extras else scores
        finally:
            self._requests.put(request)

    def close(self) -> None:
        self.__dict__.pop("_requests", None)
        self.__dict__.pop("_compiled", None)


def compile_cpu(model_path: Path, threads: int, precision: str, streams: int = 1) -> Any:
    """``model_path`` compiled for OpenVINO's CPU plugin at ``precision`` (fp32 or bf16), with
    ``streams`` streams (the LATENCY hint for one, else THROUGHPUT) sharing ``threads`` threads."""
    import openvino as ov

    core = ov.Core()
    try:
        return core.compile_model(
            core.read_model(str(model_path)),
            "CPU",
            {
                "PERFORMANCE_HINT": "LATENCY" if streams == 1 else "THROUGHPUT",
                "NUM_STREAMS": streams,
                "INFERENCE_NUM_THREADS": threads,
                "INFERENCE_PRECISION_HINT": _HINTS[precision],
                # Pinning threads to cores fights other processes on a shared node.
                "ENABLE_CPU_PINNING": False,
            },
        )
    except Exception as exc:  # openvino raises RuntimeError subclasses with long texts
        raise EngineError(f"openvino could not compile {model_path}: {exc}") from exc


def _precisions() -> tuple[str, ...]:
    return ("fp32", "bf16") if cpu_supports_bf16() else ("fp32",)


def _build(model: Path, precision: str, threads: int, streams: int, extra: tuple[str, ...]) -> OpenVinoEngine:
    return OpenVinoEngine(model, threads=threads, precision=precision, streams=streams, extra_outputs=extra)


# OpenVINO is flat from 1,024 to 2,048 padded tokens per pass on the 2-vCPU development machine
# (loadtests/README.md). Ranked before ONNX Runtime: its bf16 is the CPU's fast path.
BACKENDS = (
    Backend(
        name="openvino",
        device="cpu",
        present=openvino_present,
        precisions=_precisions,
        build=_build,
        batch_tokens=2048,
        call_overhead_tokens=64,
        auto_rank=10,
        missing="pip install openvino",
    ),
)
