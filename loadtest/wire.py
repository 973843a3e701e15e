"""A blocking client of an engine's Unix socket, speaking frames (serving/common/frames.py) as a
front-end does: what loadtest's engine and transport measures drive an engine or an echo with.

    wire = Wire("/tmp/rnnserve-x/engine-0.sock")
    wire.send(encode([Hello()]))
    replies = decode_replies(wire.recv())
"""
import socket
import time

from serving.common.frames import Frames, pack


class Wire:
    """A blocking connection to an engine, as a front-end's is (serving/frontend/client.py): frames
    out, frames in."""

    def __init__(self, address: str, timeout_s: float = 120):
        deadline = time.monotonic() + timeout_s
        while True:
            self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.socket.connect(address)
                break
            except OSError:  # the engine is still loading, not listening yet
                self.socket.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.frames, self.arrived = Frames(), []

    def send(self, payload: bytes):
        self.socket.sendall(pack(payload))

    def recv(self) -> memoryview:
        while not self.arrived:
            data = self.socket.recv(1 << 18)
            if not data:
                raise ConnectionError("the engine closed the connection")
            self.arrived += self.frames.feed(data)
        return self.arrived.pop(0)

    def close(self):
        self.socket.close()
