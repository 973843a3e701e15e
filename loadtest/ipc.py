"""What the front-end <-> engine transport costs: the Unix stream socket the server uses (4-byte
length-prefixed frames, serving/common/frames.py) against ZeroMQ DEALER/ROUTER over ipc://, the
transport before it, the messages msgspec-encoded as the server sends them (serving/common/messages.py).

    python -m loadtest ipc [--messages 20000]

For each transport, an echo "engine" in another process answers every frame with a Result per
request. Measured: one request per frame, one at a time (a lone request: the latency and CPU of
one round trip), and frames of 8 and 64 requests kept 4 frames deep (what a busy front-end and
engine send: the cost per request once frames carry several). CPU is both processes' (ZeroMQ's
I/O threads included), read from /proc. The client here is blocking, as the echo is, for both.
"""
import multiprocessing
import os
import shutil
import socket
import tempfile
import time

import zmq

from loadtest.wire import Wire
from serving.common.frames import Frames, pack
from serving.common.messages import Infer, Result, Rows, decode_replies, decode_requests, encode

TICK = os.sysconf("SC_CLK_TCK")
LOGITS = bytes(8)  # two float32 logits
STOP = b"stop"


def cpu_s(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def echoed(frame) -> bytes:
    return encode([Result(m.id, LOGITS, [1, 2]) for m in decode_requests(frame)])


def zeromq_echo(address: str):
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.bind(address)
    while True:
        sender, frame = sock.recv_multipart()
        if frame == STOP:
            return
        sock.send_multipart([sender, echoed(frame)])


def unix_echo(path: str):
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    sock, _ = listener.accept()
    frames = Frames()
    while data := sock.recv(1 << 18):
        for frame in frames.feed(data):
            if frame == STOP:
                return
            sock.sendall(pack(echoed(frame)))


def zeromq_client(address: str):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(address)
    return sock


TRANSPORTS = {  # name -> (echo, client, address in a folder)
    "unix": (unix_echo, Wire, lambda folder: f"{folder}/echo.sock"),
    "zeromq": (zeromq_echo, zeromq_client, lambda folder: f"ipc://{folder}/echo"),
}


def round_trips(sock, per_frame: int, depth: int, messages: int) -> None:
    row, deadline = Rows.of([list(range(2, 86))]), time.monotonic() + 60  # an 84-token row: a short IMDB text
    sent = answered = 0
    while answered < messages:
        while sent < messages and sent - answered < depth * per_frame:
            sock.send(encode([Infer(sent + k, "m", 1, row.ids.data, row.lengths.data, deadline) for k in range(per_frame)]))
            sent += per_frame
        answered += len(decode_replies(sock.recv()))


def measure(transport: str, messages: int) -> list[dict]:
    echo, client, address = TRANSPORTS[transport]
    folder = tempfile.mkdtemp(prefix="rnnserve-ipc-", dir="/tmp")  # new each time: no stale socket in the way
    address = address(folder)
    engine = multiprocessing.get_context("spawn").Process(target=echo, args=(address,))
    engine.start()
    sock = client(address)
    round_trips(sock, 1, 1, 1000)  # connected and warm
    rows = []
    for per_frame, depth in ((1, 1), (8, 4), (64, 4)):
        started, mine, theirs = time.perf_counter(), time.process_time(), cpu_s(engine.pid)
        round_trips(sock, per_frame, depth, messages)
        wall = time.perf_counter() - started
        cpu = time.process_time() - mine + cpu_s(engine.pid) - theirs
        rows.append({"transport": transport, "requests_per_frame": per_frame, "frames_in_flight": depth,
                     "requests_per_s": messages / wall, "us_per_request_wall": 1e6 * wall / messages,
                     "us_cpu_per_request": 1e6 * cpu / messages})
        print(f"{transport:6s} {per_frame:2d} requests per frame, {depth} in flight: {rows[-1]['requests_per_s']:9.0f} "
              f"requests/s, {rows[-1]['us_per_request_wall']:6.1f} us each, {rows[-1]['us_cpu_per_request']:6.1f} us "
              "of CPU (both processes)")
    sock.send(STOP)
    engine.join()
    sock.close()
    shutil.rmtree(folder)
    return rows


def ipc(args) -> list[dict]:
    """Each transport in turn, the one the server uses first."""
    return [row for transport in TRANSPORTS for row in measure(transport, args.messages)]
