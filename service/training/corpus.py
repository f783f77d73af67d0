"""Corpus: read any UTF-8 text file, fingerprint it, split it train/validation by position, or by play
when `charlstm corpus` wrote its manifest beside it (`<text>.manifest.json`: each play's range)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

MANIFEST_SUFFIX = ".manifest.json"

# The convention of the published tiny-shakespeare baselines: first 90% train, last 10% validation.
DEFAULT_TRAIN_FRACTION = 0.9
SEEN_AT = 0.01  # charlstm corpus --seen: a play with this share of its lines in the seen text was seen


@dataclass(frozen=True)
class Corpus:
    name: str
    text: str
    sha256: str
    manifest: dict | None = None  # what charlstm corpus wrote beside the text, when it did
    manifest_sha256: str | None = None

    @classmethod
    def read(cls, path: str | Path) -> "Corpus":
        path = Path(path)
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not UTF-8 text: {e}") from None
        if len(text) < 2:
            raise ValueError(f"{path} holds {len(text)} characters; a corpus needs at least 2")
        sha = hashlib.sha256(raw).hexdigest()
        beside = path.with_name(path.name + MANIFEST_SUFFIX)
        manifest = manifest_sha = None
        if beside.exists():
            manifest_raw = beside.read_bytes()
            manifest, manifest_sha = json.loads(manifest_raw), hashlib.sha256(manifest_raw).hexdigest()
            if manifest.get("sha256") != sha:
                raise ValueError(f"{beside} describes another text (sha256 {str(manifest.get('sha256'))[:12]}..., "
                                 f"this one {sha[:12]}...): rebuild it with charlstm corpus, or move it away")
        return cls(name=path.name, text=text, sha256=sha, manifest=manifest, manifest_sha256=manifest_sha)

    def validation_plays(self, spec: str, train_fraction: float = DEFAULT_TRAIN_FRACTION) -> list[str]:
        """The plays held out for validation: the files `spec` names (comma-separated), or with `auto` the
        first plays in a fixed order (sha256 of the file name, so no one picks them) until they hold
        1 - train_fraction of the characters, leaving out any play the manifest's `seen_file` holds."""
        if self.manifest is None:
            raise ValueError(f"a split by play needs the corpus manifest beside {self.name} (charlstm corpus writes it)")
        plays = self.manifest["plays"]
        works: dict[str, list[dict]] = {}  # a play's texts in every edition go to one side together
        for p in plays:
            works.setdefault(p.get("work") or p["file"], []).append(p)
        if spec == "auto":  # never a play the corpus's --seen text holds: a model fine-tuned on it saw that play
            chosen, held = [], 0
            unseen = [w for w in works if all((p.get("seen_fraction") or 0) < SEEN_AT for p in works[w])]
            for work in sorted(unseen, key=lambda w: hashlib.sha256(w.encode()).hexdigest()):
                if held >= (1.0 - train_fraction) * len(self.text):
                    break
                chosen += [p["file"] for p in works[work]]
                held += sum(p["end"] - p["start"] for p in works[work])
            return sorted(chosen)
        names = [n.strip() for n in spec.split(",") if n.strip()]
        unknown = sorted(set(names) - {p["file"] for p in plays})
        if unknown or not names:
            raise ValueError(f"val_plays names {', '.join(unknown) or 'no play'}; the corpus holds {', '.join(p['file'] for p in plays)}")
        named = {p.get("work") or p["file"] for p in plays if p["file"] in names}
        chosen = sorted(p["file"] for w in named for p in works[w])
        if len(chosen) == len(plays):
            raise ValueError("val_plays holds out every play: training would have no text")
        return chosen

    def split_by_plays(self, validation: list[str]) -> tuple[str, str]:
        """(train, validation): the plays' ranges from the manifest, each play whole on one side."""
        ranges = [(p["start"], p["end"], p["file"] in validation) for p in self.manifest["plays"]]
        train = "".join(self.text[a:b] for a, b, held in ranges if not held)
        return train, "".join(self.text[a:b] for a, b, held in ranges if held)

    def split(self, train_fraction: float = DEFAULT_TRAIN_FRACTION) -> tuple[str, str]:
        """(train, validation): a split by position, never shuffled, so validation is unseen text."""
        if not 0.0 < train_fraction < 1.0:
            raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
        cut = int(len(self.text) * train_fraction)
        return self.text[:cut], self.text[cut:]

    def split_as_trained(self, card: dict) -> tuple[str, str]:
        """(train, validation) cut where `charlstm train` cut them for the model of `card`: only that
        model's own training text (its checksum in the card) has such parts."""
        trained_on = card.get("corpus", {})
        if "split" not in trained_on or trained_on.get("sha256") != self.sha256:
            raise ValueError(f"{self.name} is not the text this model was trained on ({trained_on.get('name', 'unknown')}, "
                             f"sha256 {str(trained_on.get('sha256', '?'))[:12]}...)")
        if trained_on["split"].get("by") == "play":
            return self.split_by_plays(trained_on["split"]["validation_plays"])
        return self.split(trained_on["split"]["train_fraction"])

    def describe(self, train_fraction: float, validation_plays: list[str] | None = None) -> dict:
        """What a model card records of its corpus: the text's checksum, the split, and the manifest's."""
        train, val = self.split_by_plays(validation_plays) if validation_plays else self.split(train_fraction)
        split = {"train_fraction": train_fraction, "train_chars": len(train), "val_chars": len(val)}
        if validation_plays:
            split.update(by="play", validation_plays=validation_plays)
        out = {"name": self.name, "chars": len(self.text), "sha256": self.sha256, "split": split}
        if self.manifest is not None:
            m = self.manifest
            out["manifest"] = {"sha256": self.manifest_sha256, "format": m.get("format"), "edition": m.get("edition"),
                               "heldout_entries": m.get("heldout_entries"), "excluded": m.get("excluded"),
                               "plays": [p["file"] for p in m.get("plays", [])]}
        return out
