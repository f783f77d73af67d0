"""A run's checkpoint: everything a resumed run needs (weights, optimizer moments, averaged weights, the
carried LSTM state, the random generators, the step and the history) as safetensors + JSON, no pickle,
so a resumed run continues bit for bit; and the best weights so far, kept apart."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..model import store
from .averaging import WeightAverage

CKPT_TENSORS = "checkpoint.safetensors"
CKPT_META = "checkpoint.json"
BEST_WEIGHTS = "best.safetensors"


@dataclass
class RunState:
    """What a checkpoint holds besides tensors."""

    step: int = 0
    best_val: float = float("inf")
    best_step: int = -1
    evals_since_best: int = 0
    wall_time_s: float = 0.0
    chars_seen: int = 0
    history: list[dict] = field(default_factory=list)  # one row per evaluation
    curve: list[list[float]] = field(default_factory=list)  # [step, train nats] every few steps
    commands: list[str] = field(default_factory=list)
    done: bool = False  # training ended (all steps or early stop)
    best_score: float = float("inf")  # the selection rule's figure at best_step
    exported: str | None = None  # name@version once the model is in the store


class Checkpoint:
    """The checkpoint in a run folder."""

    def __init__(self, out: str | Path):
        self.out = Path(out)

    def exists(self) -> bool:
        return (self.out / CKPT_META).is_file()

    def config(self) -> dict | None:
        """The run's settings as saved, or None without a checkpoint."""
        return json.loads((self.out / CKPT_META).read_text())["config"] if self.exists() else None

    def save(self, config: dict, run: RunState, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             average: WeightAverage | None, carried: tuple[torch.Tensor, torch.Tensor] | None, device: torch.device,
             tied: bool) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        if tied:
            tensors.pop("model.head.weight")
        opt = optimizer.state_dict()
        for idx, st in opt["state"].items():
            for key, val in st.items():
                tensors[f"optim.{idx}.{key}"] = val.detach().cpu().contiguous().reshape(val.shape)
        if average is not None:
            tensors.update(average.state())
        if carried is not None:
            tensors["carried.h"], tensors["carried.c"] = (s.detach().cpu().contiguous() for s in carried)
        tensors["rng.cpu"] = torch.get_rng_state()
        if device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
        meta = {"config": config, "run": asdict(run),
                "param_groups": [{k: v for k, v in g.items()} for g in opt["param_groups"]]}
        tmp = self.out / f".{CKPT_TENSORS}.tmp"
        save_file(tensors, str(tmp))
        tmp.replace(self.out / CKPT_TENSORS)
        store.write_json_atomic(self.out / CKPT_META, meta)

    def save_run(self, run: RunState) -> None:
        """Rewrite only the run record (the tensors stay those of the last step)."""
        meta = json.loads((self.out / CKPT_META).read_text())
        meta["run"] = asdict(run)
        store.write_json_atomic(self.out / CKPT_META, meta)

    def load(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, average: WeightAverage | None,
             device: torch.device, tied: bool) -> tuple[RunState, tuple[torch.Tensor, torch.Tensor] | None]:
        """Restore the model, the optimizer, the average and the random generators; return the run record and
        the carried state."""
        meta = json.loads((self.out / CKPT_META).read_text())
        tensors = load_file(str(self.out / CKPT_TENSORS))
        model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}, strict=not tied)
        state: dict[int, dict] = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, idx, key = k.split(".", 2)
                state.setdefault(int(idx), {})[key] = v.to(device) if key != "step" else v
        groups = meta["param_groups"]
        for g in groups:
            g["betas"] = tuple(g["betas"])
        optimizer.load_state_dict({"state": state, "param_groups": groups})
        if average is not None:
            average.load(tensors, device, str(self.out / CKPT_TENSORS))
        carried = None
        if "carried.h" in tensors:
            carried = (tensors["carried.h"].to(device), tensors["carried.c"].to(device))
        torch.set_rng_state(tensors["rng.cpu"])
        if "rng.cuda" in tensors and device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], device)
        run = dict(meta["run"])
        run.setdefault("best_score", run.get("best_val", float("inf")))  # a checkpoint from before the selection rule
        return RunState(**run), carried

    def save_best(self, weights: dict[str, torch.Tensor]) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.out / f".{BEST_WEIGHTS}.tmp"
        save_file(weights, str(tmp))
        tmp.replace(self.out / BEST_WEIGHTS)

    def best(self, device: torch.device) -> dict[str, torch.Tensor] | None:
        path = self.out / BEST_WEIGHTS
        return load_file(str(path), device=str(device)) if path.is_file() else None
