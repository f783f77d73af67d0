"""`charlstm corpus` on small play texts written here in the Gutenberg layout: a header and a list of persons,
headings, stage directions, abbreviated speakers, characters outside the vocabulary, and held-out plays."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap

import pytest

from service import playtexts

from .server import ROOT

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
