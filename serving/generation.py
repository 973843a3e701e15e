"""Language models: continuous-batched generation and stateful sequence sessions.

An RNN's whole context is its state (layers x hidden numbers), so a generation is a loop of
steps "advance this state over these tokens". Every step goes through the model's step batcher
("<model>:step"): all steps queued at once share one ONNX Runtime call, whether they are
prompts being prefilled (lengths differ: the graph's `lengths` keeps each state exact) or one
token of a running generation, or a session's new text. When a call returns, every generation
samples its next token and queues its next step before the batcher runs again, so the active
generations advance together, one call per token; new ones join at the next call, finished or
abandoned ones leave at once. Work per token does not grow with the prompt or the text so far.
"""
import asyncio
import secrets
import time
from dataclasses import dataclass, field

import numpy as np

from core.codec import softmax
from serving import metrics
from serving.batcher import Batcher
from serving.model import ServedModel, Step
from serving.schemas import GenerateRequest


def sample(logits: np.ndarray, temperature: float, top_k: int, top_p: float, rng: np.random.Generator) -> int:
    """The next token from (V,) logits: greedy at temperature 0, else from the filtered softmax."""
    if temperature == 0:
        return int(np.argmax(logits))
    z = (logits.astype(np.float64) - logits.max()) / temperature  # max 0: no overflow at tiny temperatures
    if 0 < top_k < len(z):
        z[z < np.partition(z, -top_k)[-top_k]] = -np.inf
    p = softmax(z)
    if top_p < 1:
        order = np.argsort(-p)
        outside = np.cumsum(p[order]) - p[order] >= top_p  # tokens past the nucleus
        p[order[outside]] = 0
        p /= p.sum()
    return int(rng.choice(len(p), p=p))


@dataclass
class Generation:
    """One generate request, advanced by its own coroutine through the shared step batcher."""
    model: ServedModel
    stepper: Batcher
    body: GenerateRequest
    timeout_s: float  # for the first token (the prompt's prefill), and then for each step
    prompt_ids: list[int] = field(default_factory=list)
    unknown: int = 0
    text: str = ""
    tokens: int = 0
    finish_reason: str | None = None

    def __post_init__(self):
        self.prompt_ids = self.model.codec.ids(self.body.prompt)
        self.unknown = self.prompt_ids.count(self.model.codec.vocab.unk_id)

    async def pieces(self):
        """Yields each generated token's text; sets finish_reason, text and tokens."""
        body, rng = self.body, np.random.default_rng(self.body.seed)
        (logits, state), = await self.stepper.submit([Step(self.prompt_ids, self.model.zero_state())], self.timeout_s)
        while True:
            token = sample(logits, body.temperature, body.top_k, body.top_p, rng)
            piece = self.model.codec.decode([token])
            self.tokens += 1
            self.text += piece
            stop = next((s for s in body.stop if s and s in self.text[-(len(piece) + len(s)):]), None)
            if stop:
                self.text = self.text[: self.text.index(stop)]
                self.finish_reason = "stop"
            elif self.tokens >= body.max_new_tokens:
                self.finish_reason = "length"
            yield piece
            if self.finish_reason:
                return
            (logits, state), = await self.stepper.submit([Step([token], state)], self.timeout_s)


@dataclass
class Session:
    id: str
    state: np.ndarray
    logits: np.ndarray | None = None
    tokens: int = 0
    last_used: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class Sessions:
    """Live sequence sessions of one model: a cap, and expiry after idle_s unused. The live-sessions
    gauge follows every change, expiry included."""

    def __init__(self, model: ServedModel, max_sessions: int, idle_s: float):
        self.model, self.max_sessions, self.idle_s = model, max_sessions, idle_s
        self.live: dict[str, Session] = {}

    def expire(self, everything: bool = False):
        """End the sessions idle for longer than idle_s (all of them when the model version retires)."""
        now = time.monotonic()
        expired = [sid for sid, s in self.live.items() if everything or now - s.last_used > self.idle_s]
        for sid in expired:
            self.delete(sid)

    def create(self) -> Session | None:
        """A new session at the zero state, or None when the cap is reached."""
        self.expire()
        if len(self.live) >= self.max_sessions:
            return None
        session = Session(secrets.token_hex(8), self.model.zero_state())
        self.live[session.id] = session
        metrics.LIVE_SESSIONS.labels(self.model.name).inc()
        return session

    def get(self, sid: str) -> Session | None:
        self.expire()
        session = self.live.get(sid)
        if session:
            session.last_used = time.monotonic()
        return session

    def delete(self, sid: str) -> bool:
        if self.live.pop(sid, None) is None:
            return False
        metrics.LIVE_SESSIONS.labels(self.model.name).dec()
        return True


def top_k(model: ServedModel, logits: np.ndarray, k: int) -> list[dict]:
    p = softmax(logits)
    best = np.argsort(-p)[:k]
    return [{"token": model.codec.vocab.itos[i], "probability": float(p[i])} for i in best]
