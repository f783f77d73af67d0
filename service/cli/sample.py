"""`charlstm sample`: text to stdout through the serving engine (service/cli/generation.py runs it)."""

from __future__ import annotations

import argparse

from ..model import store
from .common import add_unknown_chars, check_replacement, report_unknown


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..backends.selector import CPU_BACKENDS
    from .generation import DEFAULT_BACKEND
    from ..sampling import control_type, controls_for

    p.add_argument("--model", default=None, help="name, name@version or a model folder (default: the store's default)")
    p.add_argument("--prompt", default="", help="text that primes the state (empty: the server's start character)")
    p.add_argument("--length", type=int, default=500, help="characters to generate")
    for f in controls_for("native"):  # the server's controls, defaults and words: one statement, in service/sampling.py
        p.add_argument("--" + f.name.replace("_", "-"), type=control_type(f), default=f.default,
                       help=f"{f.metadata['doc']} (default {f.default})")
    p.add_argument("--stop", action="append", default=[], help="end at this string (not printed); repeatable")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--regex", default=None, help="the generated text must match this regular expression (as structured_outputs.regex)")
    p.add_argument("--choice", action="append", default=[], help="the generated text is one of these; repeatable (as structured_outputs.choice)")
    p.add_argument("--backend", default=None, choices=CPU_BACKENDS,
                   help=f"the engine's compute backend (default: an export's own with --session-in, else {DEFAULT_BACKEND}; "
                        "a server on another backend draws other bits)")
    add_unknown_chars(p)
    from . import session_file

    session_file.add_arguments(p)  # --session-in / --session-out: continue an exported session offline


def run(args) -> int:
    from . import session_file
    from .generation import sample
    from ..sampling import MAX_SEED, bound_error, controls_for

    check_replacement(args)
    if args.length < 0:
        raise ValueError(f"--length must be at least 0, got {args.length}")
    for f in controls_for("native"):  # the bounds the server's protocols enforce
        if (wrong := bound_error(f.name, getattr(args, f.name))) is not None:
            raise ValueError("--" + wrong.replace("_", "-"))
    if args.seed is not None and not 0 <= args.seed <= MAX_SEED:
        raise ValueError(f"--seed must be in [0, {MAX_SEED}], got {args.seed}")
    if session_file.wants_session(args):
        return session_file.sample_session(args)
    loaded = store.load(args.model or store.default_model(args.store), args.store)
    ids, unknown = loaded.vocab.encode_with_policy(args.prompt, args.unknown_chars, args.replacement)
    report_unknown(args, unknown)
    sample(loaded, args, ids)
    return 0
