"""ONNX Runtime engine: the CPU provider, or CUDA (onnxruntime-gpu) when asked for and present.

Every forward pass goes through IO binding, on both providers, so the path tested on a CPU in CI
is the path that runs on a GPU:

* inputs are copied to the provider's device once per batch (``bind_cpu_input`` on the CPU;
  an ``OrtValue`` made on the GPU, bound as is, on CUDA), never again inside the graph;
* the score output is bound to a preallocated host buffer, so the scores (a few bytes) come back in
  one copy and no per-batch output allocation happens. An outcome graph's output is ``[batch]``, a
  process graph's ``[batch, length]`` (a value per token, read at the step tokens: rmserve.kinds);
  the buffer takes the shape the graph declares. The outputs the manifest names beside it
  (``extra_outputs``: a gating head's ``components``) come back as columns after the score.

On CUDA the memory arena grows by what is requested (``kSameAsRequested``), not by doubling,
and never past ``gpu_mem_limit`` when one is set: a long-running server that once saw a large
batch keeps that batch's working set, not twice it. TF32 is off: an fp32 bundle promises scores
equal to PyTorch's within 1e-4 relative (README, "Exact"), which TF32 matrix products (~3e-4) would break;
fp16 and bf16 bundles never use TF32, and they are the fast path on a GPU (docs/gpu.md).

Streams (CPU only) are lanes over one session: each lane has its own IO binding and output buffer,
and every lane runs the one session. ONNX Runtime documents ``InferenceSession::Run`` as safe to call
from several threads at once ("Multiple threads are allowed to run this function; hence its
thread-safe", onnxruntime/core/session/inference_session.h), and its Python binding releases the GIL
around the run ("release GIL to allow multiple python threads to invoke Run() in parallel",
onnxruntime/python/onnxruntime_pybind_state.cc). A session holds its own copy of the weights,
prepacked for MLAS's ``MatMul`` and not shareable from Python (docs/prefix-reuse.md, "The weights in
memory"), so one session for all lanes holds the weights once, where a session per lane held them
once per lane. The session's threads are ``shared_session_threads``: the lanes' callers plus the pool's
workers add up to ``threads``; with one thread per lane each pass runs on its caller's thread alone.
"""

from __future__ import annotations

import queue
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from rmserve.engines.base import EngineError, EngineInfo, TokenBatch, shared_session_threads, with_columns
from rmserve.engines.registry import Backend

_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
_OUTPUT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def cuda_present() -> bool:
    """onnxruntime-gpu is installed and sees a device."""
    return "CUDAExecutionProvider" in ort.get_available_providers()


def compute_capability(device_id: int) -> tuple[int, int] | None:
    """The GPU's compute capability from nvidia-smi (no CUDA runtime is imported here); None if unknown."""
    try:
        done = subprocess.run(
            ["nvidia-smi", f"--id={device_id}", "--query-gpu=compute_cap", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        major, minor = done.stdout.strip().split(".")
        return int(major), int(minor)
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def bf16_problem(capability: tuple[int, int] | None) -> str | None:
    """Why a bf16 bundle cannot be served on a GPU of ``capability``, or None.

    bf16 kernels (and flash attention) need compute capability 8.0+ (Ampere); an unknown capability
    is let through, and a GPU without them fails at its session forward pass, in the warm-up.
    """
    if capability is None or capability >= (8, 0):
        return None
    found = ".".join(map(str, capability))
    return (
        f"a bf16 bundle needs a GPU with bf16 units (compute capability 8.0+); this one is {found}: "
        "export the model with --precision fp16 for it"
    )


def cuda_options(device_id: int, gpu_mem_limit_bytes: int) -> dict[str, str]:
    """CUDAExecutionProvider options; see the module docstring for why each is set."""
    options = {
        "device_id": str(device_id),
        "arena_extend_strategy": "kSameAsRequested",
        "use_tf32": "0",
        # Reward models have no convolutions; skip cuDNN's exhaustive search at the session run.
        "cudnn_conv_algo_search": "DEFAULT",
        # Input copies and kernels share one stream, so a bound input is ready when a kernel reads it.
        "do_copy_in_default_stream": "1",
    }
    if gpu_mem_limit_bytes > 0:
        options["gpu_mem_limit"] = str(gpu_mem_limit_bytes)
    return options


def new_session(
    model_path: Path, threads: int, providers: list[Any], *, arena: bool = True
) -> ort.InferenceSession:
    """A session of ``model_path`` on ``providers`` with the server's settings, ``threads`` intra-op.
    ``arena`` False: the CPU allocator frees each buffer as it goes, instead of keeping the arena's
    chunks (grown by doubling) until the session ends."""
    opts = ort.SessionOptions()
    opts.enable_cpu_mem_arena = arena
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Spinning threads burn the cores that tokenization and HTTP need between batches.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(model_path), sess_options=opts, providers=providers)
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise EngineError(f"onnxruntime could not load {model_path}: {exc}") from exc


class _Lane:
    """A stream: an IO binding of the shared session and an output buffer, one forward pass at a time."""

    def __init__(self, session: ort.InferenceSession, dtype: Any) -> None:
        self.session = session
        self.binding = session.io_binding()
        self.scores = np.empty(64, dtype=dtype)  # grown on demand; bound as the output buffer (flat)


class OnnxRuntimeEngine:
    """``streams`` > 1 (CPU only) runs that many forward passes at once on one session."""

    def __init__(
        self,
        model_path: Path,
        *,
        provider: str = "cpu",
        threads: int = 1,
        precision: str = "fp32",
        device_id: int = 0,
        gpu_mem_limit_bytes: int = 0,
        streams: int = 1,
        extra_outputs: tuple[str, ...] = (),
    ) -> None:
        wanted = _PROVIDERS.get(provider)
        if wanted is None:
            raise EngineError(f"onnxruntime has no provider {provider!r}; choose one of {sorted(_PROVIDERS)}")
        present = ort.get_available_providers()
        if wanted not in present:
            raise EngineError(
                f"provider {provider!r} needs {wanted}, which this onnxruntime build lacks "
                f"(it has {', '.join(present)}); install onnxruntime-gpu instead of onnxruntime"
            )
        providers: list[Any]
        if provider == "cuda":
            # One session per device: a second would hold a second copy of the weights and arena.
            streams = 1
            providers = [(wanted, cuda_options(device_id, gpu_mem_limit_bytes)), "CPUExecutionProvider"]
            self._device, self._device_id = "cuda", device_id
        else:
            streams = max(1, min(streams, threads))
            providers = [wanted]
            self._device, self._device_id = "cpu", 0
        session = new_session(model_path, shared_session_threads(threads, streams), providers)
        if provider == "cuda" and wanted not in session.get_providers():
            # onnxruntime-gpu falls back to the CPU silently when CUDA/cuDNN libraries are missing.
            raise EngineError(
                "onnxruntime-gpu could not start CUDAExecutionProvider (CUDA 12/13 runtime, cuBLAS or "
                f"cuDNN libraries missing or not matching the wheel); session providers: "
                f"{', '.join(session.get_providers())}"
            )
        self._inputs = [i.name for i in session.get_inputs()]
        out = session.get_outputs()[0]
        self._output = out.name
        self._per_token = len(out.shape) == 2  # [batch, length]: a process graph
        self._extra = extra_outputs
        missing = sorted(set(extra_outputs) - {o.name for o in session.get_outputs()})
        if missing:
            raise EngineError(f"{model_path}: the manifest names outputs the graph lacks: {missing}")
        dtype = _OUTPUT_DTYPES.get(out.type)
        if dtype is None:
            raise EngineError(f"{model_path}: output {out.name!r} is {out.type}, not a float tensor")
        self._lanes: queue.SimpleQueue[_Lane] = queue.SimpleQueue()
        for _ in range(streams):
            self._lanes.put(_Lane(session, dtype))
        detail: dict[str, Any] = {
            "runtime": f"onnxruntime {ort.__version__}",
            "providers": session.get_providers(),
            "io_binding": True,
            "sessions": 1,  # shared by the streams
        }
        if provider == "cuda":
            detail["cuda_options"] = cuda_options(device_id, gpu_mem_limit_bytes)
        self.info = EngineInfo(
            provider=provider, precision=precision, threads=threads, streams=streams, detail=detail
        )

    def infer(self, batch: TokenBatch) -> np.ndarray:
        lane = self._lanes.get()
        try:
            return self._run(lane, batch)
        finally:
            self._lanes.put(lane)

    def _run(self, lane: _Lane, batch: TokenBatch) -> np.ndarray:
        rows, width = batch.shape
        shape = [rows, width] if self._per_token else [rows]
        size = rows * width if self._per_token else rows
        if lane.scores.shape[0] < size:
            lane.scores = np.empty(max(size, 2 * lane.scores.shape[0]), dtype=lane.scores.dtype)
        binding = lane.binding
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        on_device = []  # the device copies must outlive the run
        for name, array in batch.feeds(self._inputs).items():
            array = np.ascontiguousarray(array, dtype=np.int64)
            if self._device == "cpu":
                binding.bind_cpu_input(name, array)
            else:
                value = ort.OrtValue.ortvalue_from_numpy(array, "cuda", self._device_id)
                binding.bind_ortvalue_input(name, value)
                on_device.append(value)
        out = lane.scores[:size]
        binding.bind_output(self._output, "cpu", 0, out.dtype, shape, out.ctypes.data)
        for name in self._extra:  # shaped by the graph; a few floats per row
            binding.bind_output(name, "cpu")
        lane.session.run_with_iobinding(binding)
        scores = out.reshape(shape).astype(np.float32, copy=True)
        if not self._extra:
            return scores
        extras = [v.numpy().reshape(rows, -1) for v in binding.get_outputs()[1:]]
        return with_columns(scores, extras)

    def close(self) -> None:
        # Idempotent: the batcher and its owner may both close the engine.
        self.__dict__.pop("_lanes", None)


def _build_cpu(
    model: Path, precision: str, threads: int, streams: int, extra: tuple[str, ...]
) -> OnnxRuntimeEngine:
    return OnnxRuntimeEngine(
        model, provider="cpu", threads=threads, precision=precision, streams=streams, extra_outputs=extra
    )


def _build_cuda(
    model: Path, precision: str, threads: int, streams: int, extra: tuple[str, ...]
) -> OnnxRuntimeEngine:
    problem = bf16_problem(compute_capability(0)) if precision == "bf16" else None
    if problem:
        raise EngineError(problem)
    return OnnxRuntimeEngine(
        model, provider="cuda", threads=threads, precision=precision, streams=streams, extra_outputs=extra
    )


# Batch budgets measured on the 2-vCPU development machine with two streams (loadtests/README.md):
# ONNX Runtime is fastest at batches of 1 to 4 HH pairs and loses 15% at 2,048 tokens. A call costs
# about 4 ms and a token about 70 us there (MiniLM-L6), so a pass is worth 64 padded tokens; on a GPU
# a launch costs as much as thousands of tokens and it wants large batches.
BACKENDS = (
    Backend(
        name="cpu",
        device="cpu",
        present=lambda: True,
        precisions=lambda: ("fp32",),
        build=_build_cpu,
        batch_tokens=512,
        call_overhead_tokens=64,
        auto_rank=20,
        missing="pip install onnxruntime",
    ),
    Backend(
        name="cuda",
        device="gpu",
        present=cuda_present,
        precisions=lambda: ("fp32",),
        build=_build_cuda,
        batch_tokens=65536,
        call_overhead_tokens=8192,
        auto_rank=0,
        missing="CUDAExecutionProvider is missing; install onnxruntime-gpu instead of onnxruntime",
    ),
)
