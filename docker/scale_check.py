"""The through-nginx checks of the scaled stack (docker/smoke_scale.sh runs this with the repo's venv).

1. 50 session calls through nginx, spread over the replicas by round robin, give exactly the text of
   the same calls on one replica alone, and every replica served some of them.
2. Clients call their own sessions through nginx (streaming) while one replica is killed mid-run:
   every call ends (done, an error status or a broken stream, never a hang), only calls in flight on
   the killed replica fail, and every session holds exactly its successful calls: replaying them on
   a surviving replica gives the same text. A call cut by the kill after its commit landed (the
   replica died between committing and sending `done`) is in the session whole or not at all: the
   session's position says which, and the replay replays it without knowing its text.
3. The bounded soak's mix (tests/soak.py) runs through nginx on the two surviving replicas: the books
   balance, summed over them.

Loopback only. Exits non-zero on a failed check. The stack has an API key: every call sends
$CHARLSTM_API_KEY (its /metrics too).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import sys
import time
from urllib.parse import urlparse

import httpx

from service.metrics import sample_sum

ROUTE = 'charlstm_requests_total{method="POST",route="/sessions/{session_id}/generate",status="200"}'
AUTH = {"Authorization": f"Bearer {os.environ['CHARLSTM_API_KEY']}"} if os.environ.get("CHARLSTM_API_KEY") else {}


def log(msg: str) -> None:
    print(f"[scale] {msg}", file=sys.stderr, flush=True)


def served(replica: str) -> float:
    for line in httpx.get(replica + "/metrics", timeout=10, headers=AUTH).text.splitlines():
        if line.startswith(ROUTE + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def create(url: str, **body) -> str:
    r = httpx.post(url + "/sessions", json=body, timeout=60, headers=AUTH)
    r.raise_for_status()
    return r.json()["session_id"]


def call(url: str, sid: str, body: dict) -> str:
    r = httpx.post(f"{url}/sessions/{sid}/generate", json=body, timeout=60, headers=AUTH)
    assert r.status_code == 200, r.text
    return r.json()["text"]


def body_for(i: int) -> dict:
    return {"prompt": ["", " thou", "\nKING:", " and"][i % 4], "max_new_tokens": 10 + 5 * (i % 7), "temperature": [1.0, 0.7][i % 2]}


def check_continuity(nginx: str, replicas: list[str], calls: int) -> None:
    before = [served(r) for r in replicas]
    spread, alone = create(nginx, prompt="ROMEO:", seed=11), create(replicas[0], prompt="ROMEO:", seed=11)
    for i in range(calls):
        a, b = call(nginx, spread, body_for(i)), call(replicas[0], alone, body_for(i))
        assert a == b, f"call {i}: through nginx {a!r}, on one replica {b!r}"
    per = [served(r) - b for r, b in zip(replicas, before)]
    per[0] -= calls  # the reference calls went to the first replica directly
    assert sum(per) == calls and all(n > 0 for n in per), f"calls per replica {per}"
    log(f"{calls} session calls through nginx continue one another exactly; calls per replica {[int(n) for n in per]}")


async def client(http: httpx.AsyncClient, nginx: str, k: int, stop_at: float, out: dict) -> None:
    created = (await http.post(nginx + "/sessions", json={"prompt": "QUEEN:", "seed": 100 + k})).json()
    sid, position = created["session_id"], created["position"]
    done_calls: list[tuple[dict, str | None]] = []  # text None: committed, but the kill cut the client off first
    out["sessions"][sid] = (k, done_calls)
    i = 0
    while time.monotonic() < stop_at:
        body = {**body_for(i + k), "max_new_tokens": 150 + 10 * (i % 5), "stream": True}
        t0 = time.monotonic()
        text, outcome, done = "", None, None
        try:
            async with http.stream("POST", f"{nginx}/sessions/{sid}/generate", json=body) as r:
                if r.status_code != 200:
                    await r.aread()
                    outcome = f"status_{r.status_code}"
                else:
                    event = None
                    async for line in r.aiter_lines():
                        if line.startswith("event:"):
                            event = line[6:].strip()
                        elif line.startswith("data:") and event == "token":
                            text += json.loads(line[5:])["text"]
                        elif line.startswith("data:") and event == "done":
                            done = json.loads(line[5:])
                            outcome = outcome or "ok"  # an error event comes before its done
                        elif line.startswith("data:") and event == "error":
                            outcome = "error_event"
                    outcome = outcome or "stream_cut"
        except httpx.TimeoutException:
            outcome = "hang"
        except httpx.TransportError:
            outcome = "stream_cut"
        out["outcomes"].append((t0, time.monotonic(), outcome))
        if outcome == "ok":
            done_calls.append((body, text))
            position += len(body["prompt"]) + len(text)
            assert done["session"]["position"] == position, f"session {sid}: done says position {done['session']['position']}"
            i += 1
        elif outcome in ("stream_cut", "error_event"):
            if await landed(http, nginx, sid, body, position):
                done_calls.append((body, None))
                out["committed_cut"] += 1
                position += len(body["prompt"]) + body["max_new_tokens"]
                i += 1
        elif outcome == "status_409":
            await asyncio.sleep(0.5)  # the killed replica's lease on this session has not expired yet


async def landed(http: httpx.AsyncClient, nginx: str, sid: str, body: dict, before: int) -> bool:
    """After a cut call: the session's committed position says whether the call landed, whole
    (its prompt and every character it was asked for) or not at all. By the time a client sees the
    cut its replica is dead, so no commit can land later."""
    r = await http.get(f"{nginx}/sessions/{sid}")
    assert r.status_code == 200, r.text
    now = r.json()["position"]
    whole = before + len(body["prompt"]) + body["max_new_tokens"]
    assert now in (before, whole), f"session {sid}: position {now} after a cut call, neither {before} nor {whole}"
    return now == whole


def check_kill(nginx: str, replicas: list[str], clients: int, seconds: float, kill_after: float, kill: str) -> None:
    out: dict = {"sessions": {}, "outcomes": [], "committed_cut": 0}

    async def run():
        stop_at = time.monotonic() + seconds
        async with httpx.AsyncClient(timeout=httpx.Timeout(30.0), limits=httpx.Limits(max_connections=clients), headers=AUTH) as http:
            tasks = [asyncio.create_task(client(http, nginx, k, stop_at, out)) for k in range(clients)]
            await asyncio.sleep(kill_after)
            log(f"killing a replica: {kill}")
            out["kill_started"] = time.monotonic()
            proc = await asyncio.create_subprocess_exec(*shlex.split(kill))
            await proc.wait()
            out["killed_at"] = time.monotonic()  # the replica is dead by now; calls started earlier may have been on it
            await asyncio.gather(*tasks)

    asyncio.run(run())
    outcomes = out["outcomes"]
    tally: dict[str, int] = {}
    for _, _, o in outcomes:
        tally[o] = tally.get(o, 0) + 1
    log(f"{len(outcomes)} streaming session calls from {clients} clients: {tally}")
    assert "hang" not in tally, "a call hung"
    started, killed = out["kill_started"], out["killed_at"]
    failed = [(t0, t1, o) for t0, t1, o in outcomes if o not in ("ok", "status_409")]
    assert not [f for f in failed if f[1] < started], f"calls failed before the kill: {failed}"
    assert len(failed) <= clients, "more failures than calls in flight at the kill"
    late = [f for f in failed if f[0] > killed + 0.5]
    assert not late, f"calls started after the replica was dead failed: {late}"
    log(f"kill command took {killed - started:.1f} s")
    survivor = replicas[0]
    for sid, (k, calls) in out["sessions"].items():
        twin = create(survivor, prompt="QUEEN:", seed=100 + k)
        for body, text in calls:
            again = call(survivor, twin, {key: v for key, v in body.items() if key != "stream"})
            assert text is None or again == text, f"session {sid}: a successful call's text differs on replay"
    log(f"every session holds exactly its {sum(len(c) for _, c in out['sessions'].values())} committed calls; "
        f"{len(failed)} calls in flight on the killed replica ended with {sorted({f[2] for f in failed})}, "
        f"{out['committed_cut']} of them after their commit had landed")


def metric(replica: str, name: str, labels: str = "") -> float:
    """The sum of `name`'s samples whose labels include `labels` (a series by model is summed over models)."""
    return sample_sum(httpx.get(replica + "/metrics", timeout=10, headers=AUTH).text, name, labels)


def books(replicas: list[str]) -> dict[str, float]:
    """The counters the soak balances, summed over the replicas."""
    reasons = ("length", "stop", "cancelled", "shutdown", "error")
    return {
        "finished": sum(metric(r, "charlstm_streams_finished_total", f'reason="{x}"') for r in replicas for x in reasons),
        "cancelled": sum(metric(r, "charlstm_streams_finished_total", 'reason="cancelled"') for r in replicas),
        "errors": sum(metric(r, "charlstm_streams_finished_total", 'reason="error"') for r in replicas),
        "rejected": sum(metric(r, "charlstm_rejected_requests_total", 'reason="overloaded"') for r in replicas),
    }


def check_soak(nginx: str, survivors: list[str], clients: int, seconds: float) -> None:
    """The bounded soak's mix (tests/soak.py: plain, streaming, sessions, clients that drop mid-stream)
    through nginx on the surviving replicas: the books balance, summed over them."""
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))
    from tests.soak import worker

    from collections import Counter

    def drained() -> bool:
        return all(metric(r, "charlstm_running_streams") == 0 and metric(r, "charlstm_waiting_streams") == 0 for r in survivors)

    deadline = time.monotonic() + 30
    while not drained():
        assert time.monotonic() < deadline, "replicas did not drain before the soak"
        time.sleep(0.2)
    before = books(survivors)
    tally: Counter = Counter()
    sessions: list[str] = []
    rng = random.Random(0)
    stop_at = time.monotonic() + seconds

    async def drive():
        await asyncio.gather(*(worker(nginx, stop_at, random.Random(rng.random()), tally, sessions, AUTH) for _ in range(clients)))

    asyncio.run(drive())
    deadline = time.monotonic() + 30
    while not drained():
        assert time.monotonic() < deadline, "replicas did not drain after the soak"
        time.sleep(0.2)
    delta = {k: v - before[k] for k, v in books(survivors).items()}
    busy = [sid for sid in sessions if httpx.get(f"{nginx}/sessions/{sid}", timeout=10, headers=AUTH).json().get("busy")]
    fivexx = sum(v for k, v in tally.items() if k.startswith("status_5"))
    log(f"soak through nginx on {len(survivors)} replicas, {seconds:g} s, {clients} clients: accepted {tally['accepted']}, "
        f"completed {tally['completed']}, dropped {tally['disconnected']}, 429s {tally['status_429']}; replicas finished "
        f"{delta['finished']:.0f} streams, cancelled {delta['cancelled']:.0f}, rejected {delta['rejected']:.0f}")
    assert delta["finished"] == tally["accepted"], "streams finished on the replicas differ from those the clients had accepted"
    assert delta["cancelled"] <= tally["disconnected"], "more streams cancelled than clients dropped"
    assert delta["rejected"] == tally["status_429"], "429s seen differ from rejections counted"
    assert delta["errors"] == 0 and fivexx == 0, f"{delta['errors']:.0f} engine errors, {fivexx} 5xx"
    assert not busy, f"{len(busy)} sessions still leased"
    log("the books balance")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nginx", required=True)
    ap.add_argument("--replica", action="append", required=True, help="a replica's own URL; the last one is killed")
    ap.add_argument("--kill", required=True, help="command that kills the last replica")
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--clients", type=int, default=12)
    ap.add_argument("--seconds", type=float, default=25.0)
    ap.add_argument("--kill-after", type=float, default=8.0)
    ap.add_argument("--soak-seconds", type=float, default=30.0, help="then the soak's mix on the two survivors; 0: skip")
    ap.add_argument("--soak-clients", type=int, default=32)
    args = ap.parse_args()
    for url in [args.nginx, *args.replica]:
        if urlparse(url).hostname not in ("127.0.0.1", "localhost"):
            raise SystemExit("loopback only")
    check_continuity(args.nginx, args.replica, args.calls)
    check_kill(args.nginx, args.replica, args.clients, args.seconds, args.kill_after, args.kill)
    if args.soak_seconds:
        check_soak(args.nginx, args.replica[:-1], args.soak_clients, args.soak_seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
