"""What front-ends and engines say to each other: msgspec structs, sent as msgpack in the frames of
a Unix stream socket (serving/common/frames.py).

A front-end holds one connection per engine; an engine listens on one socket. Each frame
carries a list of messages: a front-end sends what its event loop produced in one turn, an
engine sends, per front-end, what one batch or one generation step produced. Deadlines are
time.monotonic() values: every process on a machine reads the same clock.
"""
from dataclasses import dataclass
from itertools import chain

import msgspec
import numpy as np


class Message(msgspec.Struct, tag=True, array_like=True):
    pass


# front-end -> engine
class Hello(Message):
    """A front-end (re)connected: the engine answers with its catalog."""


class Infer(Message):
    id: int
    model: str
    version: int  # the version whose codec made the rows: it must run there (else Failed 410, and retry)
    ids: bytes  # every row's token ids end to end, int32 (Rows)
    lengths: bytes  # each row's length, int32
    deadline: float
    trace: str = ""  # the request's W3C traceparent when tracing is on (serving/common/tracing.py)
    alone: bool = False  # the front-end had no other request in flight: its user waits for each answer


class Generate(Message):
    """A generation to start. Its first token's deadline is the front-end's to keep (it sends Cancel
    past it): the engine is sent none."""
    id: int
    model: str
    version: int
    prompt: list[int]
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int | None
    presence_penalty: float = 0.0  # logits[t] -= presence * (t generated) + frequency * (times t generated)
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # logits of tokens in the prompt or generated: / it if positive, * it if not
    logprobs: int = -1  # each generated token's log-probability and that many alternatives (-1: none)
    prompt_logprobs: bool = False  # each prompt token's log-probability, sent before the first token


class OpenSession(Message):
    id: int
    model: str
    name: str = ""  # the session's id when the client names it (a Triton sequence); else the engine draws one


class Step(Message):
    """A session's step. One that carries a state (a state token's, serving/frontend/core/state_token.py) starts
    from it, on the version it names: in the session named (opened here if it is not live: it went on elsewhere),
    or with no session named, in a slot of its own for this one step."""
    id: int
    session: str
    ids: list[int]
    deadline: float
    top_k: int  # the engine answers the k most likely next tokens, not the whole distribution
    state: bytes = b""  # every state input's (layers, H) float32, one after another; b"": the session's own
    tokens: int = 0  # read before `state`
    model: str = ""  # a carried state's model and version
    version: int = 0
    return_state: bool = False  # answer the state after the step too


class CloseSession(Message):
    id: int
    session: str


class Cancel(Message):
    """The client left or its deadline passed: drop these requests (or end these generations)."""
    ids: list[int]


class Control(Message):
    id: int
    verb: str  # load | unload | index | statistics
    model: str = ""
    version: int | None = None


# engine -> front-end
class Deployed(msgspec.Struct, array_like=True):
    name: str
    version: int
    task: str
    provider: str
    variant: str
    device: str  # "cuda:N" or "cpu"
    max_queue_size: int  # the model's own limit: front-ends shed by it
    max_batch_size: int = 0  # its batching, as the model configuration extension reports it
    max_queue_delay_s: float = 0.0


class Catalog(Message):
    """What the engine serves now; sent on Hello and after every change."""
    models: list[Deployed]


class Result(Message):
    id: int
    data: bytes  # float32, row-major
    shape: list[int]


class Results(Message):
    """A batch's answers to one front-end: each request's rows of `width` float32 outputs, the
    requests' rows one after another in `data`."""
    ids: list[int]
    rows: list[int]  # how many rows each request has
    width: int
    data: bytes


class Failed(Message):
    id: int
    status: int  # the HTTP status the front-end answers with
    error: str


class Tokens(Message):
    """One generation step: the next token of each of these generations; `last` ends them."""
    ids: list[int]
    tokens: list[int]
    last: list[bool]


class Logprobs(Message):
    """Sent just before the Tokens message it belongs to, for the generations in it that asked: the
    log-probability of each one's token and its most likely alternatives, (id, log-probability)
    most likely first."""
    ids: list[int]
    logprobs: list[float]
    top: list[list[tuple[int, float]]]


class PromptLogprobs(Message):
    """Each prompt token's log-probability given the tokens before it (the first has none), sent
    after the prefill, before the first token; `last` ends a generation of no tokens (scoring)."""
    id: int
    logprobs: list[float | None]
    last: bool


class Stepped(Message):
    """A session step's answer: the step's top_k most likely next tokens, most likely first, with
    their probabilities (softmax over the whole vocabulary), and the tokens read so far."""
    id: int
    tokens: list[int]
    probabilities: list[float]
    total_tokens: int
    state: bytes = b""  # after the step, when asked (Step's layout)


class SessionOpened(Message):
    id: int
    session: str
    version: int


class Depths(Message):
    """Each model's queue length at this engine, sent with every frame: front-ends shed by it."""
    queued: dict[str, int]


class Done(Message):
    """A control verb's or a session's answer: JSON-able."""
    id: int
    body: dict | list


ToEngine = Hello | Infer | Generate | OpenSession | Step | CloseSession | Cancel | Control
ToFrontend = (Catalog | Result | Results | Failed | Tokens | Logprobs | PromptLogprobs | Stepped | SessionOpened
              | Depths | Done)
encode = msgspec.msgpack.Encoder().encode
decode_requests = msgspec.msgpack.Decoder(list[ToEngine]).decode
decode_replies = msgspec.msgpack.Decoder(list[ToFrontend]).decode


@dataclass(frozen=True, slots=True)
class Rows:
    """Rows of token ids as they travel: one int32 buffer end to end and their lengths, never a
    Python list per row (Infer carries their bytes)."""
    ids: np.ndarray  # (total,) int32
    lengths: np.ndarray  # (count,) int32

    @property
    def count(self) -> int:
        return len(self.lengths)

    @classmethod
    def of(cls, rows: list[list[int]]) -> "Rows":
        return cls(np.fromiter(chain.from_iterable(rows), np.int32), np.fromiter(map(len, rows), np.int32, len(rows)))
