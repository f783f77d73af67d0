"""`charlstm models`: the store's models with their figures; set the default."""

from __future__ import annotations

import argparse

from ..model import store


def _figure(metrics: dict, key: str, width: int) -> str:
    """A card's figure to four places, or a dash where the card has none (a model trained without a test text)."""
    return f"{metrics[key]:>{width}.4f}" if key in metrics else f"{'-':>{width}}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set-default", metavar="NAME[@VERSION]", default=None,
                   help="make this model the store's default (what a bare --model and the service use)")


def run(args) -> int:
    if args.set_default:
        store.set_default(args.set_default, args.store)
        print(f"default model of {store.store_root(args.store)}: {args.set_default}")
    rows = store.list_models(args.store)
    if not rows:
        print(f"no models in {store.store_root(args.store)}")
        return 0
    print(f"  {'model':<28} {'params':>10} {'val nats':>9} {'val bpc':>8} {'test bpc':>8} {'steps':>7}  created")
    for name, version, card in rows:
        mark = "*" if store.is_default(name, version, args.store) else " "
        if card is None:
            print(f"{mark} {name + '@' + version:<28} (unreadable card)")
            continue
        m, t = card.get("metrics", {}), card.get("training", {})
        print(f"{mark} {name + '@' + version:<28} {card.get('num_parameters', 0):>10,} "
              f"{_figure(m, 'val_nats_per_char', 9)} {_figure(m, 'val_bits_per_char', 8)} "
              f"{_figure(m, 'test_bits_per_char', 8)} {t.get('steps', 0):>7}  {card.get('created_at', '')}")
    print(f"(* marks the store's default: {store.default_model(args.store)})")
    return 0
