"""How frames travel between front-ends and engines: over a Unix stream socket, each one a 4-byte
little-endian length, then that many bytes (a list of messages as serving/common/messages.py
encodes them).

    frames = Frames()
    for frame in frames.feed(sock.recv(1 << 18)):  # what one read brought: none, one or several frames
        handle(decode_requests(frame))
    sock.sendall(pack(encode(messages)))

A stream socket has no message boundaries: a read may end inside a frame or hold several. The
splitter keeps only the unfinished tail, and copies a frame that came in pieces once, when its
last piece arrives (no `buffer += data` of immutable bytes, quadratic on big frames).
"""
import os
import struct

HEADER = struct.Struct("<I")  # the payload's length in bytes
MAX_PATH = 107  # AF_UNIX's sun_path on Linux holds 108 bytes with its terminating zero


def pack(payload: bytes) -> bytes:
    """One frame on the wire: the payload's length, then the payload."""
    return HEADER.pack(len(payload)) + payload


class Frames:
    """Bytes as they were read in, whole frames out, in order."""

    def __init__(self):
        self.tail = bytearray()  # the start of a frame whose end has not arrived
        self.needed = HEADER.size  # bytes the tail must hold before a frame can come out of it

    def feed(self, data: bytes) -> list[memoryview]:
        """The frames that `data` completes (views of bytes nobody changes: keep or decode them)."""
        if self.tail:
            self.tail += data
            if len(self.tail) < self.needed:
                return []
            data, self.tail = bytes(self.tail), bytearray()  # the one copy of a frame that came in pieces
        frames, view, at, end = [], memoryview(data), 0, len(data)
        while end - at >= HEADER.size:
            size = HEADER.unpack_from(data, at)[0]
            if end - at - HEADER.size < size:
                break
            frames.append(view[at + HEADER.size: at + HEADER.size + size])
            at += HEADER.size + size
        if at < end:
            self.tail += view[at:]
            self.needed = HEADER.size + (HEADER.unpack_from(self.tail)[0] if len(self.tail) >= HEADER.size else 0)
        else:
            self.needed = HEADER.size
        return frames


def socket_path(address: str) -> str:
    """An engine's address, checked: a filesystem path short enough for a Unix socket (ValueError
    saying so, not an OSError at bind or a front-end that never connects)."""
    if not address or address.startswith(("ipc://", "tcp://")):
        raise ValueError(f"an engine's address is a Unix socket's path, e.g. /tmp/rnnserve/engine-0.sock: "
                         f"not {address!r}")
    if len(os.fsencode(address)) > MAX_PATH:
        raise ValueError(f"the engine socket path {address!r} is {len(os.fsencode(address))} bytes: a Unix socket's "
                         f"path holds at most {MAX_PATH} (use a shorter runtime folder, e.g. under /tmp)")
    return address
