"""The `charlstm` command: train, evaluate, sample, models, serve."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys

from . import session_file, store


def _add_train(sub) -> None:
    from .train import TrainConfig

    p = sub.add_parser("train", help="train a model on a UTF-8 text file and save it into the model store")
    p.add_argument("--resume", action="store_true", help="continue the checkpoint in --out exactly where it stopped")
    defaults = TrainConfig(text="")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "store":  # the global --store names the store for every command
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif f.name == "text":
            p.add_argument(flag, required=True, help="training text (UTF-8), e.g. tinyshakespeare.txt")
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            p.add_argument(flag, type=kind, default=default, help=f"default: {default}")


def _cmd_train(args) -> int:
    from .train import TrainConfig, run_training

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if f.name != "store"}
    values["store"] = args.store
    run_training(TrainConfig(**values), resume=args.resume, command=_command_line())
    return 0


def _cmd_evaluate(args) -> int:
    from .evaluate import read_chunks, score_chunks

    loaded = store.load(args.model, args.store)
    score = score_chunks(loaded.model, loaded.vocab, read_chunks(args.text))
    if args.json:
        print(json.dumps(score.to_dict()))
    else:
        print(f"{loaded.name}@{loaded.version} on {args.text}: {score.nats_per_char:.4f} nats/char, "
              f"{score.bits_per_char:.4f} bits/char over {score.chars:,} characters")
    return 0


def _cmd_sample(args) -> int:
    from .generate import generate_text
    from .session_file import sample_session, wants_session

    if wants_session(args):
        return sample_session(args)

    loaded = store.load(args.model, args.store)
    for piece in generate_text(loaded.model, loaded.vocab, args.prompt, args.length,
                               temperature=args.temperature, seed=args.seed):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _cmd_models(args) -> int:
    rows = store.list_models(args.store)
    if not rows:
        print(f"no models in {store.store_root(args.store)}")
        return 0
    print(f"{'model':<28} {'params':>10} {'val nats':>9} {'val bpc':>8} {'steps':>7}  created")
    for name, version, card in rows:
        if card is None:
            print(f"{name + '@' + version:<28} (unreadable card)")
            continue
        m, t = card.get("metrics", {}), card.get("training", {})
        print(f"{name + '@' + version:<28} {card.get('num_parameters', 0):>10,} {m.get('val_nats_per_char', float('nan')):>9.4f} "
              f"{m.get('val_bits_per_char', float('nan')):>8.4f} {t.get('steps', 0):>7}  {card.get('created_at', '')}")
    return 0


def _add_serve(sub) -> None:
    from .settings import Settings

    p = sub.add_parser("serve", help="serve a model over HTTP (settings also come from CHARLSTM_* variables)")
    for name, field in Settings.model_fields.items():
        if name == "model_store":
            continue  # the global --store
        kind = {int: int, float: float}.get(field.annotation, str)
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None,
                       help=f"{field.description or ''} (env CHARLSTM_{name.upper()}, default {field.default})")


def _cmd_serve(args) -> int:
    import uvicorn

    from .server import build_app
    from .settings import Settings

    overrides = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    if args.store:
        overrides["model_store"] = args.store
    settings = Settings(**overrides)
    loaded = store.load(settings.model, settings.model_store)  # fail fast, with the store's one clear message
    config = uvicorn.Config(build_app(settings, loaded), host=settings.host, port=settings.port, log_level=settings.log_level,
                            workers=1, timeout_graceful_shutdown=int(settings.shutdown_grace_s) + 5)
    uvicorn.Server(config).run()
    return 0


def _command_line() -> str:
    return shlex.join(["charlstm", *sys.argv[1:]])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="charlstm", description=__doc__)
    parser.add_argument("--store", default=None, help="model store root (default: $CHARLSTM_MODEL_STORE or ./model_store)")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    p = sub.add_parser("evaluate", help="cross-entropy of a text file under a model, in nats and bits per char")
    p.add_argument("--model", default=store.DEFAULT_MODEL, help="name, name@version or a model folder")
    p.add_argument("--text", required=True)
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("sample", help="generate text to stdout")
    p.add_argument("--model", default=store.DEFAULT_MODEL)
    p.add_argument("--prompt", default="")
    p.add_argument("--length", type=int, default=500)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=None)
    session_file.add_arguments(p)
    sub.add_parser("models", help="list the models in the store with their figures")
    _add_serve(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"train": _cmd_train, "evaluate": _cmd_evaluate, "sample": _cmd_sample, "models": _cmd_models,
                "serve": _cmd_serve}
    try:
        return handlers[args.command](args)
    except store.ModelLoadError as e:
        print(f"charlstm: {e}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:
        print(f"charlstm: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
