"""How an engine batches one model version's requests: its queue, when a batch is due, and the
batch run as ONNX Runtime calls, each request answered with its own rows' outputs.

A batch is due when its rows fill max_batch_size or its oldest request has waited
max_queue_delay_ms. Its rows are sorted by length and cut into calls of at most max_batch_size
rows and max_batch_tokens padded tokens, each padded only to its own longest row, by the engine's
loop. The calls run on the device (device_thread.py: a thread beside the loop with a GPU, inline on
the CPU); on the thread, while they run the loop forms and pads the next batch (at most MAX_FORMED
per model on the device). A failing call fails its batch's requests, and only them.
"""
import logging
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
from prometheus_client import Gauge

from core.codec import right_padded
from serving.common import metrics, tracing
from serving.common.messages import Failed, Result, Results
from serving.engine.device_thread import DeviceThread
from serving.engine.runner import Runner
from serving.engine.statistics import Statistics

log = logging.getLogger(__name__)
MAX_FORMED = 2  # batches of a model on the device at once: the one computing, and the next, padded, behind it


@dataclass(eq=False)
class Pending:
    """One request waiting for its rows' outputs."""
    sender: bytes  # the front-end's socket identity
    id: int
    ids: bytes  # its rows' token ids end to end, int32, as Infer carried them (Rows)
    lengths: bytes  # each row's length, int32
    count: int  # rows
    deadline: float
    arrived: float
    trace: str = ""  # its traceparent: the queued span's parent (serving/common/tracing.py)
    cancelled: bool = False


Call = tuple[np.ndarray, np.ndarray, np.ndarray]  # the batch's row indices, their (B, T) ids, (B,) lengths


@dataclass(eq=False)
class Formed:
    """A batch sent to the device, waiting for its outputs."""
    requests: list[Pending]
    rows: int
    calls: list[Call]
    outputs: Future  # (each call's output, each call's seconds)
    input_s: float  # forming and padding it


class Batcher:
    def __init__(self, runner: Runner, depth: Gauge):
        """depth: the rows-waiting gauge in /metrics (an old and a new version of a model add up),
        brought up to date once per loop turn (publish)."""
        self.runner, self.limits, self.depth = runner, runner.limits, depth
        self.published = 0  # the rows waiting that the gauge counts
        self.waiting: deque[Pending] = deque()
        self.rows = 0
        self.by_id: dict[tuple[bytes, int], Pending] = {}  # for cancels
        self.formed: deque[Formed] = deque()  # batches on the device, oldest first
        self.stats = Statistics()  # what the statistics extension reports

    def __len__(self) -> int:
        return len(self.waiting)

    def full(self) -> bool:
        return len(self.waiting) >= self.limits.max_queue_size

    def put(self, request: Pending):
        self.waiting.append(request)
        self.by_id[request.sender, request.id] = request
        self.rows += request.count

    def publish(self):
        """The rows-waiting gauge, brought up to date (once per loop turn, not per request)."""
        if self.rows != self.published:
            self.depth.inc(self.rows - self.published)
            self.published = self.rows

    def cancel(self, sender: bytes, ids: list[int]):
        """The client left or its deadline passed: these requests are dropped when their batch is
        formed, and a formed batch whose every request is gone does not run."""
        for i in ids:
            if request := self.by_id.pop((sender, i), None):
                request.cancelled = True

    def busy(self) -> bool:
        return bool(self.waiting) or bool(self.formed)

    def due_in(self, now: float) -> float | None:
        """Seconds until a batch is due (0: now); None when nothing waits, or when MAX_FORMED batches
        are on the device (the one that ends wakes the engine)."""
        if not self.waiting or len(self.formed) >= MAX_FORMED:
            return None
        if self.rows >= self.limits.max_batch_size:
            return 0.0
        return max(0.0, self.waiting[0].arrived + self.limits.max_queue_delay_s - now)

    def take_all(self) -> list[Pending]:
        waiting, self.waiting, self.rows, self.by_id = list(self.waiting), deque(), 0, {}
        return waiting

    def take(self) -> list[Pending]:
        """The next batch: requests in arrival order until their rows fill max_batch_size (at least
        one request)."""
        batch, rows = [], 0
        while self.waiting and (not batch or rows + self.waiting[0].count <= self.limits.max_batch_size):
            request = self.waiting.popleft()
            batch.append(request)
            rows += request.count
        self.rows -= rows
        return batch

    def start(self, device: DeviceThread):
        """Form the due batch and send it to the device: its live requests (a cancelled one, or one
        past its deadline, which the front-end has answered 504 already, is left out), their rows
        cut into calls (plan_calls) and padded here, the calls run on the device (device_thread.py).
        finish() answers it."""
        now, batch = time.monotonic(), []
        for request in self.take():
            if not request.cancelled and request.deadline >= now:
                batch.append(request)  # it stays in by_id until answered: a cancel may still stop its batch
            else:
                self.by_id.pop((request.sender, request.id), None)
        if not batch:
            return
        started = time.perf_counter()
        queue_time = metrics.of(metrics.QUEUE_TIME, self.runner.name)
        for request in batch:
            queue_time.observe(now - request.arrived)
            self.stats.add("queue", 1, now - request.arrived)
        lengths = np.frombuffer(b"".join([r.lengths for r in batch]), np.int32).astype(np.int64)
        padded = right_padded(np.frombuffer(b"".join([r.ids for r in batch]), np.int32), lengths, np.int64)  # (rows, T)
        calls = [(call, padded[call, : lengths[call[-1]]], lengths[call])  # ascending: its last row is its longest
                 for call in plan_calls(lengths, self.limits.max_batch_size, self.limits.max_batch_tokens)]
        input_s = time.perf_counter() - started  # taken before the submit: on the CPU the calls run inside it
        self.formed.append(Formed(batch, len(lengths), calls, device.submit(self.run_calls, batch, calls, now), input_s))

    def run_calls(self, batch: list[Pending], calls: list[Call], now: float) -> tuple[list[np.ndarray] | None, list[float]]:
        """On the device thread: each call through ONNX Runtime, in the batch's span; the outputs, and
        the seconds each took; none when every request of the batch was cancelled or timed out while
        it waited behind the batch before it."""
        if all(r.cancelled or r.deadline < time.monotonic() for r in batch):
            return None, []
        outputs, seconds = [], []
        with tracing.batch_span(self.runner.name, batch, now) as span:
            for _, ids, lengths in calls:
                started = time.perf_counter()
                outputs.append(self.runner.run_call(ids, lengths))
                seconds.append(time.perf_counter() - started)
            if span:
                span.set_attributes({"rnnserve.rows": sum(len(c) for c, _, _ in calls),
                                     "rnnserve.padded_tokens": sum(ids.size for _, ids, _ in calls),
                                     "rnnserve.tokens": sum(int(lengths.sum()) for _, _, lengths in calls)})
        return outputs, seconds

    def finish(self, post, wait: bool = False):
        """Answer the formed batches whose calls are done, oldest first (wait: every formed batch),
        through post(front-end, message): one message per front-end. A failing batch fails its
        requests, and only them."""
        name = self.runner.name
        while self.formed and (wait or self.formed[0].outputs.done()):
            formed = self.formed.popleft()
            for request in formed.requests:
                self.by_id.pop((request.sender, request.id), None)
            try:
                outputs, seconds = formed.outputs.result()
                if outputs is None:  # nobody waits for it: the front-ends answered (504) or dropped them
                    continue
                started = time.perf_counter()
                gathered = self.gathered(formed, outputs)
            except Exception as e:
                log.exception("batch of %d rows failed on %s", formed.rows, name)
                for request in formed.requests:
                    post(request.sender, Failed(request.id, 500, f"inference failed: {type(e).__name__}: {e}"))
                self.stats.failed(formed.requests, time.monotonic())
                continue
            metrics.of(metrics.INFERENCE_TIME, name).observe(sum(seconds))
            answers = results if isinstance(gathered, np.ndarray) else sequences
            for sender, message in answers(formed.requests, gathered):
                post(sender, message)
            self.stats.ran(formed.requests, formed.rows, [len(call) for call, _, _ in formed.calls],
                           {"compute_input": formed.input_s, "compute_infer": sum(seconds),
                            "compute_output": time.perf_counter() - started, "calls": seconds}, time.monotonic())

    def gathered(self, formed: Formed, outputs: list[np.ndarray]) -> np.ndarray | list[np.ndarray]:
        """The calls' outputs in the batch's row order: a classifier's (rows, C) logits, a language
        model's (T_i, V) per row."""
        name, gathered = self.runner.name, None
        for (call, ids, lengths), out in zip(formed.calls, outputs):
            if len(out) != len(call):
                raise RuntimeError(f"{name}: {len(call)} rows in, {len(out)} out")
            if gathered is None:
                gathered = np.empty((formed.rows, out.shape[1]), np.float32) if out.ndim == 2 else [None] * formed.rows
            if out.ndim == 2:
                gathered[call] = out
            else:  # (B, T, V): each row up to its length
                for j, i in enumerate(call.tolist()):
                    gathered[i] = out[j, : lengths[j]]
            metrics.of(metrics.BATCH_SIZE, name).observe(len(call))
            metrics.of(metrics.PADDING_RATIO, name).observe(ids.size / int(lengths.sum()) - 1)
        return gathered


def results(batch: list[Pending], outputs: np.ndarray):
    """A classifier's answers: per front-end one Results message, its requests' rows of logits."""
    mine: dict[bytes, tuple[list[int], list[int], list[np.ndarray]]] = {}
    start = 0
    for request in batch:
        n = request.count
        ids, counts, parts = mine.setdefault(request.sender, ([], [], []))
        ids.append(request.id)
        counts.append(n)
        parts.append(outputs[start: start + n])
        start += n
    width = outputs.shape[1]
    return [(sender, Results(ids, counts, width, np.concatenate(parts).tobytes()))
            for sender, (ids, counts, parts) in mine.items()]


def sequences(batch: list[Pending], outputs: list[np.ndarray]):
    """A language model's answers (V2 infer): per request (n, T, V), zero past each row's length."""
    start = 0
    for request in batch:
        mine = outputs[start: start + request.count]  # (T_i, V) each
        data = right_padded(np.concatenate(mine), np.fromiter(map(len, mine), np.int64, len(mine)))  # (n, T, V)
        start += len(mine)
        yield request.sender, Result(request.id, data.tobytes(), list(data.shape))


def plan_calls(lengths, max_rows: int, max_tokens: int) -> list[np.ndarray]:
    """Row indices grouped into calls: sorted by length, each call within max_rows and
    max_tokens = rows x its longest row (a row longer than max_tokens goes alone)."""
    lengths = np.asarray(lengths)
    order = np.argsort(lengths, kind="stable")
    ordered = lengths[order]
    calls, i = [], 0
    while i < len(order):  # ascending, so a call's last row is its longest
        ends = np.arange(i + 1, min(i + max_rows, len(order)) + 1)
        fits = ends[(ends - i) * ordered[ends - 1] <= max_tokens]
        j = int(fits[-1]) if len(fits) else i + 1
        calls.append(order[i:j])
        i = j
    return calls
