"""The playground's portable sessions in a real headless chromium: Fork branches a story into two panes
that continue identically until their calls differ, and Export saves a file that Import loads back into a
session which continues exactly like the uninterrupted one. They use the session routes of issue 13
(POST /sessions/{id}/fork, GET /sessions/{id}/export, POST /sessions/import)."""

from __future__ import annotations

import json

import httpx

from ..browser import Playground, browser, playground  # noqa: F401 - `browser` and `playground` are fixtures

SAMPLING = {"temperature": 1.0, "max_new_tokens": 90}


def api_session(url: str, seed: int, prompts: list[str]) -> tuple[str, list[str]]:
    """A session continued through the API alone, uninterrupted: the reference for the page."""
    sid = httpx.post(url + "/sessions", json={"seed": seed}, timeout=10.0).json()["session_id"]
    texts = []
    for prompt in prompts:
        r = httpx.post(f"{url}/sessions/{sid}/generate", json={"prompt": prompt, **SAMPLING}, timeout=60.0)
        assert r.status_code == 200, r.text
        texts.append(r.json()["text"])
    return sid, texts


def start_session(pg: Playground, prompt: str, seed: int) -> None:
    pg.open()
    pg.session_mode()
    pg.fill(prompt=prompt, seed=seed, max_chars=SAMPLING["max_new_tokens"], temperature=SAMPLING["temperature"])
    pg.generate()
    assert pg.wait_calls(0, 1) == "length"


def test_fork_branches_into_two_panes_that_continue_identically_then_apart(playground, server, tmp_path):
    pg = playground
    start_session(pg, "KING:\n", seed=11)
    parent = pg.pane(0).get_attribute("data-session-id")
    pg.pane(0).locator(".fork").click()
    pg.wait_for("() => document.querySelectorAll('#panes .pane').length === 2")
    child = pg.pane(1).get_attribute("data-session-id")
    assert child and child != parent
    assert "Fork" in pg.pane(1).locator(".pane-title").inner_text()
    # The fork shows its parent's story so far.
    assert pg.pane(1).locator(".pane-text").text_content() == pg.pane(0).locator(".pane-text").text_content()
    assert pg.pane(1).get_attribute("class").split().count("active") == 1  # the new branch is the one Generate continues

    # Same state, seed and counter: both branches continue with the same text...
    for index in (0, 1):
        pg.pane(index).locator(".continue").click()
    assert pg.wait_calls(0, 2) == "length" and pg.wait_calls(1, 1) == "length"
    same = pg.generated(0)[1]
    assert pg.generated(1) == [same]

    # Then apart: one branch is given a prompt, the other goes on by itself.
    pg.fill(prompt="Thou")
    pg.pane(1).locator(".continue").click()
    assert pg.wait_calls(1, 2) == "length"
    pg.pane(0).locator(".continue").click()
    assert pg.wait_calls(0, 3) == "length"
    # Each branch says what one uninterrupted session with its own calls says.
    ref_a, plain = api_session(server.url, 11, ["KING:\n", "", ""])
    ref_b, prompted = api_session(server.url, 11, ["KING:\n", "", "Thou"])
    assert pg.generated(0) == plain
    assert pg.generated(1) == prompted[1:]
    assert plain[2] != prompted[2]
    positions = [httpx.get(f"{server.url}/sessions/{sid}", timeout=5.0).json()["position"] for sid in (parent, child)]
    assert positions[0] != positions[1]  # two sessions, each with its own state

    pg.page.screenshot(path=str(tmp_path / "playground-fork.png"), full_page=True)
    assert pg.foreign_requests() == []
    for sid in (parent, child, ref_a, ref_b):
        httpx.delete(f"{server.url}/sessions/{sid}", timeout=5.0)


def test_export_then_import_continues_like_the_uninterrupted_session(playground, server, tmp_path):
    pg = playground
    start_session(pg, "QUEEN:\n", seed=23)
    original = pg.pane(0).get_attribute("data-session-id")
    with pg.page.expect_download() as download:
        pg.pane(0).locator(".export").click()
        pg.wait_for("() => document.getElementById('status').textContent.startsWith('Exported')")
    saved = tmp_path / download.value.suggested_filename
    download.value.save_as(saved)
    blob = json.loads(saved.read_text())
    assert blob["format"] == "charlstm-session/1" and blob["model"] == "tiny@v1"
    assert blob["position"] == httpx.get(f"{server.url}/sessions/{original}", timeout=5.0).json()["position"]
    assert saved.name.endswith(f"-{blob['position']}.json")

    # Close the pane (the page deletes its session), then load the file back.
    pg.pane(0).locator(".close").click()
    pg.wait_for("() => document.querySelectorAll('#panes .pane').length === 0")
    assert httpx.get(f"{server.url}/sessions/{original}", timeout=5.0).status_code == 404
    pg.page.set_input_files("#import-file", str(saved))
    pg.wait_for("() => document.querySelectorAll('#panes .pane.session').length === 1")
    imported = pg.pane(0).get_attribute("data-session-id")
    assert imported and imported != original
    assert "Imported" in pg.pane(0).locator(".pane-title").inner_text()
    assert f"position {blob['position']}" in pg.pane(0).locator(".pane-title").inner_text()

    pg.generate()  # continues the imported session: it is the active pane
    assert pg.wait_calls(0, 1) == "length"
    _, expected = api_session(server.url, 23, ["QUEEN:\n", ""])
    assert pg.generated(0) == [expected[1]]
    assert pg.foreign_requests() == []
    httpx.delete(f"{server.url}/sessions/{imported}", timeout=5.0)


def test_importing_a_file_that_is_not_a_session_says_so(playground, server, tmp_path):
    pg = playground
    pg.open()
    pg.session_mode()
    bad = tmp_path / "notes.json"
    bad.write_text('{"hello": "world"}')
    pg.page.set_input_files("#import-file", str(bad))
    pg.page.wait_for_function("() => document.getElementById('status').textContent.includes('not an exported session')")
    tampered = tmp_path / "tampered.json"
    tampered.write_text(json.dumps({"format": "charlstm-session/1", "model": "tiny@v1", "position": 1, "data": "AAAA"}))
    pg.page.set_input_files("#import-file", str(tampered))
    pg.page.wait_for_function("() => /^\\d{3} /.test(document.getElementById('status').textContent)")  # the server's answer
    assert pg.status().startswith("422 invalid_session_blob"), pg.status()
    assert pg.pane_count() == 0
