"""Which attention an exported decoder graph carries: one fused operator per layer, or unfused.

Fused (the default for decoders): the checkpoint is loaded with PyTorch SDPA attention and
exported at opset 23, where torch.onnx writes each ``scaled_dot_product_attention`` as ONNX's
standard ``Attention`` op, each RMSNorm as ``RMSNormalization`` and each rotary embedding as
``RotaryEmbedding``. The padding mask (per-row key padding, causal within the row, a sliding
window where the model has one) is the boolean ``attn_mask`` of each Attention node, so the graph
is right under left and right padding alike. ONNX Runtime runs all three ops on its CPU and CUDA
providers, OpenVINO reads them too (docs/gpu.md says why this route and not a fusion rewriter).

Unfused: eager attention at the requested opset (MatMul, Softmax, MatMul), the graph every
exporter of this project wrote before; chosen with ``--no-fuse-attention``, for encoders, and
for models without an SDPA path or whose graph does not come out fused (Gemma2: logit
soft-capping). The manifest says which, and why.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

# The reason recorded when the user asks for unfused attention; it also keeps a decoder off the lean graph.
NO_FUSE = "--no-fuse-attention"

FUSED_OP = "Attention"
FUSED_OPSET = 23
# Ops that mean attention was left in pieces: a softmax over scores.
UNFUSED_MARKERS = frozenset({"Softmax"})


@dataclass(frozen=True)
class AttentionPlan:
    """How to load and export: the HF attention implementation, the opset, and the reason."""

    implementation: str | None
    opset: int
    fused: bool
    reason: str | None = None

    @property
    def label(self) -> str:
        return f"fused:{FUSED_OP}" if self.fused else "unfused"


def unfused(opset: int, reason: str, family: str = "decoder") -> AttentionPlan:
    return AttentionPlan("eager" if family == "decoder" else None, opset, False, reason)


def plan(family: str, *, fuse: bool, opset: int | None, default_opset: int) -> AttentionPlan:
    """The plan for a checkpoint of ``family`` before it is loaded."""
    if family != "decoder":
        reason = "encoders keep their attention (rmserve export --optimize fuses BERT-style graphs)"
        return unfused(opset or default_opset, reason, family)
    if not fuse:
        return unfused(opset or default_opset, NO_FUSE)
    if opset is not None and opset < FUSED_OPSET:
        return unfused(opset, f"opset {opset} has no Attention op (it needs {FUSED_OPSET})")
    return AttentionPlan("sdpa", opset or FUSED_OPSET, True)


def op_counts(model_path: Path) -> Counter[str]:
    """Operator types in the main graph (weights are not read)."""
    import onnx

    proto = onnx.load(str(model_path), load_external_data=False)
    return Counter(node.op_type for node in proto.graph.node)


def check_fused(ops: Counter[str], layers: int | None) -> str | None:
    """None when a graph of ``ops`` has one fused Attention per layer and no softmax; else what is wrong."""
    fused = ops.get(FUSED_OP, 0)
    stray = sorted(op for op in UNFUSED_MARKERS if ops.get(op))
    if stray:
        pieces = ", ".join(stray)
        return f"the graph still computes attention in pieces ({pieces}) beside {fused} {FUSED_OP} ops"
    if layers is not None and fused != layers:
        return f"the graph has {fused} {FUSED_OP} ops for {layers} layers"
    if fused == 0:
        return f"the graph has no {FUSED_OP} op"
    return None


def fused_ops_summary(ops: Counter[str]) -> dict[str, int]:
    """The fused operators among a graph's ``ops``, by type (for the manifest)."""
    names = (FUSED_OP, "RMSNormalization", "RotaryEmbedding", "LayerNormalization")
    return {name: ops[name] for name in names if ops.get(name)}
