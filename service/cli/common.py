"""What several commands share: the store option, the unknown-character policy, the command line a card records."""

from __future__ import annotations

import argparse
import os
import shlex
import sys


UNKNOWN_POLICIES = ("error", "skip", "replace")


def add_store(p: argparse.ArgumentParser, top: bool = False) -> None:
    """--store before or after the sub-command; the sub-command's copy leaves the global one alone when absent."""
    p.add_argument("--store", default=os.environ.get("CHARLSTM_MODEL_STORE") if top else argparse.SUPPRESS,
                   help="model store root (default: $CHARLSTM_MODEL_STORE, else the repository's model_store/)")


def add_unknown_chars(p: argparse.ArgumentParser) -> None:
    p.add_argument("--unknown-chars", choices=UNKNOWN_POLICIES, default="error",
                   help="characters outside the model's vocabulary: refuse the text (default), skip them, or replace them")
    p.add_argument("--replacement", default=None, help="with --unknown-chars replace: the character put in their place")


def report_unknown(args, count: int) -> None:
    if args.unknown_chars != "error":
        done = "skipped" if args.unknown_chars == "skip" else f"replaced by {args.replacement!r}"
        print(f"charlstm: {count:,} character(s) outside the vocabulary {done}", file=sys.stderr, flush=True)


def check_replacement(args) -> None:
    if args.unknown_chars == "replace" and (args.replacement is None or len(args.replacement) != 1):
        raise ValueError(f"--unknown-chars replace needs --replacement, one character; got {args.replacement!r}")


def command_line() -> str:
    return shlex.join(["charlstm", *sys.argv[1:]])
