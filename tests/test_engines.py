"""The OpenVINO engine on the same bundles, the precision quality gate, CPU-limit sizing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rmserve.bundle import default_bundle_path, load_bundle
from rmserve.config import Settings
from rmserve.engines import select as select_mod
from rmserve.engines.base import EngineError, TokenBatch, _cgroup_cpu_quota, available_cpus
from rmserve.engines.gate import calibration_items, run_gate
from rmserve.engines.onnxruntime import OnnxRuntimeEngine
from rmserve.engines.openvino import OpenVinoEngine, cpu_supports_bf16
from rmserve.engines.registry import backends
from rmserve.formatting import Formatter
from tests.support.server import serve
from tests.test_serving import TEXTS, post_score, torch_scores

needs_bf16 = pytest.mark.skipif(not cpu_supports_bf16(), reason="this CPU has no native bf16 units")


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_openvino_fp32_matches_pytorch_over_http(
    arch: str, tiny_bundles: dict[str, Path], tmp_path: Path
) -> None:
    bundle = tiny_bundles[arch]
    expected = torch_scores(bundle, TEXTS)
    env = {
        "RMSERVE_MODELS": str(bundle),
        "RMSERVE_PROVIDER": "openvino",
        "RMSERVE_PRECISION": "fp32",
        "RMSERVE_CACHE": "off",
    }
    with serve(env, tmp_path) as server:
        got = np.array(post_score(server.url, TEXTS).json()["scores"])
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
        alone = post_score(server.url, TEXTS[:1]).json()["scores"][0]
        crowd = TEXTS[1:] * 5
        mixed = post_score(server.url, crowd[:16] + TEXTS[:1] + crowd[16:32]).json()["scores"][16]
        assert abs(alone - mixed) <= 1e-5 * max(1.0, abs(alone))


@needs_bf16
def test_bf16_passes_the_gate_on_the_real_default_bundle() -> None:
    path = default_bundle_path()
    if not (path / "manifest.json").is_file():
        pytest.fail(f"the default bundle is missing from {path}")
    bundle = load_bundle(path)
    items = calibration_items(bundle, Formatter(bundle))
    reference = OnnxRuntimeEngine(bundle.model_path, threads=2)
    report = run_gate(
        reference,
        OpenVinoEngine(bundle.model_path, threads=2, precision="bf16"),
        items,
        pad_id=bundle.manifest.format.pad_token_id,
    )
    assert report.passed, report.summary()
    assert report.pairwise_agreement >= 0.99 and report.spearman >= 0.995
    assert report.max_rel_deviation > 0  # it is measured, not assumed: bf16 is not exact


class BrokenPrecision:
    """A deliberately broken reduced precision: the real OpenVINO bf16 engine with its scores
    scrambled by noise as large as the scores themselves (test-only; no real precision is this bad)."""

    def __init__(self, inner: OpenVinoEngine) -> None:
        self.inner = inner
        self.info = inner.info
        self._rng = np.random.default_rng(0)

    def infer(self, batch: TokenBatch) -> np.ndarray:
        scores = self.inner.infer(batch)
        return (scores + self._rng.normal(0, 1.0, size=scores.shape)).astype(np.float32)

    def close(self) -> None:
        self.inner.close()


@needs_bf16
def test_a_broken_precision_fails_the_gate_auto_falls_back_explicit_stops(
    tiny_bundles: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    real_build = select_mod.build

    def build(candidate, bundle, threads, streams=1):  # type: ignore[no-untyped-def]
        engine = real_build(candidate, bundle, threads, streams)
        return BrokenPrecision(engine) if candidate.precision == "bf16" else engine

    monkeypatch.setattr(select_mod, "build", build)
    bundle = load_bundle(tiny_bundles["bert"])

    engine, selection = select_mod.create_engine(bundle, Settings(provider="openvino", precision="auto"))
    assert engine.info.precision == "fp32"
    gate = selection["quality_gate"]["openvino/bf16"]
    assert gate["passed"] is False and gate["spearman"] < 0.995
    engine.close()

    with pytest.raises(EngineError, match=r"bf16 failed the quality gate: .*Spearman"):
        select_mod.create_engine(bundle, Settings(provider="openvino", precision="bf16"))


def test_auto_chooses_the_same_engine_on_every_start(tiny_bundles: dict[str, Path]) -> None:
    bundle = load_bundle(tiny_bundles["bert"])
    chosen = []
    for _ in range(2):
        engine, selection = select_mod.create_engine(bundle, Settings())
        chosen.append((engine.info.provider, engine.info.precision, selection["reason"]))
        engine.close()
    assert chosen[0] == chosen[1], chosen
    provider, precision, reason = chosen[0]
    first_cpu = next(b.name for b in backends().values() if b.device == "cpu" and b.present())
    assert provider == first_cpu  # the rule: the present CPU backend of lowest rank
    if precision != "fp32":  # a reduced precision only where the CPU runs it natively, gated
        assert cpu_supports_bf16() and "passed the quality gate" in reason


def test_cpu_limits_size_the_threads(tmp_path: Path, tiny_bundles: dict[str, Path]) -> None:
    # A cgroup v2 quota of 1.5 CPUs rounds up to 2; "max" means no quota.
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert _cgroup_cpu_quota(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert _cgroup_cpu_quota(tmp_path) is None
    # A process pinned to one core builds one-thread, one-stream engines, whatever the machine has.
    code = (
        "from rmserve.engines.base import available_cpus; from rmserve.config import Settings; "
        "from rmserve.bundle import load_bundle; from rmserve.engines.select import create_engine; "
        f"e, s = create_engine(load_bundle({str(tiny_bundles['bert'])!r}), Settings()); "
        "print(available_cpus(), e.info.threads, s['threads'], e.info.streams, s['streams'])"
    )
    out = subprocess.run(
        ["taskset", "-c", "0", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    ).stdout.split()
    assert out == ["1", "1", "1", "1", "1"]
    assert available_cpus() >= 1
