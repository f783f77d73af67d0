"""Network faults on loopback for the store tests: a server that accepts connections and never answers
(a hanging Redis), and a proxy in front of a real redis-server that forwards a chosen command and cuts
the connection before its reply (a lost reply, which redis-py answers by sending the command again).
Both listen on 127.0.0.1 only and close everything they opened when closed."""

from __future__ import annotations

import socket
import threading



class Silent:
    """Accepts every connection, reads what comes and never writes a byte."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.conns: list[socket.socket] = []
        self.closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._swallow, args=(conn,), daemon=True).start()

    @staticmethod
    def _swallow(conn: socket.socket) -> None:
        try:
            while conn.recv(65536):
                pass
        except OSError:
            pass

    def close(self) -> None:
        self.closed.set()
        self.sock.close()
        for c in self.conns:
            c.close()


class ReplyDropper:
    """Forwards to `upstream_port`; once armed with a marker, the first client command holding it is
    forwarded, its reply read from upstream and thrown away, and both connections are cut."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.marker: bytes | None = None
        self.dropped = threading.Event()
        self.lock = threading.Lock()
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self, marker: bytes) -> None:
        with self.lock:
            self.marker, self.dropped = marker, threading.Event()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            self.conns += [client, upstream]
            cutting = threading.Event()  # set before the marked command goes up: its reply must not come down
            threading.Thread(target=self._up, args=(client, upstream, cutting), daemon=True).start()
            threading.Thread(target=self._down, args=(upstream, client, cutting), daemon=True).start()

    def _up(self, client: socket.socket, upstream: socket.socket, cutting: threading.Event) -> None:
        try:
            while data := client.recv(65536):
                with self.lock:
                    if self.marker is not None and self.marker in data:
                        self.marker = None
                        cutting.set()
                upstream.sendall(data)
                if cutting.is_set():
                    return
        except OSError:
            pass

    def _down(self, upstream: socket.socket, client: socket.socket, cutting: threading.Event) -> None:
        try:
            while data := upstream.recv(65536):
                if cutting.is_set():  # the marked command's reply: it ran, and the client never hears so
                    for s in (client, upstream):
                        try:
                            s.shutdown(socket.SHUT_RDWR)
                        except OSError:
                            pass
                        s.close()
                    self.dropped.set()
                    return
                client.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            try:
                c.close()
            except OSError:
                pass
