"""What the front-end <-> engine transport costs: ZeroMQ DEALER/ROUTER over an ipc:// socket, the
messages msgspec-encoded as the server sends them (serving/common/messages.py).

    python -m loadtest ipc [--messages 20000]

An echo "engine" in another process answers every frame with a Result per request. Measured:
one request per frame, one at a time (a lone request: the latency and CPU of one round trip),
and frames of 8 and 64 requests kept 4 frames deep (what a busy front-end and engine send: the
cost per request once frames carry several). CPU is both processes' (ZeroMQ's I/O threads
included), read from /proc.
"""
import multiprocessing
import os
import time

import zmq

from serving.common.messages import Infer, Result, Rows, decode_replies, decode_requests, encode

TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def echo(address: str):
    socket = zmq.Context.instance().socket(zmq.ROUTER)
    socket.bind(address)
    logits = bytes(8)  # two float32 logits
    while True:
        sender, frame = socket.recv_multipart()
        if frame == b"stop":
            return
        socket.send_multipart([sender, encode([Result(m.id, logits, [1, 2]) for m in decode_requests(frame)])])


def round_trips(socket, per_frame: int, depth: int, messages: int) -> None:
    row, deadline = Rows.of([list(range(2, 86))]), time.monotonic() + 60  # an 84-token row: a short IMDB text
    sent = answered = 0
    while answered < messages:
        while sent < messages and sent - answered < depth * per_frame:
            socket.send(encode([Infer(sent + k, "m", 1, row.ids.data, row.lengths.data, deadline) for k in range(per_frame)]))
            sent += per_frame
        answered += len(decode_replies(socket.recv()))


def ipc(args) -> list[dict]:
    address = f"ipc:///tmp/rnnserve-ipc-{os.getpid()}"
    engine = multiprocessing.get_context("spawn").Process(target=echo, args=(address,))
    engine.start()
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.connect(address)
    round_trips(socket, 1, 1, 1000)  # connected and warm
    rows = []
    for per_frame, depth in ((1, 1), (8, 4), (64, 4)):
        started, mine, theirs = time.perf_counter(), time.process_time(), cpu_s(engine.pid)
        round_trips(socket, per_frame, depth, args.messages)
        wall = time.perf_counter() - started
        cpu = time.process_time() - mine + cpu_s(engine.pid) - theirs
        rows.append({"requests_per_frame": per_frame, "frames_in_flight": depth,
                     "requests_per_s": args.messages / wall, "us_per_request_wall": 1e6 * wall / args.messages,
                     "us_cpu_per_request": 1e6 * cpu / args.messages})
        print(f"{per_frame:2d} requests per frame, {depth} in flight: {rows[-1]['requests_per_s']:9.0f} requests/s, "
              f"{rows[-1]['us_per_request_wall']:6.1f} us each, {rows[-1]['us_cpu_per_request']:6.1f} us of CPU "
              "(both processes)")
    socket.send(b"stop")
    engine.join()
    return rows
