"""ONNX Runtime: the fused step as one ONNX graph (onnx_graphs.py), in fp32 or with int8 weights, run by
its CPU kernels (MLAS).

The graphs are written from the loaded model's fused weights when the backend is built (in well under a
second for 2 x 512: no cache is kept). A step of any batch is one `InferenceSession.run`, which releases
the GIL, so shares of a large batch run on the step workers at once.

Each step also returns the logits of its new state; `logits` hands them back when it is asked about
that very state, and otherwise runs the head alone in a graph of its own (checked at build to give the
same bits as the step's head).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import numpy as np
import onnxruntime as ort

from .base import Backend, agreeing_rows, kernel_threads

PIECE_S = 0.001  # a pipelined block's piece takes about this long per layer

log = logging.getLogger("charlstm.backends")


def session(graph: bytes, threads: int) -> ort.InferenceSession:
    """An ONNX Runtime session of one graph's bytes, on the CPU."""
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # warnings about unused initialisers and the like stay out of the server log
    return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])


def write_graphs(w, num_layers: int, hidden: int, int8: bool) -> dict[str, bytes]:
    """onnx_graphs.write_all, importing onnx only now (in the child process, for `write_apart`)."""
    from . import onnx_graphs

    return onnx_graphs.write_all(w, num_layers, hidden, int8)


def write_apart(w, num_layers: int, hidden: int, int8: bool) -> dict[str, bytes]:
    """The graphs written in a child process (spawned: no copy of this process's threads), so this process
    never imports onnx: what a server does (measured: benchmarks/README.md, "Footprint")."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as child:
        return child.submit(write_graphs, w, num_layers, hidden, int8).result()


class OnnxBackend(Backend):
    """The fused step in ONNX Runtime on the CPU; `int8` for int8 weights."""

    def __init__(self, model, workers: int = 1, device: str = "cpu", int8: bool = False, threads: int | None = None,
                 apart: bool = False):
        """threads: each kernel's threads (default: `base.kernel_threads`). apart: the graphs are written in
        a child process (`write_apart`: this process never imports onnx; a server's choice)."""
        if str(device) != "cpu":
            raise ValueError(f"the onnx backends run on the CPU only, not on {device}")
        super().__init__(model, workers)
        self.name, self.weights_kind = ("onnx-int8", "int8") if int8 else ("onnx", "fp32")
        threads = max(1, threads or kernel_threads())
        graphs = (write_apart if apart else write_graphs)(self.weights, self.num_layers, self.hidden, int8)
        self._step, self._head = session(graphs.pop("step"), threads), session(graphs.pop("head"), threads)
        self._inputs = [(f"h{layer}", f"c{layer}") for layer in range(self.num_layers)]
        self._outputs = [f"{x}{layer}_new" for x in "hc" for layer in range(self.num_layers)] + ["logits"]  # the state's order
        self._run_options: ort.RunOptions | None = None  # what every run passes (`_give_back`)
        gen = np.random.default_rng(0)
        probe = (gen.random((2, self.num_layers, 256, self.hidden), dtype=np.float32) * 2 - 1)  # (2, L, 256, H)
        probe_ids = gen.integers(0, self.vocab_size, 256)  # (256,) int64
        self.min_rows, self.max_rows = agreeing_rows(lambda B: self._run(probe_ids[:B], probe[:, :, :B])[0][0, -1], self.name)
        self.head_rows = agreeing_rows(lambda B: self._head_rows(probe[0, -1, :B]), f"{self.name}'s head")
        state, fused_logits = self._run(probe_ids[:64], probe[:, :, :64])
        self._fused_head = np.array_equal(fused_logits, self._head_rows(np.ascontiguousarray(state[0, -1])))
        self._layers = [session(graphs.pop(f"layer{layer}"), threads) for layer in range(self.num_layers)]
        self._ingest_pool = ThreadPoolExecutor(1, thread_name_prefix="charlstm-ingest")
        self.pipelined = False  # the layers of a block run at once, in pieces, on two threads (measured below)
        self._layer_step_s = {1: 0.0, 8: 0.0}  # one step of one layer at 1 and at 8 rows, measured: the pieces' length
        self._block_exact = self._check_block(probe, probe_ids)
        if self._block_exact:
            self._measure_blocks(pipelines=threads == 1 and len(os.sched_getaffinity(0)) >= 2)
        self.weights = None  # the sessions hold their own copy; the fp32 ones would only take memory
        self._give_back()

    def _give_back(self) -> None:
        """One small run of each graph that shrinks its arena: what the build's probes (256 rows) and
        measurements made it grab goes back, and serving grows it again only to what serving needs."""
        self._run_options = ort.RunOptions()
        self._run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        try:
            state = self.zero_state(1)
            self._head_rows(self._run(np.zeros(1, dtype=np.int64), state)[0][0, -1])
            if self._block_exact:
                self.ingest([[0, 0]], state)  # two characters: each layer's block graph
        finally:
            self._run_options = None

    def _measure_blocks(self, pipelines: bool) -> None:
        """A layer's step time in a block at 1 and 8 rows (what `_piece` and `block_seconds` work from);
        and, where `pipelines` (two cores, one thread a kernel), whether a block of 8 rows x 128
        characters goes faster with its layers pipelined on two threads than one layer after the other,
        here (by 10% at least, or not at all: the second core must be free)."""
        def best(slices: list[list[int]]) -> float:
            state, times = self.zero_state(len(slices)), []
            for _ in range(3):
                t0 = time.perf_counter()
                self.ingest(slices, state)
                times.append(time.perf_counter() - t0)
            return min(times)

        ids = [(7 * i) % self.vocab_size for i in range(128)]
        for rows in self._layer_step_s:
            self._layer_step_s[rows] = best([ids[:32]] * rows) / (32 * self.num_layers)
        if pipelines:
            one_by_one = best([ids] * 8)
            self.pipelined = True
            self.pipelined = best([ids] * 8) < 0.9 * one_by_one

    def _layer_step(self, rows: int) -> float:
        """Seconds of one step of one layer in a block of `rows` rows: linear between the measured 1 and 8."""
        one, eight = self._layer_step_s[1], self._layer_step_s[8]
        return max(one + (eight - one) * (rows - 1) / 7, 1e-7)

    def block_seconds(self, rows: int, chars: int) -> float | None:
        if not self._block_exact:
            return None
        if self.pipelined:  # the layers overlap but for one piece at each end
            return (chars + (self.num_layers - 1) * self._piece(rows, chars)) * self._layer_step(rows)
        return chars * self.num_layers * self._layer_step(rows)

    def _piece(self, rows: int, T: int) -> int:
        """Characters a piece of a pipelined block: enough that a piece's run takes PIECE_S (a run's own
        cost, tens of microseconds, stays small beside it), a multiple of 8, at most T."""
        return min(T, max(8, -(-int(PIECE_S / self._layer_step(rows)) // 8) * 8))

    def _check_block(self, probe: np.ndarray, probe_ids: np.ndarray) -> bool:
        """Whether the block graph gives every row the bits of the step, character by character (it is
        written to, op for op; a runtime that fused the two graphs' ops differently would break it).
        If not, blocks go through the step (`Backend.ingest`), slower and still exact."""
        slices = [probe_ids[r * 7 : r * 7 + n].tolist() for r, n in enumerate((9, 3, 0, 6))]
        state = probe[:, :, : len(slices)]  # (2, L, 4, H)
        stepped, y_stepped = super().ingest(slices, state, outputs=True)
        block, y_block = self.ingest(slices, state, outputs=True, checked=True)
        exact = np.array_equal(stepped, block) and all(np.array_equal(a, b) for a, b in zip(y_stepped, y_block))
        if not exact:
            log.warning("%s: the block graph does not give the step's bits here; prompts are ingested step by step", self.name)
        return exact

    def close(self) -> None:
        super().close()
        self._ingest_pool.shutdown(wait=True)

    def describe(self) -> dict:
        return {**super().describe(), "onnxruntime": ort.__version__, "fused_head": self._fused_head,
                "block_graph": self._block_exact, "block_pipelined": self.pipelined}

    def ingest(self, slices: list[list[int]], state: np.ndarray, outputs: bool = False,
               checked: bool = False) -> tuple[np.ndarray, list[np.ndarray] | None]:
        """A block in one run of each layer's graph (a loop inside ONNX Runtime, no Python per character),
        rows padded to min_rows and cut into shares of max_rows like a step's; a block of one character a
        row is one step.
        state (2, L, R, H) -> (new state (2, L, R, H), outputs: R tensors (T_r, H) or None)."""
        T = max((len(ids) for ids in slices), default=0)
        if T == 0 or not (checked or self._block_exact):  # nothing to feed (a Scan takes at least one step)
            return super().ingest(slices, state, outputs)
        R = len(slices)
        if R > self.max_rows:
            parts = [self.ingest(slices[a : a + self.max_rows], state[:, :, a : a + self.max_rows], outputs, checked)
                     for a in range(0, R, self.max_rows)]
            return np.concatenate([p[0] for p in parts], axis=2), [y for p in parts for y in p[1]] if outputs else None
        if T == 1 and all(slices):  # one character a row: one run of the step graph beats a run a layer
            new_state = self.step(np.array([ids[0] for ids in slices], dtype=np.int64), state)  # (2, L, R, H)
            return new_state, [new_state[0, -1, r : r + 1].copy() for r in range(R)] if outputs else None
        rows = max(R, self.min_rows)
        ids, live = np.zeros((T, rows), np.int64), np.zeros((T, rows, 1), np.bool_)
        for r, row_ids in enumerate(slices):
            ids[: len(row_ids), r] = row_ids
            live[: len(row_ids), r] = True
        hc = np.zeros((2, self.num_layers, rows, self.hidden), np.float32)  # padded rows: zeros, never live
        hc[:, :, :R] = state
        h, c = list(hc[0]), list(hc[1])  # L arrays (rows, H) each
        y = self._run_layers(ids, live, h, c)  # h, c: updated in place; y (T, rows, H), the top layer's
        new_state = np.stack([*h, *c])[:, :R].reshape(2, self.num_layers, R, self.hidden)  # (2, L, R, H), a copy
        if not outputs:
            return new_state, None
        return new_state, [y[: len(row_ids), r].copy() for r, row_ids in enumerate(slices)]

    def _run_layers(self, ids: np.ndarray, live: np.ndarray, h: list[np.ndarray], c: list[np.ndarray]) -> np.ndarray:
        """Every layer over the block, h[l], c[l] (R, H) replaced by the new state. One layer after the
        other; or, where `pipelined`, in pieces of `_piece` characters, layer l on piece k while layer
        l + 1 works on piece k - 1, on two threads (each layer's weights stay in its own core's cache). Returns the top layer's y (T, R, H)."""
        T, rows = ids.shape
        step = self._piece(rows, T) if self.pipelined else T
        pieces = [(a, min(a + step, T)) for a in range(0, T, step)]
        ys: dict[tuple[int, int], np.ndarray] = {}

        def run(layer: int, k: int) -> None:
            a, b = pieces[k]
            x = ids[a:b] if layer == 0 else ys.pop((layer - 1, k))
            feeds = {"ids" if layer == 0 else "below": x, "live": live[a:b], "h_in": h[layer], "c_in": c[layer]}
            h[layer], c[layer], ys[(layer, k)] = self._layers[layer].run(["h_new", "c_new", "y"], feeds, self._run_options)

        if len(pieces) == 1:
            for layer in range(self.num_layers):
                run(layer, 0)
        else:
            for stage in range(len(pieces) + self.num_layers - 1):
                tasks = [(layer, stage - layer) for layer in range(self.num_layers) if 0 <= stage - layer < len(pieces)]
                futures = [self._ingest_pool.submit(run, *task) for task in tasks[1:]]
                run(*tasks[0])
                for future in futures:
                    future.result()
        top = self.num_layers - 1
        return np.concatenate([ys[(top, k)] for k in range(len(pieces))]) if len(pieces) > 1 else ys[(top, 0)]

    def _run(self, ids: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One run of the step graph. ids (B,) int64, state (2, L, B, H) -> (new state (2, L, B, H), logits (B, V))."""
        feeds = {"ids": ids}
        for layer, (h, c) in enumerate(self._inputs):  # a row range of a contiguous state is contiguous: no copies
            feeds[h] = np.ascontiguousarray(state[0, layer])
            feeds[c] = np.ascontiguousarray(state[1, layer])
        out = self._step.run(self._outputs, feeds, self._run_options)
        new_state = np.stack(out[:-1]).reshape(2, self.num_layers, -1, self.hidden)  # h of every layer, then c: one copy
        return new_state, out[-1]

    def _advance(self, ids: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        new_state, logits = self._run(ids, state)
        return new_state, logits if self._fused_head else None

    def _head_rows(self, top: np.ndarray) -> np.ndarray:
        return self._head.run(["logits"], {"top": np.ascontiguousarray(top)}, self._run_options)[0]
