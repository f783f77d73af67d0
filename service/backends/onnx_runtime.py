"""ONNX Runtime: the fused step as one ONNX graph, in fp32 or with int8 weights, run by its CPU kernels (MLAS).

The graph is written from the loaded model's fused weights when the backend is built (with
`onnx.helper`, in well under a second for 2 x 512: no cache is kept), so it computes the same recurrence as
torch_fp32.py, node for node: a gather of layer 0's table row, one multiply a layer over [h_below,
h_self], the cell, and the head over the new top h. A step of any batch is one `InferenceSession.run`,
which releases the GIL, so shares of a large batch run on the step workers at once.

int8: each layer's multiply takes 7-bit activations quantized with one fixed scale (LSTM outputs lie in
[-1, 1], the argument of torch_int8.py's pinned range), an int8 weight with a scale per output column,
and an exact int32 product (`MatMulInteger`): a row's result cannot depend on the other rows of its
batch. 7 bits keep AVX2's u8 x s8 pair sums (vpmaddubsw) from saturating int16. The head stays fp32.
ONNX Runtime's own dynamic quantization (`quantize_dynamic`) takes one activation scale for the whole
batch, which would tie a row's text to its neighbours', so it is not used.

Each step also returns the logits of its new state; `logits` hands them back when it is asked about
that very state, and otherwise runs the head alone in a graph of its own (checked at build to give the
same bits as the step's head).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from ..model import CharLSTM
from .base import Backend, agreeing_rows
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

    def session(self, name: str, threads: int) -> ort.InferenceSession:
        model = helper.make_model(helper.make_graph(self.nodes, name, self.inputs, self.outputs, self.inits),
                                  opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = 10
        onnx.checker.check_model(model)
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # warnings about unused initialisers and the like stay out of the server log
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _multiply(g: _Graph, x: str, weight: torch.Tensor, name: str, int8: bool) -> str:
    """x (B, K) @ weight (K, N) -> (B, N), in fp32 or over int8 weights and 7-bit activations."""
    if not int8:
        return g.op("MatMul", [x, g.const(name, weight.numpy())], f"{name}_out")
    q, scales = quantize_columns(weight)  # (K, N) int8, (N,)
    xq = g.op("QuantizeLinear", [x, "act_scale", "act_zero"], f"{name}_xq")  # (B, K) uint8
    acc = g.op("MatMulInteger", [xq, g.const(f"{name}_q", q.numpy()), "act_zero"], f"{name}_acc")  # (B, N) int32, exact
    accf = g.op("Cast", [acc], f"{name}_accf", to=TensorProto.FLOAT)
    return g.op("Mul", [accf, g.const(f"{name}_scale", (scales / ACT_LEVELS).numpy())], f"{name}_out")


def step_graph(w: FusedWeights, num_layers: int, hidden: int, int8: bool, threads: int = 1) -> ort.InferenceSession:
    """ids (B,), h{l}, c{l} (B, H) -> h{l}_new, c{l}_new (B, H), logits (B, V)."""
    g, H = _Graph(), hidden
    g.const("table0", w.table0.numpy())
    g.const("split_gates", np.array([3 * H, H], np.int64))
    g.const("split_ifo", np.array([H, H, H], np.int64))
    if int8:
        g.const("act_scale", np.array(1.0 / ACT_LEVELS, np.float32))
        g.const("act_zero", np.array(ACT_ZERO, np.uint8))
    g.io(g.inputs, "ids", TensorProto.INT64, ["B"])
    below = None
    for layer in range(num_layers):
        h, c = (g.io(g.inputs, f"{x}{layer}", TensorProto.FLOAT, ["B", H]) for x in "hc")
        if layer == 0:
            row = g.op("Gather", ["table0", "ids"], "row0", axis=0)  # (B, 4H)
            gates = g.op("Add", [_multiply(g, h, w.w_hh0, "w_hh0", int8), row], "gates0")
        else:
            inp = g.op("Concat", [below, h], f"cat{layer}", axis=1)  # (B, 2H): [h_below, h_self]
            bias = g.const(f"b_cat{layer}", w.b_cat[layer - 1].numpy())
            gates = g.op("Add", [_multiply(g, inp, w.w_cat[layer - 1], f"w_cat{layer}", int8), bias], f"gates{layer}")
        ifo_in, g_in = g.op("Split", [gates, "split_gates"], [f"ifo_in{layer}", f"g_in{layer}"], axis=1)
        ifo = g.op("Sigmoid", [ifo_in], f"ifo{layer}")  # (B, 3H)
        i, f, o = g.op("Split", [ifo, "split_ifo"], [f"i{layer}", f"f{layer}", f"o{layer}"], axis=1)
        cell = g.op("Add", [g.op("Mul", [f, c], f"fc{layer}"), g.op("Mul", [i, g.op("Tanh", [g_in], f"g{layer}")], f"ig{layer}")],
                    f"c{layer}_new")
        below = g.op("Mul", [o, g.op("Tanh", [cell], f"tc{layer}")], f"h{layer}_new")
        g.io(g.outputs, f"h{layer}_new", TensorProto.FLOAT, ["B", H])
        g.io(g.outputs, f"c{layer}_new", TensorProto.FLOAT, ["B", H])
    g.op("Gemm", [below, g.const("w_head", w.w_head.numpy()), g.const("b_head", w.b_head.numpy())], "logits")
    g.io(g.outputs, "logits", TensorProto.FLOAT, ["B", w.w_head.shape[1]])
    return g.session("charlstm_step", threads)


def head_graph(w: FusedWeights, threads: int = 1) -> ort.InferenceSession:
    """top (B, H) -> logits (B, V): the step graph's head alone."""
    g = _Graph()
    g.io(g.inputs, "top", TensorProto.FLOAT, ["B", w.w_head.shape[0]])
    g.op("Gemm", ["top", g.const("w_head", w.w_head.numpy()), g.const("b_head", w.b_head.numpy())], "logits")
    g.io(g.outputs, "logits", TensorProto.FLOAT, ["B", w.w_head.shape[1]])
    return g.session("charlstm_head", threads)


class OnnxBackend(Backend):
    """The fused step in ONNX Runtime on the CPU; `int8` for int8 weights."""

    def __init__(self, model: CharLSTM, workers: int = 1, device: str | torch.device = "cpu", int8: bool = False):
        if torch.device(device).type != "cpu":
            raise ValueError(f"the onnx backends run on the CPU only, not on {torch.device(device).type}")
        super().__init__(model, workers, device)
        self.name, self.weights_kind = ("onnx-int8", "int8") if int8 else ("onnx", "fp32")
        threads = max(1, torch.get_num_threads())
        self._step = step_graph(self.weights, self.num_layers, self.hidden, int8, threads)
        self._head = head_graph(self.weights, threads)
        self._inputs = [(f"h{layer}", f"c{layer}") for layer in range(self.num_layers)]
        self._outputs = [f"{x}{layer}_new" for x in "hc" for layer in range(self.num_layers)] + ["logits"]  # the state's order
        gen = torch.Generator().manual_seed(0)
        probe = torch.rand(2, self.num_layers, 256, self.hidden, generator=gen) * 2 - 1  # (2, L, 256, H)
        probe_ids = torch.randint(0, self.vocab_size, (256,), generator=gen)
        self.min_rows, self.max_rows = agreeing_rows(lambda B: self._run(probe_ids[:B], probe[:, :, :B])[0][0, -1], self.name)
        self.head_rows = agreeing_rows(lambda B: self._head_rows(probe[0, -1, :B]), f"{self.name}'s head")
        state, fused_logits = self._run(probe_ids[:64], probe[:, :, :64])
        self._fused_head = torch.equal(fused_logits, self._head_rows(state[0, -1].contiguous()))

    def describe(self) -> dict:
        return {**super().describe(), "onnxruntime": ort.__version__, "fused_head": self._fused_head}

    def _run(self, ids: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One run of the step graph. state (2, L, B, H) -> (new state (2, L, B, H), logits (B, V)).
        The inputs are numpy views of the state (indexing numpy costs a fraction of indexing torch)."""
        s = state.numpy()  # (2, L, B, H)
        feeds = {"ids": ids.numpy()}
        for layer, (h, c) in enumerate(self._inputs):  # a row range of a contiguous state is contiguous: no copies
            feeds[h] = np.ascontiguousarray(s[0, layer])
            feeds[c] = np.ascontiguousarray(s[1, layer])
        out = self._step.run(self._outputs, feeds)
        new_state = torch.from_numpy(np.stack(out[:-1])).view(2, self.num_layers, -1, self.hidden)  # h of every layer, then c: one copy
        return new_state, torch.from_numpy(out[-1])

    def _advance(self, ids: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        new_state, logits = self._run(ids, state)
        return new_state, logits if self._fused_head else None

    def _head_rows(self, top: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self._head.run(["logits"], {"top": top.contiguous().numpy()})[0])
