"""Several models in one server: routing by name and version, load on first use, keep-alive, the
loaded-model cap, sessions bound to their model, reload and the store's default, metrics by model, and
the OpenAI client listing and using each. Three tiny models are trained here: tiny@v1 (the shared
fixture), tiny@v2 (another run of the same name) and other@v1 (another text, a smaller state)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading

import httpx
import openai
import pytest
from httpx_sse import connect_sse

from service.model import store
from service.engine.share import ComputeShare
from service.training.train import run_training

from ..conftest import make_play, tiny_config
from ..reference import reference_text
from ..server import ROOT, Server, wait_until
from .test_api import assert_error

REFS = ["other@v1", "tiny@v1", "tiny@v2"]


@pytest.fixture(scope="module")
def models_store(trained_store, play_file, tmp_path_factory):
    """tiny@v1 (copied), tiny@v2 and other@v1 (trained here), tiny the store's default."""
    root = tmp_path_factory.mktemp("models") / "store"
    shutil.copytree(trained_store, root)
    other_play = root.parent / "other.txt"
    other_play.write_text(make_play(24_000, seed=5), encoding="utf-8")
    run_training(tiny_config(play_file, root.parent / "tiny2-run", root, steps=60, seed=8))
    run_training(tiny_config(other_play, root.parent / "other-run", root, name="other", embed_dim=24, hidden_size=24, steps=60))
    store.set_default("tiny", root)
    return root


@pytest.fixture(scope="module")
def models(models_store):
    return {ref: store.load(ref, models_store) for ref in REFS}


@pytest.fixture(scope="module")
def multi(models_store):
    """Every model in the store, all three loaded at once at most, none unloaded for idling."""
    srv = Server(models_store, model="", models="all", max_loaded_models=3, model_keep_alive_s=-1)
    yield srv
    srv.stop()


@pytest.fixture
def own_models(models_store, tmp_path):
    root = tmp_path / "store"
    shutil.copytree(models_store, root)
    return root


def gen(server, **body) -> dict:
    r = httpx.post(server.url + "/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def expected(models, ref: str, prompt: str, length: int, seed: int) -> str:
    loaded = models[ref]
    return "".join(reference_text(loaded.model, loaded.vocab, prompt, length, seed=seed))


def loaded_now(server) -> dict[str, bool]:
    return {m["id"]: m["loaded"] for m in httpx.get(server.url + "/info").json()["models"]}


# ---------------------------------------------------------------- routing

def test_a_request_names_its_model_by_name_and_version_or_gets_the_default(multi, models):
    for ref in REFS:
        body = gen(multi, model=ref, prompt="KING:", max_new_tokens=40, seed=11)
        assert body["model"] == ref and body["text"] == expected(models, ref, "KING:", 40, 11)
    assert gen(multi, model="tiny", prompt="A", max_new_tokens=1)["model"] == "tiny@v2"  # a bare name: its newest version
    assert gen(multi, model="other", prompt="A", max_new_tokens=1)["model"] == "other@v1"
    assert gen(multi, prompt="A", max_new_tokens=1)["model"] == "tiny@v2"  # none: the store's default, tiny


@pytest.mark.parametrize("path,body", [
    ("/generate", {"model": "nope", "prompt": "A"}),
    ("/generate", {"model": "tiny@v9", "prompt": "A"}),
    ("/sessions", {"model": "nope"}),
    ("/score", {"model": "nope", "text": "KING:"}),
    ("/tokenize", {"model": "nope", "prompt": "KING"}),
    ("/detokenize", {"model": "nope", "tokens": [1]}),
])
def test_an_unknown_model_is_404_model_not_found(multi, path, body):
    assert_error(httpx.post(multi.url + path, json=body, timeout=30), 404, "model_not_found", "model")


def test_the_tokenizer_routes_answer_for_the_model_named(multi, models):
    info = httpx.get(multi.url + "/tokenizer_info", params={"model": "other@v1"}).json()
    assert info["vocab"] == {c: i for i, c in enumerate(models["other@v1"].vocab.chars)}
    assert_error(httpx.get(multi.url + "/tokenizer_info", params={"model": "nope"}), 404, "model_not_found")
    ids = httpx.post(multi.url + "/tokenize", json={"model": "other@v1", "prompt": "KING:"}).json()["tokens"]
    assert ids == models["other@v1"].vocab.encode("KING:")


def test_the_openai_client_lists_every_model_and_uses_each(multi, models):
    client = openai.OpenAI(base_url=multi.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    listed = [m.id for m in client.models.list()]
    assert listed == REFS
    for ref in listed:
        r = client.completions.create(model=ref, prompt="QUEEN:", max_tokens=30, seed=4)
        assert r.model == ref and r.choices[0].text == expected(models, ref, "QUEEN:", 30, 4)
        chat = client.chat.completions.create(model=ref, messages=[{"role": "user", "content": "Good morrow."}], max_tokens=5,
                                              extra_body={"speakers": {"user": "KING", "assistant": "QUEEN"}})
        assert chat.model == ref
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="nope", prompt="A", max_tokens=1)
    assert err.value.code == "model_not_found" and err.value.param == "model"


def test_metrics_carry_the_model(multi):
    before = multi.metric("charlstm_generated_tokens_total", 'model="other@v1"')
    gen(multi, model="other@v1", prompt="A", max_new_tokens=12)
    assert multi.metric("charlstm_generated_tokens_total", 'model="other@v1"') == before + 12
    assert multi.metric("charlstm_streams_finished_total", 'model="other@v1",reason="length"') >= 1
    assert multi.metric("charlstm_model_loaded", 'model="other@v1"') == 1


# ---------------------------------------------------------------- sessions

def test_a_session_belongs_to_the_model_it_was_created_on(multi, models):
    url = multi.url
    created = httpx.post(url + "/sessions", json={"model": "other@v1", "prompt": "KING:", "seed": 5}).json()
    sid = created["session_id"]
    assert created["model"] == "other@v1" and httpx.get(f"{url}/sessions/{sid}").json()["model"] == "other@v1"
    first = httpx.post(f"{url}/sessions/{sid}/generate", json={"max_new_tokens": 30}).json()  # its model, unnamed
    assert first["model"] == "other@v1" and first["text"] == expected(models, "other@v1", "KING:", 30, 5)
    assert httpx.post(f"{url}/sessions/{sid}/generate", json={"model": "other", "max_new_tokens": 3}).status_code == 200
    assert_error(httpx.post(f"{url}/sessions/{sid}/generate", json={"model": "tiny@v1", "max_new_tokens": 3}), 409,
                 "model_mismatch", "model")
    assert_error(httpx.post(url + "/score", json={"session_id": sid, "model": "tiny@v1", "text": "KING"}), 409, "model_mismatch")
    assert httpx.post(url + "/score", json={"session_id": sid, "text": "KING"}).status_code == 200
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    with pytest.raises(openai.ConflictError):
        client.completions.create(model="tiny@v1", prompt="", max_tokens=3, extra_body={"session_id": sid})
    assert client.completions.create(model="other@v1", prompt="", max_tokens=3, extra_body={"session_id": sid}).model == "other@v1"

    export = httpx.get(f"{url}/sessions/{sid}/export").json()
    assert export["model"] == "other@v1"
    assert_error(httpx.post(url + "/sessions/import", json={"data": export["data"], "model": "tiny@v1"}), 409, "model_mismatch", "data")
    imported = httpx.post(url + "/sessions/import", json={"data": export["data"]})  # the blob names its weights
    assert imported.status_code == 201 and imported.json()["model"] == "other@v1"
    again = httpx.post(f"{url}/sessions/{imported.json()['session_id']}/generate", json={"max_new_tokens": 20}).json()
    original = httpx.post(f"{url}/sessions/{sid}/generate", json={"max_new_tokens": 20}).json()
    assert again["text"] == original["text"] and again["model"] == "other@v1"


# ---------------------------------------------------------------- loading and unloading

def test_a_model_loads_on_first_use_and_stays(models_store):
    srv = Server(models_store, model="", models="all", max_loaded_models=3, model_keep_alive_s=-1)
    try:
        assert loaded_now(srv) == {"other@v1": False, "tiny@v1": False, "tiny@v2": True}  # the default, at start
        assert srv.metric("charlstm_model_load_seconds_count", 'model="other@v1"') == 0
        gen(srv, model="other@v1", prompt="A", max_new_tokens=3)
        gen(srv, model="other@v1", prompt="A", max_new_tokens=3)
        assert loaded_now(srv)["other@v1"] is True
        assert srv.metric("charlstm_model_load_seconds_count", 'model="other@v1"') == 1  # loaded once
    finally:
        srv.stop()


class Streaming:
    """A long stream on `model` read in a thread until the block ends (a client that stops reading would be
    cut off by the server's send timeout, and its model would idle)."""

    def __init__(self, server, model: str):
        self.url, self.model = server.url + "/generate", model
        self.first, self.stop = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)

    def _read(self) -> None:
        with httpx.Client(timeout=60) as client, connect_sse(
                client, "POST", self.url, json={"model": self.model, "max_new_tokens": 1_000_000, "stream": True}) as source:
            for sse in source.iter_sse():
                if sse.event == "token":
                    self.first.set()
                if self.stop.is_set():
                    return  # leaving closes the connection: the server cancels the stream

    def __enter__(self):
        self.thread.start()
        assert self.first.wait(60), f"no token from {self.model}"
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(60)


def test_an_idle_model_unloads_after_its_keep_alive_but_never_while_streaming(models_store):
    srv = Server(models_store, model="", models="all", max_loaded_models=3, model_keep_alive_s=0, max_new_tokens=1_000_000)
    try:
        with Streaming(srv, "other@v1"):
            # the sweeper unloads the idle default; the same sweep sees other@v1 streaming and keeps it
            wait_until(lambda: srv.metric("charlstm_model_unloads_total", 'model="tiny@v2",reason="keep_alive"') == 1,
                       what="the idle default to unload")
            assert loaded_now(srv)["other@v1"] is True
        wait_until(lambda: srv.metric("charlstm_model_unloads_total", 'model="other@v1",reason="keep_alive"') == 1,
                   what="other@v1 to unload once idle")
        assert loaded_now(srv)["other@v1"] is False
        gen(srv, model="other@v1", prompt="A", max_new_tokens=3)  # loads again
        assert srv.metric("charlstm_model_load_seconds_count", 'model="other@v1"') == 2
    finally:
        srv.stop()


def test_the_cap_unloads_the_least_recently_used_idle_model_and_refuses_when_none_is_idle(models_store, models):
    srv = Server(models_store, model="", models="all", max_loaded_models=2, model_keep_alive_s=-1, max_new_tokens=1_000_000)
    try:
        gen(srv, model="tiny@v1", prompt="A", max_new_tokens=3)  # tiny@v2 (the default) and tiny@v1 loaded
        gen(srv, model="tiny@v2", prompt="A", max_new_tokens=3)  # tiny@v1 is now the least recently used
        gen(srv, model="other@v1", prompt="A", max_new_tokens=3)
        assert srv.metric("charlstm_model_unloads_total", 'model="tiny@v1",reason="capacity"') == 1
        assert loaded_now(srv) == {"other@v1": True, "tiny@v1": False, "tiny@v2": True}
        with Streaming(srv, "other@v1"), Streaming(srv, "tiny@v2"):  # both loaded models busy
            refused = httpx.post(srv.url + "/generate", json={"model": "tiny@v1", "prompt": "A", "max_new_tokens": 3})
            assert_error(refused, 503, "too_many_models")
            assert refused.headers["retry-after"] == "1"
        body = wait_until(lambda: _ok_or_none(srv, model="tiny@v1", prompt="KING:", max_new_tokens=20, seed=2),
                          what="tiny@v1 to load once a model is idle")
        assert body["text"] == expected(models, "tiny@v1", "KING:", 20, 2)
    finally:
        srv.stop()


def _ok_or_none(server, **body):
    r = httpx.post(server.url + "/generate", json=body, timeout=60)
    return r.json() if r.status_code == 200 else None


# ---------------------------------------------------------------- the store changes under a running server

def test_reload_serves_a_model_saved_while_running_and_set_default_takes_effect(own_models, play_file, tmp_path):
    srv = Server(own_models, model="", models="all")
    try:
        assert_error(httpx.post(srv.url + "/generate", json={"model": "late", "prompt": "A"}), 404, "model_not_found")
        run_training(tiny_config(play_file, tmp_path / "late-run", own_models, name="late", steps=30, seed=9))
        assert_error(httpx.post(srv.url + "/generate", json={"model": "late", "prompt": "A"}), 404, "model_not_found")
        reload = httpx.post(srv.url + "/admin/models/reload").json()
        assert reload["added"] == ["late@v1"] and reload["removed"] == [] and "late@v1" in reload["models"]
        late = store.load("late", own_models)
        body = gen(srv, model="late", prompt="KING:", max_new_tokens=25, seed=6)
        assert body["model"] == "late@v1"
        assert body["text"] == "".join(reference_text(late.model, late.vocab, "KING:", 25, seed=6))
        assert gen(srv, prompt="A", max_new_tokens=1)["model"] == "tiny@v2"
        subprocess.run([sys.executable, "-m", "service.cli", "models", "--store", str(own_models), "--set-default", "late"],
                       cwd=ROOT, check=True, capture_output=True)
        # no restart, no reload: the server reads the store's default within a second, never on a request
        wait_until(lambda: gen(srv, prompt="A", max_new_tokens=1)["model"] == "late@v1", what="the new default followed")
        assert json.loads((own_models / "default.json").read_text())["model"] == "late"
    finally:
        srv.stop()


def test_a_server_of_the_default_model_alone_follows_set_default(own_models):
    srv = Server(own_models, model="")  # models unset: the store's default alone
    try:
        assert [m["id"] for m in httpx.get(srv.url + "/v1/models").json()["data"]] == ["tiny@v2"]
        assert_error(httpx.post(srv.url + "/generate", json={"model": "other", "prompt": "A"}), 404, "model_not_found")
        store.set_default("other", own_models)
        wait_until(lambda: gen(srv, prompt="A", max_new_tokens=1)["model"] == "other@v1", what="the new default followed")
    finally:
        srv.stop()


# ---------------------------------------------------------------- the cores, shared between engines

def test_the_next_turn_goes_to_the_engine_that_has_had_least():
    now = [0.0]
    share = ComputeShare(clock=lambda: now[0])
    with share.turn(1):
        now[0] += 5.0  # engine 1 has had 5 s
    with share.turn(2):
        now[0] += 1.0  # engine 2 has had 1 s
    holding, release, order = threading.Event(), threading.Event(), []

    def hold():
        with share.turn(3):
            holding.set()
            release.wait(30)

    def take(key):
        with share.turn(key):
            order.append(key)

    threads = [threading.Thread(target=hold)]
    threads[0].start()
    assert holding.wait(30)
    for key in (1, 2):  # 1 queues first, 2 is owed more
        threads.append(threading.Thread(target=take, args=(key,)))
        threads[-1].start()
        wait_until(lambda: share.waiting() == key, what=f"engine {key} to queue")
    release.set()
    for t in threads:
        t.join(30)
    assert order == [2, 1]


def test_an_engine_back_from_idle_gets_no_credit_for_the_time_away():
    now = [0.0]
    share = ComputeShare(clock=lambda: now[0])
    with share.turn(1):
        now[0] += 100.0
    holding, release = threading.Event(), threading.Event()

    def hold():
        with share.turn(1):
            holding.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    assert holding.wait(30)
    def arrive():
        with share.turn(7):
            pass

    newcomer = threading.Thread(target=arrive)
    newcomer.start()
    wait_until(lambda: share.waiting() == 1, what="the new engine to queue")
    assert share.used()[7] == 100.0  # starts level with the busy engine, not 100 s ahead of it
    release.set()
    holder.join(30)
    newcomer.join(30)
