"""A loopback TCP proxy that can fail on purpose: in front of the S3 server, it stands for the network and the
store going away. ``outage(seconds)`` resets every open connection, then refuses new ones (the listening socket is
closed) for the first half and accepts-and-resets them for the second, then forwards again."""

from __future__ import annotations

import socket
import struct
import threading
import time


def _reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0) rather than FIN: the peer sees 'connection reset by peer'. SHUT_RD first wakes
    a pipe thread blocked in recv() on it: until that call returns the kernel keeps the connection open, and a
    plain close() from here would leave the peer waiting for an answer that never comes."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RD)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


class ChaosProxy:
    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.lock = threading.Lock()
        self.conns: list[socket.socket] = []
        self.mode = "up"  # "up", "refuse" (nothing listens) or "reset" (accept, then RST)
        self.refused_or_reset = 0
        self._listener = self._listen(0)
        self.port = self._listener.getsockname()[1]
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, daemon=True, name="chaos-accept")
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _listen(self, port: int) -> socket.socket:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen(64)
        s.settimeout(0.1)
        return s

    def _accept_loop(self) -> None:
        while not self._closed:
            with self.lock:
                listener = self._listener
            if listener is None:
                time.sleep(0.02)
                continue
            try:
                client, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            if self.mode != "up":
                self.refused_or_reset += 1
                _reset(client)
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                _reset(client)
                continue
            with self.lock:
                self.conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            src.settimeout(None)
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def go_down(self, mode: str) -> None:
        """Reset every open connection; then 'refuse' (stop listening) or 'reset' (accept and RST)."""
        with self.lock:
            conns, self.conns = self.conns, []
            self.mode = mode
            if mode == "refuse" and self._listener is not None:
                self._listener.close()
                self._listener = None
            elif mode == "reset" and self._listener is None:
                self._listener = self._listen(self.port)
        for c in conns:
            _reset(c)

    def come_up(self) -> None:
        with self.lock:
            if self._listener is None:
                self._listener = self._listen(self.port)
            self.mode = "up"

    def outage(self, seconds: float) -> threading.Thread:
        """In the background: refuse for half of ``seconds``, accept-and-reset for the other half, then recover."""

        def run() -> None:
            self.go_down("refuse")
            time.sleep(seconds / 2)
            self.go_down("reset")
            time.sleep(seconds / 2)
            self.come_up()

        thread = threading.Thread(target=run, daemon=True, name="chaos-outage")
        thread.start()
        return thread

    def close(self) -> None:
        self._closed = True
        self.go_down("refuse")
