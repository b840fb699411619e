"""A toggleable TCP proxy on loopback, for fault tests: S3 or Redis outages without losing the
server's state (moto keeps everything in memory, so stopping it would lose the buckets).

    proxy = TcpProxy(target_port=moto.port).start()   # point the worker at proxy.url
    proxy.down()      # every open connection is reset; new ones are reset at once
    proxy.up()        # traffic flows again
    proxy.block(rb"^(GET|HEAD) /inputs/")   # reset only connections sending such a request

``block`` matches each chunk the client sends that starts a request (HTTP clients write a
request head in one go, and a keep-alive connection sends the next request only after the
previous answer), so one kind of request can fail while the others go through. The proxy runs in
threads of the calling process; ``stats`` counts what it did.
"""

from __future__ import annotations

import re
import select
import socket
import struct
import threading
from dataclasses import dataclass

_CHUNK = 65536


@dataclass
class ProxyStats:
    """What the proxy did since it started."""

    connections: int = 0
    reset_while_down: int = 0
    blocked_requests: int = 0


def _reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0): the peer sees 'connection reset', as from a dying server."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class TcpProxy:
    """Forwards 127.0.0.1:port to target_host:target_port until told to fail."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1", port: int = 0) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", port), reuse_port=False)
        self.port = int(self._listener.getsockname()[1])
        self.stats = ProxyStats()
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._down = False
        self._pattern: re.Pattern[bytes] | None = None
        self._closed = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> TcpProxy:
        threading.Thread(target=self._accept_loop, name=f"proxy-{self.port}", daemon=True).start()
        return self

    def down(self) -> None:
        """Start an outage: reset every open connection and every new one."""
        with self._lock:
            self._down = True
            victims = list(self._open)
        for sock in victims:
            _reset(sock)

    def up(self) -> None:
        """End the outage (and any block)."""
        with self._lock:
            self._down = False
            self._pattern = None

    def block(self, pattern: bytes) -> None:
        """Reset a connection when the client sends a request matching ``pattern`` (a regex)."""
        with self._lock:
            self._pattern = re.compile(pattern)

    def close(self) -> None:
        self._closed.set()
        self.down()
        self._listener.close()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.stats.connections += 1
                down = self._down
                if down:
                    self.stats.reset_while_down += 1
            if down:
                _reset(client)
                continue
            threading.Thread(target=self._pump, args=(client,), daemon=True).start()

    def _pump(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            _reset(client)
            return
        with self._lock:
            self._open.update((client, upstream))
        refused = False
        try:
            refused = self._relay(client, upstream)
        finally:
            with self._lock:
                self._open.difference_update((client, upstream))
            for sock in (client, upstream):
                if refused:
                    _reset(sock)
                else:
                    sock.close()

    def _relay(self, client: socket.socket, upstream: socket.socket) -> bool:
        """Copy bytes both ways until both sides are done; True when the proxy cut the link.

        An end of stream from one side is passed on as a half-close (FIN), never as a reset, so
        an answer followed by ``Connection: close`` still reaches the client whole.
        """
        peers = {client: upstream, upstream: client}
        open_readers = [client, upstream]
        while open_readers and not self._closed.is_set():
            try:
                readable, _, _ = select.select(open_readers, [], [], 0.5)
                for sock in readable:
                    data = sock.recv(_CHUNK)
                    if sock is client and data and self._refuse(data):
                        return True
                    if data:
                        peers[sock].sendall(data)
                        continue
                    open_readers.remove(sock)
                    peers[sock].shutdown(socket.SHUT_WR)
            except (OSError, ValueError):  # reset by down(), or by a peer
                return True
        return False

    def _refuse(self, data: bytes) -> bool:
        with self._lock:
            if self._down:
                return True
            if self._pattern is not None and self._pattern.search(data):
                self.stats.blocked_requests += 1
                return True
        return False
