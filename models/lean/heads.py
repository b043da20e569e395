"""Heads on the lean decoder body: what a row of the residual stream becomes.

``last_token_score`` is the outcome reward: each row's last real token (``sum(mask) - 1`` under right
padding) is gathered first, so only ``batch`` rows go through the final norm and the score head.
A head is a function of the body's output and its inputs; another head (a value at each step
token, for process rewards) reads the same ``DecoderInputs`` and the same body.
"""

from __future__ import annotations

from onnx import TensorProto

from rmserve.models.lean.body import DecoderInputs, linear, rms_norm
from rmserve.models.lean.builder import GraphBuilder
from rmserve.models.lean.weights import DecoderWeights, Linear

HEAD = "head"


def last_token_score(
    g: GraphBuilder, hidden: str, inputs: DecoderInputs, w: DecoderWeights, score: Linear
) -> str:
    """float32 ``[batch]``: the score head on the final norm of each row's last real token."""
    with g.scope(HEAD):
        lengths = g.one("ReduceSum", [inputs.attention_mask, g.ints("axis", [1])], keepdims=0)
        # An all-padding row (never served) pools position 0, as models/heads.py does.
        last = g.one("Max", [g.one("Sub", [lengths, g.ints("one", 1)]), g.ints("zero", 0)])
        starts = g.one(
            "Mul", [g.one("Range", [g.ints("zero", 0), inputs.batch, g.ints("one", 1)]), inputs.seq]
        )
        flat = g.one("Reshape", [hidden, g.ints("rows_shape", [-1, w.hidden])])
        pooled = g.one("Gather", [flat, g.one("Add", [starts, last])], axis=0)
        normed = rms_norm(g, pooled, g.weight("final_norm", w.final_norm), w.eps)
        scores = g.one("Reshape", [linear(g, normed, score, "score"), g.ints("flat", [-1])])
        if g.float_type != TensorProto.FLOAT:
            scores = g.one("Cast", [scores], to=TensorProto.FLOAT)
    return scores
