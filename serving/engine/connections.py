"""An engine's side of the wire: a listening Unix stream socket at its address and one connection
per front-end, all in one selector with whatever else wakes the loop (the device thread's pipe).

    connections = Connections("/tmp/rnnserve-x/engine-0.sock", spin_s=0.001)
    connections.watch(device.done, device.woken)
    arrived, gone = connections.poll(timeout_s, spin)  # [(front-end, frame)], [front-ends that left]
    connections.send(frontend, payload)          # one frame (serving/common/frames.py)

A front-end is an opaque key (bytes, as a socket identity was): the engine files its requests,
generations and replies under it. Sending never blocks the loop: what the kernel does not take at
once (a big frame, a slow reader) waits in that connection's buffer, in order, and goes out as the
socket drains. A front-end that closes its connection, or dies, is forgotten here and reported
gone; a reply still addressed to it is dropped.

Asked to spin, a poll that follows work keeps looking for up to spin_s before it sleeps: a request
that comes meanwhile is taken at once. A sleeping process is woken by the kernel, and on a virtual
machine a halted CPU's wake-up and its cold caches cost a one-request turn as much as its loop does
(docs/benchmarks.md).
"""
import itertools
import os
import selectors
import socket
import time
from collections.abc import Callable

from serving.common.frames import Frames, pack, socket_path

READ_BYTES = 1 << 18


class Connection:
    def __init__(self, sock: socket.socket, key: bytes):
        self.socket, self.key = sock, key
        self.frames = Frames()
        self.unsent = bytearray()  # frames the kernel has not taken yet, in order


class Connections:
    def __init__(self, address: str, spin_s: float = 0.0):
        self.path, self.spin_s = socket_path(address), spin_s
        self.lately = False  # whether the last poll found anything: only then does the next one spin
        self.selector = selectors.DefaultSelector()
        self.listener: socket.socket | None = None
        self.open: dict[bytes, Connection] = {}
        self.keys = itertools.count(1)

    def listen(self):
        """Bind the address (a dead engine's socket file there is removed first) and take connections."""
        if os.path.exists(self.path):
            os.unlink(self.path)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(128)
        self.listener.setblocking(False)
        self.selector.register(self.listener, selectors.EVENT_READ)

    def watch(self, fd: int, ready: Callable[[], None]):
        """Wake the loop when fd is readable, and call ready()."""
        self.selector.register(fd, selectors.EVENT_READ, ready)

    def poll(self, timeout_s: float, spin: bool = False) -> tuple[list[tuple[bytes, memoryview]], list[bytes]]:
        """Sleep until something arrives (at most timeout_s; 0: just look; spin: look for spin_s
        first), then take it: the frames that arrived, each with its front-end, in order, and the
        front-ends that left."""
        arrived, gone = [], []
        for key, events in self.ready(timeout_s, spin):
            if key.fileobj is self.listener:
                self.accept()
            elif callable(key.data):
                key.data()
            else:
                connection = key.data
                if events & selectors.EVENT_WRITE and not self.write(connection):
                    gone.append(connection.key)
                elif events & selectors.EVENT_READ and not self.read(connection, arrived):
                    gone.append(connection.key)
        for frontend in gone:
            self.drop(frontend)
        return arrived, gone

    def ready(self, timeout_s: float, spin: bool) -> list:
        """What the selector has for the loop: asked to spin after a poll that found something,
        looked for without sleeping for spin_s (at most timeout_s), then waited for until timeout_s
        is up. A poll that found nothing does not spin the next time: an idle engine sleeps."""
        started = now = time.perf_counter()
        spin_until = started + min(self.spin_s, timeout_s) if spin and self.lately else started
        while now < spin_until:
            if ready := self.selector.select(0):
                break
            now = time.perf_counter()
        else:
            ready = self.selector.select(max(0.0, timeout_s - (now - started)))
        self.lately = bool(ready)
        return ready

    def accept(self):
        while True:
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            sock.setblocking(False)
            connection = Connection(sock, b"\0" + next(self.keys).to_bytes(4, "big"))
            self.open[connection.key] = connection
            self.selector.register(sock, selectors.EVENT_READ, connection)

    def read(self, connection: Connection, arrived: list) -> bool:
        """Everything the socket holds, cut into frames; False once the front-end has left (read to
        the end: a front-end that sent and left is forgotten before what it sent is run)."""
        while True:
            try:
                data = connection.socket.recv(READ_BYTES)
            except BlockingIOError:
                return True
            except OSError:
                return False
            if not data:
                return False
            arrived += [(connection.key, frame) for frame in connection.frames.feed(data)]

    def send(self, frontend: bytes, payload: bytes):
        """One frame to a front-end (dropped if it has left): written now as far as the kernel
        takes it, the rest when its socket drains."""
        connection = self.open.get(frontend)
        if connection is None:
            return
        frame = pack(payload)
        if connection.unsent:  # behind what is waiting already
            connection.unsent += frame
            return
        try:
            sent = connection.socket.send(frame)
        except BlockingIOError:
            sent = 0
        except OSError:  # it left: the next poll reads its end
            return
        if sent < len(frame):
            connection.unsent += memoryview(frame)[sent:]
            self.selector.modify(connection.socket, selectors.EVENT_READ | selectors.EVENT_WRITE, connection)

    def write(self, connection: Connection) -> bool:
        """More of what waits for a slow reader; False once the front-end has left."""
        try:
            sent = connection.socket.send(connection.unsent)
        except BlockingIOError:
            return True
        except OSError:
            return False
        del connection.unsent[:sent]
        if not connection.unsent:
            self.selector.modify(connection.socket, selectors.EVENT_READ, connection)
        return True

    def drop(self, frontend: bytes):
        connection = self.open.pop(frontend, None)
        if connection is not None:
            self.selector.unregister(connection.socket)
            connection.socket.close()

    def close(self):
        """Every connection and the listener closed, the socket file removed."""
        for frontend in list(self.open):
            self.drop(frontend)
        if self.listener is not None:
            self.selector.unregister(self.listener)
            self.listener.close()
            self.listener = None
            if os.path.exists(self.path):
                os.unlink(self.path)
        self.selector.close()
