"""A small asyncio HTTP/1.1 load generator: N users, keep-alive, no think time, bounded in time,
in one process or several (so that the load generator is not what is measured).

Lighter than Locust (no gevent, no per-request objects beyond a few bytes), so it checks that
Locust is not the limit being measured. Handles Content-Length and chunked (streamed) bodies.
"""
import asyncio
import multiprocessing
import time
from dataclasses import dataclass, field

JSON = b"Content-Type: application/json\r\n"


@dataclass
class LoadResult:
    latencies_s: list[float] = field(default_factory=list)
    first_byte_s: list[float] = field(default_factory=list)  # time to the first body chunk (streams)
    chunk_gaps_s: list[float] = field(default_factory=list)  # between a stream's body chunks, as read
    errors: int = 0
    lost: int = 0  # requests that got no HTTP answer at all (a reset or refused connection)
    statuses: dict = field(default_factory=dict)
    elapsed_s: float = 0.0
    cpu_s: float = 0.0  # the load generator's own CPU time


async def read_response(reader: asyncio.StreamReader, sent_at: float, result: LoadResult) -> tuple[int, bytes, bool]:
    """(status, body, whether the server closes the connection after it)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in
               (line.partition(b":") for line in head.split(b"\r\n")[1:] if line)}
    closes = headers.get(b"connection", b"").lower() == b"close"
    if headers.get(b"transfer-encoding") == b"chunked":
        body, last = b"", sent_at
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            now = time.perf_counter()
            (result.chunk_gaps_s if body else result.first_byte_s).append(now - last)
            body, last = body + chunk[:-2], now
        return status, body, closes
    return status, await reader.readexactly(int(headers.get(b"content-length", b"0"))), closes


async def user(host: str, port: int, requests, duration_s: float, result: LoadResult, offset: int, users: int):
    """One keep-alive connection sending requests in turn; a request that gets no answer (the
    connection reset or refused) is counted lost and the user connects again, after a pause."""
    deadline = time.perf_counter() + duration_s
    i, connection = offset, None
    try:
        while time.perf_counter() < deadline:
            path, body, *headers = requests[i % len(requests)]
            i += users
            sent_at = time.perf_counter()
            try:
                connection = connection or await asyncio.open_connection(host, port)
                reader, writer = connection
                writer.write(b"POST %s HTTP/1.1\r\nHost: %s\r\n%sContent-Length: %d\r\n\r\n%s" % (
                    path.encode(), host.encode(), headers[0] if headers else JSON, len(body), body))
                status, _, closes = await read_response(reader, sent_at, result)
            except (OSError, asyncio.IncompleteReadError):
                result.lost += 1
                connection = close(connection)
                await asyncio.sleep(0.05)
                continue
            result.latencies_s.append(time.perf_counter() - sent_at)
            result.statuses[status] = result.statuses.get(status, 0) + 1
            result.errors += status != 200
            if closes:
                connection = close(connection)
    finally:
        close(connection)


def close(connection) -> None:
    if connection:
        connection[1].close()


async def load(host: str, port: int, requests: list[tuple], users: int, duration_s: float) -> LoadResult:
    """`users` connections sending `requests` round-robin for `duration_s`: (path, body) with a JSON
    content type, or (path, body, header lines) with its own (b"Name: value\\r\\n" each)."""
    result = LoadResult()
    started = time.perf_counter()
    await asyncio.gather(*(user(host, port, requests, duration_s, result, u, users) for u in range(users)))
    result.elapsed_s = time.perf_counter() - started
    return result


def timed(load_fn, args) -> LoadResult:
    """asyncio.run(load_fn(*args)), with the CPU time this process spent on it."""
    started = time.process_time()
    result = asyncio.run(load_fn(*args))
    result.cpu_s = time.process_time() - started
    return result


def load_part(args) -> LoadResult:
    return timed(load, args)


def load_in_processes(host: str, port: int, requests: list[tuple], users: int, duration_s: float,
                      processes: int = 1) -> LoadResult:
    """load() spread over `processes` processes, the users split between them; the result merged,
    with the CPU-seconds the load generator used."""
    if processes <= 1:
        return load_part((host, port, requests, users, duration_s))
    shares = [users // processes + (i < users % processes) for i in range(processes)]
    parts = [(host, port, requests[i::processes] or requests, n, duration_s) for i, n in enumerate(shares) if n]
    with multiprocessing.get_context("spawn").Pool(len(parts)) as pool:
        results = pool.map(load_part, parts)
    merged = LoadResult(elapsed_s=max(r.elapsed_s for r in results), cpu_s=sum(r.cpu_s for r in results))
    for r in results:
        merged.latencies_s += r.latencies_s
        merged.first_byte_s += r.first_byte_s
        merged.chunk_gaps_s += r.chunk_gaps_s
        merged.errors += r.errors
        merged.lost += r.lost
        for status, n in r.statuses.items():
            merged.statuses[status] = merged.statuses.get(status, 0) + n
    return merged
