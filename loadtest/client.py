"""A small asyncio HTTP/1.1 load generator: N users, keep-alive, no think time, bounded in time.

Lighter than Locust (no gevent, no per-request objects beyond a few bytes), so it checks that
Locust is not the limit being measured. Handles Content-Length and chunked (streamed) bodies.
"""
import asyncio
import time
from dataclasses import dataclass, field


@dataclass
class LoadResult:
    latencies_s: list[float] = field(default_factory=list)
    first_byte_s: list[float] = field(default_factory=list)  # time to the first body chunk (streams)
    errors: int = 0
    statuses: dict = field(default_factory=dict)
    elapsed_s: float = 0.0


async def read_response(reader: asyncio.StreamReader, sent_at: float, result: LoadResult) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in
               (line.partition(b":") for line in head.split(b"\r\n")[1:] if line)}
    if headers.get(b"transfer-encoding") == b"chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            if not body:
                result.first_byte_s.append(time.perf_counter() - sent_at)
            body += chunk[:-2]
        return status, body
    return status, await reader.readexactly(int(headers.get(b"content-length", b"0")))


async def user(host: str, port: int, requests, duration_s: float, result: LoadResult, offset: int, users: int):
    reader, writer = await asyncio.open_connection(host, port)
    deadline = time.perf_counter() + duration_s
    i = offset
    try:
        while time.perf_counter() < deadline:
            path, body = requests[i % len(requests)]
            i += users
            sent_at = time.perf_counter()
            writer.write(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (path.encode(), host.encode(), len(body), body))
            status, _ = await read_response(reader, sent_at, result)
            result.latencies_s.append(time.perf_counter() - sent_at)
            result.statuses[status] = result.statuses.get(status, 0) + 1
            result.errors += status != 200
    finally:
        writer.close()


async def load(host: str, port: int, requests: list[tuple[str, bytes]], users: int, duration_s: float) -> LoadResult:
    """`users` connections sending `requests` (path, body) round-robin for `duration_s`."""
    result = LoadResult()
    started = time.perf_counter()
    await asyncio.gather(*(user(host, port, requests, duration_s, result, u, users) for u in range(users)))
    result.elapsed_s = time.perf_counter() - started
    return result
