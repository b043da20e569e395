"""ArmoRM's gating head on the lean graph (models/gating_head.py is the torch definition it matches).

From the residual stream it gathers two rows per item: the last real token (``sum(mask) - 1``) and the
prompt end, the start of the gate pattern's last occurrence in ``input_ids``. The pattern is found with
one ``Equal`` per pattern token on the ids shifted left (the ids are padded with ``-1`` on the right, so
every shift keeps the sequence's length), ``And`` across them, and the largest matching position
(``-1`` where none matches; the formatter never sends such an item, and position 0 is read). After the
final norm: ``rewards = regression(last)`` (the ``components`` output, float32 ``[batch, objectives]``),
``gate = softmax(mlp(prompt_end) / temperature) * logit_scale``, ``scores = sum(gate * (rewards @
transform))``.
"""

from __future__ import annotations

from onnx import TensorProto

from rmserve.models.lean.body import DecoderInputs, linear, rms_norm
from rmserve.models.lean.builder import GraphBuilder
from rmserve.models.lean.weights import DecoderWeights, GatingHeadWeights, Linear

HEAD = "head"


def gating_outputs(
    g: GraphBuilder, hidden: str, inputs: DecoderInputs, w: DecoderWeights, head: GatingHeadWeights
) -> tuple[str, str]:
    """(scores ``[batch]``, components ``[batch, objectives]``), both float32."""
    with g.scope(HEAD):
        flat = g.one("Reshape", [hidden, g.ints("rows_shape", [-1, w.hidden])])
        starts = g.one(
            "Mul", [g.one("Range", [g.ints("zero", 0), inputs.batch, g.ints("one", 1)]), inputs.seq]
        )
        lengths = g.one("ReduceSum", [inputs.attention_mask, g.ints("axis", [1])], keepdims=0)
        last = g.one("Max", [g.one("Sub", [lengths, g.ints("one", 1)]), g.ints("zero", 0)])
        end = g.one("Max", [_prompt_end(g, inputs, head.pattern), g.ints("zero", 0)])
        norm = g.weight("final_norm", w.final_norm())
        at_last = rms_norm(g, g.one("Gather", [flat, g.one("Add", [starts, last])], axis=0), norm, w.eps)
        at_end = rms_norm(g, g.one("Gather", [flat, g.one("Add", [starts, end])], axis=0), norm, w.eps)
        rewards = _float32(g, linear(g, at_last, head.regression, "regression"))
        x = at_end
        for k, layer in enumerate(head.gate):
            x = _relu_linear(g, x, layer, k, last_layer=k == len(head.gate) - 1)
        x = g.one("Div", [_float32(g, x), g.float32("temperature", head.temperature)])
        gate = g.one("Mul", [g.one("Softmax", [x], axis=1), g.float32("logit_scale", head.logit_scale)])
        adjusted = g.one("MatMul", [rewards, g.float32_array("transform", head.transform)])
        scores = g.one("ReduceSum", [g.one("Mul", [gate, adjusted]), g.ints("axis", [1])], keepdims=0)
    # The components leave through their own node: the rewards are read inside the graph too.
    return scores, g.one("Identity", [rewards])


def _relu_linear(g: GraphBuilder, x: str, layer: Linear, k: int, *, last_layer: bool) -> str:
    y = linear(g, x, layer, f"gate{k}")
    return y if last_layer else g.one("Relu", [y])


def _float32(g: GraphBuilder, x: str) -> str:
    return x if g.float_type == TensorProto.FLOAT else g.one("Cast", [x], to=TensorProto.FLOAT)


def _prompt_end(g: GraphBuilder, inputs: DecoderInputs, pattern: tuple[int, ...]) -> str:
    """int64 ``[batch]``: where the pattern's last occurrence starts in each row, -1 where it does not."""
    n = len(pattern)
    rows = g.one("Shape", [inputs.input_ids], start=0, end=1)
    fill_shape = g.one("Concat", [rows, g.ints("tail", [n - 1])], axis=0)
    fill = g.one("Expand", [g.ints("minus_one", -1), fill_shape])
    padded = g.one("Concat", [inputs.input_ids, fill], axis=1)
    found = ""
    for k, token in enumerate(pattern):
        end = g.ints(f"end{k}", [k - (n - 1)] if k < n - 1 else [1 << 62])
        shifted = g.one("Slice", [padded, g.ints(f"start{k}", [k]), end, g.ints("axis1", [1])])
        match = g.one("Equal", [shifted, g.ints(f"token{k}", token)])
        found = match if not found else g.one("And", [found, match])
    position = g.one("Where", [found, inputs.positions, g.ints("none", -1)])
    return g.one("ReduceMax", [position, g.ints("axis", [1])], keepdims=0)
