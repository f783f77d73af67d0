"""`charlstm evaluate`: a text's cross-entropy under a model, through its nn.LSTM or a backend's step."""

from __future__ import annotations

import argparse
import json
import sys

from ..model import store
from .common import add_unknown_chars, check_replacement, report_unknown


def add_arguments(p: argparse.ArgumentParser) -> None:
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
    add_unknown_chars(p)


def run(args) -> int:
    from ..training.evaluate import read_chunks

    check_replacement(args)
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
    from ..training.corpus import Corpus

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
    from ..training.evaluate import score_chunks

    backend = args.backend or {"none": "torch", "int8": "torch-int8", None: None}[args.quantize]
    if backend:  # through that backend's step
        from ..backends import build
        from ..backends.quality import score_chunks_stepped

        if args.unknown_chars != "error":
            raise ValueError("--backend scores text as it is: leave --unknown-chars at error")
        score = score_chunks_stepped(build(backend, loaded, workers=1), loaded.vocab, chunks)
    else:
        score = score_chunks(loaded.model, loaded.vocab, chunks, unknown=args.unknown_chars, replacement=args.replacement)
    report_unknown(args, score.unknown_chars)
    return score


def _split_chunks(path: str, split: str, card: dict) -> list[str]:
    """The training or validation part of a text, cut where `charlstm train` cut it for this model:
    only the model's own training text (its checksum in the card) has such a part."""
    from ..training.corpus import Corpus

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

    from ..training.evaluate import read_chunks

    total = sum(len(c) for c in read_chunks(path, size=1 << 20))
    with tqdm(total=total, unit="char", unit_scale=True, dynamic_ncols=True, file=sys.stderr, desc="evaluate") as bar:
        for chunk in chunks:
            yield chunk
            bar.update(len(chunk))  # the chunk has been scored when the next one is asked for
