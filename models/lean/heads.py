"""Heads on the lean decoder body: what a row of the residual stream becomes.

``last_token_score`` is the outcome reward: each row's last real token (``sum(mask) - 1`` under right
padding) is gathered first, so only ``batch`` rows go through the final norm and the score head.
``step_values`` is a process model's: the final norm and the step head at every position, then the
head's rule, ``[batch, seq]`` (the server reads the step tokens' positions; right padding puts them
where the item has them). A token's value depends only on the tokens before it (causal attention), so
a padding position's value, never read, changes no real one. The rule runs in float32 after the
label logits are cast, as ``StepHead`` computes it, and in the same ops: positive_prob
sigmoid(l+ - l-), prob_diff p(+) - p(-) = sigmoid(l+ - l-) - sigmoid(l- - l+), sigmoid, raw.
"""

from __future__ import annotations

from onnx import TensorProto

from rmserve.models.lean.body import DecoderInputs, linear, rms_norm
from rmserve.models.lean.builder import GraphBuilder
from rmserve.models.lean.gating import gating_outputs
from rmserve.models.lean.weights import DecoderWeights, GatingHeadWeights, ScoreHeadWeights, StepHeadWeights

HEAD = "head"


def head_output(
    g: GraphBuilder,
    hidden: str,
    inputs: DecoderInputs,
    w: DecoderWeights,
    head: ScoreHeadWeights | GatingHeadWeights | StepHeadWeights,
) -> list[tuple[str, str, list[str]]]:
    """The graph's outputs (value, name, dimensions), ``scores`` first: ``[batch]`` scores, or ``[batch,
    sequence]`` step values; a gating head adds its ``components`` ``[batch, objectives]``."""
    if isinstance(head, StepHeadWeights):
        return [(step_values(g, hidden, w, head), "scores", ["batch", "sequence"])]
    if isinstance(head, GatingHeadWeights):
        scores, rewards = gating_outputs(g, hidden, inputs, w, head)
        return [(scores, "scores", ["batch"]), (rewards, "components", ["batch", "objectives"])]
    return [(last_token_score(g, hidden, inputs, w, head), "scores", ["batch"])]


def last_token_score(
    g: GraphBuilder, hidden: str, inputs: DecoderInputs, w: DecoderWeights, score: ScoreHeadWeights
) -> str:
    """float32 ``[batch]``: the score head on the final norm of each row's last real token (then, for a
    normalised head, ``(r - mean) / std`` in float32)."""
    with g.scope(HEAD):
        lengths = g.one("ReduceSum", [inputs.attention_mask, g.ints("axis", [1])], keepdims=0)
        # An all-padding row (never served) pools position 0, as models/heads.py does.
        last = g.one("Max", [g.one("Sub", [lengths, g.ints("one", 1)]), g.ints("zero", 0)])
        starts = g.one(
            "Mul", [g.one("Range", [g.ints("zero", 0), inputs.batch, g.ints("one", 1)]), inputs.seq]
        )
        flat = g.one("Reshape", [hidden, g.ints("rows_shape", [-1, w.hidden])])
        pooled = g.one("Gather", [flat, g.one("Add", [starts, last])], axis=0)
        normed = rms_norm(g, pooled, g.weight("final_norm", w.final_norm()), w.eps)
        x = normed
        for k, layer in enumerate(score.layers):
            if k:
                x = g.one("Relu", [x])
            x = linear(g, x, layer, "score" if k == 0 else f"score{k}")
        scores = g.one("Reshape", [x, g.ints("flat", [-1])])
        if g.float_type != TensorProto.FLOAT:
            scores = g.one("Cast", [scores], to=TensorProto.FLOAT)
        if score.normalize is not None:
            mean, std = score.normalize
            scores = g.one("Sub", [scores, g.float32("mean", mean)])
            scores = g.one("Div", [scores, g.float32("std", std)])
    return scores


def step_values(g: GraphBuilder, hidden: str, w: DecoderWeights, head: StepHeadWeights) -> str:
    """float32 ``[batch, seq]``: the step head's rule on its label logits at every position."""
    with g.scope(HEAD):
        x = rms_norm(g, hidden, g.weight("final_norm", w.final_norm()), w.eps)
        for k, layer in enumerate(head.layers):
            if k:
                x = g.one("Relu", [x])
            x = linear(g, x, layer, f"labels{k}")
        if g.float_type != TensorProto.FLOAT:
            x = g.one("Cast", [x], to=TensorProto.FLOAT)
        n = int(head.layers[-1].weight.shape[1])
        # Each label's logit as [batch, seq, 1]; the value is reshaped to [batch, seq] at the end.
        labels = g.op("Split", [x, g.ints("label_sizes", [1] * n)], outputs=n, axis=2) if n > 1 else [x]
        positive = labels[head.positive]
        if head.rule == "raw":
            value = positive
        elif head.rule == "sigmoid":
            value = g.one("Sigmoid", [positive])
        else:
            assert head.negative is not None, "StepHead refuses a two-label rule on one label"
            negative = labels[head.negative]
            value = g.one("Sigmoid", [g.one("Sub", [positive, negative])])
            if head.rule == "prob_diff":
                p_negative = g.one("Sigmoid", [g.one("Sub", [negative, positive])])
                value = g.one("Sub", [value, p_negative])
        return g.one("Reshape", [value, g.ints("steps_shape", [0, 0])])
