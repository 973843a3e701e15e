"""How an engine batches one model version's requests: its queue, when a batch is due, and the
batch run as ONNX Runtime calls, each request answered with its own rows' outputs.

A batch is due when its rows fill max_batch_size or its oldest request has waited
max_queue_delay_ms; while one batch runs, the next fills by itself. Its rows are sorted by length
and cut into calls of at most max_batch_size rows and max_batch_tokens padded tokens, each padded
only to its own longest row. A failing call fails its batch's requests, and only them.
"""
import logging
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
from prometheus_client import Gauge

from serving.common import metrics, tracing
from serving.common.messages import Failed, Result
from serving.engine.runner import Runner

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Pending:
    """One request waiting for its rows' outputs."""
    sender: bytes  # the front-end's socket identity
    id: int
    rows: list[list[int]]
    deadline: float
    arrived: float
    trace: str = ""  # its traceparent: the queued span's parent (serving/common/tracing.py)
    cancelled: bool = False


class Batcher:
    def __init__(self, runner: Runner, depth: Gauge):
        """depth: the rows-waiting gauge in /metrics (an old and a new version of a model add up)."""
        self.runner, self.limits, self.depth = runner, runner.limits, depth
        self.waiting: deque[Pending] = deque()
        self.rows = 0
        self.by_id: dict[tuple[bytes, int], Pending] = {}  # for cancels

    def __len__(self) -> int:
        return len(self.waiting)

    def full(self) -> bool:
        return len(self.waiting) >= self.limits.max_queue_size

    def put(self, request: Pending):
        self.waiting.append(request)
        self.by_id[request.sender, request.id] = request
        self.rows += len(request.rows)
        self.depth.inc(len(request.rows))

    def cancel(self, sender: bytes, ids: list[int]):
        """The client left or its deadline passed: these requests are dropped when their batch is taken."""
        for i in ids:
            if request := self.by_id.pop((sender, i), None):
                request.cancelled = True

    def due_in(self, now: float) -> float | None:
        """Seconds until a batch is due (0: now), None when nothing waits."""
        if not self.waiting:
            return None
        if self.rows >= self.limits.max_batch_size:
            return 0.0
        return max(0.0, self.waiting[0].arrived + self.limits.max_queue_delay_s - now)

    def take_all(self) -> list[Pending]:
        self.depth.dec(self.rows)
        waiting, self.waiting, self.rows, self.by_id = list(self.waiting), deque(), 0, {}
        return waiting

    def take(self) -> list[Pending]:
        """The next batch: requests in arrival order until their rows fill max_batch_size (at least
        one request)."""
        batch, rows = [], 0
        while self.waiting and (not batch or rows + len(self.waiting[0].rows) <= self.limits.max_batch_size):
            request = self.waiting.popleft()
            self.by_id.pop((request.sender, request.id), None)
            batch.append(request)
            rows += len(request.rows)
        self.rows -= rows
        self.depth.dec(rows)
        return batch

    def run(self, post):
        """The due batch: its live requests' rows (a cancelled one, or one past its deadline, which
        the front-end has answered 504 already, is left out) through the model, each request
        answered through post(front-end, message)."""
        now, name = time.monotonic(), self.runner.name
        batch = [r for r in self.take() if not r.cancelled and r.deadline >= now]
        if not batch:
            return
        queue_time = metrics.of(metrics.QUEUE_TIME, name)
        for request in batch:
            queue_time.observe(now - request.arrived)
        rows = [row for request in batch for row in request.rows]
        started = time.perf_counter()
        with tracing.batch_span(name, batch, now) as span:
            try:
                outputs, padded = self.calls(rows)
            except Exception as e:  # a failing batch fails its requests, and only them
                log.exception("batch of %d rows failed on %s", len(rows), name)
                for request in batch:
                    post(request.sender, Failed(request.id, 500, f"inference failed: {type(e).__name__}: {e}"))
                return
            if span:
                span.set_attributes({"rnnserve.rows": len(rows), "rnnserve.padded_tokens": padded,
                                     "rnnserve.tokens": sum(map(len, rows))})
        metrics.of(metrics.INFERENCE_TIME, name).observe(time.perf_counter() - started)
        classes = np.stack(outputs) if outputs[0].ndim == 1 else None  # (rows, C) for a classifier
        start = 0
        for request in batch:
            n = len(request.rows)
            if classes is not None:
                data = classes[start: start + n]
            else:  # language model: (n, T, V), zero past each row's length
                mine = outputs[start: start + n]
                data = np.zeros((n, max(len(o) for o in mine), mine[0].shape[-1]), np.float32)
                for i, out in enumerate(mine):
                    data[i, : len(out)] = out
            start += n
            post(request.sender, Result(request.id, data.tobytes(), list(data.shape)))

    def calls(self, rows: list[list[int]]) -> tuple[list[np.ndarray], int]:
        """Each row's output, and the tokens the calls ran with their padding."""
        name, lengths = self.runner.name, [len(r) for r in rows]
        outputs, padded = [None] * len(rows), 0
        for call in plan_calls(lengths, self.limits.max_batch_size, self.limits.max_batch_tokens):
            out = self.runner.run_rows([rows[i] for i in call])
            if len(out) != len(call):
                raise RuntimeError(f"{name}: {len(call)} rows in, {len(out)} out")
            longest, real = max(lengths[i] for i in call), sum(lengths[i] for i in call)
            padded += len(call) * longest
            metrics.of(metrics.BATCH_SIZE, name).observe(len(call))
            metrics.of(metrics.PADDING_RATIO, name).observe(len(call) * longest / real - 1)
            for j, i in enumerate(call):
                outputs[i] = out[j]
        return outputs, padded


def plan_calls(lengths: list[int], max_rows: int, max_tokens: int) -> list[list[int]]:
    """Row indices grouped into calls: sorted by length, each call within max_rows and
    max_tokens = rows x its longest row (a row longer than max_tokens goes alone)."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    calls, current = [], []
    for i in order:  # ascending, so the row being added is the call's longest
        if current and (len(current) + 1 > max_rows or (len(current) + 1) * lengths[i] > max_tokens):
            calls.append(current)
            current = []
        current.append(i)
    return calls + [current] if current else calls
