"""Nothing acknowledged is lost when the server is killed: clients continue their sessions back to back,
the server gets SIGKILL mid-load, and after a restart every session stands at least where its client was
last told it stood (one call further at most: a call whose commit was made durable but whose answer
never left), and continues with the text an uninterrupted session gives."""

from __future__ import annotations

import signal
import threading

import httpx

from ..server import Server, wait_until

CLIENTS = 12
CALL = {"max_new_tokens": 16, "temperature": 0.9}
PROMPT = "KING:\n"


class Client(threading.Thread):
    """Continues its own session back to back until its server stops answering; keeps what was acknowledged."""

    def __init__(self, url: str, seed: int, progress: threading.Condition):
        super().__init__(daemon=True)
        self.url, self.seed, self.progress = url, seed, progress
        r = httpx.post(f"{url}/sessions", json={"prompt": PROMPT, "seed": seed}, timeout=30)
        assert r.status_code == 201 and r.json()["durable"] is not False, r.text
        self.sid = r.json()["session_id"]
        self.position = r.json()["position"]  # the last position an answer told this client
        self.texts: list[str] = []  # the text of every acknowledged call, in order
        self.failure: str | None = None

    def run(self) -> None:
        with httpx.Client(timeout=30) as http:
            while True:
                try:
                    r = http.post(f"{self.url}/sessions/{self.sid}/generate", json=CALL)
                except httpx.TransportError:
                    return  # the server is gone
                if r.status_code != 200:
                    self.failure = r.text
                    return
                body = r.json()
                if body["session"]["durable"] is not True:
                    self.failure = f"an answer that was not durable: {r.text}"
                    return
                with self.progress:
                    self.texts.append(body["text"])
                    self.position = body["session"]["position"]
                    self.progress.notify_all()


def run_until_killed(url: str, kill) -> list[Client]:
    """CLIENTS clients continue their sessions; once each has had 5 calls acknowledged, `kill()` the server."""
    progress = threading.Condition()
    clients = [Client(url, 4000 + i, progress) for i in range(CLIENTS)]
    for c in clients:
        c.start()
    with progress:
        assert progress.wait_for(lambda: all(len(c.texts) >= 5 for c in clients) or any(c.failure for c in clients),
                                 timeout=120), "the clients made no progress"
    kill()  # while every client has a call in flight or about to be
    for c in clients:
        c.join(timeout=60)
        assert not c.is_alive() and c.failure is None, c.failure
    return clients


def assert_nothing_acknowledged_was_lost(url: str, clients: list[Client]) -> None:
    for c in clients:
        meta = httpx.get(f"{url}/sessions/{c.sid}", timeout=10)
        assert meta.status_code == 200, meta.text
        position = meta.json()["position"]
        step = CALL["max_new_tokens"]
        assert position in (c.position, c.position + step), (c.sid, position, c.position)  # never behind what was acknowledged
        # an uninterrupted twin: the same calls up to that position give the acknowledged texts, then the same next text
        twin = httpx.post(f"{url}/sessions", json={"prompt": PROMPT, "seed": c.seed}, timeout=30).json()["session_id"]
        twin_texts = [httpx.post(f"{url}/sessions/{twin}/generate", json=CALL, timeout=30).json()["text"]
                      for _ in range((position - len(PROMPT)) // step)]
        assert twin_texts[: len(c.texts)] == c.texts
        after = httpx.post(f"{url}/sessions/{c.sid}/generate", json=CALL, timeout=30).json()["text"]
        assert after == httpx.post(f"{url}/sessions/{twin}/generate", json=CALL, timeout=30).json()["text"]


def test_a_killed_server_loses_no_acknowledged_session_call(trained_store, tmp_path):
    """The default store and fsync policy; the periodic snapshot is pushed out of the test's reach, so only
    the write before each answer can have saved what the restarted server finds."""
    db = tmp_path / "sessions.sqlite3"
    first = Server(trained_store, session_db=db, snapshot_interval_s=3600)
    try:
        clients = run_until_killed(first.url, lambda: first.stop(signal.SIGKILL))
    finally:
        first.stop(signal.SIGKILL)
    assert sum(len(c.texts) for c in clients) >= 5 * CLIENTS
    second = Server(trained_store, session_db=db)
    try:
        assert_nothing_acknowledged_was_lost(second.url, clients)
    finally:
        second.stop()


def test_a_killed_replica_loses_no_acknowledged_session_call(trained_store, redis_server):
    """Sessions in a real redis-server: a replica killed under load; another replica finds every session."""
    key = "durability-test-session-key-0123456789abcdef"
    doomed = Server(trained_store, session_store=redis_server.url, session_key=key, session_lease_s=2.0)
    try:
        clients = run_until_killed(doomed.url, lambda: doomed.stop(signal.SIGKILL))
    finally:
        doomed.stop(signal.SIGKILL)
    other = Server(trained_store, session_store=redis_server.url, session_key=key)
    try:
        for c in clients:  # a call the killed replica was running holds its session until its lease expires
            wait_until(lambda: not httpx.get(f"{other.url}/sessions/{c.sid}", timeout=10).json()["busy"], timeout=60,
                       what="the killed replica's lease to expire")
        assert_nothing_acknowledged_was_lost(other.url, clients)
    finally:
        other.stop()

