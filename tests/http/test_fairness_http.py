"""Fairness between clients through a real server (service/engine/fairness.py, service/api/identity.py):
a client is served ahead of another's backlog, a flooding client's 429 is its own, a client back from
idle is lifted, weights share the rows, and named keys drive the session quotas, limits and metrics.
Clients come from different loopback addresses (127.0.0.2, 127.0.0.3), which Linux routes like 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from ..server import Server
from .test_api import assert_error

KEYS = {"alice": "alice-key-0123456789", "bob": "bob-key-0123456789ab", "carol": "carol-key-0123456789"}


def client(address: str, key: str | None = None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {KEYS[key]}"} if key else None
    return httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(local_address=address), timeout=120, headers=headers)


class Completions:
    """Who finished, in order; a waiter for a count."""

    def __init__(self):
        self.order: list[str] = []
        self.changed = asyncio.Event()

    async def generate(self, http: httpx.AsyncClient, url: str, who: str, chars: int, seed: int) -> int:
        r = await http.post(url + "/generate", json={"prompt": "KING:\n", "max_new_tokens": chars, "seed": seed})
        if r.status_code == 200:
            self.order.append(who)
            self.changed.set()
        return r.status_code

    async def until(self, count) -> None:
        while not count(self.order):
            self.changed.clear()
            await asyncio.wait_for(self.changed.wait(), 120)


async def until_waiting(url: str, at_least: int) -> None:
    """Poll /ready until the engine holds `at_least` waiting streams (a condition, with a deadline)."""
    async with httpx.AsyncClient(timeout=5) as http:
        deadline = time.monotonic() + 60
        while (await http.get(url + "/ready")).json()["waiting"] < at_least:
            assert time.monotonic() < deadline, "the requests never queued"
            await asyncio.sleep(0.02)


@pytest.fixture(scope="module")
def narrow(trained_store):
    """Two rows: whoever gets the next free row is the scheduler's choice."""
    srv = Server(trained_store, max_batch_size=2, max_queue=64, max_rows_per_request=1)
    yield srv
    srv.stop()


def test_a_client_is_served_ahead_of_another_clients_backlog_and_lifted_from_idle(narrow):
    async def scenario():
        done = Completions()
        async with client("127.0.0.2") as a, client("127.0.0.3") as b:
            flood = [asyncio.create_task(done.generate(a, narrow.url, "A", 40, i)) for i in range(30)]
            await until_waiting(narrow.url, 26)
            await done.until(lambda order: len(order) >= 10)  # A alone: 10 served, its counter well above B's 0
            mark = len(done.order)
            late = [asyncio.create_task(done.generate(b, narrow.url, "B", 40, i)) for i in range(10)]
            statuses = await asyncio.gather(*flood, *late)
        return statuses, done.order, mark

    statuses, order, mark = asyncio.run(scenario())
    assert statuses == [200] * 40
    after = order[mark:]
    last_b = max(i for i, who in enumerate(after) if who == "B")
    assert after[: last_b + 1].count("A") <= 15  # B's ten were in ahead of A's backlog (FIFO: all of A's 20 first)
    # lifted to A's counter, B shares the rows with A (unlifted, its 0 would have taken every row for ten requests)
    assert after[:12].count("A") >= 4 and after[:12].count("B") >= 4


def test_the_queue_shares_429_goes_to_the_flooding_client_only(trained_store):
    srv = Server(trained_store, max_batch_size=2, max_queue=4, max_rows_per_request=1)  # bound: 6 requests

    async def scenario():
        async with client("127.0.0.2") as a, client("127.0.0.3") as b:
            body = {"prompt": "KING:\n", "max_new_tokens": 4000, "stream": True}
            short = {"prompt": "KING:\n", "max_new_tokens": 5}
            held = []

            async def hold(http) -> int:  # a stream accepted and held open (its status comes before any character)
                cm = http.stream("POST", srv.url + "/generate", json=body)
                held.append(cm)
                return (await cm.__aenter__()).status_code

            try:
                filled = [await hold(a) for _ in range(6)]  # A fills the bound: 2 rows, 4 waiting
                alone = await a.post(srv.url + "/generate", json=short)
                mine = [await hold(b) for _ in range(3)]  # B is let in past the bound, within its share (3 of 6)
                beyond = await b.post(srv.url + "/generate", json=short)
                refused = await a.post(srv.url + "/generate", json=short)
            finally:
                for cm in held:
                    await cm.__aexit__(None, None, None)
            return filled, alone, mine, beyond, refused

    try:
        filled, alone, mine, beyond, refused = asyncio.run(scenario())
        assert filled == [200] * 6 and mine == [200] * 3
        assert_error(alone, 429, "overloaded")  # alone, A meets the bound as before
        assert "its share" not in alone.json()["error"]["message"]
        for r in (beyond, refused):  # each beyond its share of 6: B holds 3, A 6 (or 5, if one stream ended)
            assert_error(r, 429, "overloaded")
            assert "its share is 3" in r.json()["error"]["message"] and r.headers["retry-after"]
        assert srv.metric("charlstm_client_refusals_total", 'reason="over_share"') == 2
        assert srv.metric("charlstm_client_refusals_total", 'reason="overloaded"') == 1
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def keyed(trained_store, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.json"
    keys.write_text(json.dumps({"keys": [{"name": "alice", "key": KEYS["alice"], "weight": 3},
                                         {"name": "bob", "key": KEYS["bob"]},
                                         {"name": "carol", "sha256": __import__("hashlib").sha256(KEYS["carol"].encode()).hexdigest(),
                                          "max_requests": 1}]}))
    srv = Server(trained_store, api_keys_file=keys, protect_metrics="false", max_batch_size=1, max_queue=64,
                 session_create_burst=2, session_create_rate=0.1)
    yield srv
    srv.stop()


def test_weights_share_the_rows_in_their_ratio(keyed):
    async def scenario():
        done = Completions()
        async with client("127.0.0.2", "bob") as bob, client("127.0.0.3", "alice") as alice:
            first = [asyncio.create_task(done.generate(bob, keyed.url, "bob", 300, i)) for i in range(20)]
            await until_waiting(keyed.url, 15)  # bob first: arrival order would serve him first
            second = [asyncio.create_task(done.generate(alice, keyed.url, "alice", 300, i)) for i in range(20)]
            await asyncio.gather(*first, *second)
        return done.order

    order = asyncio.run(scenario())
    assert 9 <= order[:16].count("alice") <= 13  # weight 3 against 1: about 12 of 16 (arrival order: none)


def test_named_keys_drive_the_session_quota_the_request_limit_and_the_metrics(keyed):
    async def scenario():
        async with client("127.0.0.2", "alice") as here, client("127.0.0.3", "alice") as there, \
                client("127.0.0.4", "bob") as bob, client("127.0.0.5", "carol") as carol, client("127.0.0.6") as nobody:
            made = [(await http.post(keyed.url + "/sessions", json={})).status_code for http in (here, there, here)]
            theirs = (await bob.post(keyed.url + "/sessions", json={})).status_code
            body = {"prompt": "KING:\n", "max_new_tokens": 4000, "stream": True}
            async with carol.stream("POST", keyed.url + "/generate", json=body) as holding:
                assert holding.status_code == 200
                second = await carol.post(keyed.url + "/generate", json={"prompt": "KING:\n", "max_new_tokens": 3})
            unknown = await nobody.post(keyed.url + "/generate", json={"prompt": "KING:\n"})
            return made, theirs, second, unknown

    made, theirs, second, unknown = asyncio.run(scenario())
    assert made == [201, 201, 429]  # alice's bucket, whichever address she calls from
    assert theirs == 201  # bob's is his own
    assert_error(second, 429, "overloaded")
    assert "its limit" in second.json()["error"]["message"]
    assert_error(unknown, 401, "unauthorized")
    assert keyed.metric("charlstm_client_refusals_total", 'client="carol",reason="client_limit"') == 1
    assert keyed.metric("charlstm_client_generated_chars_total", 'client="alice"') > 0
    assert keyed.metric("charlstm_client_generated_chars_total", 'client="carol"') > 0
    assert keyed.metric("charlstm_client_queue_time_seconds_count", 'client="bob"') >= 1
    assert keyed.metric("charlstm_client_generated_chars_total", 'client="anonymous"') == 0
