"""Language models in an engine: continuous-batched generation and sequence sessions, with every
RNN state held in one pool per model version.

An RNN's whole context is its state (layers x hidden numbers), so a generation is a loop of steps
"advance this state over these tokens". Each active generation and each session holds a slot of
the pool. One step gathers the slots that have work (a prompt to prefill, the token sampled last
step, a session's new text), runs them in one ONNX Runtime call (`lengths` keeps every row exact,
whatever its length), scatters the new states back and samples every generation's next token in
one vectorized pass (sampling.py), after the penalties of the generations that have any (their
counts of generated tokens and masks of seen tokens are (slots, V) arrays, V the model's
vocabulary, made when the first generation with a penalty comes). Log-probabilities are taken only for the generations that asked: of each sampled
token, and of each prompt token from the prefill's logits at every position.
New generations join at the next step; finished or cancelled ones leave and free their slot.
Work per token does not grow with the prompt or the text so far.

An RNN's state after a prompt is all a generation needs of it, so the states after the prompts seen
last are kept (with the next-token logits there; up to prompt_cache_bytes, least recently used out):
a generation whose prompt is one of them starts from that state and skips its prefill, as vLLM's
prefix caching skips a cached prefix. One that asks for the prompt's log-probabilities runs it.

A session step may carry its state (from a state token: any replica's, serving/frontend/core/state_token.py):
it is loaded into the session's slot when the step runs, and the state after it goes back when asked. A step
that carries a state and names no session runs in a slot of its own, freed after that one step.
"""
import functools
import logging
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from core.codec import pad
from serving.common import metrics
from serving.common.messages import Failed, Generate, Logprobs, PromptLogprobs, Step, Stepped, Tokens
from serving.engine.runner import Runner
from serving.engine.sampling import log_probabilities, most_likely, next_tokens, penalized

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Session:
    id: str
    slot: int
    last_used: float = field(default_factory=time.monotonic)
    tokens: int = 0  # read so far
    steps: list = field(default_factory=list)  # (sender, Step) in arrival order, one run per engine step
    alone: bool = False  # a carried state's one step: closed after it, and not a live session


class LanguageModel:
    """The generations and sessions of one language-model version. Everything a step needs is an
    array indexed by slot (the token to feed, how many were emitted, the sampling settings, the
    uniforms), so a step of decoding is a few vectorized operations, whatever the number of
    generations; Python loops only over those that join or leave."""

    def __init__(self, runner: Runner, max_generations: int, max_sessions: int, idle_s: float, max_new_tokens: int,
                 prompt_cache_bytes: int = 0):
        self.runner, self.max_generations, self.max_sessions, self.idle_s = runner, max_generations, max_sessions, idle_s
        self.vocab_size = int(runner.manifest.outputs[0].shape[-1])  # logits (batch, seq, vocab)
        slots = max_generations + max_sessions
        self.pool = runner.zero_state(slots)  # (layers, slots, H) per state input: the graph's own layout
        self.free = list(range(slots))[::-1]
        self.next_token, self.emitted, self.max_new, self.request_id, self.frontend = (
            np.zeros(slots, np.int64) for _ in range(5))
        self.temperature, self.top_p, self.top_k = np.zeros(slots), np.ones(slots), np.zeros(slots, np.int64)
        self.presence, self.frequency, self.repetition = np.zeros(slots), np.zeros(slots), np.ones(slots)
        self.penalized = np.zeros(slots, bool)  # the slots with a penalty
        self.with_penalties = self.with_logprobs = 0  # generations that have them: a step with none skips them
        self.counts = self.seen = None  # (slots, V): generated tokens' counts, seen tokens; made at the first penalty
        self.alternatives = np.full(slots, -1, np.int64)  # logprobs' alternatives per token (-1: no logprobs)
        self.scored: set[int] = set()  # slots whose prompt's log-probabilities are sent after the prefill
        self.uniforms = np.zeros((slots, max_new_tokens))  # a generation's draws, one per token (pages touched as used)
        self.senders: list[bytes] = []  # front-ends, by the index in self.frontend
        self.streams: dict[tuple[bytes, int], int] = {}  # (front-end, request id) -> slot
        self.prompts: dict[int, list[int]] = {}  # slot -> its prompt, fed at the next step
        self.decoding: np.ndarray = np.zeros(0, np.int64)  # slots that feed their last token
        self.sessions: dict[str, Session] = {}
        self.stepping: dict[str, Session] = {}  # the sessions with a step waiting, in arrival order
        self.waiting_steps: dict[tuple[bytes, int], Session] = {}  # (front-end, request id) -> its session
        self.prompt_states: OrderedDict[tuple[int, ...], tuple[list[np.ndarray], np.ndarray]] = OrderedDict()
        self.max_prompt_states = prompt_cache_bytes // (self.state_bytes + 4 * self.vocab_size)  # states, (V,) logits

    @property
    def name(self) -> str:
        return self.runner.name

    @functools.cached_property
    def step_label(self) -> str:
        """Its steps' batch size and time are the model's histograms under this name."""
        return f"{self.name}:step"

    def take_slot(self) -> int:
        slot = self.free.pop()
        for state in self.pool:
            state[:, slot] = 0.0  # (layers, H): the zero state
        return slot

    def start(self, sender: bytes, request: Generate) -> Failed | None:
        if len(self.streams) >= self.max_generations:
            return Failed(request.id, 503, f"{self.max_generations} generations already running; retry shortly")
        if sender not in self.senders:
            self.senders.append(sender)
        slot = self.take_slot()
        self.streams[sender, request.id] = slot
        self.prompts[slot] = request.prompt
        self.emitted[slot], self.max_new[slot], self.request_id[slot] = 0, request.max_new_tokens, request.id
        self.frontend[slot] = self.senders.index(sender)
        self.temperature[slot], self.top_k[slot], self.top_p[slot] = request.temperature, request.top_k, request.top_p
        self.presence[slot], self.frequency[slot] = request.presence_penalty, request.frequency_penalty
        self.repetition[slot], self.alternatives[slot] = request.repetition_penalty, request.logprobs
        self.penalized[slot] = (request.presence_penalty != 0 or request.frequency_penalty != 0
                                or request.repetition_penalty != 1)
        if self.penalized[slot]:
            if self.counts is None:
                self.counts = np.zeros((len(self.penalized), self.vocab_size), np.int32)
                self.seen = np.zeros((len(self.penalized), self.vocab_size), bool)
            self.counts[slot], self.seen[slot] = 0, False
            self.seen[slot, request.prompt] = True
        self.with_penalties += int(self.penalized[slot])
        self.with_logprobs += int(request.logprobs >= 0)
        if request.prompt_logprobs:
            self.scored.add(slot)
        if request.temperature:
            self.uniforms[slot, : request.max_new_tokens] = np.random.default_rng(request.seed).random(request.max_new_tokens)
        metrics.of(metrics.ACTIVE_GENERATIONS, self.name).inc()
        return None

    def end(self, key: tuple[bytes, int]):
        """A generation cancelled or failed between steps: it leaves the next one too."""
        slot = self.release(key)
        if slot is not None:
            self.decoding = self.decoding[self.decoding != slot]

    def release(self, key: tuple[bytes, int]) -> int | None:
        """Free a generation's slot (the step that ends it sets self.decoding itself)."""
        slot = self.streams.pop(key, None)
        if slot is None:
            return None
        self.prompts.pop(slot, None)
        self.scored.discard(slot)
        self.with_penalties -= int(self.penalized[slot])
        self.with_logprobs -= int(self.alternatives[slot] >= 0)
        self.free.append(slot)
        metrics.of(metrics.ACTIVE_GENERATIONS, self.name).dec()
        return slot

    @functools.cached_property
    def state_bytes(self) -> int:
        """A slot's state as a step carries it: every state input's (layers, H) float32."""
        return sum(state[:, 0].nbytes for state in self.pool)

    def open(self, name: str = "", alone: bool = False) -> str | None:
        """A new session at the zero state, its id `name` if the client gave one (a live session of
        that name starts again); None when max_sessions are live (a step alone counts among them).
        Idle sessions are expired here only when they are in the way (else housekeeping does it)."""
        if name:
            self.close(name)
        if len(self.sessions) >= self.max_sessions:
            self.expire()
        if len(self.sessions) >= self.max_sessions:
            return None
        session = Session(name or secrets.token_hex(8), self.take_slot(), alone=alone)
        self.sessions[session.id] = session
        if not alone:
            metrics.of(metrics.LIVE_SESSIONS, self.name).inc()
        return session.id

    def close(self, sid: str) -> bool:
        session = self.sessions.pop(sid, None)
        if session is None:
            return False
        self.stepping.pop(sid, None)
        for sender, request in session.steps:
            self.waiting_steps.pop((sender, request.id), None)
        self.free.append(session.slot)
        if not session.alone:
            metrics.of(metrics.LIVE_SESSIONS, self.name).dec()
        return True

    def expire(self, everything: bool = False):
        """End the sessions idle for longer than idle_s (all of them when the version retires)."""
        now = time.monotonic()
        for sid in [s.id for s in self.sessions.values()
                    if everything or (not s.steps and now - s.last_used > self.idle_s)]:
            self.close(sid)

    def step_session(self, sender: bytes, request: Step, sid: str = "") -> Failed | None:
        """Queue a step of the session `request` names (or `sid`, the one a carried state opened)."""
        session, now = self.sessions.get(sid or request.session), time.monotonic()
        if session and not session.steps and now - session.last_used > self.idle_s:
            self.close(session.id)  # expired, though housekeeping has not come round to it yet
            session = None
        if session is None:
            return Failed(request.id, 404, f"no session {request.session!r} (ended, expired, or its version was replaced)")
        session.last_used = now
        session.steps.append((sender, request))
        self.stepping[session.id] = session
        self.waiting_steps[sender, request.id] = session
        return None

    def step_carried(self, sender: bytes, request: Step) -> Failed | None:
        """A step that carries its state: in the session it names (opened here if it is not live: it
        went on on another replica), or, naming none, in a slot of its own for this one step."""
        if len(request.state) != self.state_bytes:
            return Failed(request.id, 400, f"a state of {len(request.state)} bytes: {self.name} "
                                           f"v{self.runner.version} keeps {self.state_bytes}")
        name = request.session or f":{sender.hex()}:{request.id}"  # no client can name it (REST ids hold no ':')
        if name not in self.sessions and self.open(name, alone=not request.session) is None:
            return Failed(request.id, 503, f"{self.max_sessions} sessions are live; retry shortly")
        return self.step_session(sender, request, name)

    def load(self, session: Session, request: Step):
        """A carried state into the session's slot: each state input's (layers, H), one after another."""
        carried = np.frombuffer(request.state, np.float32).reshape(len(self.pool), *self.pool[0][:, 0].shape)
        self.put(session.slot, carried)
        session.tokens = request.tokens

    def put(self, slot: int, states):
        """Into a slot of the pool: one (layers, H) state per state input of the graph."""
        for state, given in zip(self.pool, states):
            state[:, slot] = given

    def state_of(self, slot: int) -> bytes:
        """The slot's state as a step carries it."""
        return b"".join(state[:, slot].tobytes() for state in self.pool)

    def cancel(self, sender: bytes, ids: list[int]):
        """These requests' generations end and their session steps are dropped: work by the ids."""
        for i in ids:
            self.end((sender, i))
            if session := self.waiting_steps.pop((sender, i), None):
                session.steps = [(s, r) for s, r in session.steps if s != sender or r.id != i]
                if not session.steps:
                    self.stepping.pop(session.id, None)
                if session.alone:
                    self.close(session.id)

    def has_work(self) -> bool:
        return bool(self.streams) or bool(self.stepping)

    def next_steps(self, now: float) -> list[tuple[bytes, Step, Session]]:
        """Each session's oldest waiting step (one per session a step), those past their deadline
        dropped: the front-end has answered them 504 already."""
        steps = []
        for session in list(self.stepping.values()):
            sender, request = session.steps.pop(0)
            self.waiting_steps.pop((sender, request.id), None)
            if not session.steps:
                del self.stepping[session.id]
            if request.deadline >= now:
                steps.append((sender, request, session))
            elif session.alone:
                self.close(session.id)
        return steps

    def step(self) -> list[tuple[bytes, object]]:
        """One step of every slot with work: the prompts of new generations and the sessions' new
        text in one call of their own (rows of several lengths), and the last token of every other
        generation in another (one token each, no padding). Returns (front-end, reply) pairs (one
        Tokens message per front-end with the next token of each of its generations, and each
        session step's k most likely next tokens)."""
        recalled, recalled_logits, prefill = self.recall(list(self.prompts.items()))
        steps = self.next_steps(time.monotonic())
        prefilled = np.array([*recalled, *(slot for slot, _ in prefill)], np.int64)
        if not len(prefilled) and not len(self.decoding) and not steps:
            return []
        sampling = self.max_new[prefilled] > 0  # (P,): the others only score their prompt
        generating = np.concatenate([prefilled[sampling], self.decoding])
        started = time.perf_counter()
        try:
            for _, request, session in steps:
                if request.state:
                    self.load(session, request)
            read, scores = self.advance([*(slot for slot, _ in prefill), *(session.slot for _, _, session in steps)],
                                        [prompt for _, prompt in prefill] + [request.ids for _, request, _ in steps])
            self.remember(prefill, read[: len(prefill)])
            decoded, _ = self.advance(self.decoding, None)
            after_prompts = np.concatenate([np.array(recalled_logits, read.dtype).reshape(-1, self.vocab_size),
                                            read[: len(prefill)]])  # (P, V), as the graph gave them
            replies, ended = self.sampled(generating, np.concatenate([after_prompts[sampling], decoded]))
        except Exception as e:  # a failing step fails what was in it, and only that
            log.exception("a step of %d generations and %d session steps failed on %s", len(generating), len(steps),
                          self.name)
            return self.fail(np.concatenate([prefilled, self.decoding]), steps,
                             f"generation failed: {type(e).__name__}: {e}")
        self.prompts.clear()
        replies = self.scores(scores) + replies  # a prompt's log-probabilities before its first token
        self.decoding = generating[~ended]
        metrics.of(metrics.INFERENCE_TIME, self.step_label).observe(time.perf_counter() - started)
        best = most_likely(read[len(prefill):], np.array([r.top_k for _, r, _ in steps], np.int64)) if steps else []
        for (tokens, p), (sender, request, session) in zip(best, steps):
            session.last_used, session.tokens = time.monotonic(), session.tokens + len(request.ids)
            state = self.state_of(session.slot) if request.return_state else b""
            replies.append((sender, Stepped(request.id, tokens, p, session.tokens, state)))
            if session.alone:
                self.close(session.id)
        return replies

    def recall(self, prompts: list[tuple[int, list[int]]]
               ) -> tuple[list[int], list[np.ndarray], list[tuple[int, list[int]]]]:
        """The (slot, prompt)s of new generations whose prompt's state is kept: their slots, given
        that state now, and the (V,) logits after it; and the others, whose prompts are to run."""
        slots, logits, to_run = [], [], []
        for slot, prompt in prompts:
            kept = None if slot in self.scored else self.prompt_states.get(key := tuple(prompt))
            if kept is None:
                to_run.append((slot, prompt))
                continue
            self.prompt_states.move_to_end(key)
            self.put(slot, kept[0])
            slots.append(slot)
            logits.append(kept[1])
        return slots, logits, to_run

    def remember(self, prompts: list[tuple[int, list[int]]], logits: np.ndarray):
        """Keep the state each prompt just ran to (now in its slot) and its (V,) row of logits, the
        least recently used ones out beyond max_prompt_states."""
        if not self.max_prompt_states:
            return
        for (slot, prompt), row in zip(prompts, logits):
            self.prompt_states[key := tuple(prompt)] = ([state[:, slot].copy() for state in self.pool], row.copy())
            self.prompt_states.move_to_end(key)
        while len(self.prompt_states) > self.max_prompt_states:
            self.prompt_states.popitem(last=False)

    def advance(self, slots, rows: list[list[int]] | None) -> tuple[np.ndarray, dict[int, list[float | None]]]:
        """One call: these slots' states over their rows (None: each slot's last sampled token), the
        new states kept; the next-token logits (B, V) at each row's end, and the prompt's
        log-probabilities of each slot that asked for them (slot -> one per token; the first: None)."""
        slots = np.asarray(slots, np.int64)
        if not len(slots):
            return np.zeros((0, self.vocab_size), np.float32), {}
        if rows is None:
            ids, lengths = self.next_token[slots][:, None], np.ones(len(slots), np.int64)
        else:
            ids, lengths = pad(rows)
        gathered = [state[:, slots] for state in self.pool]  # (layers, B, H) each: the slots' columns
        scoring = rows is not None and bool(self.scored) and not self.scored.isdisjoint(slots.tolist())
        logits, states = self.runner.advance(ids, lengths, gathered, scoring)  # scoring: (B, T, V), else (B, V)
        for state, new in zip(self.pool, states):
            state[:, slots] = new  # (layers, B, H) back into the slots' columns
        metrics.of(metrics.BATCH_SIZE, self.step_label).observe(len(slots))
        if not scoring:
            return logits, {}
        scores = {slot: prompt_logprobs(logits[i, : lengths[i]], ids[i, : lengths[i]])
                  for i, slot in enumerate(slots.tolist()) if slot in self.scored}
        return logits[np.arange(len(lengths)), lengths - 1], scores  # (B, V) at each row's last token

    def scores(self, scores: dict[int, list[float | None]]) -> list[tuple[bytes, PromptLogprobs]]:
        """The prompts' log-probabilities, each to its front-end; a generation of no tokens (it only
        scores its prompt) ends with them."""
        replies = []
        for slot, logprobs in scores.items():
            self.scored.discard(slot)
            key, last = (self.senders[self.frontend[slot]], int(self.request_id[slot])), bool(self.max_new[slot] == 0)
            replies.append((key[0], PromptLogprobs(key[1], logprobs, last)))
            if last:
                self.release(key)
        return replies

    def sampled(self, slots: np.ndarray, logits: np.ndarray) -> tuple[list[tuple[bytes, Tokens]], np.ndarray]:
        """Every generation's next token, sampled in one pass; one Tokens message per front-end;
        the generations that reached max_new_tokens end (the mask of those is returned too)."""
        if not len(slots):
            return [], np.zeros(0, bool)
        emitted = self.emitted[slots]
        rows = np.flatnonzero(self.penalized[slots]) if self.with_penalties else ()  # (R,) the rows with a penalty
        if len(rows):
            with_penalty = slots[rows]
            logits = penalized(logits, rows, self.counts[with_penalty], self.seen[with_penalty],
                               self.presence[with_penalty], self.frequency[with_penalty], self.repetition[with_penalty])
        tokens = next_tokens(logits, self.temperature[slots], self.top_k[slots], self.top_p[slots],
                             self.uniforms[slots, emitted])
        if len(rows):
            self.counts[with_penalty, tokens[rows]] += 1
            self.seen[with_penalty, tokens[rows]] = True
        self.next_token[slots], self.emitted[slots] = tokens, emitted + 1
        last = emitted + 1 >= self.max_new[slots]
        frontends, ids = self.frontend[slots], self.request_id[slots]
        replies = [(self.senders[f], Tokens(ids[mine].tolist(), tokens[mine].tolist(), last[mine].tolist()))
                   for f in np.unique(frontends) for mine in [frontends == f]]
        if self.with_logprobs and len(asked := np.flatnonzero(self.alternatives[slots] >= 0)):
            replies = self.logprobs(asked, slots, logits, tokens) + replies  # each before its Tokens
        for f, rid in zip(frontends[last].tolist(), ids[last].tolist()):
            self.release((self.senders[f], rid))
        metrics.of(metrics.TOKENS_GENERATED, self.name).inc(len(slots))
        return replies, last

    def logprobs(self, asked: np.ndarray, slots: np.ndarray, logits: np.ndarray,
                 tokens: np.ndarray) -> list[tuple[bytes, Logprobs]]:
        """The log-probabilities of the rows `asked` (of slots, logits and tokens): one Logprobs
        message per front-end."""
        chosen, top = log_probabilities(logits[asked], tokens[asked], self.alternatives[slots[asked]])
        frontends, ids = self.frontend[slots[asked]].tolist(), self.request_id[slots[asked]].tolist()
        replies = {}
        for f, rid, lp, alternatives in zip(frontends, ids, chosen, top):
            message = replies.setdefault(f, Logprobs([], [], []))
            message.ids.append(rid)
            message.logprobs.append(lp)
            message.top.append(alternatives)
        return [(self.senders[f], message) for f, message in replies.items()]

    def fail(self, generating: np.ndarray, steps: list, error: str) -> list[tuple[bytes, Failed]]:
        replies = [(sender, Failed(request.id, 500, error)) for sender, request, _ in steps]
        for _, _, session in steps:
            if session.alone:
                self.close(session.id)
        for slot in generating.tolist():
            key = (self.senders[self.frontend[slot]], int(self.request_id[slot]))
            replies.append((key[0], Failed(key[1], 500, error)))
            self.end(key)
        return replies


def prompt_logprobs(logits: np.ndarray, ids: np.ndarray) -> list[float | None]:
    """(T, V) logits at each prompt token and its (T,) ids -> each token's log-probability given the
    ones before it (log-softmax of the position before, float32); the first has none."""
    z = logits[:-1].astype(np.float32) - logits[:-1].max(axis=1, keepdims=True)  # (T - 1, V)
    z -= np.log(np.exp(z).sum(axis=1, keepdims=True))
    return [None, *z[np.arange(len(z)), ids[1:]].tolist()]
