"""The playground page in a real headless chromium against a real server on the tiny model: it shows
exactly the text the API gives for a seed, Stop frees the server's row, a session continues, the model
picker routes calls to the picked model, the API key works, nothing is fetched from elsewhere, and a
phone-sized screen needs no sideways scrolling."""

from __future__ import annotations

import re

import httpx

from service.model import store
from service.training.train import run_training

from ..browser import Playground, browser, playground  # noqa: F401 - `browser` and `playground` are fixtures
from ..conftest import tiny_config
from ..server import Server, wait_until

SAMPLING = {"temperature": 0.9, "top_k": 20, "top_p": 0.95, "repetition_penalty": 1.1}


def api_text(url: str, headers: dict | None = None, **body) -> dict:
    r = httpx.post(url + "/generate", json=body, headers=headers, timeout=60.0)
    assert r.status_code == 200, r.text
    return r.json()


# ---------------------------------------------------------------- serving


def test_page_and_assets_come_from_the_package_with_a_strict_policy(server):
    page = httpx.get(server.url + "/", timeout=5.0)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert "connect-src 'self'" in page.headers["content-security-policy"]
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        r = httpx.get(f"{server.url}/playground/{name}", timeout=5.0)
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind), name
        assert f'"playground/{name}"' in page.text, f"the page does not load {name}"
        # Nothing refers to another host: the page must work with no outside network.
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", r.text, re.I), name
    missing = httpx.get(server.url + "/playground/../settings.py", timeout=5.0)
    assert missing.status_code == 404 and set(missing.json()["error"]) == {"type", "message", "param"}
    other = httpx.get(server.url + "/playground/index.html.bak", timeout=5.0)
    assert other.status_code == 404 and other.json()["error"]["type"] == "not_found"
    sneaky = httpx.get(server.url + "/playground/%2e%2e%2fapp.py", timeout=5.0)
    assert sneaky.status_code == 404 and sneaky.json()["error"]["type"] == "not_found"
    post = httpx.post(server.url + "/", json={}, timeout=5.0)
    assert post.status_code == 405 and "GET" in post.headers["allow"] and set(post.json()["error"]) == {"type", "message", "param"}
    assert "/" not in httpx.get(server.url + "/openapi.json", timeout=5.0).json()["paths"]


# ---------------------------------------------------------------- generating


def test_the_page_shows_exactly_the_text_the_api_gives_for_a_seed(playground, server, tmp_path):
    pg = playground.open()
    assert "tiny@v1" in pg.page.inner_text("#model-info")
    pg.fill(prompt="KING:\n", seed=1234, max_chars=300, **SAMPLING)
    pg.generate()
    assert pg.wait_calls(0, 1) == "length"
    shown = pg.generated(0)
    expected = api_text(server.url, prompt="KING:\n", seed=1234, max_new_tokens=300, **SAMPLING)
    assert shown == [expected["text"]] and len(expected["text"]) == 300
    footer = pg.pane(0).locator("footer").inner_text()
    assert re.search(r"300 chars · [\d,]+ chars/s · first after \d+ ms", footer), footer
    assert "generated 300 · seed 1234" in footer
    assert pg.pane(0).locator(".prompt").text_content() == "KING:\n"  # the prompt is shown before its text

    # Generating again with the same seed shows the same text: the pane starts afresh each time.
    pg.generate()
    assert pg.wait_calls(0, 1) == "length"
    assert pg.generated(0) == [expected["text"]]

    shot = tmp_path / "playground.png"
    pg.page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    assert pg.foreign_requests() == []
    assert {"/", "/playground/app.js", "/playground/style.css", "/info", "/generate"} <= {
        httpx.URL(u).path for u in pg.requests}


def test_a_bad_field_shows_the_servers_message_and_nothing_runs(playground, server):
    pg = playground.open()
    pg.fill(prompt="KING:", top_p=0, seed=1)
    pg.generate()
    pg.page.wait_for_function("() => document.getElementById('status').textContent.includes('top_p')")
    assert pg.status().startswith("422 invalid_field: top_p")
    assert pg.generated(0) == []  # the failed call leaves no empty text behind
    assert not pg.page.is_enabled("#stop")


def test_stop_cancels_the_stream_and_the_server_frees_the_row(playground, server):
    pg = playground.open()
    before = server.metric("charlstm_client_disconnects_total")
    pg.fill(prompt="GHOST:\n", seed=99, max_chars=100_000)  # far longer than the test lasts
    pg.generate()
    pg.page.wait_for_function("() => document.querySelector('#panes .generated')?.textContent.length > 50")
    assert server.metric("charlstm_running_streams") == 1
    assert pg.page.is_enabled("#stop") and not pg.page.is_enabled("#generate")
    pg.stop()
    assert pg.wait_calls(0, 1) == "stopped"
    wait_until(lambda: server.metric("charlstm_running_streams") == 0, what="the server to free the row")
    wait_until(lambda: server.metric("charlstm_client_disconnects_total") == before + 1, what="the disconnect to be counted")
    assert pg.page.is_enabled("#generate") and not pg.page.is_enabled("#stop")
    # What the page kept is exactly the start of that seed's text.
    shown = pg.generated(0)[0]
    assert len(shown) < 100_000
    assert api_text(server.url, prompt="GHOST:\n", seed=99, max_new_tokens=len(shown))["text"] == shown


def test_a_session_continues_twice_like_the_api(playground, server):
    pg = playground.open()
    pg.session_mode()
    pg.fill(prompt="QUEEN:\n", seed=42, max_chars=120, **SAMPLING)
    pg.generate()
    assert pg.wait_calls(0, 1) == "length"
    assert pg.page.input_value("#prompt") == ""  # the prompt is in the state now: the box empties
    pg.generate()
    assert pg.wait_calls(0, 2) == "length"
    pg.fill(prompt="Thou")
    pg.pane(0).locator(".continue").click()
    assert pg.wait_calls(0, 3) == "length"
    shown = pg.generated(0)

    session_id = pg.pane(0).get_attribute("data-session-id")

    ref = httpx.post(server.url + "/sessions", json={"seed": 42}, timeout=10.0).json()["session_id"]
    expected = []
    for prompt in ("QUEEN:\n", "", "Thou"):
        r = httpx.post(f"{server.url}/sessions/{ref}/generate", json={"prompt": prompt, "max_new_tokens": 120, **SAMPLING}, timeout=60.0)
        expected.append(r.json()["text"])
    assert shown == expected
    info, ref_info = (httpx.get(f"{server.url}/sessions/{sid}", timeout=5.0).json() for sid in (session_id, ref))
    assert info["seed"] == 42 and info["position"] == ref_info["position"] >= 7 + 120 + 120 + 4 + 120
    assert f"position {info['position']}" in pg.pane(0).locator(".pane-title").inner_text()
    assert pg.foreign_requests() == []
    for sid in (session_id, ref):
        httpx.delete(f"{server.url}/sessions/{sid}", timeout=5.0)


def test_stop_in_a_session_leaves_session_and_page_as_they_were(playground, server):
    pg = playground.open()
    pg.session_mode()
    pg.fill(prompt="FOOL:\n", seed=5, max_chars=40)
    pg.generate()
    pg.wait_calls(0, 1)
    session_id = pg.pane(0).get_attribute("data-session-id")
    first = pg.generated(0)
    position = httpx.get(f"{server.url}/sessions/{session_id}", timeout=5.0).json()["position"]
    pg.fill(prompt="Ay", max_chars=100_000)
    pg.generate()
    pg.page.wait_for_function("() => document.querySelectorAll('#panes .generated')[1]?.textContent.length > 20")
    pg.stop()
    pg.page.wait_for_function("() => document.querySelector('#panes .finish').textContent.startsWith('stopped')")
    wait_until(lambda: server.metric("charlstm_running_streams") == 0, what="the server to free the row")
    # The session did not advance, so the page drops the stopped call and keeps its prompt for a retry.
    assert pg.generated(0) == first
    assert pg.page.input_value("#prompt") == "Ay"
    wait_until(lambda: not httpx.get(f"{server.url}/sessions/{session_id}", timeout=5.0).json()["busy"], what="the session to be idle")
    assert httpx.get(f"{server.url}/sessions/{session_id}", timeout=5.0).json()["position"] == position
    httpx.delete(f"{server.url}/sessions/{session_id}", timeout=5.0)


def test_closing_a_running_session_pane_stops_it_and_deletes_the_session(playground, server):
    pg = playground.open()
    pg.session_mode()
    pg.fill(prompt="KING:\n", seed=4, max_chars=100_000)
    pg.generate()
    pg.page.wait_for_function("() => document.querySelector('#panes .generated')?.textContent.length > 20")
    session_id = pg.pane(0).get_attribute("data-session-id")
    pg.pane(0).locator(".close").click()
    assert pg.pane_count() == 0
    wait_until(lambda: httpx.get(f"{server.url}/sessions/{session_id}", timeout=5.0).status_code == 404,
               what="the page to delete the session once its call has ended")
    assert server.metric("charlstm_running_streams") == 0
    assert pg.status() == ""  # no error: the page waited for the server to free the session


# ---------------------------------------------------------------- several models


def test_the_picked_model_generates_and_owns_the_sessions_made_on_it(browser, own_store, play_file, tmp_path):  # noqa: F811
    run_training(tiny_config(play_file, tmp_path / "run2", own_store, name="other", steps=30, seed=3))
    store.set_default("tiny", own_store)
    srv = Server(own_store, model="", models="all")
    pg = Playground(browser, srv.url)
    try:
        pg.open()
        listed = [m["id"] for m in httpx.get(srv.url + "/v1/models", timeout=5.0).json()["data"]]
        assert sorted(listed) == ["other@v1", "tiny@v1"]
        assert pg.page.locator("#model option").evaluate_all("os => os.map(o => o.value)") == listed
        assert pg.page.input_value("#model") == "tiny@v1"  # the server's default is preselected
        assert pg.page.inner_text("#model-info").startswith("tiny@v1")

        pg.page.select_option("#model", "other@v1")
        pg.wait_for("() => document.getElementById('model-info').textContent.startsWith('other@v1')")
        pg.fill(prompt="KING:\n", seed=77, max_chars=120, **SAMPLING)
        pg.generate()
        assert pg.wait_calls(0, 1) == "length"
        body = dict(prompt="KING:\n", seed=77, max_new_tokens=120, **SAMPLING)
        expected = api_text(srv.url, model="other@v1", **body)["text"]
        assert pg.generated(0) == [expected]
        assert expected != api_text(srv.url, **body)["text"]  # the default model would have said something else
        assert "other@v1" in pg.pane(0).locator(".pane-title").inner_text()

        # A session made with other@v1 belongs to it; its calls name no model (the server knows it).
        pg.session_mode()
        pg.fill(prompt="FOOL:\n", max_chars=40)
        with pg.page.expect_request(lambda r: r.method == "POST" and httpx.URL(r.url).path == "/sessions") as created:
            pg.generate()
        assert created.value.post_data_json["model"] == "other@v1"
        assert pg.wait_calls(1, 1) == "length"
        session_id = pg.pane(1).get_attribute("data-session-id")
        assert httpx.get(f"{srv.url}/sessions/{session_id}", timeout=5.0).json()["model"] == "other@v1"
        assert "other@v1" in pg.pane(1).locator(".pane-title").inner_text()
        with pg.page.expect_request(lambda r: httpx.URL(r.url).path == f"/sessions/{session_id}/generate") as call:
            pg.generate()
        assert pg.wait_calls(1, 2) == "length"
        assert "model" not in call.value.post_data_json
        assert pg.foreign_requests() == [] and pg.errors == []
    finally:
        pg.close()
        srv.stop()


# ---------------------------------------------------------------- API key and small screens


def test_with_an_api_key_the_page_loads_and_asks_for_it(browser, trained_store):  # noqa: F811
    key = "playground-test-key"
    srv = Server(trained_store, api_key=key)
    pg = Playground(browser, srv.url)
    try:
        pg.open(wait_for_model=False)
        pg.page.wait_for_function("() => document.getElementById('model-info').textContent.includes('401')")
        assert "API key" in pg.page.inner_text("#model-info")
        pg.fill(prompt="ROMEO:", seed=8, max_chars=80)
        pg.generate()
        pg.page.wait_for_function("() => document.getElementById('status').textContent.includes('401')")

        pg.page.click(".auth summary")
        pg.page.fill("#api-key", key)
        pg.page.press("#api-key", "Tab")  # the change event reloads the model's details with the key
        pg.page.wait_for_function("() => document.getElementById('model-info').textContent.includes('tiny@v1')")
        pg.generate()
        assert pg.wait_calls(0, 1) == "length"
        headers = {"Authorization": f"Bearer {key}"}
        assert pg.generated(0) == [api_text(srv.url, headers, prompt="ROMEO:", seed=8, max_new_tokens=80)["text"]]
        # The key stays in the page: nothing stored, no cookie.
        assert pg.page.evaluate("localStorage.length + sessionStorage.length") == 0
        assert pg.context.cookies() == []
        assert httpx.get(srv.url + "/info", timeout=5.0).status_code == 401  # the API itself stays closed
        assert pg.errors == []
    finally:
        pg.close()
        srv.stop()


def test_a_phone_sized_screen_needs_no_sideways_scrolling(browser, server, tmp_path):  # noqa: F811
    pg = Playground(browser, server.url, viewport={"width": 375, "height": 740})
    try:
        pg.open()
        pg.session_mode()
        pg.fill(prompt="JULIET:\n", seed=3, max_chars=400)
        pg.generate()
        assert pg.wait_calls(0, 1) == "length"
        assert pg.page.evaluate("document.documentElement.scrollWidth") <= 375
        for selector in ("#prompt", "#generate", "#stop", "#seed", "#panes .pane", "#panes .pane .fork"):
            box = pg.page.locator(selector).first.bounding_box()
            assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 375, selector
        pg.page.screenshot(path=str(tmp_path / "playground-phone.png"), full_page=True)
        httpx.delete(f"{server.url}/sessions/{pg.pane(0).get_attribute('data-session-id')}", timeout=5.0)
        assert pg.errors == []
    finally:
        pg.close()
