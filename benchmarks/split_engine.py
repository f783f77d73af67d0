"""Issue 38, item 3's experiment: the engine core in a process of its own, as vLLM v1 runs its EngineCore.

`engines(settings, deliver)` has the composition root's signature (service/server.py, `running`'s
`engines`): each model's engine runs in a spawned child process, built there exactly as the root builds
it in process (`server.engine_factory`), and the server holds a `ProcessEngine`, which answers the
HTTP layer as an `Engine` does. Over one pipe each way (multiprocessing's, pickled):

- the server sends `submit` (the requests, each with a listener number) and waits for the child's
  answer, since a refusal (queue full, shutting down) must reach the client before anything is sent;
  `cancel` and `shutdown` go without an answer;
- the child sends each look's events (the engine's `deliver`) with the engine observer calls made
  meanwhile (the metrics) and the engine's snapshot (what /ready and every request's check read).

It is the experiment, not a serving mode: constrained output's compiled automata, the device step and
the compute share between several models' engines are not carried over, and an engine that dies ends
its streams with an error and stays dead. `benchmarks/bench_split.py` measures it against the engine in
process; benchmarks/README.md says which won and why.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import threading
from collections.abc import Callable
from typing import Any

from service.engine.engine import EngineSnapshot, EngineStats
from service.engine.observers import Fanout
from service.engine.types import ANONYMOUS, Client, Done, EngineUnavailable, GenerationRequest

log = logging.getLogger("charlstm.split")


class _Recorder:
    """In the child: the engine's observer calls, kept until the next message to the server carries them."""

    def __init__(self) -> None:
        self._calls: list[tuple[str, tuple]] = []
        self._lock = threading.Lock()

    def __getattr__(self, name: str):
        if not name.startswith("on_"):
            raise AttributeError(name)

        def record(*args) -> None:
            with self._lock:
                self._calls.append((name, args))
        return record

    def take(self) -> list[tuple[str, tuple]]:
        with self._lock:
            out, self._calls = self._calls, []
        return out


def _child(conn, settings, loaded) -> None:
    """The engine's process: build the engine as the root does, then serve the server's commands."""
    from service.server import engine_factory

    send_lock = threading.Lock()
    recorder = _Recorder()
    streams: dict[int, Any] = {}
    holder: dict = {}

    def send(message) -> None:
        with send_lock:
            conn.send(message)

    def deliver(batch: list[tuple[int, list]]) -> None:  # on the engine thread, once a look
        for lid, events in batch:
            if events and isinstance(events[-1], Done):
                streams.pop(lid, None)
        send(("events", batch, recorder.take(), holder["engine"].snapshot()))

    engine, details = engine_factory(settings, deliver)(loaded, None)
    holder["engine"] = engine
    engine.add_observer(recorder)
    engine.start()
    send(("ready", details, engine.config, engine.snapshot()))
    while True:
        try:
            message = conn.recv()
        except EOFError:  # the server has gone
            engine.stop()
            return
        kind = message[0]
        if kind == "submit":
            _, token, requests, client = message
            try:
                got = engine.submit_all(requests, client)
                streams.update((lid, stream) for (_, lid), stream in zip(requests, got))
                error = None
            except Exception as e:  # a refusal: the server raises it to its caller
                error = e
            send(("submitted", token, error, engine.snapshot(), recorder.take()))
        elif kind == "cancel":
            stream = streams.get(message[1])
            if stream is not None:
                engine.cancel(stream)
        elif kind == "shutdown":
            engine.begin_shutdown(message[1])
        elif kind == "stop":
            engine.stop()
            send(("stopped",))
            return


class RemoteStream:
    """What `submit_all` hands back: the listener's number, which `cancel` names."""

    def __init__(self, lid: int) -> None:
        self.lid = lid


class ProcessEngine:
    """The server's side of an engine in another process: `Engine`'s face over the pipe."""

    def __init__(self, conn, process, deliver: Callable[[list], None], config, snapshot: EngineSnapshot) -> None:
        self.config = config
        self._conn, self._process, self._deliver = conn, process, deliver
        self._snapshot = snapshot
        self._ids = itertools.count()
        self._listeners: dict[int, Any] = {}
        self._answers: dict[int, list] = {}
        self._events = Fanout(EngineStats)  # the server's observers of this engine (the metrics)
        self._send_lock = threading.Lock()
        self._cv = threading.Condition()
        self._admitted = 0
        self._reader = threading.Thread(target=self._read, name="charlstm-engine-pipe", daemon=True)

    def start(self) -> None:
        self._reader.start()

    def _send(self, message) -> None:
        with self._send_lock:
            self._conn.send(message)

    def submit(self, request: GenerationRequest, listener: Any, client: Client = ANONYMOUS) -> RemoteStream:
        return self.submit_all([(request, listener)], client)[0]

    def submit_all(self, requests: list[tuple[GenerationRequest, Any]], client: Client = ANONYMOUS) -> list[RemoteStream]:
        lids = [next(self._ids) for _ in requests]
        token, answered = next(self._ids), threading.Event()
        self._answers[token] = answer = [answered, None]
        self._listeners.update((lid, listener) for lid, (_, listener) in zip(lids, requests))
        with self._cv:
            self._admitted += len(requests)
        try:
            self._send(("submit", token, [(request, lid) for lid, (request, _) in zip(lids, requests)], client))
        except OSError as e:
            answer[1] = EngineUnavailable(f"the engine's process is gone: {e}")
            answered.set()
        answered.wait()
        if answer[1] is not None:
            for lid in lids:
                self._listeners.pop(lid, None)
            with self._cv:
                self._admitted -= len(requests)
                self._cv.notify_all()
            raise answer[1]
        return [RemoteStream(lid) for lid in lids]

    def cancel(self, stream: RemoteStream) -> None:
        if stream.lid in self._listeners:
            self._send(("cancel", stream.lid))

    def snapshot(self) -> EngineSnapshot:
        return self._snapshot

    def idle(self) -> bool:
        with self._cv:
            return self._admitted == 0

    def wait_idle(self, timeout: float) -> bool:
        with self._cv:
            return self._cv.wait_for(lambda: self._admitted == 0, timeout)

    def add_observer(self, observer) -> None:
        self._events.observers.append(observer)

    def begin_shutdown(self, grace_s: float) -> None:
        try:
            self._send(("shutdown", grace_s))
        except OSError:
            pass

    def stop(self) -> None:
        try:
            self._send(("stop",))
        except OSError:
            pass
        self._reader.join(timeout=30)
        self._process.join(timeout=30)
        if self._process.is_alive():
            self._process.kill()

    def _replay(self, calls: list[tuple[str, tuple]]) -> None:
        for name, args in calls:
            getattr(self._events, name)(*args)

    def _read(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                self._died()
                return
            kind = message[0]
            if kind == "events":
                _, batch, calls, self._snapshot = message
                mapped, ended = [], 0
                for lid, events in batch:
                    listener = self._listeners.get(lid)
                    if listener is None:
                        continue
                    if events and isinstance(events[-1], Done):
                        del self._listeners[lid]
                        ended += 1
                    mapped.append((listener, events))
                self._deliver(mapped)
                self._replay(calls)
                if ended:
                    with self._cv:
                        self._admitted -= ended
                        self._cv.notify_all()
            elif kind == "submitted":
                _, token, error, self._snapshot, calls = message
                answer = self._answers.pop(token)
                answer[1] = error
                answer[0].set()
                self._replay(calls)
            elif kind == "stopped":
                return

    def _died(self) -> None:
        """The child is gone: every stream in flight ends with an error, every waiting submit is refused."""
        s = self._snapshot
        self._snapshot = EngineSnapshot(running=0, waiting=0, steps=s.steps, ready=False, draining=s.draining, failed=True)
        for answer in list(self._answers.values()):
            answer[1] = EngineUnavailable("the engine's process is gone")
            answer[0].set()
        gone = [(listener, [Done(text="", finish_reason="error", prompt_tokens=0, completion_tokens=0, seed=0,
                                 error="engine_error: the engine's process is gone")])
                for listener in self._listeners.values()]
        self._listeners.clear()
        self._deliver(gone)
        with self._cv:
            self._admitted = 0
            self._cv.notify_all()


def engines(settings, deliver: Callable[[list], None]):
    """The composition root's `engines`: each model's engine in a spawned process of its own."""

    def build(loaded, share):
        context = multiprocessing.get_context("spawn")
        ours, theirs = context.Pipe()
        process = context.Process(target=_child, args=(theirs, settings, loaded), name="charlstm-engine-core")
        process.start()
        theirs.close()
        kind, details, config, snapshot = ours.recv()  # the child's engine is built and started
        assert kind == "ready", kind
        loaded.drop_module()
        return ProcessEngine(ours, process, deliver, config, snapshot), details

    return build


if __name__ == "__main__":  # `charlstm serve` with every engine in a process of its own
    import functools
    import sys

    import service.server
    from service import cli

    service.server.build_app = functools.partial(service.server.build_app, engines=engines)
    sys.exit(cli.main(["serve", *sys.argv[1:]]))
