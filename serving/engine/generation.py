"""Language models in an engine: continuous-batched generation and sequence sessions, with every
RNN state held in one pool per model version.

An RNN's whole context is its state (layers x hidden numbers), so a generation is a loop of steps
"advance this state over these tokens". Each active generation and each session holds a slot of
the pool. One step gathers the slots that have work (a prompt to prefill, the token sampled last
step, a session's new text), runs them in one ONNX Runtime call (`lengths` keeps every row exact,
whatever its length), scatters the new states back and samples each generation's next token.
New generations join at the next step; finished or cancelled ones leave and free their slot.
Work per token does not grow with the prompt or the text so far.
"""
import logging
import secrets
import time
from dataclasses import dataclass, field

import numpy as np

from core.codec import softmax
from serving import metrics
from serving.engine.runner import Runner
from serving.messages import Failed, Generate, Step, Stepped, Tokens

log = logging.getLogger(__name__)


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


@dataclass(eq=False)
class Stream:
    """One generation: its slot, what it feeds next, and how it samples."""
    sender: bytes
    request: Generate
    slot: int
    feed: list[int]  # the prompt, then the token sampled last
    rng: np.random.Generator
    emitted: int = 0


@dataclass(eq=False)
class Session:
    id: str
    slot: int
    last_used: float = field(default_factory=time.monotonic)
    tokens: int = 0  # read so far
    steps: list = field(default_factory=list)  # (sender, Step) in arrival order, one run per engine step


class LanguageModel:
    """The generations and sessions of one language-model version."""

    def __init__(self, runner: Runner, max_generations: int, max_sessions: int, idle_s: float):
        self.runner, self.max_generations, self.max_sessions, self.idle_s = runner, max_generations, max_sessions, idle_s
        self.pool = np.zeros((max_generations + max_sessions, *runner.zero_state().shape), np.float32)  # (slots, S, L, H)
        self.free = list(range(len(self.pool)))[::-1]
        self.streams: dict[tuple[bytes, int], Stream] = {}
        self.sessions: dict[str, Session] = {}

    @property
    def name(self) -> str:
        return self.runner.name

    def take_slot(self) -> int:
        slot = self.free.pop()
        self.pool[slot] = 0.0  # the zero state
        return slot

    def start(self, sender: bytes, request: Generate) -> Failed | None:
        if len(self.streams) >= self.max_generations:
            return Failed(request.id, 503, f"{self.max_generations} generations already running; retry shortly")
        self.streams[sender, request.id] = Stream(sender, request, self.take_slot(), request.prompt,
                                                  np.random.default_rng(request.seed))
        metrics.ACTIVE_GENERATIONS.labels(self.name).inc()
        return None

    def end(self, key: tuple[bytes, int]):
        stream = self.streams.pop(key, None)
        if stream:
            self.free.append(stream.slot)
            metrics.ACTIVE_GENERATIONS.labels(self.name).dec()

    def open(self) -> str | None:
        self.expire()
        if len(self.sessions) >= self.max_sessions:
            return None
        session = Session(secrets.token_hex(8), self.take_slot())
        self.sessions[session.id] = session
        metrics.LIVE_SESSIONS.labels(self.name).inc()
        return session.id

    def close(self, sid: str) -> bool:
        session = self.sessions.pop(sid, None)
        if session is None:
            return False
        self.free.append(session.slot)
        metrics.LIVE_SESSIONS.labels(self.name).dec()
        return True

    def expire(self, everything: bool = False):
        """End the sessions idle for longer than idle_s (all of them when the version retires)."""
        now = time.monotonic()
        for sid in [s.id for s in self.sessions.values()
                    if everything or (not s.steps and now - s.last_used > self.idle_s)]:
            self.close(sid)

    def step_session(self, sender: bytes, request: Step) -> Failed | None:
        session, now = self.sessions.get(request.session), time.monotonic()
        if session and not session.steps and now - session.last_used > self.idle_s:
            self.close(session.id)  # expired, though housekeeping has not come round to it yet
            session = None
        if session is None:
            return Failed(request.id, 404, f"no session {request.session!r} (ended, expired, or its version was replaced)")
        session.last_used = now
        session.steps.append((sender, request))
        return None

    def cancel(self, sender: bytes, ids: list[int]):
        for i in ids:
            self.end((sender, i))
        gone = set(ids)
        for session in self.sessions.values():
            session.steps = [(s, r) for s, r in session.steps if s != sender or r.id not in gone]

    def has_work(self) -> bool:
        return bool(self.streams) or any(s.steps for s in self.sessions.values())

    def step(self) -> list[tuple[bytes, object]]:
        """One ONNX Runtime call over every slot with work; returns (sender, reply) pairs: each
        generation's next token, each session step's next-token logits."""
        now = time.monotonic()
        rows, slots, owners = [], [], []
        for stream in self.streams.values():
            rows.append(stream.feed)
            slots.append(stream.slot)
            owners.append(stream)
        for session in self.sessions.values():
            if session.steps:
                sender, request = session.steps.pop(0)
                if request.deadline < now:
                    continue  # the front-end has answered 504 already
                rows.append(request.ids)
                slots.append(session.slot)
                owners.append((sender, request, session))
        if not rows:
            return []
        started = time.perf_counter()
        try:
            logits, state = self.runner.advance(rows, self.pool[slots])  # (B, V), (B, S, L, H)
        except Exception as e:  # a failing step fails what was in it, and only that
            log.exception("a step of %d rows failed on %s", len(rows), self.name)
            return self.fail(owners, f"generation failed: {type(e).__name__}: {e}")
        self.pool[slots] = state
        metrics.of(metrics.INFERENCE_TIME, f"{self.name}:step").observe(time.perf_counter() - started)
        metrics.of(metrics.BATCH_SIZE, f"{self.name}:step").observe(len(rows))
        replies, tokens = [], {}
        for row, owner in zip(logits, owners):
            if isinstance(owner, Stream):
                r = owner.request
                token = sample(row, r.temperature, r.top_k, r.top_p, owner.rng)
                owner.feed, owner.emitted = [token], owner.emitted + 1
                last = owner.emitted >= r.max_new_tokens
                ids, toks, lasts = tokens.setdefault(owner.sender, ([], [], []))
                ids.append(r.id)
                toks.append(token)
                lasts.append(last)
                if last:
                    self.end((owner.sender, r.id))
            else:
                sender, request, session = owner
                session.last_used, session.tokens = time.monotonic(), session.tokens + len(request.ids)
                replies.append((sender, Stepped(request.id, row.astype(np.float32).tobytes(), session.tokens)))
        metrics.of(metrics.TOKENS_GENERATED, self.name).inc(sum(len(t[0]) for t in tokens.values()))
        return replies + [(sender, Tokens(*t)) for sender, t in tokens.items()]

    def fail(self, owners: list, error: str) -> list[tuple[bytes, Failed]]:
        replies = []
        for owner in owners:
            if isinstance(owner, Stream):
                replies.append((owner.sender, Failed(owner.request.id, 500, error)))
                self.end((owner.sender, owner.request.id))
            else:
                replies.append((owner[0], Failed(owner[1].id, 500, error)))
        return replies
