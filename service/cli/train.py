"""`charlstm train`: train a model on a text and save it into the model store."""

from __future__ import annotations

import argparse
import dataclasses

from .common import command_line


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..training.train import TrainConfig

    p.add_argument("--resume", action="store_true", help="continue the checkpoint in --out exactly where it stopped "
                                                         "(or export a finished run whose export failed)")
    p.add_argument("--finish", action="store_true", help="with --resume: end the run at its current step and "
                                                         "export its best checkpoint")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "store":  # --store is shared by every command
            continue
        flag, doc = "--" + f.name.replace("_", "-"), f.metadata["doc"]
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=doc)
        elif f.default is dataclasses.MISSING:
            p.add_argument(flag, required=True, help=doc)
        elif f.name == "steps":  # None tells a resume that no new length was asked for
            p.add_argument(flag, type=int, default=None, help=f"{doc} (default: {f.default})")
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            p.add_argument(flag, type=kind, default=f.default, help=f"{doc} (default: {f.default})")

def run(args) -> int:
    from ..training.train import TrainConfig, run_training

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if f.name != "store"}
    values["store"] = args.store
    steps = values.pop("steps")
    if steps is not None:
        values["steps"] = steps
    if args.finish and not args.resume:
        raise ValueError("--finish ends a stopped run: use it with --resume")
    run_training(TrainConfig(**values), resume=args.resume, command=command_line(), finish_now=args.finish,
                 new_steps=steps if args.resume else None)
    return 0
