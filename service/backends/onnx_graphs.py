"""The ONNX graphs of the fused step, written with `onnx.helper` from the fused weights: the step (a
batch advanced one character, with the new state's logits), the head alone, and one loop graph a layer
for prompt blocks. Each comes out as a model file's bytes, which onnx_runtime.py turns into sessions;
a server writes them in a child process (onnx_runtime.write_apart), so it never imports onnx itself (17 MB).

The step computes the same recurrence as torch_fp32.py, node for node: a gather of layer 0's table row,
one multiply a layer over [h_below, h_self], the cell, and the head over the new top h.

int8: each layer's multiply takes 7-bit activations quantized with one fixed scale (LSTM outputs lie in
[-1, 1], the argument of torch_int8.py's pinned range), an int8 weight with a scale per output column,
and an exact int32 product (`MatMulInteger`): a row's result cannot depend on the other rows of its
batch. 7 bits keep AVX2's u8 x s8 pair sums (vpmaddubsw) from saturating int16. The head stays fp32.
ONNX Runtime's own dynamic quantization (`quantize_dynamic`) takes one activation scale for the whole
batch, which would tie a row's text to its neighbours', so it is not used.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .fused import FusedWeights, quantize_columns

OPSET = 21
ACT_LEVELS = 63.5  # 7-bit activations: x in [-1, 1] -> round(x * 63.5) + 64 in [0, 128]
ACT_ZERO = 64

class _Graph:
    """Nodes and initialisers of one graph being written."""

    def __init__(self):
        self.nodes, self.inits, self.inputs, self.outputs = [], [], [], []

    def const(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, kind: str, inputs: list[str], outputs: list[str] | str, **attrs):
        outs = [outputs] if isinstance(outputs, str) else outputs
        self.nodes.append(helper.make_node(kind, inputs, outs, **attrs))
        return outs[0] if isinstance(outputs, str) else outs

    def io(self, side: list, name: str, dtype: int, shape: list) -> str:
        side.append(helper.make_tensor_value_info(name, dtype, shape))
        return name

    def serialized(self, name: str) -> bytes:
        """The graph as an ONNX model file's bytes, checked."""
        model = helper.make_model(helper.make_graph(self.nodes, name, self.inputs, self.outputs, self.inits),
                                  opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = 10
        onnx.checker.check_model(model)
        return model.SerializeToString()


def act_scales(scales: np.ndarray) -> np.ndarray:
    """A weight's column scales (N,) times the activations' step: what an int32 product is multiplied by."""
    return (scales / np.float32(ACT_LEVELS)).astype(np.float32)


def _quantized(g: _Graph, x: str, q: str, name: str) -> str:
    """x (B, K) fp32 in [-1, 1] -> its exact int32 product (B, N) with the int8 weight named q (K, N)."""
    xq = g.op("QuantizeLinear", [x, "act_scale", "act_zero"], f"{name}_xq")  # (B, K) uint8
    return g.op("MatMulInteger", [xq, q, "act_zero"], f"{name}_acc")  # (B, N) int32, exact


def _scaled(g: _Graph, acc: str, scale: str, name: str) -> str:
    """An int32 product (B, N) -> fp32, with the weight's scale per column."""
    return g.op("Mul", [g.op("Cast", [acc], f"{name}_accf", to=TensorProto.FLOAT), scale], f"{name}_out")


def _multiply(g: _Graph, x: str, weight: np.ndarray, name: str, int8: bool) -> str:
    """x (B, K) @ weight (K, N) -> (B, N), in fp32 or over int8 weights and 7-bit activations."""
    if not int8:
        return g.op("MatMul", [x, g.const(name, weight)], f"{name}_out")
    q, scales = quantize_columns(weight)  # (K, N) int8, (N,)
    acc = _quantized(g, x, g.const(f"{name}_q", q), name)
    return _scaled(g, acc, g.const(f"{name}_scale", act_scales(scales)), name)


def _cell(g: _Graph, gates: str, c: str, h_new: str, c_new: str, name: str) -> None:
    """The LSTM cell after its multiply: gates (B, 4H) in [i, f, o, g] order and c (B, H) -> h_new, c_new (B, H)."""
    ifo_in, g_in = g.op("Split", [gates, "split_gates"], [f"ifo_in{name}", f"g_in{name}"], axis=1)
    ifo = g.op("Sigmoid", [ifo_in], f"ifo{name}")  # (B, 3H)
    i, f, o = g.op("Split", [ifo, "split_ifo"], [f"i{name}", f"f{name}", f"o{name}"], axis=1)
    cell = g.op("Add", [g.op("Mul", [f, c], f"fc{name}"), g.op("Mul", [i, g.op("Tanh", [g_in], f"g{name}")], f"ig{name}")], c_new)
    g.op("Mul", [o, g.op("Tanh", [cell], f"tc{name}")], h_new)


def _constants(g: _Graph, w: FusedWeights, hidden: int, int8: bool) -> None:
    H = hidden
    g.const("table0", w.table0)
    g.const("split_gates", np.array([3 * H, H], np.int64))
    g.const("split_ifo", np.array([H, H, H], np.int64))
    if int8:
        g.const("act_scale", np.array(1.0 / ACT_LEVELS, np.float32))
        g.const("act_zero", np.array(ACT_ZERO, np.uint8))


def step_graph(w: FusedWeights, num_layers: int, hidden: int, int8: bool) -> bytes:
    """ids (B,), h{l}, c{l} (B, H) -> h{l}_new, c{l}_new (B, H), logits (B, V)."""
    g, H = _Graph(), hidden
    _constants(g, w, H, int8)
    g.io(g.inputs, "ids", TensorProto.INT64, ["B"])
    below = None
    for layer in range(num_layers):
        h, c = (g.io(g.inputs, f"{x}{layer}", TensorProto.FLOAT, ["B", H]) for x in "hc")
        if layer == 0:
            row = g.op("Gather", ["table0", "ids"], "row0", axis=0)  # (B, 4H)
            gates = g.op("Add", [_multiply(g, h, w.w_hh0, "w_hh0", int8), row], "gates0")
        else:
            inp = g.op("Concat", [below, h], f"cat{layer}", axis=1)  # (B, 2H): [h_below, h_self]
            bias = g.const(f"b_cat{layer}", w.b_cat[layer - 1])
            gates = g.op("Add", [_multiply(g, inp, w.w_cat[layer - 1], f"w_cat{layer}", int8), bias], f"gates{layer}")
        _cell(g, gates, c, f"h{layer}_new", f"c{layer}_new", str(layer))
        below = f"h{layer}_new"
        g.io(g.outputs, f"h{layer}_new", TensorProto.FLOAT, ["B", H])
        g.io(g.outputs, f"c{layer}_new", TensorProto.FLOAT, ["B", H])
    g.op("Gemm", [below, g.const("w_head", w.w_head), g.const("b_head", w.b_head)], "logits")
    g.io(g.outputs, "logits", TensorProto.FLOAT, ["B", w.w_head.shape[1]])
    return g.serialized("charlstm_step")


def layer_graph(w: FusedWeights, layer: int, hidden: int, int8: bool) -> bytes:
    """One layer over a block of prompt slices: its input, live (T, R, 1) bool (row r has a character at
    step t), h, c (R, H) -> h_new, c_new (R, H) and y (T, R, H), the layer's h after each step. The
    input is ids (T, R) int64 for layer 0, the layer below's y for the others.

    A `Scan` over the T steps whose body is the step graph's layer, op for op: a row's state is the one
    the step gives it, character after character. A row past its slice's end keeps its state (`Where`).
    With int8 weights, the input projection leaves the loop: the layer below's whole output, (T x R, H),
    is multiplied by the input half of the weight in one product, and each step adds the recurrent
    half's product to it. Both are exact int32 sums, so their sum is the step's product over
    [h_below, h_self] to the bit; an fp32 product split in two would round otherwise, so the fp32 body
    multiplies the concatenation like the step."""
    g, H = _Graph(), hidden
    _constants(g, w, H, int8)
    if layer == 0:
        xs = g.op("Gather", ["table0", g.io(g.inputs, "ids", TensorProto.INT64, ["T", "R"])], "rows0", axis=0)  # (T, R, 4H)
    else:
        xs = g.io(g.inputs, "below", TensorProto.FLOAT, ["T", "R", H])
    g.io(g.inputs, "live", TensorProto.BOOL, ["T", "R", 1])
    state = [g.io(g.inputs, v, TensorProto.FLOAT, ["R", H]) for v in ("h_in", "c_in")]
    body = _Graph()
    h, c = (body.io(body.inputs, x, TensorProto.FLOAT, ["R", H]) for x in "hc")
    x = body.io(body.inputs, "x", TensorProto.INT32 if int8 and layer else TensorProto.FLOAT,
                ["R", 4 * H if int8 or not layer else H])
    live = body.io(body.inputs, "live_t", TensorProto.BOOL, ["R", 1])
    if layer == 0:
        if int8:
            q, scales = quantize_columns(w.w_hh0)
            acc = _quantized(body, h, g.const("w_hh0_q", q), "w_hh0")
            product = _scaled(body, acc, g.const("w_hh0_scale", act_scales(scales)), "w_hh0")
        else:
            product = body.op("MatMul", [h, g.const("w_hh0", w.w_hh0)], "w_hh0_out")
        gates = body.op("Add", [product, x], "gates")
    else:
        bias = g.const("b_cat", w.b_cat[layer - 1])
        if int8:
            q, scales = quantize_columns(w.w_cat[layer - 1])  # (2H, 4H): rows [h_below, h_self]
            xs = _quantized(g, xs, g.const("w_in_q", q[:H]), "w_in")  # (T, R, 4H) int32
            acc = body.op("Add", [x, _quantized(body, h, g.const("w_rec_q", q[H:]), "w_rec")], "acc")
            product = _scaled(body, acc, g.const("w_cat_scale", act_scales(scales)), "w_cat")
        else:
            inp = body.op("Concat", [x, h], "cat", axis=1)  # (R, 2H): [h_below, h_self]
            product = body.op("MatMul", [inp, g.const("w_cat", w.w_cat[layer - 1])], "w_cat_out")
        gates = body.op("Add", [product, bias], "gates")
    _cell(body, gates, c, "h_step", "c_step", "")
    body.op("Where", [live, "h_step", h], "h_next")
    body.op("Where", [live, "c_step", c], "c_next")
    body.op("Identity", ["h_next"], "y_t")
    for name, shape in (("h_next", ["R", H]), ("c_next", ["R", H]), ("y_t", ["R", H])):
        body.io(body.outputs, name, TensorProto.FLOAT, shape)
    graph = helper.make_graph(body.nodes, f"layer{layer}_step", body.inputs, body.outputs)
    g.op("Scan", [*state, xs, "live"], ["h_new", "c_new", "y"], body=graph, num_scan_inputs=2)
    for name, shape in (("h_new", ["R", H]), ("c_new", ["R", H]), ("y", ["T", "R", H])):
        g.io(g.outputs, name, TensorProto.FLOAT, shape)
    return g.serialized(f"charlstm_layer{layer}")


def head_graph(w: FusedWeights) -> bytes:
    """top (B, H) -> logits (B, V): the step graph's head alone."""
    g = _Graph()
    g.io(g.inputs, "top", TensorProto.FLOAT, ["B", w.w_head.shape[0]])
    g.op("Gemm", ["top", g.const("w_head", w.w_head), g.const("b_head", w.b_head)], "logits")
    g.io(g.outputs, "logits", TensorProto.FLOAT, ["B", w.w_head.shape[1]])
    return g.serialized("charlstm_head")


def write_all(w: FusedWeights, num_layers: int, hidden: int, int8: bool) -> dict[str, bytes]:
    """Every graph the backend runs: "step", "head" and "layer{l}" for each layer."""
    return {"step": step_graph(w, num_layers, hidden, int8), "head": head_graph(w),
            **{f"layer{layer}": layer_graph(w, layer, hidden, int8) for layer in range(num_layers)}}
