"""A deployment: one loaded model version and what serves it (its batcher; for a language model
also its step batcher, sessions and generation count).

Routes take the deployment once, at the start of a request, and hold it until they answer
(`with deployment.hold()`), so a request runs wholly on one version. A swap puts the new
deployment in place for new requests; the old one is retired: it waits until nothing holds it,
then stops its batchers, and its ONNX Runtime session is released with it.
"""
import asyncio
import ctypes
import gc
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass

from serving import metrics
from serving.batcher import Batcher
from serving.generation import Sessions
from serving.model import ServedModel
from serving.settings import Settings

log = logging.getLogger(__name__)


@dataclass(eq=False)  # compared and hashed by identity: the repository keys retiring ones
class Deployment:
    model: ServedModel
    batcher: Batcher
    stepper: Batcher | None = None  # language models: their steps, batched across generations
    sessions: Sessions | None = None
    generations: int = 0  # generations running now
    holders: int = 0  # requests using this deployment now (queued, running or streaming)

    @classmethod
    def start(cls, model: ServedModel, settings: Settings) -> "Deployment":
        """Batchers for `model`, started on the running event loop."""
        limits = dict(max_batch_size=settings.max_batch_size, max_batch_tokens=settings.max_batch_tokens,
                      max_queue_delay_ms=settings.max_queue_delay_ms, max_queue_size=settings.max_queue_size)
        deployment = cls(model, Batcher(model.name, model.run_rows, **limits))
        if model.task == "lm":
            deployment.stepper = Batcher(f"{model.name}:step", model.advance, **limits)
            deployment.sessions = Sessions(model, settings.max_sessions, settings.session_idle_s)
        for batcher in deployment.batchers:
            batcher.start()
        return deployment

    @property
    def batchers(self) -> list[Batcher]:
        return [self.batcher] + ([self.stepper] if self.stepper else [])

    def acquire(self):
        """A request starts using this deployment: retiring waits until it is released."""
        self.holders += 1
        metrics.IN_FLIGHT.labels(self.model.name).inc()

    def release(self):
        self.holders -= 1
        metrics.IN_FLIGHT.labels(self.model.name).dec()

    @contextmanager
    def hold(self):
        self.acquire()
        try:
            yield self
        finally:
            self.release()

    async def retire(self, grace_s: float):
        """Wait until no request holds this deployment (at most grace_s), then stop its batchers;
        requests still waiting after that get an error, not silence."""
        deadline = time.monotonic() + grace_s
        while self.holders and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self.holders:
            log.warning("%s v%s retired with %d requests unanswered after %.0fs",
                        self.model.name, self.model.version, self.holders, grace_s)
        try:
            for batcher in self.batchers:
                await batcher.stop()
        finally:
            if self.sessions:
                self.sessions.expire(everything=True)
            self.model.session = None  # the ONNX Runtime session goes now, not with the last reference
        return_freed_memory()
        log.info("released %s version %s", self.model.name, self.model.version)


def return_freed_memory():
    """Give freed heap back to the OS. Each load runs in other threads, and glibc keeps what
    their arenas freed; without this the resident size grew ~20 MB per reload in the soak."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
