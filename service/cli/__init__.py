"""The `charlstm` command: corpus, train, calibrate, evaluate, sample, models, serve; one module a command,
each with `add_arguments(parser)` and `run(args)`.

Only the chosen sub-command's module is imported and its arguments built, so `train`, `calibrate`,
`evaluate`, `sample` and `models` run where only the training dependencies are installed: nothing here
imports the serving stack (pydantic, FastAPI, uvicorn) unless the command is `serve`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ..model import store
from .common import add_store

# name -> (help, the module that adds its arguments and runs it)
COMMANDS = {
    "corpus": ("build a training corpus in tiny-shakespeare's layout from Gutenberg play texts, holding out the test plays", "corpus"),
    "train": ("train a model on a UTF-8 text file and save it into the model store", "train"),
    "calibrate": ("fit a softmax temperature on a model's validation split, fold it in, save the next version", "calibrate"),
    "evaluate": ("cross-entropy of a text file under a model, in nats and bits per char", "evaluate"),
    "sample": ("generate text to stdout", "sample"),
    "models": ("list the models in the store with their figures; set the default", "models"),
    "serve": ("serve a model over HTTP (settings also come from CHARLSTM_* variables)", "serve"),
}


def command(name: str):
    """The module of a sub-command."""
    return importlib.import_module(f".{COMMANDS[name][1]}", __name__)


def _chosen_command(argv: list[str]) -> str | None:
    """The sub-command named in argv: the first word that is not the global --store or its value."""
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--store":
            skip = True
        elif not arg.startswith("-"):
            return arg if arg in COMMANDS else None
    return None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser for `argv`: every sub-command is listed, only the chosen one gets its arguments built."""
    argv = sys.argv[1:] if argv is None else argv
    chosen = _chosen_command(argv)
    parser = argparse.ArgumentParser(prog="charlstm", description=__doc__.split("\n")[0])
    add_store(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_store(p)
        if name == chosen:
            command(name).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    try:
        return command(args.command).run(args)
    except store.ModelLoadError as e:
        print(f"charlstm: {e}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:
        print(f"charlstm: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        if e.name != "torch":
            raise
        print(f"charlstm {args.command}: this command needs torch, which the serving install leaves out: "
              "pip install 'charlstm[torch]' (README: Which install)", file=sys.stderr)
        return 2

