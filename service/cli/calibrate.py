"""`charlstm calibrate`: fit a softmax temperature on a model's validation split and save the next version."""

from __future__ import annotations

import argparse
import math

from ..model import store
from .common import command_line


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="name@version to calibrate (default: the store's default)")
    p.add_argument("--text", required=True, help="the text the model was trained on: T is fitted on its validation split")
    p.add_argument("--test-text", default=None, help="a text the model never saw (e.g. an unseen play): "
                                                     "measured before and after, never fitted on")
    p.add_argument("--set-default", action="store_true", help="make the calibrated version the store's default")


def run(args) -> int:
    from ..training.calibrate import run_calibration

    path, card = run_calibration(args.model or store.default_model(args.store), args.text, args.test_text, args.store,
                                 command=command_line(), set_default=args.set_default)
    calibration, metrics = card["calibration"], card["metrics"]
    print(f"{path.parent.name}@{path.name}: {calibration['parent']} with its logits divided by "
          f"T = {calibration['temperature']:.4f} (fitted on the validation split)")
    for split in ("val", "test"):
        if f"{split}_nats_per_char" in metrics:
            before, after = calibration["before"][f"{split}_nats_per_char"], metrics[f"{split}_nats_per_char"]
            print(f"  {split}: {before:.4f} -> {after:.4f} nats/char ({before / math.log(2):.4f} -> {after / math.log(2):.4f} bits/char)")
    print(f"saved {path}" + (" (now the store's default)" if args.set_default else ""))
    return 0
