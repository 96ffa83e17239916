"""TLS in front of a plain server, as stunnel does: for a Redis built without TLS (the bundled
Valkey), so the TLS tests run wherever the suite does. Clients see real TLS on the port."""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import threading

from tests.helpers.tls import TlsFiles


class TlsFront:
    """Accepts TLS on ``port`` and carries each connection to ``inner`` (plain, loopback), a
    thread per connection (one thread reads and writes both sides: an SSL socket is not to be
    used by two threads at once)."""

    def __init__(self, port: int, inner: int, files: TlsFiles) -> None:
        self.port, self.inner = port, inner
        self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._context.load_cert_chain(files.cert, files.key)
        self._listener = socket.create_server(("127.0.0.1", port), reuse_port=False)
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stopped = False

    def start(self) -> None:
        threading.Thread(target=self._accept, daemon=True).start()

    def stop(self) -> None:
        """Close the port and every connection carried."""
        with self._lock:
            self._stopped = True
            sockets = [self._listener, *self._open]
            self._open.clear()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            if not self._keep(conn):
                return
            threading.Thread(target=self._carry, args=(conn,), daemon=True).start()

    def _keep(self, sock: socket.socket) -> bool:
        with self._lock:
            if self._stopped:
                sock.close()
                return False
            self._open.add(sock)
            return True

    def _drop(self, *sockets: socket.socket) -> None:
        with self._lock:
            for sock in sockets:
                self._open.discard(sock)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.close()

    def _carry(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(10)
            tls = self._context.wrap_socket(conn, server_side=True)  # takes conn over
        except (OSError, ssl.SSLError):
            self._drop(conn)
            return
        try:
            tls.settimeout(None)
            inner = socket.create_connection(("127.0.0.1", self.inner))
        except OSError:  # the server is down (killed by a test): the client sees a close
            self._drop(conn, tls)
            return
        with self._lock:
            self._open.discard(conn)
        if not (self._keep(tls) and self._keep(inner)):
            self._drop(tls, inner)
            return
        with contextlib.suppress(OSError, ssl.SSLError, ValueError):
            _pump(tls, inner)
        self._drop(tls, inner)


def _pump(tls: ssl.SSLSocket, inner: socket.socket) -> None:
    """Both directions until either side closes."""
    while True:
        readable = [tls] if tls.pending() else select.select([tls, inner], [], [])[0]
        if tls in readable:
            data = tls.recv(65536)
            if not data:
                return
            inner.sendall(data)
        if inner in readable:
            data = inner.recv(65536)
            if not data:
                return
            tls.sendall(data)
