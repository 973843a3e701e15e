"""Dynamic batching: a queue of (rows, future) per model, run in length-sorted padded batches.

A batch closes at max_batch_size rows or max_queue_delay_ms after its first row, whichever
comes first; while one batch runs, the next fills. Its rows are sorted by length and cut into
ONNX Runtime calls of at most max_batch_size rows and max_batch_tokens padded tokens; the model's
run_rows pads each call only to its own longest row. Inference runs in a worker thread, off the
event loop. Results go back to their requests row by row; a failing call fails every request
in it, and the loop goes on. A row is anything with a length: token ids, or an LM step.
"""
import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from serving import metrics

log = logging.getLogger(__name__)


class QueueFull(Exception):
    pass


class Stopped(Exception):
    """The batcher stopped (its model version was unloaded or the server is shutting down)."""


@dataclass
class Request:
    rows: list  # unpadded rows (token ids, or LM steps); len(row) is its number of tokens
    future: asyncio.Future
    queued_at: float = field(default_factory=time.perf_counter)


def plan_calls(lengths: list[int], max_rows: int, max_tokens: int) -> list[list[int]]:
    """Row indices grouped into calls: sorted by length, each call within max_rows and
    max_tokens = rows x its longest row (a row longer than max_tokens goes alone)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    calls, current = [], []
    for i in order:  # ascending, so the row being added is the call's longest
        if current and (len(current) + 1 > max_rows or (len(current) + 1) * lengths[i] > max_tokens):
            calls.append(current)
            current = []
        current.append(i)
    return calls + [current] if current else calls


class Batcher:
    """One per model: submit(rows) -> one output per row, computed in shared batches.

    run_rows(rows) runs one ONNX Runtime call over a list of rows and returns one output each."""

    def __init__(self, name: str, run_rows: Callable[[list], list], *,
                 max_batch_size: int, max_batch_tokens: int, max_queue_delay_ms: float, max_queue_size: int):
        self.name = name
        self.run_rows = run_rows
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_delay_s = max_queue_delay_ms / 1000
        self.queue: asyncio.Queue[Request] = asyncio.Queue(max_queue_size)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"infer-{name}")
        self.task: asyncio.Task | None = None
        self.running: list[Request] = []  # the batch taken from the queue and not yet answered

    def start(self):
        self.task = asyncio.create_task(self.loop(), name=f"batcher-{self.name}")

    async def stop(self):
        """Stop the loop; every request not answered yet, queued or in the batch running now,
        gets Stopped at once, never silence (a call already in ONNX Runtime finishes unread)."""
        if self.task:
            self.task.cancel()
        stopped = Stopped(f"model {self.name!r} was unloaded or the server is stopping")
        waiting = [self.queue.get_nowait() for _ in range(self.queue.qsize())]
        for request in self.running + waiting:
            if not request.future.done():
                request.future.set_exception(stopped)
        self.running = []
        await asyncio.to_thread(self.executor.shutdown, wait=True)

    def enqueue(self, rows: list) -> asyncio.Future:
        """Queue one request's rows; its future gets one output per row. Raises QueueFull at once
        when the queue is full. Cancelling the future drops the request if it has not run yet."""
        request = Request(rows, asyncio.get_running_loop().create_future())
        try:
            self.queue.put_nowait(request)
        except asyncio.QueueFull:
            raise QueueFull(f"model {self.name!r} has {self.queue.qsize()} requests waiting") from None
        metrics.QUEUE_DEPTH.labels(self.name).set(self.queue.qsize())
        return request.future

    async def submit(self, rows: list, timeout_s: float) -> list:
        """One output per row, or TimeoutError after timeout_s (the request is then dropped)."""
        return await asyncio.wait_for(self.enqueue(rows), timeout_s)

    async def next_batch(self) -> list[Request]:
        batch = [await self.queue.get()]
        rows = len(batch[0].rows)
        deadline = time.perf_counter() + self.max_delay_s
        while rows < self.max_batch_size:
            if self.queue.empty():
                wait = deadline - time.perf_counter()
                if wait <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), wait))
                except TimeoutError:
                    break
            else:
                batch.append(self.queue.get_nowait())
            rows += len(batch[-1].rows)
        metrics.QUEUE_DEPTH.labels(self.name).set(self.queue.qsize())
        return batch

    async def loop(self):
        loop = asyncio.get_running_loop()
        while True:
            self.running = []
            batch = [r for r in await self.next_batch() if not r.future.done()]  # timed out or gone: dropped
            if not batch:
                continue
            self.running = batch
            started = time.perf_counter()
            for request in batch:
                metrics.QUEUE_TIME.labels(self.name).observe(started - request.queued_at)
            rows = [row for request in batch for row in request.rows]
            try:
                outputs = await loop.run_in_executor(self.executor, self.run_calls, rows)
            except Exception as e:  # a failing batch fails its requests, and only them
                log.exception("batch of %d rows failed on %s", len(rows), self.name)
                for request in batch:
                    if not request.future.done():
                        request.future.set_exception(e)
                continue
            metrics.INFERENCE_TIME.labels(self.name).observe(time.perf_counter() - started)
            start = 0
            for request in batch:
                if not request.future.done():
                    request.future.set_result(outputs[start: start + len(request.rows)])
                start += len(request.rows)

    def run_calls(self, rows: list) -> list:
        """In the worker thread: every row's output, in the order given."""
        lengths = [len(r) for r in rows]
        outputs = [None] * len(rows)
        for call in plan_calls(lengths, self.max_batch_size, self.max_batch_tokens):
            out = self.run_rows([rows[i] for i in call])
            if len(out) != len(call):
                raise RuntimeError(f"{self.name}: {len(call)} rows in, {len(out)} out")
            longest, real = max(lengths[i] for i in call), sum(lengths[i] for i in call)
            metrics.BATCH_SIZE.labels(self.name).observe(len(call))
            metrics.PADDING_RATIO.labels(self.name).observe(len(call) * longest / real - 1)
            for j, i in enumerate(call):
                outputs[i] = out[j]
        return outputs
