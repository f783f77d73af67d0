"""`charlstm corpus` on small play texts written here in the Gutenberg layout: a header and a list of persons,
headings, stage directions, abbreviated speakers, characters outside the vocabulary, and held-out plays."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import textwrap

import pytest

from service.training import playtexts
from service.model import store
from service.training.corpus import Corpus
from service.training.train import run_training

from ..conftest import SPEAKERS, make_play, tiny_config
from ..server import ROOT

ROMEO = textwrap.dedent("""\
    ROMEO AND JULIET

    by William Shakespeare



    PERSONS REPRESENTED

    Escalus, Prince of Verona.
    Romeo, Son to Montague.
    Lady Capulet, Wife to Capulet.
    Nurse to Juliet.
    Citizens of Verona; Watchmen.

    SCENE.--Verona.

    ACT I.

    Scene I. A public place.

    [Enter Romeo and the Nurse.]

    Rom.
    What light through yonder window breaks?
      It is the east (and Juliet is the sun)!

    Nurse.
    Faith, I can "tell" you; [aside] _young_ Romeo
    will be older when you have found him.

    [Enter Lady Capulet, and
    a Servant.

    Lady Cap.
    Nurse, where's my daughter? Call her forth to me.

    1 Cit.
    Clubs, bills, and partisans! 2 strike!

    2 Watch.
    Peace, ho!

    [Exeunt.]

    ESCALUS.
    Rebellious subjects, enemies to peace,

    Profaners of this neighbour-stained steel!
    """)

EXPECTED = textwrap.dedent("""\
    ROMEO:
    What light through yonder window breaks?
    It is the east and Juliet is the sun!

    NURSE:
    Faith, I can 'tell' you; young Romeo
    will be older when you have found him.

    LADY CAPULET:
    Nurse, where's my daughter? Call her forth to me.

    FIRST CITIZEN:
    Clubs, bills, and partisans! strike!

    SECOND WATCHMAN:
    Peace, ho!

    ESCALUS:
    Rebellious subjects, enemies to peace,

    ESCALUS:
    Profaners of this neighbour-stained steel!

    """)

POEM = "A LOVER'S COMPLAINT\n\nby William Shakespeare\n\nFrom off a hill whose concave womb reworded\nA plaintful story from a sistering vale,\n"


def play_folder(tmp_path, plays: dict[str, str]):
    texts = tmp_path / "texts"
    texts.mkdir()
    for name, text in plays.items():
        (texts / name).write_text(text, encoding="utf-8")
    heldout = tmp_path / "heldout.txt"
    heldout.write_text("# plays no corpus may hold\nmacbeth\nlear\n\n", encoding="utf-8")
    return texts, heldout


def test_a_play_becomes_speeches_in_tiny_shakespeares_layout():
    play, speeches = playtexts.parse_play(ROMEO, "romeo_and_juliet_gut.txt")
    assert "".join(f"{s}:\n{text}\n\n" for s, text in speeches) == EXPECTED
    assert play.title == "ROMEO AND JULIET" and play.speeches == 7 and not play.unexpanded
    # what the manifest reports: the abbreviations it expanded (Nurse and ESCALUS were written in full)
    assert play.expanded == {"Rom.": "ROMEO", "Lady Cap.": "LADY CAPULET", "1 Cit.": "FIRST CITIZEN", "2 Watch.": "SECOND WATCHMAN"}


def test_the_corpus_holds_out_the_test_plays_and_writes_a_checked_manifest(tmp_path):
    macbeth = ROMEO.replace("ROMEO AND JULIET", "MACBETH")
    texts, heldout = play_folder(tmp_path, {"romeo_and_juliet_gut.txt": ROMEO, "macbeth_gut.txt": macbeth,
                                            "lear_gut.txt": ROMEO.replace("ROMEO AND JULIET", "KING LEAR"),
                                            "clear_skies_gut.txt": ROMEO.replace("ROMEO AND JULIET", "CLEAR SKIES"),
                                            "lovers_complaint_gut.txt": POEM, "lear_gut_f.txt": "The Folio: not read"})
    corpus, manifest = playtexts.build(texts, heldout)
    assert manifest["excluded"] == ["lear_gut.txt", "macbeth_gut.txt"]  # 'lear' is a word of the name, not a part of 'clear'
    assert [p["file"] for p in manifest["plays"]] == ["clear_skies_gut.txt", "romeo_and_juliet_gut.txt"]
    assert manifest["skipped_no_speeches"] == ["lovers_complaint_gut.txt"]
    assert corpus == EXPECTED + EXPECTED and set(corpus) <= set(playtexts.VOCABULARY)
    first, second = manifest["plays"]
    assert corpus[first["start"]:first["end"]] == corpus[second["start"]:second["end"]] == EXPECTED  # a split by play
    assert manifest["dropped"] == {"(": 2, ")": 2, "_": 4, "2": 2}  # per character, over both plays kept
    out = tmp_path / "corpus" / "plays.txt"
    where = playtexts.write(corpus, manifest, out)
    saved = json.loads(where.read_text())
    assert saved["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest() and saved["chars"] == len(out.read_text())
    assert saved["plays"][1]["source_sha256"] == hashlib.sha256(ROMEO.encode()).hexdigest()
    again, _ = playtexts.build(texts, heldout)
    assert again == corpus  # the same texts, the same bytes


def test_the_command_line_builds_it_and_refuses_a_folder_without_plays(tmp_path):
    texts, heldout = play_folder(tmp_path, {"romeo_and_juliet_gut.txt": ROMEO})
    out = tmp_path / "plays.txt"
    run = subprocess.run([sys.executable, "-m", "service.cli", "corpus", "--texts", str(texts), "--heldout", str(heldout),
                          "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert out.read_text() == EXPECTED and "1 plays" in run.stdout and "sha256" in run.stdout
    empty = tmp_path / "empty"
    empty.mkdir()
    run = subprocess.run([sys.executable, "-m", "service.cli", "corpus", "--texts", str(empty), "--heldout", str(heldout),
                          "--out", str(tmp_path / "x.txt")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "no *_gut.txt play texts" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.parametrize("raw,full", [("Rom.", "ROMEO"), ("Lady Cap.", "LADY CAPULET"), ("1 Cit.", "FIRST CITIZEN"),
                                      ("KING HENRY.", "KING HENRY"), ("3 Watch.", "THIRD WATCHMAN"), ("Nurse.", "NURSE")])
def test_abbreviations_expand_from_the_list_of_persons(raw, full):
    persons = ["Romeo", "Lady Capulet", "Nurse", "Citizens", "Watchmen"]
    expand = playtexts.Expander(persons, playtexts.Counter(), {"Citizens", "Watchmen", "Verona"})
    assert expand(raw) == full


def gutenberg(play: str, title: str) -> str:
    """The tests' synthetic play written as a Gutenberg text: a list of persons, a heading, `Name.` speakers."""
    persons = "\n".join(f"{s.title()}, a person of the play." for s in SPEAKERS)
    speeches = re.sub(r"^([A-Z]+):$", lambda m: m.group(1).title() + ".", play, flags=re.M)
    return f"{title}\n\nby William Shakespeare\n\nPERSONS REPRESENTED\n\n{persons}\n\nACT I.\n\nScene I. A hall.\n\n{speeches}"


def test_training_on_the_corpus_holds_out_whole_plays(tmp_path):
    texts, heldout = play_folder(tmp_path, {f"play_{i}_gut.txt": gutenberg(make_play(6_000, seed=i), f"PLAY {i}")
                                            for i in range(3)})
    corpus, manifest = playtexts.build(texts, heldout)
    out = tmp_path / "plays.txt"
    playtexts.write(corpus, manifest, out)
    held = next(p for p in manifest["plays"] if p["file"] == "play_1_gut.txt")
    store_root = tmp_path / "store"
    run_training(tiny_config(out, tmp_path / "run", store_root, steps=20, eval_every=10, checkpoint_every=10,
                             val_plays="play_1_gut.txt"))
    card = store.load("tiny", store_root).card
    split = card["corpus"]["split"]
    assert split["by"] == "play" and split["validation_plays"] == ["play_1_gut.txt"]
    assert split["val_chars"] == held["end"] - held["start"] and split["train_chars"] == len(corpus) - split["val_chars"]
    assert card["corpus"]["manifest"]["plays"] == [p["file"] for p in manifest["plays"]]
    assert card["corpus"]["manifest"]["sha256"] == hashlib.sha256((tmp_path / "plays.txt.manifest.json").read_bytes()).hexdigest()
    scored = subprocess.run([sys.executable, "-m", "service.cli", "evaluate", "--store", str(store_root), "--model", "tiny",
                             "--text", str(out), "--split", "validation", "--json"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert scored.returncode == 0, scored.stderr
    validation = json.loads(scored.stdout)
    assert validation["chars"] == held["end"] - held["start"] - 1  # that play, whole, and nothing else
    each = subprocess.run([sys.executable, "-m", "service.cli", "evaluate", "--store", str(store_root), "--model", "tiny",
                           "--text", str(out), "--plays", "play_2_gut.txt,play_1_gut.txt", "--json"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert each.returncode == 0, each.stderr
    plays = json.loads(each.stdout)
    assert list(plays) == ["play_1_gut.txt", "play_2_gut.txt"]
    assert plays["play_1_gut.txt"]["nats_per_char"] == pytest.approx(validation["nats_per_char"], abs=1e-9)
    other = next(p for p in manifest["plays"] if p["file"] == "play_2_gut.txt")
    assert plays["play_2_gut.txt"]["chars"] == other["end"] - other["start"] - 1
    both = subprocess.run([sys.executable, "-m", "service.cli", "evaluate", "--store", str(store_root), "--model", "tiny",
                           "--text", str(out), "--plays", "auto", "--split", "validation"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert both.returncode != 0 and "leave --split out" in both.stderr and "Traceback" not in both.stderr
    auto = Corpus.read(out).validation_plays("auto", 0.6)
    assert 1 <= len(auto) < 3 and auto == Corpus.read(out).validation_plays("auto", 0.6)  # a fixed order, not a pick


def test_a_split_by_play_needs_the_manifest_that_describes_the_text(tmp_path):
    texts, heldout = play_folder(tmp_path, {"romeo_and_juliet_gut.txt": ROMEO})
    corpus, manifest = playtexts.build(texts, heldout)
    bare = tmp_path / "bare.txt"
    bare.write_text(corpus)
    with pytest.raises(ValueError, match="needs the corpus manifest"):
        Corpus.read(bare).validation_plays("auto")
    out = tmp_path / "plays.txt"
    playtexts.write(corpus, manifest, out)
    out.write_text(corpus + "KING:\nA line added after.\n\n")
    with pytest.raises(ValueError, match="describes another text"):
        Corpus.read(out)


FOLIO = textwrap.dedent("""\
    The Tragedie of Romeo and Juliet


    Actus Primus. Scoena Prima.

    Enter Sampson and Gregory, with Swords and Bucklers, of the
    House of Capulet.

      Samp. Gregory: A my word wee'l not carry coales

       Greg. No, for then we should be Colliars
      Sam. I mean, if we be in choller, wee'l draw
    Downe with the Mountagues.
    Enter Benuolio.

      Iul. O Romeo, Romeo, wherefore art thou Romeo?

    They Fight.

       Ben. Part Fooles, put vp the[m] Swords
    """)

FOLIO_EXPECTED = ("SAMPSON:\nGregory: A my word wee'l not carry coales\n\nGREGORY:\nNo, for then we should be Colliars\n\n"
                  "SAMPSON:\nI mean, if we be in choller, wee'l draw\nDowne with the Mountagues.\n\n"
                  "JULIET:\nO Romeo, Romeo, wherefore art thou Romeo?\n\nBENVOLIO:\nPart Fooles, put vp them Swords\n\n")


def test_a_folio_text_becomes_speeches_with_its_own_spelling():
    play, speeches = playtexts.parse_folio(FOLIO, "romeo_and_juliet_gut_f.txt", ["SAMPSON", "GREGORY", "BENVOLIO", "JULIET", "ROMEO"])
    assert "".join(f"{s}:\n{text}\n\n" for s, text in speeches) == FOLIO_EXPECTED
    assert play.expanded == {"Samp.": "SAMPSON", "Greg.": "GREGORY", "Sam.": "SAMPSON", "Iul.": "JULIET", "Ben.": "BENVOLIO"}


def test_both_editions_keep_a_plays_texts_on_one_side_of_the_split(tmp_path):
    modern = ROMEO.replace("Rom.\n", "Romeo.\n")
    texts, heldout = play_folder(tmp_path, {"romeo_and_juliet_gut.txt": modern, "romeo_and_juliet_gut_f.txt": FOLIO,
                                            "tempest_gut.txt": ROMEO.replace("ROMEO AND JULIET", "THE TEMPEST"),
                                            "macbeth_gut_f.txt": FOLIO.replace("Romeo and Juliet", "Macbeth")})
    corpus, manifest = playtexts.build(texts, heldout, "both")
    assert manifest["excluded"] == ["macbeth_gut_f.txt"] and manifest["edition"] == "both"
    assert [(p["file"], p["work"]) for p in manifest["plays"]] == [
        ("romeo_and_juliet_gut.txt", "romeo_and_juliet"), ("romeo_and_juliet_gut_f.txt", "romeo_and_juliet"), ("tempest_gut.txt", "tempest")]
    # this modern text names none of the Folio scene's speakers: they stay as written, and the manifest says so
    assert "SAMP:\n" in corpus and manifest["plays"][1]["unexpanded"] == ["Samp.", "Greg.", "Sam.", "Iul.", "Ben."]
    out = tmp_path / "both.txt"
    playtexts.write(corpus, manifest, out)
    assert Corpus.read(out).validation_plays("romeo_and_juliet_gut.txt") == ["romeo_and_juliet_gut.txt", "romeo_and_juliet_gut_f.txt"]
    with pytest.raises(ValueError, match="edition must be"):
        playtexts.build(texts, heldout, "quarto")


HENRY = textwrap.dedent("""\
    THE FIRST PART OF KING HENRY THE FOURTH

    PERSONS REPRESENTED

    Lady Percy, Wife to Hotspur.
    Thomas Percy, Earl of Worcester.
    A Messenger; the Queen.

    ACT I.

    HOT.
    My liege, I did deny no prisoners: the messenger came with a nurse.

    WOR.
    Peace, cousin, say no more; a messenger is but a servant of the nurse.

    Messenger.
    My lord, the nurse and the messenger would speak with Hotspur.

    Queen.
    Good Hotspur, a queen would have a messenger, and a queen's nurse.

    Lady Percy.
    O Hotspur, say what nurse brings news to Worcester.
    """)


def test_roles_keep_tiny_shakespeares_title_case_and_names_their_capitals(tmp_path):
    texts, heldout = play_folder(tmp_path, {"henry_iv_part_1_gut.txt": HENRY})
    corpus, manifest = playtexts.build(texts, heldout)
    # HOT. and WOR. expand from the list's words; Messenger is a common word of the speeches (lower case there
    # more often than capitalised within a line), Hotspur and Percy are not; a bare rank stays a name
    assert [s for s in re.findall(r"^(.+):$", corpus, flags=re.M)] == ["HOTSPUR", "WORCESTER", "Messenger", "QUEEN", "LADY PERCY"]
    assert manifest["plays"][0]["expanded"] == {"HOT.": "HOTSPUR", "WOR.": "WORCESTER"}
    assert playtexts.speaker_case("FIRST CITIZEN", {"first", "citizen"}) == "First Citizen"
    assert playtexts.speaker_case("GHOST OF LORD", {"ghost", "of", "lord"}) == "Ghost of Lord"
    assert playtexts.speaker_case("LADY CAPULET", {"lady"}) == "LADY CAPULET"


def test_a_seen_text_marks_the_plays_it_holds_and_auto_validation_skips_them(tmp_path):
    plays = {f"play_{i}_gut.txt": gutenberg(make_play(3_000, seed=i), f"PLAY {i}") for i in range(4)}
    texts, heldout = play_folder(tmp_path, plays)
    unseen, _ = playtexts.build(texts, heldout)
    _, speeches = playtexts.parse_play(plays["play_0_gut.txt"], "play_0_gut.txt")
    seen = tmp_path / "tiny.txt"  # play_0's speeches, in another layout
    seen.write_text("".join(f"{s.title()}:\n{text}\n\n" for s, text in speeches), encoding="utf-8")
    corpus, manifest = playtexts.build(texts, heldout, seen=seen)
    assert corpus == unseen  # the same text, and the manifest says more
    fractions = {p["file"]: p["seen_fraction"] for p in manifest["plays"]}
    assert fractions["play_0_gut.txt"] == 1.0 and all(fractions[f"play_{i}_gut.txt"] < 0.01 for i in (1, 2, 3))
    assert manifest["seen_file"] == {"name": "tiny.txt", "sha256": hashlib.sha256(seen.read_bytes()).hexdigest()}
    out = tmp_path / "plays.txt"
    playtexts.write(corpus, manifest, out)
    auto = Corpus.read(out).validation_plays("auto", 0.0)  # every play it may take: all but the seen one
    assert auto == ["play_1_gut.txt", "play_2_gut.txt", "play_3_gut.txt"]
    run = subprocess.run([sys.executable, "-m", "service.cli", "corpus", "--texts", str(texts), "--heldout", str(heldout),
                          "--seen", str(seen), "--out", str(tmp_path / "cli.txt")], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert "tiny.txt holds 1 of the plays" in run.stdout and "play_0_gut.txt" in run.stdout.splitlines()[-1]
