"""What one model version's batcher has done, as Triton's statistics extension counts it: requests
answered and failed, and the time each spent queued and in its batch's compute_input (forming and
padding), compute_infer (the ONNX Runtime calls) and compute_output (answers gathered); per call
size, the calls and their times. The engine sends these on the "statistics" control verb; the
front-ends sum every engine's (serving/frontend/core/statistics.py)."""
import time
from collections import defaultdict
from dataclasses import dataclass, field

PHASES = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")
COMPUTE = PHASES[3:]


def ns(seconds: float) -> int:
    return int(seconds * 1e9)


@dataclass(eq=False)
class Statistics:
    inference_count: int = 0  # rows answered (Triton: inferences, a batch of 4 counts 4)
    execution_count: int = 0  # ONNX Runtime calls
    last_inference_ms: int = 0  # ms since the epoch
    totals: dict = field(default_factory=lambda: {p: [0, 0] for p in PHASES})  # phase -> [count, ns]
    batches: dict = field(default_factory=lambda: defaultdict(lambda: {p: [0, 0] for p in COMPUTE}))  # rows -> ...

    def add(self, phase: str, count: int, seconds: float):
        self.totals[phase][0] += count
        self.totals[phase][1] += ns(seconds)

    def ran(self, requests: list, rows: int, calls: list[int], times: dict[str, float], now: float):
        """A batch answered: `requests` (each with its arrival, monotonic), `rows` in all, its calls'
        sizes, and the batch's seconds per compute phase; each call is charged its rows' share of
        compute_input and compute_output and its own compute_infer (times["calls"])."""
        self.inference_count += rows
        self.execution_count += len(calls)
        self.last_inference_ms = int(time.time() * 1000)
        for request in requests:
            self.add("success", 1, now - request.arrived)
        for phase in COMPUTE:
            self.add(phase, len(requests), times[phase] * len(requests))  # each request waits for its whole batch
        for size, infer_s in zip(calls, times["calls"]):
            batch = self.batches[size]
            for phase, seconds in (("compute_input", times["compute_input"] * size / rows), ("compute_infer", infer_s),
                                   ("compute_output", times["compute_output"] * size / rows)):
                batch[phase][0] += 1
                batch[phase][1] += ns(seconds)

    def failed(self, requests: list, now: float):
        for request in requests:
            self.add("fail", 1, now - request.arrived)

    def row(self, name: str, version: int) -> dict:
        """Triton's ModelStatistics, as JSON."""
        def duration(pair):
            return {"count": pair[0], "ns": pair[1]}
        return {"name": name, "version": str(version), "last_inference": self.last_inference_ms,
                "inference_count": self.inference_count, "execution_count": self.execution_count,
                "inference_stats": {p: duration(v) for p, v in self.totals.items()}
                | {"cache_hit": duration((0, 0)), "cache_miss": duration((0, 0))},
                "batch_stats": [{"batch_size": size} | {p: duration(v) for p, v in phases.items()}
                                for size, phases in sorted(self.batches.items())]}
