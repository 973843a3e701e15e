"""Front-ends <-> engines over Unix stream sockets (serving/common/frames.py, serving/engine/connections.py,
serving/frontend/client.py): frames come out whole however the reads cut them, an answer bigger
than the socket's buffer reaches its requests whole, and a front-end that leaves mid-work frees
what it held while the engine goes on serving the others; an engine's poll after work spins before it
sleeps, within its timeout."""
import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from core.repository import read_version
from loadtest.wire import Wire
from serving.common.frames import MAX_PATH, Frames, pack, socket_path
from serving.common.messages import Catalog, Generate, Hello, Infer, Results, Rows, Tokens, decode_replies, encode
from serving.engine.connections import Connections
from tests.serving_fixtures import Server, alone, graph_logits, slowed, slowed_steps, streams_gone, tiny_repository

PAYLOADS = [b"", b"a", b"hello frames", bytes(range(256)) * 3]


def fed(frames: Frames, pieces) -> list[bytes]:
    return [bytes(frame) for piece in pieces for frame in frames.feed(piece)]


def test_frames_split_at_every_byte_come_out_whole_and_in_order():
    wire = b"".join(map(pack, PAYLOADS))
    for cut in range(len(wire) + 1):
        assert fed(Frames(), [wire[:cut], wire[cut:]]) == PAYLOADS, cut
    assert fed(Frames(), [wire[i: i + 1] for i in range(len(wire))]) == PAYLOADS  # a byte a read
    frames = Frames()
    for cut in range(1, len(wire)):  # one splitter goes on after any cut
        assert fed(frames, [wire[:cut], wire[cut:]]) == PAYLOADS and not frames.tail


def test_several_frames_in_one_read_and_a_big_one_in_many():
    frames = Frames()
    assert fed(frames, [b"".join(map(pack, PAYLOADS * 50))]) == PAYLOADS * 50
    big = np.random.default_rng(0).bytes(5 << 20)
    wire = pack(b"x") + pack(big) + pack(b"y")
    pieces = [wire[i: i + 65536] for i in range(0, len(wire), 65536)]
    assert fed(frames, pieces) == [b"x", big, b"y"] and not frames.tail


def test_an_engine_address_too_long_for_a_unix_socket_is_refused_saying_why(tmp_path):
    assert socket_path("/tmp/rnnserve-x/engine-0.sock") == "/tmp/rnnserve-x/engine-0.sock"
    for bad in ("ipc:///tmp/x/engine-0", "/" + "d" * MAX_PATH):
        with pytest.raises(ValueError, match="Unix socket"):
            socket_path(bad)
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    done = subprocess.run([sys.executable, "-m", "serving", "--repository", str(tmp_path), "--engines", "1"],
                          env=os.environ | {"TMPDIR": str(deep)}, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "a Unix socket's path holds at most 107" in done.stderr, done.stderr[-2000:]
    assert not [name for name in os.listdir(deep) if name.startswith("rnnserve-")]  # its runtime folder removed


def test_a_poll_asked_to_spin_after_work_spins_for_spin_s_and_never_past_its_timeout(tmp_path):
    """After a poll that found something the next one asked to spin does (CPU time: it looks
    without sleeping) and a frame that comes during it is taken; the spin counts within the poll's
    timeout, so a batch due sooner is not delayed; an engine with nothing to do sleeps."""
    def timed_poll(connections, timeout_s, spin=True):
        wall, cpu = time.perf_counter(), time.thread_time()
        arrived, _ = connections.poll(timeout_s, spin)
        wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
        print(f"spin {connections.spin_s}s: a poll of {timeout_s}s took {wall:.3f}s, {cpu:.3f}s of CPU")
        return [bytes(frame) for _, frame in arrived], wall, cpu

    def spun(cpu: float) -> bool:
        """Asleep, a poll takes microseconds of CPU; spinning, all it gets of a core (0.1 s or more here,
        shared with whatever else runs on a loaded box)."""
        return cpu > 0.005

    for spin_s in (0.0, 0.3):
        connections = Connections(str(tmp_path / f"engine-{spin_s}.sock"), spin_s)
        connections.listen()
        front_end = socket.socket(socket.AF_UNIX)
        front_end.connect(connections.path)
        connections.poll(1.0)  # accepts it
        try:
            arrived, wall, cpu = timed_poll(connections, 0.5)  # after work
            assert not arrived and 0.5 <= wall < 0.7  # not 0.8: the spin is within the 0.5
            assert spun(cpu) == bool(spin_s)
            arrived, wall, cpu = timed_poll(connections, 0.5)  # after a poll that found nothing
            assert not arrived and 0.5 <= wall < 0.7 and not spun(cpu)
            threading.Timer(0.1, front_end.sendall, [pack(b"hello")]).start()
            arrived, wall, cpu = timed_poll(connections, 5.0)
            assert arrived == [b"hello"] and wall < 2.0 and not spun(cpu)
            threading.Timer(0.1, front_end.sendall, [pack(b"again")]).start()
            arrived, wall, cpu = timed_poll(connections, 5.0)  # during the spin
            assert arrived == [b"again"] and wall < 2.0 and spun(cpu) == bool(spin_s)
            arrived, wall, _ = timed_poll(connections, 0.1)
            assert not arrived and 0.1 <= wall < 0.25  # not 0.3: the spin stops at the timeout
            front_end.sendall(pack(b"more"))
            assert timed_poll(connections, 1.0)[0] == [b"more"]
            arrived, wall, cpu = timed_poll(connections, 0.5, spin=False)
            assert not arrived and 0.5 <= wall < 0.7 and not spun(cpu)  # not asked to spin
        finally:
            front_end.close()
            connections.close()


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    return tiny_repository(tmp_path_factory.mktemp("transport"))


def test_an_engine_spins_after_a_request_sent_alone_and_sleeps_after_others(repository):
    """A request that comes alone from a front-end with nothing else in flight (a user waiting for
    each answer): the engine polls for RNNSERVE_ENGINE_SPIN_US before it sleeps (its thread's CPU
    time). After one the front-end sent with others in flight, or a frame of several, it sleeps at
    once (under load, what comes meanwhile is batched, not raced for). Idle, it sleeps. The
    front-end marks its requests: one at a time, each alone; sixteen at once, not."""
    s = Server(repository, engine_spin_us=45_000)  # under the loop's longest sleep (IDLE_S), which bounds a spin
    try:
        clock = time.pthread_getcpuclockid(s.engine_thread.ident)
        wire = Wire(s.engine.address)
        wire.send(encode([Hello()]))
        version = next(m for m in decode_replies(wire.recv()) if isinstance(m, Catalog)).models[0].version
        ids = iter(range(1, 100))

        def engine_cpu_after(requests: int, alone: bool) -> float:
            """The engine's CPU seconds in the 0.2 s after `requests` sent in one frame are answered."""
            rows = Rows.of([[2, 3, 4]])
            wire.send(encode([Infer(next(ids), "clf", version, rows.ids.data, rows.lengths.data, time.monotonic() + 60,
                                    alone=alone) for _ in range(requests)]))
            answered = 0
            while answered < requests:
                answered += sum(len(m.ids) for m in decode_replies(wire.recv()) if isinstance(m, Results))
            before = time.clock_gettime(clock)
            time.sleep(0.2)
            cpu = time.clock_gettime(clock) - before
            print(f"{requests} request(s) in a frame, alone={alone}: the engine's CPU in the 0.2 s after: {cpu:.4f} s")
            return cpu

        for _ in range(2):
            assert sum(engine_cpu_after(1, True) for _ in range(4)) > 0.01  # spun 4 x 0.045 s (a loaded box shares the core)
            assert sum(engine_cpu_after(1, False) for _ in range(4)) < 0.004  # asleep: microseconds
            assert sum(engine_cpu_after(4, True) for _ in range(4)) < 0.004
        time.sleep(0.5)
        before = time.clock_gettime(clock)
        time.sleep(0.5)
        assert time.clock_gettime(clock) - before < 0.002  # idle: asleep
        wire.close()

        sent, handle = [], s.engine.handle
        s.engine.handle = lambda sender, m: (sent.append(m.alone) if isinstance(m, Infer) else None, handle(sender, m))[1]
        url = f"{s.url}/v1/models/clf:predict"
        for _ in range(4):
            assert httpx.post(url, json={"instances": ["one at a time"]}).status_code == 200

        async def sixteen():
            async with httpx.AsyncClient(timeout=30) as client:
                return await asyncio.gather(*(client.post(url, json={"instances": ["at once"]}) for _ in range(16)))
        assert all(r.status_code == 200 for r in asyncio.run(sixteen()))
        print("sent alone:", sent)
        assert sent[:4] == [True] * 4 and sum(sent[4:]) <= 8  # the first may come before the others connect
    finally:
        s.stop()


def test_answers_far_bigger_than_the_sockets_buffer_reach_their_requests_whole(repository):
    """16 language-model requests at once, 64 rows each: each answer is 64 x T x 12 float32 logits
    (300 kB at 100 tokens), its frame written in many pieces as the front-end reads them, each exact."""
    s = Server(repository, max_batch_size=64)
    writes, write = [], s.engine.connections.write
    s.engine.connections.write = lambda connection: writes.append(1) or write(connection)
    for connection in s.engine.connections.open.values():  # the server's front-end: a small buffer, many writes
        connection.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    try:
        length = min(read_version(repository / "lm" / "1").manifest.max_len, 100)
        rng = np.random.default_rng(3)
        batches = [(rng.integers(2, 12, (64, length)), rng.integers(1, length + 1, 64)) for _ in range(16)]

        def infer(batch):
            ids, lengths = batch
            body = {"inputs": [{"name": "input_ids", "shape": list(ids.shape), "datatype": "INT64", "data": ids.ravel().tolist()},
                               {"name": "lengths", "shape": [64], "datatype": "INT64", "data": lengths.tolist()}]}
            return httpx.post(f"{s.url}/v2/models/lm/infer", json=body, timeout=60)

        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(infer, batches))
        for (ids, lengths), r in zip(batches, answers):
            assert r.status_code == 200, r.text
            logits = np.array(r.json()["outputs"][0]["data"], np.float32).reshape(64, -1, 12)
            assert np.abs(logits - graph_logits(repository, "lm", ids, lengths)[:, : logits.shape[1]]).max() < 1e-5
        assert writes, "every frame went out in one write: the test did not reach the partial-write path"
    finally:
        s.stop()


def test_a_front_end_that_leaves_mid_work_frees_it_and_the_engine_serves_the_others(repository):
    """A second front-end (a raw connection, as a front-end process's is) streams a generation and
    has requests queued behind a running batch, then its connection drops: the engine forgets it,
    the queued requests never run, the generation's slot is free, and the server's own front-end
    is answered throughout."""
    s = Server(repository)
    try:
        seen, lm = slowed(s, "clf", 0.3), s.deployment("lm").lm
        slowed_steps(s, "lm", 0.005)
        wire = Wire(s.engine.address)
        wire.send(encode([Hello()]))
        catalog = next(m for m in decode_replies(wire.recv()) if isinstance(m, Catalog))
        version = {d.name: d.version for d in catalog.models}
        wire.send(encode([Generate(1, "lm", version["lm"], [2, 3, 4], lm.uniforms.shape[1], 0.0, 0, 1.0, None)]))
        while not any(isinstance(m, Tokens) for m in decode_replies(wire.recv())):  # it is streaming
            pass
        assert len(lm.streams) == 1

        def infer(rid: int, tokens: int) -> Infer:
            rows = Rows.of([[2, 3, 4, 5, 6][:tokens]])
            return Infer(rid, "clf", version["clf"], rows.ids.data, rows.lengths.data, time.monotonic() + 60)

        wire.send(encode([infer(1, 1)]))
        while not seen:  # its batch is running (0.3 s): the next ones queue behind it
            time.sleep(0.001)
        wire.send(encode([infer(2, 4), infer(3, 5)]))
        with ThreadPoolExecutor(1) as pool:  # the server's own front-end asks meanwhile
            theirs = pool.submit(httpx.post, f"{s.url}/v1/models/clf:predict", json={"instances": ["good film"]}, timeout=30)
            wire.close()
            r = theirs.result()
        assert r.status_code == 200, r.text
        probabilities = r.json()["predictions"][0]["probabilities"]
        assert np.abs(np.array([probabilities["neg"], probabilities["pos"]]) - alone(repository, "good film")).max() < 1e-5
        assert streams_gone(s, "lm") < 5 and len(lm.free) == lm.max_generations + lm.max_sessions
        assert s.engine.connections.open.keys() == s.engine.frontends  # only the server's own front-end is left
        assert len(s.engine.frontends) == 1
        time.sleep(0.5)  # what it had queued would have run by now
        assert seen[0] == 1 and 4 not in seen and 5 not in seen, seen  # its first request ran, its queued ones never
        generated = httpx.post(f"{s.url}/v1/models/lm:generate", json={"prompt": "the", "max_new_tokens": 5}, timeout=30)
        assert generated.status_code == 200 and generated.json()["tokens"] == 5, generated.text
        assert s.engine_thread.is_alive()
    finally:
        s.stop()


def test_a_connection_that_sends_what_no_front_end_would_is_closed_and_the_others_are_served(repository):
    s = Server(repository)
    try:
        wire = Wire(s.engine.address)
        wire.send(b"\xc1 not msgpack")
        with pytest.raises(ConnectionError):
            wire.recv()  # the engine closed it
        r = httpx.post(f"{s.url}/v1/models/clf:predict", json={"instances": ["good film"]}, timeout=30)
        assert r.status_code == 200 and s.engine_thread.is_alive() and len(s.engine.connections.open) == 1, r.text
    finally:
        s.stop()
