"""How an engine batches one model's requests: a queue that says when a batch is due, and a plan
that cuts the batch's rows into ONNX Runtime calls.

A batch is due when its rows fill max_batch_size or its oldest request has waited
max_queue_delay_ms; while one batch runs, the next fills by itself. Its rows are sorted by length
and cut into calls of at most max_batch_size rows and max_batch_tokens padded tokens, each padded
only to its own longest row.
"""
from collections import deque
from dataclasses import dataclass, field

from prometheus_client import Gauge

from serving.engine.runner import Limits


@dataclass(eq=False)
class Pending:
    """One request waiting for its rows' outputs."""
    sender: bytes  # the front-end's socket identity
    id: int
    rows: list[list[int]]
    deadline: float
    arrived: float
    trace: str = ""  # its traceparent: the queued span's parent (serving/tracing.py)
    cancelled: bool = False


@dataclass
class Queue:
    limits: Limits
    depth: Gauge  # rows waiting, in /metrics (several queues of one model, old and new version, add up)
    waiting: deque = field(default_factory=deque)
    rows: int = 0

    def __len__(self) -> int:
        return len(self.waiting)

    def full(self) -> bool:
        return len(self.waiting) >= self.limits.max_queue_size

    def put(self, request: Pending):
        self.waiting.append(request)
        self.rows += len(request.rows)
        self.depth.inc(len(request.rows))

    def due_in(self, now: float) -> float | None:
        """Seconds until a batch is due (0: now), None when nothing waits."""
        if not self.waiting:
            return None
        if self.rows >= self.limits.max_batch_size:
            return 0.0
        return max(0.0, self.waiting[0].arrived + self.limits.max_queue_delay_s - now)

    def take_all(self) -> list[Pending]:
        self.depth.dec(self.rows)
        waiting, self.waiting, self.rows = list(self.waiting), deque(), 0
        return waiting

    def take(self) -> list[Pending]:
        """The next batch: requests in arrival order until their rows fill max_batch_size (at
        least one request); cancelled and expired ones are left out by the caller."""
        batch, rows = [], 0
        while self.waiting and (not batch or rows + len(self.waiting[0].rows) <= self.limits.max_batch_size):
            request = self.waiting.popleft()
            batch.append(request)
            rows += len(request.rows)
        self.rows -= rows
        self.depth.dec(rows)
        return batch


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
